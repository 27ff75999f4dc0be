"""GatedMLP: the SwiGLU feed-forward that follows the mixer in a Block when d_intermediate > 0 (mamba_ssm
``modules/mlp.py``)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers import linear


class GatedMLP(nnx.Module):
    """y, gate = fc1(x).split(2); out = fc2(y * activation(gate)).

    The hidden width defaults to int(8 * in_features / 3) and is always rounded up to a multiple of ``multiple_of``,
    also when given explicitly (as mamba_ssm does). Parameters: fc1 kernel (in_features, 2 * hidden), fc2 kernel
    (hidden, out_features), with biases when ``bias``. ``y`` is the first half of fc1's output, ``gate`` the second.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
        bias: bool = False,
        multiple_of: int = 128,
        device=None,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        for name, value in (("in_features", in_features), ("multiple_of", multiple_of)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GatedMLP: {name} must be a positive int, got {value!r}")
        for name, value in (("hidden_features", hidden_features), ("out_features", out_features)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"GatedMLP: {name} must be a positive int or None, got {value!r}")
        if device is not None:
            raise ValueError(f"GatedMLP: device must be None (place arrays with jax sharding instead), got {device!r}")
        out_features = in_features if out_features is None else out_features
        hidden = int(8 * in_features / 3) if hidden_features is None else hidden_features
        hidden = -(-hidden // multiple_of) * multiple_of

        self.hidden_features = hidden
        self.activation = activation
        common = dict(use_bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(in_features, 2 * hidden, axes=("embed", "mlp"), **common)
        self.fc2 = linear(hidden, out_features, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., in_features) -> (..., out_features)."""
        y, gate = jnp.split(self.fc1(x), 2, axis=-1)
        return self.fc2(y * self.activation(gate))
