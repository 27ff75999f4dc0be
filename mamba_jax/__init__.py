"""mamba-jax: Mamba and Mamba-2 selective state space models in JAX / Flax NNX."""

from mamba_jax.layers import LayerNorm, RMSNorm

__all__ = ["LayerNorm", "RMSNorm"]
