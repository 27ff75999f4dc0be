"""Text generation: decode caches, sampling, and ``generate`` (prefill + a compiled decode loop).

``python -m mamba_jax.generate`` is the command line (``mamba_jax/generation/cli.py``).
"""

from mamba_jax.generation.cache import AttentionCache, SSMCache
from mamba_jax.generation.loop import generate
from mamba_jax.generation.sampling import SamplingConfig

__all__ = ["AttentionCache", "SSMCache", "SamplingConfig", "generate"]
