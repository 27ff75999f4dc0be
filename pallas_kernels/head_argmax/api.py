"""``head_argmax``: check the arguments, dispatch on ``implementation``."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import python_int
from pallas_kernels.head_argmax.pallas import head_argmax_pallas, supports
from pallas_kernels.head_argmax.reference import head_argmax_reference
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported

IMPLEMENTATIONS = ("reference", "pallas")
LAYOUTS = ("vd", "dv")


def head_argmax(
    hidden: jax.Array,
    head: jax.Array,
    *,
    layout: str = "vd",
    vocab_size: int | None = None,
    implementation: str | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Greedy decoding's next tokens: the arg-max of hidden @ head over the first ``vocab_size`` logits, int32 (b,).

    hidden (b, d) floating, the final normed hidden states; head (V, d) for ``layout`` "vd" (a tied embedding), or
    (d, V) for "dv" (an ``lm_head`` kernel), cast to hidden's dtype; vocab_size (default V) leaves the padding rows of
    a padded vocabulary out. The logits are products in hidden's dtype accumulated in float32, as
    ``MambaLMHeadModel.logits`` computes them; on ties the first index wins (``jnp.argmax``). A row whose logits
    hold a NaN gets the first NaN's index from "reference" (``jnp.argmax``), vocab_size - 1 from "pallas".

    implementation: "reference" (XLA: the float32 logits, then their arg-max), "pallas" (one GPU kernel that keeps
      only each tile's largest logit and its index, then one XLA reduction over those; without a supported GPU it
      runs in Pallas's interpreter, slowly), or None: "pallas" on a GPU Pallas compiles for where the kernel takes
      the shape (d a multiple of 16, vocab_size >= 16), else "reference". Not differentiable (an index).
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"head_argmax: implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    if layout not in LAYOUTS:
        raise ValueError(f"head_argmax: layout must be one of {LAYOUTS}, got {layout!r}")
    hidden, head = jnp.asarray(hidden), jnp.asarray(head)
    if hidden.ndim != 2 or not jnp.issubdtype(hidden.dtype, jnp.floating):
        raise ValueError(f"head_argmax: hidden must be floating (batch, d_model), got {hidden.shape} {hidden.dtype}")
    d_model = hidden.shape[1]
    want = "(vocab, d_model)" if layout == "vd" else "(d_model, vocab)"
    head_d, vocab = (head.shape[-1], head.shape[0]) if layout == "vd" else (head.shape[0], head.shape[-1])
    if head.ndim != 2 or head_d != d_model:
        raise ValueError(
            f"head_argmax: head must have shape {want} with d_model {d_model} for layout {layout!r}, got {head.shape}"
        )
    vocab_size = vocab if vocab_size is None else python_int("head_argmax: vocab_size", vocab_size)
    if vocab_size > vocab:
        raise ValueError(f"head_argmax: vocab_size must be an int in [1, {vocab}], got {vocab_size!r}")
    head = head.astype(hidden.dtype)
    rows = layout == "vd"
    if implementation is None:
        implementation = "pallas" if _pallas_default() and supports(d_model, vocab_size) else "reference"
    if implementation == "reference":
        return head_argmax_reference(hidden, head, vocab_size, rows)
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    return head_argmax_pallas(hidden, head, vocab_size, rows, interpret)


@functools.cache
def _pallas_default() -> bool:
    return pallas_supported()
