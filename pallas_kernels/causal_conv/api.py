"""``causal_conv1d``: check the arguments, dispatch on ``implementation``."""

import functools
import logging
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import python_bool
from pallas_kernels.causal_conv.pallas import MAX_WIDTH, causal_conv1d_pallas
from pallas_kernels.causal_conv.reference import causal_conv1d_reference
from pallas_kernels.causal_conv.xla import causal_conv1d_xla
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported

logger = logging.getLogger("pallas_kernels")
IMPLEMENTATIONS = ("reference", "xla", "pallas")


def causal_conv1d(
    x: jax.Array,
    kernel: jax.Array,
    bias: jax.Array | None = None,
    *,
    silu: bool = False,
    initial_states: jax.Array | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Depthwise causal conv over time, channels last: y_t = sum_k kernel[k] x_{t - (w - 1) + k} (+ bias), then
    SiLU if ``silu``; returned in x's dtype, computed in float32 (in x's dtype by "xla"). x before t = 0 is
    ``initial_states`` (a cached window continued, as in a prefill), or 0.

    x (b, l, c) floating; kernel (w, c); bias (c,) or None; initial_states (b, w - 1, c) or None, the inputs at
    t = -(w - 1) .. -1 (differentiable). ``implementation``: "reference" (XLA ops in float32),
    "xla" (XLA ops in x's dtype, fused by XLA with its neighbours), "pallas" (GPU kernels, float32 inside; ``interpret``
    None runs them compiled where Pallas supports the GPU, else in Pallas's interpreter), or None: "pallas" on a
    supported GPU for w <= MAX_WIDTH, else "xla".

    Reverse-mode differentiable (``jax.grad`` / ``jax.vjp``) in x, kernel, bias and initial_states; "pallas" is a
    ``custom_vjp``, so ``jax.jvp`` needs another implementation.
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    bias = None if bias is None else jnp.asarray(bias)
    initial_states = None if initial_states is None else jnp.asarray(initial_states)
    silu = python_bool("causal_conv1d: silu", silu)
    if x.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != x.shape[2] or kernel.shape[0] < 1:
        raise ValueError(
            f"causal_conv1d: x must be (batch, seqlen, channels) and kernel (width >= 1, channels); got x {x.shape}, "
            f"kernel {kernel.shape}"
        )
    for name, a in (("x", x), ("kernel", kernel), ("bias", bias), ("initial_states", initial_states)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"causal_conv1d: {name} must have a floating dtype, got {a.dtype}")
    if bias is not None and bias.shape != kernel.shape[1:]:
        raise ValueError(f"causal_conv1d: bias must have shape {kernel.shape[1:]}, got {bias.shape}")
    history = (x.shape[0], kernel.shape[0] - 1, x.shape[2])
    if initial_states is not None and initial_states.shape != history:
        raise ValueError(
            f"causal_conv1d: initial_states must have shape (batch, width - 1, channels) = {history}, "
            f"got {initial_states.shape}"
        )
    if history[1] == 0:  # width 1: nothing before x is ever read
        initial_states = None
    if implementation is None:
        implementation = "pallas" if _pallas_default() and kernel.shape[0] <= MAX_WIDTH else "xla"
    if implementation == "reference":
        return causal_conv1d_reference(x, kernel, bias, silu, initial_states)
    if implementation == "xla":
        return causal_conv1d_xla(x, kernel, bias, silu, initial_states)
    if implementation != "pallas":
        raise ValueError(
            f"causal_conv1d: implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}"
        )
    if kernel.shape[0] > MAX_WIDTH:
        raise ValueError(f"causal_conv1d: the Pallas kernels take widths up to {MAX_WIDTH}, got {kernel.shape[0]}")
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    return causal_conv1d_pallas(x, kernel, bias, silu, interpret, initial_states=initial_states)


@functools.cache
def _pallas_default() -> bool:
    usable = pallas_supported()
    logger.info("causal_conv1d: default implementation %s", "pallas" if usable else "xla")
    return usable
