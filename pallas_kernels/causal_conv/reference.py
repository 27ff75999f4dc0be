"""The causal conv as XLA ops in float32: the reference every implementation is tested against."""

import jax
import jax.numpy as jnp


def causal_conv1d_reference(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, silu: bool, initial_states: jax.Array | None = None
) -> jax.Array:
    """y_t = sum_k kernel[k] x_{t - (w - 1) + k} (+ bias), then SiLU if ``silu``; x before the sequence is
    ``initial_states`` (its last row at t = -1), or 0.

    x (b, l, c) floating; kernel (w, c); bias (c,) or None; initial_states (b, w - 1, c) or None. Returns (b, l, c)
    in x's dtype, computed in float32 and rounded once (as torch's Conv1d(c, c, w, groups=c, padding=w - 1)
    truncated to l, in float32)."""
    width, length = kernel.shape[0], x.shape[1]
    padded = with_history(x.astype(jnp.float32), initial_states, width)
    kernel = kernel.astype(jnp.float32)
    y = sum(padded[:, k : k + length] * kernel[k] for k in range(width))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return (jax.nn.silu(y) if silu else y).astype(x.dtype)


def with_history(x: jax.Array, initial_states: jax.Array | None, width: int) -> jax.Array:
    """x (b, l, c) after the w - 1 steps before it: ``initial_states`` (b, w - 1, c) cast to x's dtype, or zeros
    -> (b, w - 1 + l, c)."""
    if initial_states is None:
        return jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    return jnp.concatenate([initial_states.astype(x.dtype), x], axis=1)
