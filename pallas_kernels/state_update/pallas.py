"""``selective_state_update`` as one Pallas GPU kernel (Triton): the state is read once and written once.

The arguments are the general head layout of ``reference.py`` (state (b, h, p, n)). Grid (b, h, cdiv(p, rows)):
program (i, j, k) owns rows k * rows ... of p in head j of batch row i, with all of n, as a float32 (rows, N) tile in
registers, N = n rounded up to a power of 2 (Triton's tensors have power-of-2 sizes). Rows past p and columns past n
are masked off: they load as 0 and are never stored. Each program reads its head's dt, dt_bias, D, x, z and its
group's B, C once; an argument given per head (size 1 along p or n, Mamba-2's dt (b, h, 1), A (h, 1, 1), ...) is
read as a size-1 block and broadcast in registers, so nothing is expanded in XLA. A float32 state's new value takes
the old one's buffer (``input_output_aliases``): a decode loop's carried state (lax.while_loop, lax.scan) is updated
in place; where the old state is still live after the call (an argument of a jitted function that is not donated),
XLA copies it first.
"""

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.selective_scan.kernel_math import LOG2_E, KernelMath
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported
from pallas_kernels.selective_scan.pallas_fwd import as_index
from pallas_kernels.state_update.reference import state_update_reference

# The state a program owns: TILE float32 values (TILE // N rows), one warp per TILE values, 8 a thread. Measured on
# an H100 (benchmarks/state_update.py, in a decode loop whose states outgrow L2) against tiles of 32 to 8192 values
# and 1 to 8 warps: Mamba-1 1.4b at batch 64 (n = 16) ran 16.7 us with these tiles, 19-25 us with tiles of 128 or of
# 1024 and more; Mamba-2 1.3b (n = 128) was within noise of its best (119-128 us at batch 64) at every size tried.
TILE = 256
MAX_WARPS = 8


