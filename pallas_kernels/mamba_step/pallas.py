"""``mamba_step`` as two Pallas GPU kernels (Triton) and two XLA sums: a Mamba-1 mixer's decode step in 4 launches
where XLA's op-by-op step takes about 12 (docs/kernels.md, "Fused Mamba-1 decode step").

Program j of either kernel owns channels j * channels ... of d_inner for every batch row; one batch row is a GEMV
(products summed after the loop), more rows are padded to a power of 2 of at least 16 (``tl.dot``'s smallest tile)
and masked.

1. ``_in_kernel``, grid (di / channels,): x and z = u @ in_proj[:, its channels of each half] (one loop over d in
   tiles of ``depth``, loaded ``prefetch`` iterations ahead); the conv window shifted in place; x = silu(conv);
   x, z stored; its share of x_proj, x[:, channels] @ x_proj[channels], stored as a float32 partial sum
   (di / channels, b, r + 2n); a copy of its part of the old SSM state.
2. XLA sums the x_proj partials -> (b, r + 2n).
3. ``_out_kernel``, grid (di / channels, d / columns): dt = dt_proj of the rounded sum, softplus; the state update
   of its (b, channels, n) state (written in place by the column-0 programs); D; the silu(z) gate; ``columns``
   columns of its share of out_proj, stored as a float32 partial sum (di / channels, b, d).
4. XLA sums the out_proj partials over di / channels.

Rounding follows the reference: every projection's result and the conv's output are rounded to the compute dtype
where ``nnx.Linear`` and ``CausalConv1d`` round them; products accumulate in float32 (the conv too, rounded once).
A float32 operand's ``tl.dot`` is exact float32 (no TF32).
"""

from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.batch_split import over_batch
from pallas_kernels.mamba_step.reference import MambaStepWeights, mamba_step_reference
from pallas_kernels.selective_scan.kernel_math import LOG2_E, KernelMath
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported
from pallas_kernels.selective_scan.pallas_fwd import as_index
from pallas_kernels.state_update.pallas import combined_mask

MIN_ROWS = 16  # tl.dot's smallest M, N and K
MAX_BATCH = 16  # the batch rows one program holds (its state tile is rows x channels x n float32)
CHANNELS = 64  # channels of d_inner per program
DEPTH = 128  # rows of in_proj per loop iteration of the first kernel
COLUMNS = 512  # columns of out_proj per program of the second kernel


class Span(NamedTuple):
    """``size`` consecutive positions from ``start`` along one dimension, the first ``valid`` of them in range."""

    start: object
    size: int
    valid: int

    def slice(self) -> pl.Slice:
        return pl.ds(self.start, self.size)

    def mask(self) -> jax.Array | None:
        return lax.iota(jnp.int32, self.size) < self.valid if self.valid < self.size else None


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


def _load(ref, *index) -> jax.Array:
    """float32 ref[index]; positions out of range read as 0."""
    view, mask = _view(ref, index)
    value = view[...] if mask is None else plt.load(view, mask=mask, other=0)
    return value.astype(jnp.float32)


