"""mamba-jax: Mamba and Mamba-2 selective state space models in JAX / Flax NNX."""

from mamba_jax.block import Block
from mamba_jax.config import PRESETS, MambaConfig
from mamba_jax.generation import Generator, generate
from mamba_jax.layers import LayerNorm, RMSNorm
from mamba_jax.mamba1 import Mamba
from mamba_jax.mamba2 import Mamba2, RMSNormGated
from mamba_jax.mha import MHA
from mamba_jax.mlp import GatedMLP
from mamba_jax.model import MambaLMHeadModel, MixerModel, create_block

__all__ = [
    "MHA",
    "PRESETS",
    "Block",
    "GatedMLP",
    "Generator",
    "LayerNorm",
    "Mamba",
    "Mamba2",
    "MambaConfig",
    "MambaLMHeadModel",
    "MixerModel",
    "RMSNorm",
    "RMSNormGated",
    "create_block",
    "generate",
    "load_pretrained",
]


def __getattr__(name: str):
    # load_pretrained pulls in orbax, huggingface_hub and the converter (which itself imports mamba_jax): import it on
    # first use, so `import mamba_jax` stays light and free of import cycles.
    if name == "load_pretrained":
        from mamba_jax.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'mamba_jax' has no attribute {name!r}")