def rows_per_program(headdim: int, d_state: int) -> int:
    """The default rows of p a program owns: a power of 2, at most p rounded up to one (see TILE)."""
    return min(pl.next_power_of_2(headdim), max(1, TILE // pl.next_power_of_2(d_state)))


def warps_for(rows: int, d_state: int) -> int:
    """The default warps of a program owning ``rows`` rows: one per TILE values, 1 to MAX_WARPS."""
    return min(MAX_WARPS, max(1, rows * pl.next_power_of_2(d_state) // TILE))


class Tile(NamedTuple):
    """The part of one head's (p, n) state a program owns: slices of p and n and their masks (None: all in range)."""

    rows: pl.Slice
    cols: pl.Slice
    row_mask: jax.Array | None
    col_mask: jax.Array | None

    @classmethod
    def of_program(cls, rows: int, headdim: int, d_state: int) -> "Tile":
        first = pl.program_id(2) * rows
        cols = pl.next_power_of_2(d_state)
        row_mask = first + lax.iota(jnp.int32, rows) < headdim if headdim % rows else None
        col_mask = lax.iota(jnp.int32, cols) < d_state if cols != d_state else None
        return cls(pl.ds(first, rows), masked_ds(0, cols, col_mask is not None), row_mask, col_mask)

    def load(self, ref, *leading, axes: str) -> jax.Array:
        """float32 ``ref[*leading, <axes>]``, ``axes`` "p", "n" or "pn" naming ref's trailing dimensions: the tile's
        rows and columns, out-of-range ones read as 0; a dimension of size 1 (a broadcast) as a block of size 1."""
        index, masks, shape = [as_index(i) for i in leading], [], []
        for axis, size in zip(axes, ref.shape[len(leading) :], strict=True):
            part, mask = (self.rows, self.row_mask) if axis == "p" else (self.cols, self.col_mask)
            if size == 1:
                part, mask = pl.ds(0, 1), None
            index.append(part)
            shape.append(part.size)
            masks.append(mask)
        ref = ref.at[tuple(index)]
        mask = combined_mask(masks, shape)
        if mask is None:
            return ref[...].astype(jnp.float32)
        return plt.load(ref, mask=mask, other=0).astype(jnp.float32)

    def store(self, ref, value: jax.Array, *leading) -> None:
        """Store ``value``, (rows,) or (rows, N), at ``ref[*leading, rows(, cols)]`` in ref's dtype."""
        slices, masks = (self.rows, self.cols)[: value.ndim], (self.row_mask, self.col_mask)[: value.ndim]
        ref = ref.at[(*map(as_index, leading), *slices)]
        plt.store(ref, value.astype(ref.dtype), mask=combined_mask(masks, value.shape))


def masked_ds(start, size: int, masked: bool) -> pl.Slice:
    """pl.ds(start, size) for a slice whose positions past the array's end are ``masked``. Pallas rejects a slice
    that overhangs its array where the start is a Python number (jax >= 0.12 also at start 0), not where it is an
    array: such a start becomes one. (An array start on an unmasked load failed Triton's lowering on jax 0.11, so
    only masked slices get one.)

    A Python int start is made int32 either way. Pallas's interpreter stores (``plt.store``) through one
    lax.dynamic_slice of all the store's indices, which must share a dtype: the program ids are int32, and under
    jax_enable_x64 a Python int start would become int64 and fail to trace. An unmasked start becomes a NumPy int32,
    which Pallas still takes as a static start (the compiled kernel is the same as with a Python int)."""
    if isinstance(start, int):
        start = jnp.int32(start) if masked else np.int32(start)
    return pl.ds(start, size)


def combined_mask(masks: list[jax.Array | None], shape) -> jax.Array | None:
    """The and of per-dimension masks (each (shape[d],) or None) as one mask of ``shape``, or None."""
    parts = [lax.broadcast_in_dim(mask, tuple(shape), (d,)) for d, mask in enumerate(masks) if mask is not None]
    return functools.reduce(jnp.logical_and, parts) if parts else None


def _kernel(ins, outs, *, rows: int, heads_per_group: int, dt_softplus: bool, ops: KernelMath):
    """One program: update and read out its tile of one head's state.

    ins: state (b, h, p, n); x (b, h, p); dt (b, h, p|1); A (h, p|1, n|1); B, C (b, g, n); [D (h, p|1)] [z (b, h, p)]
    [dt_bias (h, p|1)]. outs: out (b, h, p) in x's dtype; state float32 (b, h, p, n).
    """
    batch, head = pl.program_id(0), pl.program_id(1)
    _, _, headdim, d_state = ins["state"].shape
    tile = Tile.of_program(rows, headdim, d_state)
    group = head // heads_per_group

    dt = tile.load(ins["dt"], batch, head, axes="p")  # (rows|1,)
    if "dt_bias" in ins:
        dt = dt + tile.load(ins["dt_bias"], head, axes="p")
    if dt_softplus:
        dt = ops.softplus(dt)
    x = tile.load(ins["x"], batch, head, axes="p")  # (rows,)
    A = tile.load(ins["A"], head, axes="pn")  # (rows|1, N|1)
    B = tile.load(ins["B"], batch, group, axes="n")  # (N,)
    C = tile.load(ins["C"], batch, group, axes="n")
    state = tile.load(ins["state"], batch, head, axes="pn")  # (rows, N)

    decay = ops.exp2((dt * LOG2_E)[:, None] * A)
    state = ops.fma(decay, state, (dt * x)[:, None] * B[None, :])
    out = jnp.sum(state * C[None, :], axis=1)
    if "D" in ins:
        out = ops.fma(tile.load(ins["D"], head, axes="p"), x, out)
    if "z" in ins:
        z = tile.load(ins["z"], batch, head, axes="p")
        out = out * (z * ops.sigmoid(z))
    tile.store(outs["out"], out, batch, head)
    tile.store(outs["state"], state, batch, head)


def state_update_pallas(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    z: jax.Array | None,
    dt_bias: jax.Array | None,
    dt_softplus: bool,
    *,
    interpret: bool | None = None,
    rows: int | None = None,
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One decode step in one kernel launch; arguments and results as ``state_update_reference`` (shapes there).

    ``interpret`` None runs the compiled kernel where ``pallas_supported()``, else Pallas's interpreter (slow; for
    tests). ``rows``: rows of p per program, a power of 2 (default ``rows_per_program``); ``num_warps``: warps per
    program (default ``warps_for``). Derivatives (jax.grad, jax.jvp) are the reference's: under differentiation the
    whole step runs as ``state_update_reference`` in XLA; the kernel serves decoding.
    """
    _, _, headdim, d_state = state.shape
    if rows is None:
        rows = rows_per_program(headdim, d_state)
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"state_update_pallas: rows must be a power of 2, got {rows}")
    if num_warps is None:
        num_warps = warps_for(rows, d_state)
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    return _update(state, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), bool(interpret), rows, num_warps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(9, 10, 11, 12))
def _update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, interpret, rows, num_warps):
    batch, heads, headdim, _ = state.shape
    ins = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias}
    ins = {name: value for name, value in ins.items() if value is not None}
    # pallas_call flattens the dicts in sorted key order: outs are (out, state).
    aliases = {sorted(ins).index("state"): 1} if state.dtype == jnp.float32 else {}
    kernel = functools.partial(
        _kernel, rows=rows, heads_per_group=heads // B.shape[1], dt_softplus=dt_softplus, ops=KernelMath(interpret)
    )
    result = pl.pallas_call(
        kernel,
        out_shape={
            "out": jax.ShapeDtypeStruct(x.shape, x.dtype),
            "state": jax.ShapeDtypeStruct(state.shape, jnp.float32),
        },
        grid=(batch, heads, pl.cdiv(headdim, rows)),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="selective_state_update",
    )(ins)
    return result["out"], result["state"]


@_update.defjvp
def _update_jvp(dt_softplus, interpret, rows, num_warps, primals, tangents):
    def reference(*arrays):
        return state_update_reference(*arrays, dt_softplus)

    return jax.jvp(reference, primals, tangents)