def _store(ref, value: jax.Array, *index) -> None:
    """ref[index] = value in ref's dtype, positions out of range skipped."""
    view, mask = _view(ref, index)
    plt.store(view, value.astype(ref.dtype), mask=mask)


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (rows, k) @ b (k, n) accumulated in float32: one row as products summed over k (a GEMV), more with tl.dot
    (float32 operands exactly: IEEE, not TF32)."""
    if a.shape[0] == 1:
        return jnp.sum(a.astype(jnp.float32).T * b.astype(jnp.float32), axis=0, keepdims=True)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _rounded(x: jax.Array, dtype) -> jax.Array:
    """x rounded to ``dtype`` and back to float32."""
    return x.astype(dtype).astype(jnp.float32)


def _project(u_ref, kernel_ref, firsts, rows: Span, channels: int, depth: int, dtype, prefetch: int):
    """[u (b, d) @ kernel[:, first : first + channels] for first in firsts] in float32, each (rows, channels), in one
    loop over d in tiles of ``depth``. One row keeps (depth, channels) products and sums them after the loop.
    ``prefetch``: how many iterations ahead the tiles are loaded: iteration k loads tile k + prefetch, then uses tile
    k, loaded earlier, so that prefetch + 1 tiles are in flight (the last iterations load the last tile again,
    unused)."""
    steps = u_ref.shape[1] // depth
    gemv = rows.size == 1
    shape = (depth, channels) if gemv else (rows.size, channels)

    def load(k):
        start = k * depth if isinstance(k, int) else pl.multiple_of(k * depth, depth)
        kernels = tuple(kernel_ref[pl.ds(start, depth), pl.ds(first, channels)] for first in firsts)
        return _load(u_ref, rows, Span(start, depth, depth)), kernels

    def accumulate(accs, tiles):
        u, kernels = tiles
        u = u.astype(dtype)
        if gemv:
            u = u.astype(jnp.float32).T
            return tuple(acc + u * k.astype(dtype).astype(jnp.float32) for acc, k in zip(accs, kernels, strict=True))
        return tuple(acc + _product(u, k.astype(dtype)) for acc, k in zip(accs, kernels, strict=True))

    def tile(k, carry):
        accs, loaded = carry
        loaded = (*loaded, load(jnp.minimum(k + prefetch, steps - 1)))
        return accumulate(accs, loaded[0]), loaded[1:]

    zeros = tuple(jnp.zeros(shape, jnp.float32) for _ in firsts)
    accs, _ = lax.fori_loop(0, steps, tile, (zeros, tuple(load(min(k, steps - 1)) for k in range(prefetch))))
    return [jnp.sum(acc, axis=0, keepdims=True) if gemv else acc for acc in accs]


def _in_kernel(ins, outs, *, channels: int, depth: int, prefetch: int, rows: Span, dtype, ops: KernelMath):
    """ins: u (b, d), in_proj (d, 2di) [in_proj_bias (2di,)], conv_state (b, w, di), conv (w, di) [conv_bias (di,)],
    x_proj (di, r + 2n), ssm_state (b, di, n). outs: conv_state (aliased), x and z (b, di), partial (di / channels, b,
    r + 2n) float32, old_state (b, di, n) float32: a copy of ssm_state (see ``_out_kernel``)."""
    block = pl.program_id(0)
    first = pl.multiple_of(block * channels, channels)
    d_inner = ins["conv"].shape[1]
    lanes = Span(first, channels, channels)
    states = Span(0, pl.next_power_of_2(ins["ssm_state"].shape[2]), ins["ssm_state"].shape[2])
    _store(outs["old_state"], _load(ins["ssm_state"], rows, lanes, states), rows, lanes, states)
    x, z = _project(ins["u"], ins["in_proj"], (first, d_inner + first), rows, channels, depth, dtype, prefetch)
    if "in_proj_bias" in ins:
        x = _rounded(x, dtype) + _load(ins["in_proj_bias"], lanes)
        z = _rounded(z, dtype) + _load(ins["in_proj_bias"], Span(d_inner + first, channels, channels))
    x = _rounded(x, dtype)
    _store(outs["z"], z, rows, lanes)

    width = ins["conv"].shape[0]
    taps = [_load(ins["conv_state"], rows, k, lanes) for k in range(1, width)] + [x]
    conv = 0.0
    for k, tap in enumerate(taps):  # oldest first, as the reference sums them
        _store(outs["conv_state"], tap, rows, k, lanes)
        conv = conv + _rounded(tap, dtype) * _rounded(_load(ins["conv"], k, lanes), dtype)
    if "conv_bias" in ins:
        conv = conv + _rounded(_load(ins["conv_bias"], lanes), dtype)
    conv = _rounded(conv, dtype)
    x = (conv * ops.sigmoid(conv)).astype(dtype)
    _store(outs["x"], x, rows, lanes)

    columns = Span(0, _padded(outs["partial"].shape[2]), outs["partial"].shape[2])
    x_proj = _load(ins["x_proj"], lanes, columns).astype(dtype)
    _store(outs["partial"], _product(x, x_proj), block, rows, columns)


def _out_kernel(ins, outs, *, channels: int, columns: int, rows: Span, dtype, ops: KernelMath):
    """ins: x, z (b, di), x_dbl (b, r + 2n) float32 (x_proj's result before rounding), dt_proj (r, di), dt_bias (di,),
    A_log (di, n), D (di,), old_state (b, di, n) float32, ssm_state (b, di, n) (not read), out_proj (di, d).
    outs: ssm_state (aliased), out (di / channels, b, d) float32.

    Grid (di / channels, d / columns): program (j, k) updates channel block j's state (every k computes it; k = 0
    stores it) and writes columns k * columns ... of its share of out_proj. The programs read the state from the
    first kernel's copy: reading ssm_state itself would race with the k = 0 programs writing the new state there."""
    block, column = pl.program_id(0), pl.program_id(1)
    first = pl.multiple_of(block * channels, channels)
    lanes = Span(first, channels, channels)
    rank, d_state = ins["dt_proj"].shape[0], ins["A_log"].shape[1]

    states = Span(0, pl.next_power_of_2(d_state), d_state)
    # Where d_state is not a power of 2, C's padded columns overhang the array's end (masked); Pallas rejects such a
    # slice when its start is a known number, so B's and C's starts are traced values.
    traced = block * 0
    dt = _rounded(_load(ins["x_dbl"], rows, Span(0, _padded(rank), rank)), dtype)  # (rows, padded rank)
    B = _rounded(_load(ins["x_dbl"], rows, Span(traced + rank, states.size, d_state)), dtype)  # (rows, n)
    C = _rounded(_load(ins["x_dbl"], rows, Span(traced + rank + d_state, states.size, d_state)), dtype)
    dt_proj = _load(ins["dt_proj"], Span(0, _padded(rank), rank), lanes).astype(dtype)
    dt = _rounded(_product(dt.astype(dtype), dt_proj), dtype) + _load(ins["dt_bias"], lanes)
    dt = ops.softplus(dt)  # (rows, channels)

    A = -jnp.exp(_load(ins["A_log"], lanes, states))  # (channels, n)
    state = _load(ins["old_state"], rows, lanes, states)  # (rows, channels, n)
    x = _load(ins["x"], rows, lanes)
    decay = ops.exp2((dt * LOG2_E)[:, :, None] * A[None])
    state = ops.fma(decay, state, (dt * x)[:, :, None] * B[:, None, :])

    @pl.when(column == 0)
    def _():
        _store(outs["ssm_state"], state, rows, lanes, states)

    y = jnp.sum(state * C[:, None, :], axis=2)
    y = ops.fma(_load(ins["D"], lanes), x, y)
    z = _load(ins["z"], rows, lanes)
    y = (y * (z * ops.sigmoid(z))).astype(dtype)
    start = pl.multiple_of(column * columns, columns)
    out_proj = ins["out_proj"][pl.ds(first, channels), pl.ds(start, columns)].astype(dtype)
    _store(outs["out"], _product(y, out_proj), block, rows, Span(start, columns, columns))


