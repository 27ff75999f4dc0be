"""``mamba_step`` as three Pallas GPU kernels (Triton) and two XLA sums: a Mamba-1 mixer's decode step in 5 launches
where XLA's op-by-op step takes about 12 (docs/kernels.md, "Fused Mamba-1 decode step").

One batch row is a GEMV (products summed after the loop); more rows are padded to a power of 2 of at least 16
(``tl.dot``'s smallest tile) and masked. Past one row out_proj and x_proj are XLA's products (x_proj's per-block
partial sums below grow with the rows: 10 MB a layer at 1.4b, batch 64); in_proj stays the first kernel's, every
row in one tile, up to MAX_PROJ_ROWS rows. Past MAX_BATCH rows the other two kernels run over blocks of MAX_BATCH
rows (a second grid axis).

1. ``proj_kernel``, grid (2di / proj_columns, splits): in_proj, each program ``proj_columns`` columns of one split
   of d_model (one loop in tiles of ``depth`` rows, loaded ``prefetch`` iterations ahead), stored as float32 partial
   sums (splits, b, 2di). Splitting d_model is what lets this kernel read in_proj near the memory bandwidth: the
   grid has enough programs (benchmarks/gemv.py). At one row from d_model ``XLA_IN_PROJ_FROM`` on, and past
   MAX_PROJ_ROWS rows, XLA's own product instead, (1, b, 2di) in the compute dtype (``in_proj_partials``).
   With a ``PreNorm`` (the block's residual add + RMSNorm) every program also loads the whole row of u + residual
   and norms the tiles of u (``prenorm_tiles``); program (0, 0) stores the sum, the next block's residual. Where
   XLA's product reads in_proj, and past one row, ``prenorm_launch`` norms u before it, one program a row (every
   program norming 4-16 rows itself made batch-16 generation 40% slower at 1.4b). Either saves XLA's three to four
   small kernels for the add + norm (docs/kernels.md).
   Past one row, where one split of d_model gives the grid enough programs, the conv follows in the same kernel
   (``conv_epilogue``: each program's columns are all x's or all z's) and 2 is not launched.
2. ``_in_kernel``, grid (di / channels,): program j owns channels j * channels ... of d_inner for every batch row:
   x and z = the sums of its partials; the conv window shifted in place; x = silu(conv); x, z stored; its share of
   x_proj, x[:, channels] @ x_proj[channels], stored as a float32 partial sum (di / channels, b, r + 2n).
   Ahead of ``_out_kernel`` it also copies its channels' SSM state, for that kernel to read.
3. XLA sums the x_proj partials -> (b, r + 2n) (past one row: XLA's product x @ x_proj instead).
4. ``_out_kernel``, grid (di / channels, d / columns): dt = dt_proj of the rounded sum, softplus; the state update
   of its (b, channels, n) state (read from the copy, stored in place by the column-0 programs); D; the silu(z)
   gate; ``columns`` columns of its share of out_proj, stored as a float32 partial sum (di / channels, b, d).
5. XLA sums the out_proj partials over di / channels.

From d_model ``XLA_OUT_PROJ_FROM`` on, and past one row, 4 and 5 are instead ``_state_kernel``, grid (di / channels,
row blocks), which updates its channels' state in place and stores y (b, di), and XLA's product y @ out_proj.

Rounding follows the reference: every projection's result and the conv's output are rounded to the compute dtype
where ``nnx.Linear`` and ``CausalConv1d`` round them; products accumulate in float32 (the conv too, rounded once).
A float32 operand's ``tl.dot`` is exact float32 (no TF32).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.batch_split import over_batch
from pallas_kernels.mamba_step.reference import (
    MambaStepWeights,
    PartialSums,
    PreNorm,
    mamba_step_reference,
    with_residual,
)
from pallas_kernels.mamba_step.tiles import (
    MIN_ROWS,
    Span,
    biased,
    conv_window,
    first_column,
    load,
    padded,
    partial_sum,
    product,
    project,
    rounded,
    store,
    sum_partials,
)
from pallas_kernels.selective_scan.kernel_math import LOG2_E, KernelMath
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported

MAX_BATCH = 16  # the batch rows one program holds (its state tile is rows x channels x n float32)
MAX_PROJ_ROWS = 64  # the batch rows in_proj's kernel holds in one tile (past them in_proj is XLA's product)
# Channels of d_inner per program and warps per program, at batch 1 and past it. Per layer on an H100 at batch 16
# (1.4b) and 64 (130m), 16 channels and 4 warps took 43.4 and 27.9 us against 46.8 and 31.8 with 64 and 8
# (benchmarks/RESULTS.md, "Past one row").
CHANNELS, BATCHED_CHANNELS = 64, 16
NUM_WARPS, BATCHED_WARPS = 8, 4
DEPTH = 128  # rows of in_proj per loop iteration of the first kernel
COLUMNS = 512  # columns of out_proj per program of the last kernel
PROJ_COLUMNS = 64  # columns of in_proj per program of the first kernel
PROJ_PROGRAMS = 256  # the first kernel's grid size that the default splits of d_model reach where they can
# Past one row in_proj's kernel holds every row (a tl.dot tile of up to MAX_PROJ_ROWS) and its loads are pipelined by
# Triton (``num_stages``, not ``prefetch``): fewer, longer programs. Per layer on an H100 at batch 64 (fp16) this
# took 57.0-59.5 / 77.7-79.0 us at 1.4b / 2.8b against 61.3-64.0 / 79.9-80.4 with XLA's GEMM, and at 130m 26.0 us
# with 96 programs against 27.3-28.3 with 144 or 48 (benchmarks/RESULTS.md). Where one split gives that many, the
# conv runs in the same kernel (``conv_in_proj``): 58.5 / 79.4 us against 59.7 / 81.1 at 1.4b / 2.8b.
BATCHED_PROJ_PROGRAMS = 96
BATCHED_PREFETCH, BATCHED_STAGES = 0, 4
# From this d_model on in_proj is XLA's own matrix-vector product, not proj_kernel: per layer on an H100 at 2.8b
# 50.7 against 54.8 us, at 1.4b 37.2 against 36.3 (benchmarks/RESULTS.md).
XLA_IN_PROJ_FROM = 2560
# From this d_model on out_proj is XLA's product too, and the last kernel only updates the state (in place): at 2.8b
# 44.9-46.4 against 51.0 us a layer. Below it XLA computes (1, 4096) @ (4096, 2048) as a multiply and a reduction
# (23 us): 54.2 against 37.4 at 1.4b, 22.3 against 17.6 at 130m (H100, benchmarks/RESULTS.md).
XLA_OUT_PROJ_FROM = 2560
# With ``partial_out`` past one row XLA's out_proj is one batched product over OUT_PARTS parts of d_inner, its float32
# partial sums left for the next block's norm launch to add (``PartialSums``): in a loop of layers on an H100 at
# 130m's size, batch 64, 1.4 us less kernel time a layer and one launch less (benchmarks/RESULTS.md).
OUT_PARTS = 4


def proj_kernel(ins, outs, *, columns: int, depth: int, prefetch: int, rows: Span, dtype, norm=None, ops=None):
    """ins: u (b, d), in_proj (d, m) [with ``norm``: norm_weight (d,), residual (b, d) float32 unless the first
    block's]. outs: xz (splits, b, m) float32, partial sums of u @ in_proj [with ``norm``: residual (b, d) float32].

    Grid (cdiv(m, columns), splits): program (j, s) multiplies rows s d / splits ... (s + 1) d / splits of u and
    in_proj's columns j columns ... (a split of the rows gives the grid enough programs to keep the memory busy).
    ``norm``: None, or the norm's eps (one row only): u is then normed first (``prenorm_tiles``).

    With ``ops`` (Mamba-1, one split, columns dividing di) the conv follows in the same program (``conv_epilogue``):
    ins also hold [in_proj_bias (2di,)], conv_state (b, w, di), conv (w, di) [conv_bias (di,)], and outs are
    conv_state (aliased), x and z (b, di) instead of xz."""
    column, split = pl.program_id(0), pl.program_id(1)
    splits, width = outs["xz"].shape[0] if "xz" in outs else 1, ins["in_proj"].shape[1]
    span = ins["u"].shape[1] // splits
    first = first_column(column, columns, width)
    prepare, finish = None, None
    if norm is not None:
        prepare, finish = prenorm_tiles(ins, outs, rows, norm, write=(column == 0) & (split == 0))
    acc = project(
        ins["u"], ins["in_proj"], first, rows, columns, depth, dtype, prefetch, split * span, span // depth, prepare
    )
    if finish is not None:
        acc = acc * finish()
    if ops is not None:
        conv_epilogue(ins, outs, acc, first, rows, dtype, ops)
    else:
        store(outs["xz"], acc, split, rows, Span(first, columns, columns))


def conv_epilogue(ins, outs, acc, first, rows: Span, dtype, ops: KernelMath) -> None:
    """``proj_kernel``'s sums acc (rows, columns) float32 of in_proj's columns first ... (all x's or all z's) on to
    what ``_in_kernel`` makes of them: x's through the conv window (shifted in place) and the SiLU, z's stored."""
    d_inner, columns = ins["conv"].shape[1], acc.shape[1]
    value = biased(rounded(acc, dtype), ins.get("in_proj_bias"), Span(first, columns, columns), dtype)

    @pl.when(first < d_inner)
    def _():
        lanes = Span(first, columns, columns)
        store(outs["x"], conv_window(ins, outs, rows, lanes, value, dtype, ops), rows, lanes)

    @pl.when(first >= d_inner)
    def _():
        store(outs["z"], value, rows, Span(first - d_inner, columns, columns))


def prenorm_tiles(ins, outs, rows: Span, eps: float, write):
    """The block's residual add + RMSNorm in front of in_proj (``PreNorm``) for ``project``, at one batch row (a
    GEMV, whose products are float32): every program loads s = u + residual over the whole of d (6 bytes an
    element, from L2 after the first program). Returns (prepare, finish): ``prepare`` maps a float32 tile of u from
    column ``row`` on to (u + residual) * weight in float32; ``finish()``, called after the loop, stores s where
    ``write`` holds (outs["residual"]) and returns 1 / rms(s), the factor for the loop's sums, so that no program
    waits for the row's reduction before it reads in_proj. The normed u is then not rounded to the norm's dtype
    (more exact than the reference, by at most that rounding)."""
    d = ins["u"].shape[1]
    whole = Span(0, pl.next_power_of_2(d), d)

    def weighted(tile, row):
        span = Span(row, tile.shape[1], tile.shape[1])
        return add_residual(ins, tile, rows, span) * load(ins["norm_weight"], span)[None]

    s = add_residual(ins, load(ins["u"], rows, whole), rows, whole)  # (rows, padded d)

    def finish():
        @pl.when(write)
        def _():
            store(outs["residual"], s, rows, whole)

        return inverse_rms(s, d, eps)

    return weighted, finish


def add_residual(ins, u, rows, span: Span) -> jax.Array:
    """float32 u (rows, span) plus the residual's (ins["residual"]) same elements, where the block has one."""
    return u if "residual" not in ins else u + load(ins["residual"], rows, span)


