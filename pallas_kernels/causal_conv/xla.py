"""The causal conv as XLA ops in the input's dtype: the path off a GPU, and Mamba-2's (XLA fuses it with the slices
of in_proj's output around it)."""

import jax

from pallas_kernels.causal_conv.reference import with_history


def causal_conv1d_xla(
    x: jax.Array, kernel: jax.Array, bias: jax.Array | None, silu: bool, initial_states: jax.Array | None = None
) -> jax.Array:
    """As ``causal_conv1d_reference``, in x's dtype: w shifted products and their sum, which XLA fuses into the ops
    that produce x and consume y. x (b, l, c); kernel (w, c) and bias (c,) cast to x's dtype; initial_states
    (b, w - 1, c) or None. Returns (b, l, c)."""
    width, length = kernel.shape[0], x.shape[1]
    padded = with_history(x, initial_states, width)
    kernel = kernel.astype(x.dtype)
    y = sum(padded[:, k : k + length] * kernel[k] for k in range(width))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return jax.nn.silu(y) if silu else y
