"""Block-level pieces the decode-step kernels share (``mamba_step``, ``mamba2_step``, ``head_argmax``): spans of
positions with their masks, float32 loads and masked stores, the one-row (GEMV) or ``tl.dot`` product, rounding as
the reference rounds, in_proj's tiled loop (``project``), sums of partial results, and the conv window's step."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.selective_scan.kernel_math import KernelMath
from pallas_kernels.selective_scan.pallas_fwd import as_index
from pallas_kernels.state_update.pallas import combined_mask, masked_ds

MIN_ROWS = 16  # tl.dot's smallest M, N and K


class Span(NamedTuple):
    """``size`` consecutive positions from ``start`` along one dimension, the first ``valid`` of them in range."""

    start: object
    size: int
    valid: int

    @property
    def in_range(self) -> bool:
        """All ``size`` positions in range (known while tracing)."""
        return isinstance(self.valid, int) and self.valid >= self.size

    def slice(self) -> pl.Slice:
        return masked_ds(self.start, self.size, not self.in_range)

    def mask(self) -> jax.Array | None:
        return None if self.in_range else lax.iota(jnp.int32, self.size) < self.valid


def _view(ref, index):
    """ref.at[index] and the mask of its in-range elements (None: all): Spans become slices, others indices."""
    parts, masks, shape = [], [], []
    for part in index:
        if isinstance(part, Span):
            parts.append(part.slice())
            masks.append(part.mask())
            shape.append(part.size)
        else:
            parts.append(as_index(part))
    return ref.at[tuple(parts)], combined_mask(masks, shape)


def load(ref, *index) -> jax.Array:
    """float32 ref[index]; positions out of range read as 0."""
    view, mask = _view(ref, index)
    value = view[...] if mask is None else plt.load(view, mask=mask, other=0)
    return value.astype(jnp.float32)


def store(ref, value: jax.Array, *index) -> None:
    """ref[index] = value in ref's dtype, positions out of range skipped."""
    view, mask = _view(ref, index)
    plt.store(view, value.astype(ref.dtype), mask=mask)


def product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (rows, k) @ b (k, n) accumulated in float32: one row as products summed over k (a GEMV), more with tl.dot
    (float32 operands exactly: IEEE, not TF32)."""
    if a.shape[0] == 1:
        return jnp.sum(a.astype(jnp.float32).T * b.astype(jnp.float32), axis=0, keepdims=True)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def rounded(x: jax.Array, dtype) -> jax.Array:
    """x rounded to ``dtype`` and back to float32."""
    return x.astype(dtype).astype(jnp.float32)


def project(
    u_ref,
    kernel_ref,
    first,
    rows: Span,
    columns: int,
    depth: int,
    dtype,
    prefetch: int,
    start,
    steps: int,
    prepare=None,
):
    """u (b, d) @ kernel[start : start + steps * depth, first : first + columns] in float32, (rows, columns), in one
    loop over the rows in tiles of ``depth``. One batch row keeps (depth, columns) products and sums them after the
    loop. ``prefetch``: how many iterations ahead the tiles are loaded: iteration k loads tile k + prefetch, then
    uses tile k, loaded earlier, so that prefetch + 1 tiles are in flight (the last iterations load the last tile
    again, unused). ``start`` is a traced multiple of ``depth``. ``prepare(tile, row)``, if given, maps each float32
    (rows, depth) tile of u, from u's column ``row`` on, to what is multiplied: as it is in a GEMV (products in
    float32), rounded to ``dtype`` for ``tl.dot``. Without it u's tiles are rounded to ``dtype``."""
    gemv = rows.size == 1

    def fetch(k):
        row = pl.multiple_of(start + k * depth, depth)
        u = load(u_ref, rows, Span(row, depth, depth))
        if prepare is not None:
            u = prepare(u, row)
        return u, kernel_ref[pl.ds(row, depth), pl.ds(first, columns)]

    def tile(k, carry):
        acc, loaded = carry
        loaded = (*loaded, fetch(jnp.minimum(k + prefetch, steps - 1)))
        u, kernel = loaded[0]
        kernel = kernel.astype(dtype)
        if not gemv:
            acc = acc + product(u.astype(dtype), kernel)
        elif prepare is not None:  # a prepared tile as prepare gives it
            acc = acc + u.T * kernel.astype(jnp.float32)
        else:
            acc = acc + rounded(u, dtype).T * kernel.astype(jnp.float32)
        return acc, loaded[1:]

    zeros = jnp.zeros((depth, columns) if gemv else (rows.size, columns), jnp.float32)
    acc, _ = lax.fori_loop(0, steps, tile, (zeros, tuple(fetch(min(k, steps - 1)) for k in range(prefetch))))
    return jnp.sum(acc, axis=0, keepdims=True) if gemv else acc