def inverse_rms(s, d: int, eps: float) -> jax.Array:
    """1 / sqrt(mean(s^2) + eps) per row of s (rows, padded d), its first d columns the row (the rest zero)."""
    return lax.rsqrt(jnp.sum(s * s, axis=1, keepdims=True) / d + eps)


def prenorm_inputs(prenorm: PreNorm) -> dict:
    """The norm kernels' inputs from a PreNorm: norm_weight, and the residual unless the first block's."""
    ins = {"norm_weight": prenorm.weight}
    if prenorm.residual is not None:
        ins["residual"] = prenorm.residual
    return ins


def in_proj_partials(
    u,
    in_proj,
    prenorm: PreNorm | None,
    *,
    xla: bool,
    columns: int,
    depth: int,
    prefetch: int,
    splits: int,
    dtype,
    params,
    interpret: bool,
    name: str,
) -> tuple[jax.Array, jax.Array | None]:
    """(u (b, d) @ in_proj (d, m) without its bias, the new residual or None): ``proj_kernel``'s float32 partial sums
    (splits, b, m), or with ``xla`` XLA's own product in ``dtype``, (1, b, m): ``sum_partials`` takes either. With
    ``prenorm`` u is normed first (as ``_proj_call`` does it, or by ``prenorm_launch`` before XLA's product) and the
    float32 residual (b, d) comes second, else None."""
    batch, width = u.shape[0], in_proj.shape[1]
    if xla:
        residual = None
        if prenorm is not None:
            u, residual = prenorm_launch(u, prenorm, interpret)
        return (u.astype(dtype) @ in_proj.astype(dtype))[None], residual
    out_shape = {"xz": jax.ShapeDtypeStruct((splits, batch, width), jnp.float32)}
    options = dict(columns=columns, depth=depth, prefetch=prefetch, dtype=dtype, params=params, interpret=interpret)
    result = _proj_call(u, prenorm, {"in_proj": in_proj}, out_shape, splits=splits, name=name, **options)
    return result["xz"], result.get("residual")


