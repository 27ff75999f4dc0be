"""The causal conv as XLA ops in float32: the reference every implementation is tested against."""

import jax
import jax.numpy as jnp


def causal_conv1d_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, silu: bool) -> jax.Array:
    """y_t = sum_k kernel[k] x_{t - (w - 1) + k} (+ bias), then SiLU if ``silu``; x before the sequence is 0.

    x (b, l, c) floating; kernel (w, c); bias (c,) or None. Returns (b, l, c) in x's dtype, computed in float32 and
    rounded once (as torch's Conv1d(c, c, w, groups=c, padding=w - 1) truncated to l, in float32)."""
    width, length = kernel.shape[0], x.shape[1]
    padded = jnp.pad(x.astype(jnp.float32), ((0, 0), (width - 1, 0), (0, 0)))
    kernel = kernel.astype(jnp.float32)
    y = sum(padded[:, k : k + length] * kernel[k] for k in range(width))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return (jax.nn.silu(y) if silu else y).astype(x.dtype)