def _padded(n: int) -> int:
    """n rounded up to a power of 2 of at least MIN_ROWS (a tl.dot operand's dimension)."""
    return max(MIN_ROWS, pl.next_power_of_2(n))


def depth_for(d_model: int, depth: int = DEPTH) -> int:
    """The largest power of 2 of at most ``depth`` dividing ``d_model`` (at least MIN_ROWS where ``supports`` holds);
    also the channels of d_inner a program owns, from CHANNELS."""
    while d_model % depth:
        depth //= 2
    return depth


def supports(batch: int, d_model: int, d_inner: int) -> bool:
    """Whether the kernels take this shape: batch <= MAX_BATCH, d_model and d_inner multiples of 16."""
    return batch <= MAX_BATCH and d_model % MIN_ROWS == 0 and d_inner % MIN_ROWS == 0


def mamba_step_pallas(
    u: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: MambaStepWeights,
    dtype,
    *,
    interpret: bool | None = None,
    channels: int | None = None,
    depth: int = DEPTH,
    columns: int = COLUMNS,
    prefetch: int = 2,
    num_warps: int = 8,
    num_stages: int = 3,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The step in four launches (two kernels, two sums); arguments and results as ``mamba_step_reference``, shapes
    there and ``supports``.

    ``interpret`` None runs the compiled kernels where ``pallas_supported()``, else Pallas's interpreter (slow; for
    tests). ``channels`` (a power of 2 of at least 16 dividing d_inner; None: the largest such of at most CHANNELS),
    ``depth`` (the rows of in_proj a loop iteration reads, a power of 2), ``columns`` (the columns of out_proj a
    program of the second kernel writes, a power of 2), ``prefetch`` (see ``_project``), ``num_warps`` and
    ``num_stages`` set the programs' size and Triton's; the defaults are the measured best on an H100
    (benchmarks/mamba_step.py). Derivatives (jax.grad, jax.jvp) are the reference's.
    """
    batch, d_model = u.shape
    d_inner = conv_state.shape[2]
    if channels is None:
        channels = depth_for(d_inner, CHANNELS)
    if not supports(batch, d_model, d_inner) or d_inner % channels or channels < MIN_ROWS or channels & (channels - 1):
        raise ValueError(
            f"mamba_step_pallas: needs batch <= {MAX_BATCH}, d_model a multiple of {MIN_ROWS} and d_inner a multiple "
            f"of channels ({channels}, a power of 2 of at least {MIN_ROWS}), got batch {batch}, d_model {d_model}, "
            f"d_inner {d_inner}"
        )
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    config = (jnp.dtype(dtype), bool(interpret), channels, depth, columns, int(prefetch), num_warps, num_stages)
    return _step(u, conv_state, ssm_state, weights, config)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _step(u, conv_state, ssm_state, weights, config):
    """The kernels, each device on its rows of the batch in a sharded jit (the weights whole on every device)."""
    present = {name: value for name, value in weights._asdict().items() if value is not None}
    names = sorted(present)

    def kernels(u, conv_state, ssm_state, *arrays):
        weights = MambaStepWeights(
            **{**dict.fromkeys(MambaStepWeights._fields), **dict(zip(names, arrays, strict=True))}
        )
        return _kernels(u, conv_state, ssm_state, weights, config)

    arrays = [u, conv_state, ssm_state, *(present[name] for name in names)]
    return over_batch(kernels, arrays, [True] * 3 + [False] * len(names))


def _kernels(u, conv_state, ssm_state, weights, config):
    dtype, interpret, channels, depth, columns, prefetch, num_warps, num_stages = config
    batch, d_model = u.shape
    d_inner = conv_state.shape[2]
    blocks = d_inner // channels
    width = weights.x_proj.shape[1]
    common_out = dict(
        channels=channels,
        rows=Span(0, 1 if batch == 1 else max(MIN_ROWS, pl.next_power_of_2(batch)), batch),
        dtype=dtype,
        ops=KernelMath(interpret),
    )
    common = dict(common_out, depth=depth_for(d_model, depth), prefetch=prefetch)
    params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    w = weights._asdict()

    ins = {"u": u, "conv_state": conv_state, "ssm_state": ssm_state}
    ins |= _pick(w, "in_proj", "in_proj_bias", "conv", "conv_bias", "x_proj")
    first = pl.pallas_call(
        functools.partial(_in_kernel, **common),
        out_shape={
            "conv_state": jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
            "old_state": jax.ShapeDtypeStruct(ssm_state.shape, jnp.float32),
            "partial": jax.ShapeDtypeStruct((blocks, batch, width), jnp.float32),
            "x": jax.ShapeDtypeStruct((batch, d_inner), dtype),
            "z": jax.ShapeDtypeStruct((batch, d_inner), dtype),
        },
        grid=(blocks,),
        input_output_aliases={sorted(ins).index("conv_state"): 0},  # outs flatten in sorted key order
        compiler_params=params,
        interpret=interpret,
        name="mamba_step_in",
    )(ins)

    ins = {
        "x": first["x"],
        "z": first["z"],
        "x_dbl": first["partial"].sum(axis=0),
        "old_state": first["old_state"],
        "ssm_state": ssm_state,
        **_pick(w, "dt_proj", "dt_bias", "A_log", "D", "out_proj"),
    }
    aliases = {sorted(ins).index("ssm_state"): 1} if ssm_state.dtype == jnp.float32 else {}
    out_columns = depth_for(d_model, columns)
    second = pl.pallas_call(
        functools.partial(_out_kernel, **common_out, columns=out_columns),
        out_shape={
            "out": jax.ShapeDtypeStruct((blocks, batch, d_model), jnp.float32),
            "ssm_state": jax.ShapeDtypeStruct(ssm_state.shape, jnp.float32),
        },
        grid=(blocks, d_model // out_columns),
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name="mamba_step_out",
    )(ins)

    out = second["out"].sum(axis=0).astype(dtype)
    if weights.out_proj_bias is not None:
        out = out + weights.out_proj_bias.astype(dtype)
    return out, first["conv_state"], second["ssm_state"]


def _pick(weights: dict, *names: str) -> dict:
    """The named weights that are not None."""
    return {name: weights[name] for name in names if weights[name] is not None}


@_step.defjvp
def _step_jvp(config, primals, tangents):
    def reference(u, conv_state, ssm_state, weights):
        return mamba_step_reference(u, conv_state, ssm_state, weights, config[0])

    return jax.jvp(reference, primals, tangents)