def in_proj_conv(u, weights: dict, conv_state, prenorm: PreNorm | None, *, interpret: bool, **options) -> dict:
    """in_proj and the conv in one launch (``proj_kernel`` with ``conv_epilogue``, one split): {conv_state (the
    window, updated in place), x, z (b, di) in the compute dtype, residual (b, d) float32 or None}. ``weights``: the
    in_proj, in_proj_bias, conv and conv_bias entries of ``MambaStepWeights._asdict()``; ``options``: columns,
    depth, prefetch, dtype, params, name, as ``in_proj_partials`` takes them (columns dividing di)."""
    batch, d_inner = u.shape[0], conv_state.shape[2]
    ins = {"conv_state": conv_state} | _pick(weights, "in_proj", "in_proj_bias", "conv", "conv_bias")
    out_shape = {
        "conv_state": jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        "x": jax.ShapeDtypeStruct((batch, d_inner), options["dtype"]),
        "z": jax.ShapeDtypeStruct((batch, d_inner), options["dtype"]),
    }
    result = _proj_call(u, prenorm, ins, out_shape, splits=1, interpret=interpret, conv=True, **options)
    return result | {"residual": result.get("residual")}


def _proj_call(
    u, prenorm, ins, out_shape, *, splits, columns, depth, prefetch, dtype, params, interpret, name, conv=False
):
    """``proj_kernel`` over the grid (cdiv(m, columns), splits) on u and ``ins`` (in_proj and, with ``conv``, what
    ``conv_epilogue`` reads, its conv_state updated in place). Every batch row in one tile (one row: a GEMV; more:
    tl.dot, MAX_PROJ_ROWS at most). ``prenorm``, if given, norms u first, its float32 residual added to the results
    as "residual": inside the kernel at one row, by ``prenorm_launch`` past it (every program norming 4-16 rows
    itself made batch-16 generation 40% slower at 1.4b)."""
    residual = None
    if prenorm is not None and u.shape[0] > 1:
        u, residual = prenorm_launch(u, prenorm, interpret)
        prenorm = None
    ins = {"u": u} | ins
    out_shape = dict(out_shape)
    norm = None
    if prenorm is not None:
        ins |= prenorm_inputs(prenorm)
        out_shape["residual"] = jax.ShapeDtypeStruct(u.shape, jnp.float32)
        norm = prenorm.eps
    batch, width = u.shape[0], ins["in_proj"].shape[1]
    rows = Span(0, 1 if batch == 1 else padded(batch), batch)
    aliases = {sorted(ins).index("conv_state"): sorted(out_shape).index("conv_state")} if conv else {}
    kernel = functools.partial(
        proj_kernel,
        columns=columns,
        depth=depth,
        prefetch=prefetch,
        rows=rows,
        dtype=dtype,
        norm=norm,
        ops=KernelMath(interpret) if conv else None,
    )
    result = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(width, columns), splits),
        input_output_aliases=aliases,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )(ins)
    return result if residual is None else result | {"residual": residual}