def first_column(column, columns: int, width: int):
    """The first of the ``columns`` columns that program ``column`` of a grid of cdiv(width, columns) programs
    covers: column * columns, except for a last block that would overhang ``width``, which ends at ``width`` instead
    (overlapping its neighbour, which computes and stores the same values)."""
    if width % columns == 0:
        return pl.multiple_of(column * columns, columns)
    return pl.multiple_of(jnp.minimum(column * columns, width - columns), width & -width)


def partial_sum(ref, rows, span: Span) -> jax.Array:
    """float32 sum over ref (parts, b, m)'s first axis of its ``rows`` (an index or a Span), columns ``span``."""
    return functools.reduce(jnp.add, [load(ref, part, rows, span) for part in range(ref.shape[0])])


def sum_partials(xz_ref, rows, span: Span, bias_ref, dtype) -> jax.Array:
    """Columns ``span`` of in_proj's output for ``rows`` (an index or a Span): the sum of ``proj_kernel``'s partial
    sums (xz_ref (splits, b, m)), rounded to ``dtype``, plus the rounded bias and rounded again, as ``nnx.Linear``
    computes it; float32. (A single "split" of XLA's product in ``dtype`` passes through the rounding unchanged.)"""
    return biased(rounded(partial_sum(xz_ref, rows, span), dtype), bias_ref, span, dtype)


def biased(value, bias_ref, span: Span, dtype) -> jax.Array:
    """value (rows, span) float32, already rounded to ``dtype``, plus the rounded bias (where there is one) and
    rounded again, as ``nnx.Linear`` adds it."""
    if bias_ref is None:
        return value
    return rounded(value + rounded(load(bias_ref, span), dtype), dtype)


def conv_window(ins, outs, rows: Span, lanes: Span, x, dtype, ops: KernelMath) -> jax.Array:
    """The conv step of channels ``lanes``: the window (ins["conv_state"] (b, w, di)) shifted in place with the new
    input x (rows, channels) float32 last, and silu(conv) in ``dtype`` returned."""
    width = ins["conv"].shape[0]
    window = [load(ins["conv_state"], rows, k, lanes) for k in range(1, width)] + [x]
    ops.barrier()  # the window is shifted in place: every warp reads it first
    for k, tap in enumerate(window):
        store(outs["conv_state"], tap, rows, k, lanes)
    return conv_silu(window, ins["conv"], ins.get("conv_bias"), lanes, dtype, ops).astype(dtype)


def conv_silu(window: list[jax.Array], conv_ref, bias_ref, span: Span, dtype, ops: KernelMath) -> jax.Array:
    """silu(the depthwise conv of the taps ``window``, oldest first as the reference sums them, over channels
    ``span``), the conv and the silu each rounded to ``dtype``; float32."""
    conv = 0.0
    for k, tap in enumerate(window):
        conv = conv + rounded(tap, dtype) * rounded(load(conv_ref, k, span), dtype)
    if bias_ref is not None:
        conv = conv + rounded(load(bias_ref, span), dtype)
    conv = rounded(conv, dtype)
    return rounded(conv * ops.sigmoid(conv), dtype)


def padded(n: int) -> int:
    """n rounded up to a power of 2 of at least MIN_ROWS (a tl.dot operand's dimension)."""
    return max(MIN_ROWS, pl.next_power_of_2(n))
