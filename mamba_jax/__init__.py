"""mamba-jax: Mamba and Mamba-2 selective state space models in JAX / Flax NNX."""

from mamba_jax.block import Block
from mamba_jax.config import PRESETS, MambaConfig
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
    "LayerNorm",
    "Mamba",
    "Mamba2",
    "MambaConfig",
    "MambaLMHeadModel",
    "MixerModel",
    "RMSNorm",
    "RMSNormGated",
    "create_block",
]