def prenorm_launch(u, prenorm: PreNorm, interpret: bool) -> tuple[jax.Array, jax.Array]:
    """``prenormed(u, prenorm)`` as one launch, one program a batch row (XLA takes three to four kernels for it at
    batch 1): (the normed u (b, d) in prenorm.dtype, the residual (b, d) float32). u (b, d), or a ``PartialSums``
    whose parts the launch adds."""
    parts = isinstance(u, PartialSums)
    result = pl.pallas_call(
        functools.partial(_norm_kernel, eps=prenorm.eps, dtype=u.dtype if parts else None),
        out_shape={
            "residual": jax.ShapeDtypeStruct(u.shape, jnp.float32),
            "x": jax.ShapeDtypeStruct(u.shape, prenorm.dtype),
        },
        grid=(u.shape[0],),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="mamba_step_norm",
    )({"u": u.sums if parts else u} | prenorm_inputs(prenorm))
    return result["x"], result["residual"]


def _norm_kernel(ins, outs, *, eps: float, dtype):
    """ins: u (b, d), or with ``dtype`` float32 partial sums (parts, b, d) whose sum rounded to ``dtype`` is u;
    norm_weight (d,) [residual (b, d) float32]. outs: x (b, d), residual (b, d) float32. Program r: batch row r, its
    whole row at once."""
    row, d = Span(pl.program_id(0), 1, 1), ins["u"].shape[-1]
    whole = Span(0, pl.next_power_of_2(d), d)
    u = load(ins["u"], row, whole) if dtype is None else rounded(partial_sum(ins["u"], row, whole), dtype)
    s = add_residual(ins, u, row, whole)
    store(outs["residual"], s, row, whole)
    store(outs["x"], s * inverse_rms(s, d, eps) * load(ins["norm_weight"], whole)[None], row, whole)


def _in_kernel(ins, outs, *, channels: int, rows: Span, dtype, ops: KernelMath):
    """ins: xz (splits, b, 2di) (``in_proj_partials``) [in_proj_bias (2di,)], conv_state
    (b, w, di), conv (w, di) [conv_bias (di,)] [x_proj (di, r + 2n)] [ssm_state (b, di, n)]. outs: conv_state
    (aliased), x and z (b, di) [with x_proj: partial (di / channels, b, r + 2n) float32, this block's share of
    x @ x_proj] [old_state: a copy of ssm_state, for ``_out_kernel`` to read while it writes the new state over
    ssm_state]. Grid (di / channels, cdiv(b, rows.size))."""
    block = pl.program_id(0)
    rows = program_rows(rows, ins["conv_state"].shape[0])
    first = pl.multiple_of(block * channels, channels)
    d_inner = ins["conv"].shape[1]
    lanes = Span(first, channels, channels)
    if "ssm_state" in ins:
        d_state = ins["ssm_state"].shape[2]
        states = Span(0, pl.next_power_of_2(d_state), d_state)
        store(outs["old_state"], load(ins["ssm_state"], rows, lanes, states), rows, lanes, states)
    z_lanes = Span(d_inner + first, channels, channels)
    bias = ins.get("in_proj_bias")
    x = sum_partials(ins["xz"], rows, lanes, bias, dtype)
    store(outs["z"], sum_partials(ins["xz"], rows, z_lanes, bias, dtype), rows, lanes)
    x = conv_window(ins, outs, rows, lanes, x, dtype, ops)
    store(outs["x"], x, rows, lanes)
    if "partial" not in outs:  # x_proj is XLA's product
        return
    columns = Span(0, padded(outs["partial"].shape[2]), outs["partial"].shape[2])
    x_proj = load(ins["x_proj"], lanes, columns).astype(dtype)
    store(outs["partial"], product(x, x_proj), block, rows, columns)


def _update(ins, lanes: Span, rows: Span, dtype, ops: KernelMath):
    """Channel block ``lanes``'s step from x_proj's result on: dt = softplus(dt_proj of dt + dt_bias), the state
    update, D and the silu(z) gate. ins: x, z (b, di), x_dbl (b, r + 2n) (x_proj's result: a float32 sum before
    rounding, or XLA's product in ``dtype``), dt_proj (r, di), dt_bias (di,), A_log (di, n), D (di,), ssm_state
    (b, di, n). Returns the new state (rows, channels, padded n) float32 and y (rows, channels) in ``dtype``."""
    rank, d_state = ins["dt_proj"].shape[0], ins["A_log"].shape[1]
    states = Span(0, pl.next_power_of_2(d_state), d_state)
    dt = rounded(load(ins["x_dbl"], rows, Span(0, padded(rank), rank)), dtype)  # (rows, padded rank)
    B = rounded(load(ins["x_dbl"], rows, Span(rank, states.size, d_state)), dtype)  # (rows, n)
    C = rounded(load(ins["x_dbl"], rows, Span(rank + d_state, states.size, d_state)), dtype)
    dt_proj = load(ins["dt_proj"], Span(0, padded(rank), rank), lanes).astype(dtype)
    dt = rounded(product(dt.astype(dtype), dt_proj), dtype) + load(ins["dt_bias"], lanes)
    dt = ops.softplus(dt)  # (rows, channels)

    A = -jnp.exp(load(ins["A_log"], lanes, states))  # (channels, n)
    state = load(ins["ssm_state"], rows, lanes, states)  # (rows, channels, n)
    x = load(ins["x"], rows, lanes)
    decay = ops.exp2((dt * LOG2_E)[:, :, None] * A[None])
    state = ops.fma(decay, state, (dt * x)[:, :, None] * B[:, None, :])

    y = jnp.sum(state * C[:, None, :], axis=2)
    y = ops.fma(load(ins["D"], lanes), x, y)
    z = load(ins["z"], rows, lanes)
    return state, (y * (z * ops.sigmoid(z))).astype(dtype)


