"""Text generation: decode caches, sampling, and ``generate`` (prefill + a compiled decode loop), and
``lower_generate``, its program ahead of time (for benchmarks).

``python -m mamba_jax.generate`` is the command line (``mamba_jax/generation/cli.py``).
"""

from mamba_jax.generation.cache import AttentionCache, SSMCache
from mamba_jax.generation.loop import GenerateArgs, Generator, generate, lower_generate
from mamba_jax.generation.sampling import SamplingConfig

__all__ = ["AttentionCache", "GenerateArgs", "Generator", "SSMCache", "SamplingConfig", "generate", "lower_generate"]
