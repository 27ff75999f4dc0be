"""``mamba2_step`` as three Pallas GPU kernels (Triton) and one XLA sum: a Mamba-2 mixer's decode step in 4 launches
where XLA's op-by-op step takes about 12 (docs/kernels.md, "Fused Mamba-2 decode step").

1. ``proj_kernel`` (shared with ``mamba_step``), grid (cdiv(m, proj_columns), splits): in_proj, m = 2di + 2gn + h
   columns, as float32 partial sums over ``splits`` parts of d_model, (splits, b, m). From d_model
   ``XLA_IN_PROJ_FROM`` on XLA's own product instead, (1, b, m) in the compute dtype (``in_proj_partials``).
2. ``_state_kernel``, grid (h * parts, b): program (j, r) owns 1 / parts of head j // parts (p / parts channels) of
   batch row r. It adds up its columns of the partial sums (x, z, dt, and its group's B and C), runs the conv over
   its x channels (their window shifted in place) and over B and C, updates its (p / parts, n) tile of the state in
   place, and stores y (b, d_ssm): with the norm, y * silu(z) in float32 and the partial sum of its squares
   (b, h * parts); without it, y * silu(z) rounded to the compute dtype.
3. ``_out_kernel``, grid (cdiv(d, columns), splits): out_proj as partial sums (splits, b, d) float32 of the normed
   y (each tile scaled by its group's rsqrt(mean square + eps) and the norm's weight, then rounded). Program (0, 0)
   also shifts B's and C's conv window: every ``_state_kernel`` program of a group reads it, so none of them may
   write it.
4. XLA sums the out_proj partials (and adds out_proj's bias).

With ``xla_out_proj`` (the default past one row) 3 and 4 are XLA's instead: B's and C's window shifted
(``_shift_bc``), the norm (``_normed``) and out_proj's product. Past MAX_BATCH rows both projections are XLA's; the
state kernel takes any batch (one row a program).

With ``xla_state`` (the default past one row with a float32 state, where XLA's state update already runs at the
memory's bandwidth) two kernels go around XLA's ops: XLA's in_proj, the conv over xBC with its window shifted in
place (``_conv_kernel``; XLA builds the shifted window as a new array and copies it into the decode loop's carry),
XLA's state update and readout (``state_readout``), the skip, gate and gated RMSNorm in one launch
(``_gated_norm_kernel``; XLA's ops where the mixer has no norm or headdim is not a power of 2), XLA's out_proj.

Rounding follows the reference, as in ``mamba_step``. The kernels take mixers without the gated-MLP branch
(d_ssm = d_inner) and with the norm after the gate (``norm_before_gate=False``), which is every published Mamba-2.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.mamba2_step.reference import (
    DEFAULT_OPTIONS,
    Mamba2StepOptions,
    Mamba2StepWeights,
    linear,
    mamba2_step_reference,
    state_and_out,
    state_readout,
)
from pallas_kernels.mamba_step.pallas import (
    PROJ_COLUMNS,
    batch_rows,
    default_splits,
    depth_for,
    in_proj_partials,
    prenorm_launch,
    program_rows,
    step_over_batch,
    xla_projections,
)
from pallas_kernels.mamba_step.reference import PreNorm, with_residual
from pallas_kernels.mamba_step.tiles import (
    MIN_ROWS,
    Span,
    conv_silu,
    conv_window,
    first_column,
    load,
    project,
    rounded,
    store,
    sum_partials,
)
from pallas_kernels.selective_scan.kernel_math import LOG2_E, KernelMath
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported

DEPTH = 128  # rows of a projection per loop iteration
COLUMNS = 64  # columns of out_proj per program of the last kernel
PARTS = 2  # programs per head and batch row in the state kernel
# Warps of a program. The state kernel's blocks are small (p / parts channels): with 8 warps they are replicated
# over more warps, and it took 4.5 us at 1.3b with 4 against 7.3 with 8; out_proj's kernel at 2.7b took 19.9 with 4
# against 13.8 with 8 (H100, benchmarks/RESULTS.md).
NUM_WARPS, STATE_WARPS = 8, 4
CONV_CHANNELS = 32  # channels of xBC per program of the conv kernel (``xla_state``)
# From this d_model on in_proj is XLA's own matrix-vector product, not proj_kernel: per layer on an H100 at 1.3b
# 35.3 against 38.2 us and at 2.7b 45.0 against 52.8; at 130m (d_model 768) 17.7 against 16.6 (benchmarks/RESULTS.md).
XLA_IN_PROJ_FROM = 2048


def padded_span(start, size: int) -> Span:
    """``size`` positions from ``start``, padded to a power of 2 (Triton's block sizes) and masked."""
    return Span(start, pl.next_power_of_2(size), size)


def _state_kernel(ins, outs, *, parts: int, groups: int, dt_limit, dtype, ops: KernelMath):
    """ins: xz (splits, b, m) (``in_proj_partials``) [in_proj_bias (m,)], conv_state (b, w, conv_dim), conv
    (w, conv_dim) [conv_bias (conv_dim,)], dt_bias (h,), A_log (h,), D (h,) or (d_ssm,), ssm_state (b, h, p, n).
    outs: conv_state and ssm_state (aliased, updated in place), y (b, d_ssm), [sumsq (b, h * parts) float32]."""
    program, row = pl.program_id(0), pl.program_id(1)
    head, part = program // parts, program % parts
    _, heads, headdim, d_state = ins["ssm_state"].shape
    d_ssm, width = heads * headdim, ins["conv"].shape[0]
    channels = headdim // parts
    group = head // (heads // groups)
    bias = ins.get("in_proj_bias")

    # (a headdim that is not a power of 2 leaves masked lanes, which read as 0 and end as 0)
    lanes = padded_span(pl.multiple_of(head * headdim + part * channels, channels & -channels), channels)
    xbc = Span(d_ssm + lanes.start, lanes.size, channels)  # x's columns in in_proj's output
    z = sum_partials(ins["xz"], row, lanes, bias, dtype)
    x = sum_partials(ins["xz"], row, xbc, bias, dtype)
    window = [load(ins["conv_state"], row, k, lanes) for k in range(1, width)] + [x]
    x = conv_silu(window, ins["conv"], ins.get("conv_bias"), lanes, dtype, ops)  # (channels,)

    # B and C of the head's group: their conv over the cached window (shifted later, by _out_kernel).
    bc = []
    for first in (d_ssm + group * d_state, d_ssm + (groups + group) * d_state):
        span = padded_span(first, d_state)
        new = sum_partials(ins["xz"], row, Span(d_ssm + span.start, span.size, span.valid), bias, dtype)
        taps = [load(ins["conv_state"], row, k, span) for k in range(1, width)] + [new]
        bc.append(conv_silu(taps, ins["conv"], ins.get("conv_bias"), span, dtype, ops))
    B, C = bc  # (padded n,)

    dt_column = ins["xz"].shape[2] - heads + head  # the head's dt, the last h columns of in_proj
    dt = rounded(functools.reduce(jnp.add, [ins["xz"][s, row, dt_column] for s in range(ins["xz"].shape[0])]), dtype)
    if bias is not None:
        dt = rounded(dt + rounded(bias[dt_column].astype(jnp.float32), dtype), dtype)
    # per channel from here (the same value in each): Triton's inline-assembly ops take blocks, not scalars
    dt = jnp.broadcast_to(dt + ins["dt_bias"][head].astype(jnp.float32), (lanes.size,))
    dt = ops.softplus(dt)
    dt = jnp.clip(dt, *dt_limit)
    A = -jnp.exp(ins["A_log"][head].astype(jnp.float32))
    D = load(ins["D"], lanes) if ins["D"].shape[0] == d_ssm else ins["D"][head].astype(jnp.float32)

    tile = (row, head, Span(part * channels, lanes.size, channels), padded_span(0, d_state))
    state = load(ins["ssm_state"], *tile)  # (channels, padded n)
    ops.barrier()  # x's window and the state are updated in place: every warp has read them before any writes
    for k, tap in enumerate(window):
        store(outs["conv_state"], tap, row, k, lanes)
    decay = ops.exp2(dt * A * LOG2_E)[:, None]
    state = ops.fma(decay, state, (dt * x)[:, None] * B[None, :])
    store(outs["ssm_state"], state, *tile)
    y = rounded(ops.fma(D, x, jnp.sum(state * C[None, :], axis=1)), dtype)
    gated = y * (z * ops.sigmoid(z))
    if "sumsq" in outs:
        store(outs["y"], gated, row, lanes)
        outs["sumsq"][row, program] = jnp.sum(gated * gated)
    else:
        store(outs["y"], rounded(gated, dtype), row, lanes)


def _conv_kernel(ins, outs, *, start: int, channels: int, rows: Span, dtype, ops: KernelMath):
    """ins: xz (1, b, m) (XLA's in_proj product), its xBC columns from ``start`` on [in_proj_bias (m,)], conv_state
    (b, w, conv_dim), conv (w, conv_dim) [conv_bias (conv_dim,)]. outs: conv_state (aliased: the window shifted in
    place), xbc (b, conv_dim) silu(conv) in ``dtype``. Grid (cdiv(conv_dim, channels), cdiv(b, rows.size)): each
    program the sole reader and writer of its channels' window in its rows."""
    conv_dim = ins["conv_state"].shape[2]
    first = pl.multiple_of(pl.program_id(0) * channels, channels)
    lanes = Span(first, channels, conv_dim - first)
    rows = program_rows(rows, ins["conv_state"].shape[0])
    new = sum_partials(ins["xz"], rows, Span(start + first, channels, conv_dim - first), ins.get("in_proj_bias"), dtype)
    store(outs["xbc"], conv_window(ins, outs, rows, lanes, new, dtype, ops), rows, lanes)


def _gated_norm_kernel(ins, outs, *, start: int, groups: int, eps: float, dtype, ops: KernelMath):
    """ins: readout (b, h, p) float32 (``state_readout``), xbc (b, conv_dim) (x: its first h p columns), xz (1, b, m)
    (z: its h p columns from ``start`` on) [in_proj_bias (m,)], D (h,) or (h p,), norm (h p,). outs: y (b, h p) in
    ``dtype``, what ``gated`` computes with the norm. One program a batch row, its h p channels as (heads, p) (p a
    power of 2, heads padded to one)."""
    row = pl.program_id(0)
    _, heads, headdim = ins["readout"].shape
    d_ssm, padded_heads = heads * headdim, pl.next_power_of_2(heads)
    flat = Span(0, padded_heads * headdim, d_ssm)

    def as_heads(value):  # (padded_heads * p,) -> (padded_heads, p): head-major, as the channels lie
        return value.reshape(padded_heads, headdim)

    x = as_heads(load(ins["xbc"], row, flat))
    z = as_heads(sum_partials(ins["xz"], row, Span(start, flat.size, d_ssm), ins.get("in_proj_bias"), dtype))
    if ins["D"].shape[0] == d_ssm:
        D = as_heads(load(ins["D"], flat))
    else:
        D = load(ins["D"], Span(0, padded_heads, heads))[:, None]
    readout = load(ins["readout"], row, Span(0, padded_heads, heads), Span(0, headdim, headdim))
    y = rounded(readout + D * x, dtype)
    y = y * (z * ops.sigmoid(z))  # (padded heads, p); the padding's rows are 0
    per_head = jnp.sum(y * y, axis=1)  # (padded heads,)
    group = lax.iota(jnp.int32, padded_heads) // (heads // groups)
    scale = jnp.zeros((padded_heads,), jnp.float32)
    for g in range(groups):
        mean = jnp.sum(jnp.where(group == g, per_head, 0.0)) / (d_ssm // groups)
        scale = jnp.where(group == g, lax.rsqrt(mean + eps), scale)
    y = y * scale[:, None] * as_heads(load(ins["norm"], flat))
    store(outs["y"], y.reshape(flat.size), row, flat)


def _out_kernel(
    ins, outs, *, columns: int, depth: int, prefetch: int, rows: Span, groups: int, eps: float, dtype, ops: KernelMath
):
    """ins: y (b, d_ssm), [sumsq (b, h * parts) float32, norm (d_ssm,)], out_proj (di, d); for B's and C's window:
    xz (splits, b, m) [in_proj_bias (m,)], conv_state (b, w, conv_dim).
    outs: out (splits, b, d) float32 partial sums; conv_state (aliased)."""
    column, split = pl.program_id(0), pl.program_id(1)
    splits, width = outs["out"].shape[0], outs["out"].shape[2]
    d_ssm = ins["y"].shape[1]
    span = d_ssm // splits
    prepare = None
    if "sumsq" in ins:
        group_size, per_group = d_ssm // groups, ins["sumsq"].shape[1] // groups

        def prepare(tile, row):  # (rows, depth) from channel ``row`` on: the gated RMSNorm's output
            group = row // group_size
            sumsq = load(ins["sumsq"], rows, padded_span(group * per_group, per_group))
            scale = lax.rsqrt(jnp.sum(sumsq, axis=1, keepdims=True) / group_size + eps)
            return rounded(tile * scale * load(ins["norm"], Span(row, depth, depth))[None, :], dtype)

    first = first_column(column, columns, width)
    acc = project(
        ins["y"], ins["out_proj"], first, rows, columns, depth, dtype, prefetch, split * span, span // depth, prepare
    )
    store(outs["out"], acc, split, rows, Span(first, columns, columns))

    @pl.when((column == 0) & (split == 0))
    def _():
        conv_dim = ins["conv_state"].shape[2]
        bc = padded_span(column * 0 + d_ssm, conv_dim - d_ssm)
        new = sum_partials(ins["xz"], rows, Span(d_ssm + bc.start, bc.size, bc.valid), ins.get("in_proj_bias"), dtype)
        window = [load(ins["conv_state"], rows, k, bc) for k in range(1, ins["conv_state"].shape[1])] + [new]
        ops.barrier()  # shifted in place: every warp has read the window before any writes
        for k, tap in enumerate(window):
            store(outs["conv_state"], tap, rows, k, bc)


def supports(batch: int, weights: Mamba2StepWeights, ssm_state_shape, options: Mamba2StepOptions) -> bool:
    """Whether the kernels take this mixer: no gated-MLP branch, the norm (if any) after the gate, a head at least
    16 channels (a state tile's rows), and d_model and the channels of a group (d_ssm / ngroups) multiples of 16
    (past MAX_BATCH rows, with both projections by XLA)."""
    _, heads, headdim, _ = ssm_state_shape
    d_model, d_ssm = weights.in_proj.shape[0], heads * headdim
    return (
        batch >= 1
        and weights.out_proj.shape[0] == d_ssm
        and not (weights.norm is not None and options.norm_before_gate)
        and headdim >= MIN_ROWS
        and d_model % MIN_ROWS == 0
        and (d_ssm // options.ngroups) % MIN_ROWS == 0
    )


def mamba2_step_pallas(
    u: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: Mamba2StepWeights,
    dtype,
    options: Mamba2StepOptions = DEFAULT_OPTIONS,
    *,
    prenorm: PreNorm | None = None,
    interpret: bool | None = None,
    depth: int = DEPTH,
    proj_columns: int = PROJ_COLUMNS,
    splits: int | None = None,
    columns: int = COLUMNS,
    out_splits: int | None = None,
    parts: int | None = None,
    prefetch: int = 1,
    xla_in_proj: bool | None = None,
    xla_out_proj: bool | None = None,
    xla_state: bool | None = None,
    conv_channels: int = CONV_CHANNELS,
    num_warps: int = NUM_WARPS,
    state_warps: int = STATE_WARPS,
    num_stages: int = 3,
) -> tuple[jax.Array, ...]:
    """The step in four launches (three kernels, one sum); arguments (``prenorm`` included: normed in the first
    kernel at one row, by a launch of its own past it) and results as ``mamba2_step_reference``, shapes there and
    ``supports``.

    ``interpret`` None runs the compiled kernels where ``pallas_supported()``, else Pallas's interpreter (slow; for
    tests). ``depth`` (rows of a projection a loop iteration reads), ``proj_columns`` and ``splits`` (in_proj's
    columns a program reads and the parts d_model is cut into; None: ``default_splits``), ``columns`` and
    ``out_splits`` (the same for out_proj over d_ssm), ``parts`` (programs per head and row in the state kernel, a
    power of 2 dividing headdim; None: PARTS where that leaves MIN_ROWS channels a program), ``prefetch`` (see
    ``project``), ``xla_in_proj`` (in_proj by XLA's product instead of the first kernel; None: from d_model
    XLA_IN_PROJ_FROM on, or past one row), ``xla_out_proj`` (B's and C's window, the norm and out_proj by XLA instead
    of the last kernel; None: past one row; both are XLA's past MAX_BATCH rows), ``xla_state`` (XLA's state
    update between the conv's kernel, ``conv_channels`` channels a program, and the gate-and-norm kernel; None: past
    one row with a float32 state), ``num_warps`` (of the projections' kernels), ``state_warps`` (of the state
    kernel's) and ``num_stages``: the defaults are the measured best on an H100 (benchmarks/mamba2_step.py). Derivatives
    (jax.grad, jax.jvp) are the reference's.
    """
    batch, d_model = u.shape
    _, heads, headdim, _ = ssm_state.shape
    d_ssm, width = heads * headdim, weights.in_proj.shape[1]
    if not supports(batch, weights, ssm_state.shape, options):
        raise ValueError(
            f"mamba2_step_pallas: needs d_ssm = d_inner, the norm after the gate, headdim at least {MIN_ROWS}, "
            f"d_model and d_ssm / ngroups multiples of {MIN_ROWS}; got batch {batch}, d_model {d_model}, headdim "
            f"{headdim}, d_ssm {d_ssm}, d_inner {weights.out_proj.shape[0]}, {options}"
        )
    xla_in_proj, xla_out_proj = xla_projections(
        "mamba2_step_pallas", batch, d_model, xla_in_proj, xla_out_proj, in_from=XLA_IN_PROJ_FROM
    )
    if xla_state is None:
        xla_state = batch > 1 and ssm_state.dtype == jnp.float32
    if not isinstance(conv_channels, int) or conv_channels < 1 or conv_channels & (conv_channels - 1):
        raise ValueError(f"mamba2_step_pallas: conv_channels must be a power of 2, got {conv_channels!r}")
    if parts is None:  # PARTS, or fewer where the parts would have fewer than MIN_ROWS channels
        parts = PARTS
        while parts > 1 and (headdim % parts or headdim // parts < MIN_ROWS):
            parts //= 2
    if not isinstance(parts, int) or parts < 1 or parts & (parts - 1) or headdim % parts or headdim // parts < MIN_ROWS:
        raise ValueError(
            f"mamba2_step_pallas: parts must be a power of 2 dividing headdim {headdim} into at least {MIN_ROWS} "
            f"channels, got {parts!r}"
        )
    # out_proj's tiles lie within one group of the norm
    in_depth, out_depth = depth_for(d_model, depth), depth_for(d_ssm // options.ngroups, depth)
    # powers of 2, at most the width they cut (a last block overhanging the width starts earlier: first_column)
    proj_columns = min(pl.next_power_of_2(proj_columns), 1 << (width.bit_length() - 1))
    columns = min(pl.next_power_of_2(columns), 1 << (d_model.bit_length() - 1))
    if splits is None:
        splits = default_splits(d_model, width // 2, in_depth, proj_columns)
    if out_splits is None:
        out_splits = default_splits(d_ssm, d_model // 2, out_depth, columns)
    for name, value, rows, rows_depth in (
        ("splits", splits, d_model, in_depth),
        ("out_splits", out_splits, d_ssm, out_depth),
    ):
        if not isinstance(value, int) or value < 1 or rows % (value * rows_depth):
            raise ValueError(
                f"mamba2_step_pallas: {name} must be a positive int dividing {rows} / {rows_depth}, got {value!r}"
            )
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    config = (jnp.dtype(dtype), options, bool(interpret), in_depth, out_depth, proj_columns, splits, columns)
    config += (out_splits, parts, int(prefetch), xla_in_proj, xla_out_proj, num_warps, state_warps, num_stages)
    config += (bool(xla_state), conv_channels)
    return _step(u, conv_state, ssm_state, weights, prenorm, config)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _step(u, conv_state, ssm_state, weights, prenorm, config):
    """The kernels, each device on its rows of the batch in a sharded jit (the weights whole on every device)."""
    return step_over_batch(functools.partial(_kernels, config=config), u, conv_state, ssm_state, weights, prenorm)


def _kernels(u, conv_state, ssm_state, weights: Mamba2StepWeights, prenorm: PreNorm | None, config):
    dtype, options, interpret, in_depth, out_depth, proj_columns, splits, columns = config[:8]
    out_splits, parts, prefetch, xla_in_proj, xla_out_proj, num_warps, state_warps, num_stages = config[8:16]
    xla_state, conv_channels = config[16:]
    batch, d_model = u.shape
    _, heads, headdim, _ = ssm_state.shape
    d_ssm = heads * headdim
    rows = batch_rows(batch)
    params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    ops = KernelMath(interpret)
    if xla_state:
        return _conv_then_xla(u, conv_state, ssm_state, weights, prenorm, dtype, options, conv_channels, ops)
    w = {name: value for name, value in weights._asdict().items() if value is not None}

    xz, residual = in_proj_partials(
        u,
        weights.in_proj,
        prenorm,
        xla=xla_in_proj,
        columns=proj_columns,
        depth=in_depth,
        prefetch=prefetch,
        splits=splits,
        dtype=dtype,
        params=params,
        interpret=interpret,
        name="mamba2_step_proj",
    )

    norm = weights.norm is not None
    ins = {"xz": xz, "conv_state": conv_state, "ssm_state": ssm_state}
    ins |= {name: w[name] for name in ("in_proj_bias", "conv", "conv_bias", "dt_bias", "A_log", "D") if name in w}
    out_shape = {
        "conv_state": jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        "ssm_state": jax.ShapeDtypeStruct(ssm_state.shape, ssm_state.dtype),
        "y": jax.ShapeDtypeStruct((batch, d_ssm), jnp.float32 if norm else dtype),
    }
    if norm:
        out_shape["sumsq"] = jax.ShapeDtypeStruct((batch, heads * parts), jnp.float32)
    outs = sorted(out_shape)  # pallas_call flattens dicts in sorted key order
    state = pl.pallas_call(
        functools.partial(
            _state_kernel, parts=parts, groups=options.ngroups, dt_limit=options.dt_limit, dtype=dtype, ops=ops
        ),
        out_shape=out_shape,
        input_output_aliases={sorted(ins).index(name): outs.index(name) for name in ("conv_state", "ssm_state")},
        grid=(heads * parts, batch),
        compiler_params=plt.CompilerParams(num_warps=state_warps, num_stages=num_stages),
        interpret=interpret,
        name="mamba2_step_state",
    )(ins)

    if xla_out_proj:
        conv_state = _shift_bc(state["conv_state"], xz, weights.in_proj_bias, d_ssm, dtype)
        y = _normed(state, weights.norm, options, dtype) if norm else state["y"]
        result = y @ weights.out_proj.astype(dtype)
        if weights.out_proj_bias is not None:
            result = result + weights.out_proj_bias.astype(dtype)
        return with_residual((result, conv_state, state["ssm_state"]), residual)

    ins = {"y": state["y"], "out_proj": weights.out_proj, "xz": xz, "conv_state": state["conv_state"]}
    ins |= {name: w[name] for name in ("in_proj_bias",) if name in w}
    if norm:
        ins |= {"sumsq": state["sumsq"], "norm": weights.norm}
    out = pl.pallas_call(
        functools.partial(
            _out_kernel,
            columns=columns,
            depth=out_depth,
            prefetch=prefetch,
            rows=rows,
            groups=options.ngroups,
            eps=options.eps,
            dtype=dtype,
            ops=ops,
        ),
        out_shape={
            "conv_state": jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
            "out": jax.ShapeDtypeStruct((out_splits, batch, d_model), jnp.float32),
        },
        input_output_aliases={sorted(ins).index("conv_state"): 0},
        grid=(pl.cdiv(d_model, columns), out_splits),
        compiler_params=params,
        interpret=interpret,
        name="mamba2_step_out",
    )(ins)

    result = out["out"].sum(axis=0).astype(dtype)
    if weights.out_proj_bias is not None:
        result = result + weights.out_proj_bias.astype(dtype)
    return with_residual((result, out["conv_state"], state["ssm_state"]), residual)


def _conv_then_xla(u, conv_state, ssm_state, weights: Mamba2StepWeights, prenorm, dtype, options, channels: int, ops):
    """The ``xla_state`` step: XLA's in_proj (u normed first by ``prenorm_launch``), the conv (``_conv_kernel``),
    XLA's ``state_readout``, the skip, gate and norm (``_gated_norm_kernel``), XLA's out_proj; where that kernel does
    not apply, ``state_and_out`` after the conv, as the reference computes it."""
    residual = None
    if prenorm is not None:
        u, residual = prenorm_launch(u, prenorm, ops.interpret)
    xz = (u.astype(dtype) @ weights.in_proj.astype(dtype))[None]  # (1, b, m), as sum_partials reads it
    batch, _, conv_dim = conv_state.shape
    rows = batch_rows(batch)
    w = {name: value for name, value in weights._asdict().items() if value is not None}
    ins = {"xz": xz, "conv_state": conv_state} | {
        name: w[name] for name in ("in_proj_bias", "conv", "conv_bias") if name in w
    }
    out_shape = {
        "conv_state": jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype),
        "xbc": jax.ShapeDtypeStruct((batch, conv_dim), dtype),
    }
    start = xz.shape[2] - conv_dim - ssm_state.shape[1]  # in_proj's columns: [z0, x0, z, xBC, dt (h)]
    conv = pl.pallas_call(
        functools.partial(_conv_kernel, start=start, channels=channels, rows=rows, dtype=dtype, ops=ops),
        out_shape=out_shape,
        input_output_aliases={sorted(ins).index("conv_state"): sorted(out_shape).index("conv_state")},
        grid=(pl.cdiv(conv_dim, channels), pl.cdiv(batch, rows.size)),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=ops.interpret,
        name="mamba2_step_conv",
    )(ins)
    zxbcdt = xz[0] if weights.in_proj_bias is None else xz[0] + weights.in_proj_bias.astype(dtype)
    headdim = ssm_state.shape[2]
    if weights.norm is None or headdim & (headdim - 1):
        out, new_state = state_and_out(zxbcdt, conv["xbc"], ssm_state, weights, dtype, options)
        return with_residual((out, conv["conv_state"], new_state), residual)
    # XLA's readout, then the skip, the gate and the norm in one launch (XLA takes two: the gated product, then
    # the norm's reduction and scaling), then XLA's out_proj
    readout, new_state = state_readout(zxbcdt, conv["xbc"], ssm_state, weights, options)
    ins = {"readout": readout, "xbc": conv["xbc"], "xz": xz, "D": weights.D, "norm": weights.norm}
    ins |= {name: w[name] for name in ("in_proj_bias",) if name in w}
    y = pl.pallas_call(
        functools.partial(
            _gated_norm_kernel,
            start=start - readout.shape[1] * headdim,  # z's columns, just before xBC's
            groups=options.ngroups,
            eps=options.eps,
            dtype=dtype,
            ops=ops,
        ),
        out_shape={"y": jax.ShapeDtypeStruct((batch, readout.shape[1] * headdim), dtype)},
        grid=(batch,),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=1),
        interpret=ops.interpret,
        name="mamba2_step_gated_norm",
    )(ins)["y"]
    out = linear(y, weights.out_proj, weights.out_proj_bias, dtype)
    return with_residual((out, conv["conv_state"], new_state.astype(ssm_state.dtype)), residual)


def _shift_bc(conv_state, xz, in_proj_bias, d_ssm: int, dtype):
    """conv_state (b, w, conv_dim) with B's and C's window (its columns from d_ssm on) shifted by one tap and the new
    tap (in_proj's output for them, z's d_ssm columns on, as ``sum_partials`` rounds it) last; x's part as the state
    kernel left it."""
    columns = slice(2 * d_ssm, d_ssm + conv_state.shape[2])
    new = xz[:, :, columns].astype(jnp.float32).sum(axis=0).astype(dtype)
    if in_proj_bias is not None:
        new = new + in_proj_bias[columns].astype(dtype)
    window = jnp.concatenate([conv_state[:, 1:, d_ssm:], new[:, None].astype(conv_state.dtype)], axis=1)
    return conv_state.at[:, :, d_ssm:].set(window)


def _normed(state, norm, options: Mamba2StepOptions, dtype):
    """The gated RMSNorm of the state kernel's y * silu(z) (b, d_ssm) float32, from its partial sums of squares
    (b, h * parts): each group scaled by rsqrt(mean square + eps) and the norm's weight, rounded to ``dtype``."""
    y, sumsq = state["y"], state["sumsq"]
    batch, d_ssm = y.shape
    groups = options.ngroups
    mean = sumsq.reshape(batch, groups, -1).sum(axis=2) / (d_ssm // groups)
    scaled = y.reshape(batch, groups, -1) * lax.rsqrt(mean + options.eps)[:, :, None]
    return (scaled.reshape(batch, d_ssm) * norm.astype(jnp.float32)).astype(dtype)


@_step.defjvp
def _step_jvp(config, primals, tangents):
    dtype, options = config[:2]

    def reference(u, conv_state, ssm_state, weights, prenorm):
        return mamba2_step_reference(u, conv_state, ssm_state, weights, dtype, options, prenorm)

    return jax.jvp(reference, primals, tangents)