def _out_kernel(ins, outs, *, channels: int, columns: int, rows: Span, dtype, ops: KernelMath):
    """ins: as ``_update``'s (ssm_state: ``_in_kernel``'s copy of the old state), out_proj (di, d), and the state's
    own buffer (``state_buffer``, aliased to outs' ssm_state, never read). outs: ssm_state (the new state, in
    place), out (di / channels, b, d) float32.

    Grid (di / channels, d / columns): program (j, k) updates channel block j's state (every k computes it; k = 0
    stores it) and writes columns k * columns ... of its share of out_proj. Every k reads the old state from the
    copy, so the k = 0 programs may write over the state's buffer while the others still compute: the new state
    needs no buffer of its own (which cost a copy into the decode loop's carry, ~1.5 us a layer)."""
    block, column = pl.program_id(0), pl.program_id(1)
    first = pl.multiple_of(block * channels, channels)
    lanes = Span(first, channels, channels)
    state, y = _update(ins, lanes, rows, dtype, ops)

    @pl.when(column == 0)
    def _():
        store(outs["ssm_state"], state, rows, lanes, Span(0, state.shape[2], ins["A_log"].shape[1]))

    start = pl.multiple_of(column * columns, columns)
    out_proj = ins["out_proj"][pl.ds(first, channels), pl.ds(start, columns)].astype(dtype)
    store(outs["out"], product(y, out_proj), block, rows, Span(start, columns, columns))


def _state_kernel(ins, outs, *, channels: int, rows: Span, dtype, ops: KernelMath):
    """ins: as ``_update``'s. outs: ssm_state (aliased, updated in place), y (b, di) in ``dtype``, which XLA
    multiplies by out_proj. Grid (di / channels, cdiv(b, rows.size)): each program the sole reader and writer of its
    channels' state in its rows."""
    lanes = Span(pl.multiple_of(pl.program_id(0) * channels, channels), channels, channels)
    rows = program_rows(rows, ins["x"].shape[0])
    state, y = _update(ins, lanes, rows, dtype, ops)
    ops.barrier()  # in place: every warp has read the state before any writes
    store(outs["ssm_state"], state, rows, lanes, Span(0, state.shape[2], ins["A_log"].shape[1]))
    store(outs["y"], y, rows, lanes)


def batch_rows(batch: int) -> Span:
    """The batch rows a program holds: one as a GEMV, more padded (``padded``) for tl.dot and masked; past MAX_BATCH
    a block of MAX_BATCH rows (``program_rows``)."""
    if batch > MAX_BATCH:
        return Span(0, MAX_BATCH, MAX_BATCH)
    return Span(0, 1 if batch == 1 else padded(batch), batch)


def program_rows(rows: Span, batch: int) -> Span:
    """The batch rows of this program: ``rows`` where they hold the whole batch, else block ``pl.program_id(1)`` of
    ``rows.size`` rows (the last one masked where it overhangs the batch)."""
    if rows.size >= batch:
        return rows
    start = pl.multiple_of(pl.program_id(1) * rows.size, rows.size)
    return Span(start, rows.size, batch - start)


def depth_for(d_model: int, depth: int = DEPTH) -> int:
    """The largest power of 2 of at most ``depth`` dividing ``d_model`` (at least MIN_ROWS where ``supports`` holds);
    also the channels of d_inner a program owns, from CHANNELS."""
    while d_model % depth:
        depth //= 2
    return depth


def default_splits(d_model: int, d_inner: int, depth: int, proj_columns: int, programs: int = PROJ_PROGRAMS) -> int:
    """The fewest splits of d_model (each a multiple of ``depth`` rows) that give in_proj's kernel ``programs``
    programs, or the most there can be."""
    candidates = [s for s in range(1, d_model // depth + 1) if d_model % (s * depth) == 0]
    enough = [s for s in candidates if s * (2 * d_inner // proj_columns) >= programs]
    return enough[0] if enough else candidates[-1]


def supports(batch: int, d_model: int, d_inner: int) -> bool:
    """Whether the kernels take this shape: d_model and d_inner multiples of 16 (past MAX_BATCH rows, with both
    projections by XLA)."""
    return batch >= 1 and d_model % MIN_ROWS == 0 and d_inner % MIN_ROWS == 0


def xla_projections(caller: str, batch: int, d_model: int, xla_in_proj, xla_out_proj, *, in_from: int, out_from=None):
    """(xla_in_proj, xla_out_proj) as given, a None resolved: XLA's product past one row (Mamba-2's kernels' tl.dot
    tiles were slower than its GEMMs: docs/kernels.md; ``mamba_step_pallas`` resolves its in_proj before) or from
    d_model ``in_from`` / ``out_from`` on (None: not at batch 1). Where
    the projections' kernels (which hold every row) do not run, past MAX_PROJ_ROWS rows for in_proj and MAX_BATCH
    for out_proj, ValueError for a False."""
    for name, wanted, most in (("xla_in_proj", xla_in_proj, MAX_PROJ_ROWS), ("xla_out_proj", xla_out_proj, MAX_BATCH)):
        if batch > most and wanted is False:
            raise ValueError(f"{caller}: batch {batch} > {most} needs {name} True (XLA's product) or None, got False")
    if xla_in_proj is None:
        xla_in_proj = batch > 1 or d_model >= in_from
    if xla_out_proj is None:
        xla_out_proj = batch > 1 or (out_from is not None and d_model >= out_from)
    return bool(xla_in_proj), bool(xla_out_proj)


def mamba_step_pallas(
    u: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: MambaStepWeights,
    dtype,
    *,
    prenorm: PreNorm | None = None,
    interpret: bool | None = None,
    channels: int | None = None,
    depth: int = DEPTH,
    columns: int = COLUMNS,
    prefetch: int | None = None,
    proj_columns: int = PROJ_COLUMNS,
    splits: int | None = None,
    xla_in_proj: bool | None = None,
    xla_out_proj: bool | None = None,
    xla_x_proj: bool | None = None,
    conv_in_proj: bool | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    partial_out: bool = False,
) -> tuple[jax.Array, ...]:
    """The step in five launches (three kernels, two sums), or past one row in four or five (in_proj's kernel with
    the conv or before the conv kernel, XLA's x_proj, the state kernel, XLA's out_proj); arguments (``prenorm``
    included: normed in the first kernel at one row, by a launch of its own past it) and results as
    ``mamba_step_reference``, shapes there and ``supports``.

    ``interpret`` None runs the compiled kernels where ``pallas_supported()``, else Pallas's interpreter (slow; for
    tests). The options set the programs' sizes and roles; the defaults are the measured best on an H100
    (benchmarks/mamba_step.py):
    ``channels``: a power of 2 of at least 16 dividing d_inner; None: the largest such of at most CHANNELS, or
    BATCHED_CHANNELS past one row.
    ``depth``: the rows of in_proj a loop iteration reads, a power of 2.
    ``proj_columns``: the columns of in_proj a program reads, a power of 2.
    ``splits``: how many parts d_model is cut into for in_proj, each a multiple of ``depth``; None:
    ``default_splits`` for PROJ_PROGRAMS programs, or BATCHED_PROJ_PROGRAMS past one row (1 with ``conv_in_proj``).
    ``columns``: the columns of out_proj a program of the last kernel writes, a power of 2.
    ``prefetch``: see ``project``; None: 1, or BATCHED_PREFETCH past one row.
    ``xla_in_proj``: in_proj by XLA's product instead of the first kernel; None: at one row from d_model
    XLA_IN_PROJ_FROM on, past one row in float32, and past MAX_PROJ_ROWS rows.
    ``xla_out_proj``: out_proj by XLA's product (the last kernel then only updates the state, in place, and writes
    y); None: past one row or from d_model XLA_OUT_PROJ_FROM on; always past MAX_BATCH rows, where the other kernels
    run over blocks of MAX_BATCH rows.
    ``xla_x_proj``: x_proj by XLA's product of the second kernel's x instead of per-block float32 partial sums from
    that kernel; None: past one row.
    ``conv_in_proj``: the conv in in_proj's kernel (one split of d_model) instead of a launch of its own; None: past
    one row where in_proj's kernel runs, x_proj and out_proj are XLA's, proj_columns divide d_inner and one split
    gives BATCHED_PROJ_PROGRAMS programs.
    ``num_warps`` (None: NUM_WARPS, or BATCHED_WARPS past one row) and ``num_stages`` (None: 3, or BATCHED_STAGES
    past one row): Triton's.
    ``partial_out``: where XLA computes out_proj past one row and it has no bias, return out as a ``PartialSums``
    (OUT_PARTS float32 parts over d_inner) for the next block's step to add; elsewhere out as always. u may be a
    ``PartialSums`` itself (the previous block's out): with a prenorm past one row the norm launch adds its parts,
    else XLA first.
    Derivatives (jax.grad, jax.jvp) are the reference's.
    """
    batch, d_model = u.shape
    d_inner = conv_state.shape[2]
    if channels is None:
        channels = depth_for(d_inner, CHANNELS if batch == 1 else BATCHED_CHANNELS)
    if num_warps is None:
        num_warps = NUM_WARPS if batch == 1 else BATCHED_WARPS
    if prefetch is None:
        prefetch = 1 if batch == 1 else BATCHED_PREFETCH
    if num_stages is None:
        num_stages = 3 if batch == 1 else BATCHED_STAGES
    depth, proj_columns = depth_for(d_model, depth), depth_for(2 * d_inner, proj_columns)
    if not supports(batch, d_model, d_inner) or d_inner % channels or channels < MIN_ROWS or channels & (channels - 1):
        raise ValueError(
            f"mamba_step_pallas: needs d_model a multiple of {MIN_ROWS} and d_inner a multiple of channels "
            f"({channels}, a power of 2 of at least {MIN_ROWS}), got batch {batch}, d_model {d_model}, "
            f"d_inner {d_inner}"
        )
    # Past one row in_proj's kernel (BATCHED_PROJ_PROGRAMS) in 16-bit compute dtypes only: float32 operands make
    # tl.dot exact float32, without the tensor cores, 5.4x slower than XLA's product (474 against 89 us a layer at
    # 1.4b, batch 64; benchmarks/RESULTS.md).
    if xla_in_proj is None and 1 < batch <= MAX_PROJ_ROWS and jnp.dtype(dtype).itemsize == 2:
        xla_in_proj = False
    xla_in_proj, xla_out_proj = xla_projections(
        "mamba_step_pallas",
        batch,
        d_model,
        xla_in_proj,
        xla_out_proj,
        in_from=XLA_IN_PROJ_FROM,
        out_from=XLA_OUT_PROJ_FROM,
    )
    if xla_x_proj is None:
        xla_x_proj = batch > 1
    fusable = batch > 1 and not xla_in_proj and xla_out_proj and xla_x_proj and d_inner % proj_columns == 0
    if conv_in_proj is None:  # where one split of d_model already gives in_proj's kernel enough programs
        enough = 2 * d_inner // proj_columns >= BATCHED_PROJ_PROGRAMS
        conv_in_proj = fusable and splits in (None, 1) and enough
    if conv_in_proj and not fusable:
        raise ValueError(
            "mamba_step_pallas: conv_in_proj needs more than one row, in_proj by the kernel (xla_in_proj False), "
            f"x_proj and out_proj by XLA and d_inner a multiple of proj_columns ({proj_columns}); got batch {batch}, "
            f"d_inner {d_inner}, xla_in_proj={xla_in_proj}, xla_x_proj={xla_x_proj}, xla_out_proj={xla_out_proj}"
        )
    if splits is None:
        programs = PROJ_PROGRAMS if batch == 1 else BATCHED_PROJ_PROGRAMS
        splits = 1 if conv_in_proj else default_splits(d_model, d_inner, depth, proj_columns, programs)
    if not isinstance(splits, int) or splits < 1 or d_model % (splits * depth) or (conv_in_proj and splits != 1):
        raise ValueError(
            f"mamba_step_pallas: splits must be a positive int dividing d_model / depth = {d_model} / {depth} (1 "
            f"with conv_in_proj), got {splits!r}"
        )
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    config = (jnp.dtype(dtype), bool(interpret), channels, depth, columns, int(prefetch))
    config += (proj_columns, splits, xla_in_proj, xla_out_proj, bool(xla_x_proj), bool(conv_in_proj))
    parts = partial_out and batch > 1 and xla_out_proj and weights.out_proj_bias is None and d_inner % OUT_PARTS == 0
    config += (num_warps, num_stages, OUT_PARTS if parts else 1)
    return _step(u, conv_state, ssm_state, weights, prenorm, config)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _step(u, conv_state, ssm_state, weights, prenorm, config):
    """The kernels, each device on its rows of the batch in a sharded jit (the weights whole on every device); with
    out_parts (config's last) > 1 they return y and out_proj's partial sums are XLA's product here."""
    results = step_over_batch(functools.partial(_kernels, config=config), u, conv_state, ssm_state, weights, prenorm)
    dtype, out_parts = config[0], config[-1]
    if out_parts == 1:
        return results
    out = PartialSums(split_product(results[0], weights.out_proj.astype(dtype), out_parts), dtype)
    return (out, *results[1:])


def split_product(x: jax.Array, w: jax.Array, parts: int) -> jax.Array:
    """x (b, k) @ w (k, n) by XLA as float32 partial sums (parts, b, n) over ``parts`` equal parts of k: one batched
    product, with no reduction launch after it."""
    (b, k), n = x.shape, w.shape[1]
    x, w = x.reshape(b, parts, k // parts), w.reshape(parts, k // parts, n)
    return jnp.einsum("bpk,pkn->pbn", x, w, preferred_element_type=jnp.float32)


def step_over_batch(kernels, u, conv_state, ssm_state, weights, prenorm: PreNorm | None):
    """``kernels(u, conv_state, ssm_state, weights, prenorm)``, each device on its rows of the batch in a sharded jit
    (``over_batch``): u (or its ``PartialSums``, batch second), the states and the prenorm's residual split as they
    are, the weights (a NamedTuple; None for an absent parameter) and the prenorm's weight whole on every device."""
    batched, batched_tree = jax.tree.flatten((u, conv_state, ssm_state, None if prenorm is None else prenorm.residual))
    # u's only leaf comes first: a PartialSums' sums (parts, b, d) have the batch second
    batch_dims = [1 if isinstance(u, PartialSums) else True] + [True] * (len(batched) - 1)
    whole, whole_tree = jax.tree.flatten((weights, None if prenorm is None else prenorm.weight))
    static = None if prenorm is None else (prenorm.eps, prenorm.dtype)

    def rows(*arrays):
        u, conv_state, ssm_state, residual = jax.tree.unflatten(batched_tree, arrays[: len(batched)])
        weights, norm_weight = jax.tree.unflatten(whole_tree, arrays[len(batched) :])
        norm = None if static is None else PreNorm(residual, norm_weight, *static)
        return kernels(u, conv_state, ssm_state, weights, norm)

    return over_batch(rows, batched + whole, batch_dims + [False] * len(whole))


def _kernels(u, conv_state, ssm_state, weights, prenorm, config):
    dtype, interpret, channels, depth, columns, prefetch, proj_columns, splits, xla_in_proj = config[:9]
    xla_out_proj, xla_x_proj, conv_in_proj, num_warps, num_stages, out_parts = config[9:]
    batch, d_model = u.shape
    # Only the norm launch (with a prenorm, past one row of this device's split) adds a PartialSums' parts itself;
    # at one row in_proj's kernel norms u, and without a prenorm nothing does: XLA adds them first.
    if isinstance(u, PartialSums) and (prenorm is None or batch == 1):
        u = u.total()
    d_inner = conv_state.shape[2]
    blocks = d_inner // channels
    rows = batch_rows(batch)
    common_out = dict(channels=channels, rows=rows, dtype=dtype, ops=KernelMath(interpret))
    params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    w = weights._asdict()

    proj = dict(columns=proj_columns, depth=depth, prefetch=prefetch, dtype=dtype, params=params, interpret=interpret)
    if conv_in_proj:
        first = in_proj_conv(u, w, conv_state, prenorm, name="mamba_step_proj_conv", **proj)
        residual = first["residual"]
    else:
        xz, residual = in_proj_partials(
            u, weights.in_proj, prenorm, xla=xla_in_proj, splits=splits, name="mamba_step_proj", **proj
        )
        first = _in_launch(xz, conv_state, ssm_state, weights, common_out, params, xla_x_proj, xla_out_proj)

    ins = {
        "x": first["x"],
        "z": first["z"],
        "x_dbl": first["x"] @ weights.x_proj.astype(dtype) if xla_x_proj else first["partial"].sum(axis=0),
        "ssm_state": ssm_state,
        **_pick(w, "dt_proj", "dt_bias", "A_log", "D"),
    }
    if xla_out_proj:
        second = pl.pallas_call(
            functools.partial(_state_kernel, **common_out),
            input_output_aliases={sorted(ins).index("ssm_state"): 0},
            out_shape={
                "ssm_state": jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype),
                "y": jax.ShapeDtypeStruct((batch, d_inner), dtype),
            },
            grid=(blocks, pl.cdiv(batch, rows.size)),
            compiler_params=params,
            interpret=interpret,
            name="mamba_step_state",
        )(ins)
        out = second["y"] if out_parts > 1 else second["y"] @ weights.out_proj.astype(dtype)  # see _step
    else:
        out_columns = depth_for(d_model, columns)
        ins |= {"ssm_state": first["old_state"], "state_buffer": ssm_state, "out_proj": weights.out_proj}
        second = pl.pallas_call(
            functools.partial(_out_kernel, **common_out, columns=out_columns),
            input_output_aliases={sorted(ins).index("state_buffer"): 1},  # outs: out, ssm_state
            out_shape={
                "out": jax.ShapeDtypeStruct((blocks, batch, d_model), jnp.float32),
                "ssm_state": jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype),
            },
            grid=(blocks, d_model // out_columns),
            compiler_params=params,
            interpret=interpret,
            name="mamba_step_out",
        )(ins)
        out = second["out"].sum(axis=0).astype(dtype)
    if weights.out_proj_bias is not None:
        out = out + weights.out_proj_bias.astype(dtype)
    return with_residual((out, first["conv_state"], second["ssm_state"]), residual)


def _in_launch(xz, conv_state, ssm_state, weights, common_out: dict, params, xla_x_proj: bool, xla_out_proj: bool):
    """``_in_kernel`` on in_proj's partial sums xz: {conv_state (in place), x, z [partial] [old_state]}."""
    batch, _, d_inner = conv_state.shape
    rows, dtype, interpret = common_out["rows"], common_out["dtype"], common_out["ops"].interpret
    blocks = d_inner // common_out["channels"]
    ins = {"xz": xz, "conv_state": conv_state} | _pick(weights._asdict(), "in_proj_bias", "conv", "conv_bias")
    out_shape = {
        "conv_state": jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        "x": jax.ShapeDtypeStruct((batch, d_inner), dtype),
        "z": jax.ShapeDtypeStruct((batch, d_inner), dtype),
    }
    if not xla_x_proj:
        ins["x_proj"] = weights.x_proj
        out_shape["partial"] = jax.ShapeDtypeStruct((blocks, batch, weights.x_proj.shape[1]), jnp.float32)
    if not xla_out_proj:  # _out_kernel reads the old state from a copy (its docstring)
        ins["ssm_state"] = ssm_state
        out_shape["old_state"] = jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype)
    # The conv window is updated in place (each program reads and writes only its own channels; in a decode loop this
    # saves a copy of the window), and so is the SSM state by the last kernel.
    return pl.pallas_call(
        functools.partial(_in_kernel, **common_out),
        input_output_aliases={sorted(ins).index("conv_state"): sorted(out_shape).index("conv_state")},
        out_shape=out_shape,
        grid=(blocks, pl.cdiv(batch, rows.size)),
        compiler_params=params,
        interpret=interpret,
        name="mamba_step_in",
    )(ins)


def _pick(weights: dict, *names: str) -> dict:
    """The named weights that are not None."""
    return {name: weights[name] for name in names if weights[name] is not None}


@_step.defjvp
def _step_jvp(config, primals, tangents):
    dtype, out_parts = config[0], config[-1]

    def reference(u, conv_state, ssm_state, weights, prenorm):
        results = mamba_step_reference(u, conv_state, ssm_state, weights, dtype, prenorm)
        if out_parts == 1:
            return results
        # the reference's out as the first of out_parts parts, the others zero: the same sum
        sums = jnp.zeros((out_parts, *results[0].shape), jnp.float32).at[0].set(results[0].astype(jnp.float32))
        return (PartialSums(sums, dtype), *results[1:])

    return jax.jvp(reference, primals, tangents)
