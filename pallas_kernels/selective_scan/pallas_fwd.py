"""Forward Pallas kernel of the selective scan, and the pieces the backward kernel shares with it.

One program owns ``blocks.channels`` channels of one batch row, all inside one group of B/C, and one chunk of time
steps; GPU thread i holds channel i. The state h (b, di, n) of those channels stays in registers as n vectors of
``channels`` float32 values (one list entry per state index, unrolled at trace time), so the per-channel work (softplus,
D skip, silu gate) runs once per channel, the readout <h_t, C_t> is a sum inside each thread, and B_t, C_t are scalars
shared by the whole program. Chunks run in parallel: a first launch scans every chunk but the last from a zero state
and returns its end state and the sum of its dt (its total decay is exp(A sum dt)); each program of a second launch
folds the results of the chunks before its own into its start state, then scans its chunk and writes the outputs.
The program walks its chunk in tiles of ``steps`` steps: it loads the next tile's rows of u, delta and z (and B_t,
C_t ``lookahead`` steps ahead), runs this tile's recurrence, then stores the tile's outputs, so memory latency hides
behind the exponentials instead of stalling every step (``_forward_kernel`` says why the order matters).
Shapes follow docs/architecture.md; inside the kernels the state is laid out (n, di) so one state index of a block of
channels is a contiguous row.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.selective_scan.kernel_math import KernelMath
from pallas_kernels.selective_scan.pallas_config import Chunks, ScanBlocks, chunking


class Lanes(NamedTuple):
    """The block of channels a program owns: a slice of di and, when the blocks overhang a group, the lane mask."""

    channels: pl.Slice
    mask: jax.Array | None

    def load(self, ref, *index) -> jax.Array:
        """Row ``ref[*index, channels]`` as float32 (channels,); lanes outside the mask read 0."""
        ref = ref.at[(*map(as_index, index), self.channels)]
        if self.mask is None:
            return ref[...].astype(jnp.float32)
        return plt.load(ref, mask=self.mask, other=0).astype(jnp.float32)

    def store(self, ref, value: jax.Array, *index) -> None:
        """Store the (channels,) row ``value`` at ``ref[*index, channels]`` in the ref's dtype."""
        plt.store(ref.at[(*map(as_index, index), self.channels)], value.astype(ref.dtype), mask=self.mask)


def as_index(i):
    # Pallas's interpreter (the CPU path) rejects a Triton load/store whose index holds a Python int; a NumPy int works.
    return np.int32(i) if isinstance(i, int) else i


def program_lanes(blocks: ScanBlocks, group_dim: int) -> tuple[jax.Array, jax.Array, Lanes]:
    """The program's batch index, group index and lanes. Grid (b, g, cdiv(di / g, channels))."""
    batch, group, block = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    first = block * blocks.channels
    mask = None
    if group_dim % blocks.channels:
        mask = first + lax.iota(jnp.int32, blocks.channels) < group_dim
    return batch, group, Lanes(pl.ds(group * group_dim + first, blocks.channels), mask)


def load_BC(ins, batch, t, group, names=("B", "C")) -> list[jax.Array]:
    """B_t and C_t of one step as stored (``pallas._kernel_inputs``): n uint32 words, each holding B_t[k] and C_t[k] as
    bfloat16, or the float32 scalars of ``names`` in turn. Scalars: the same value in every lane of the program."""
    d_state = ins["A2"].shape[0]
    if "BC" in ins:
        return [ins["BC"][batch, t, group, k] for k in range(d_state)]
    return [ins[name][batch, t, group, k] for name in names for k in range(d_state)]


def unpack_BC(words: list[jax.Array], names=("B", "C")) -> dict[str, list[jax.Array]]:
    """{name: n float32 scalars} for ``names`` from what ``load_BC`` loaded with the same names."""
    if words[0].dtype != jnp.uint32:
        d_state = len(words) // len(names)
        return {name: words[i * d_state : (i + 1) * d_state] for i, name in enumerate(names)}
    halves = {  # a bfloat16 is the upper half of the float32 of the same value
        "B": lambda w: lax.bitcast_convert_type(w << 16, jnp.float32),
        "C": lambda w: lax.bitcast_convert_type(w & jnp.uint32(0xFFFF0000), jnp.float32),
    }
    return {name: [halves[name](w) for w in words] for name in names}


def groups_of(inputs: dict[str, jax.Array]) -> int:
    """The number of B/C groups of the kernels' inputs."""
    return (inputs["BC"] if "BC" in inputs else inputs["C"]).shape[2]


def clamp(t, last: int):
    """min(t, last) for a Python or traced step index."""
    return min(t, last) if isinstance(t, int) else jnp.minimum(t, last)


def chunk_tiles(chunks: Chunks, chunk, tile_steps: int):
    """Where program ``chunk`` (traced) works, in tiles of ``tile_steps`` (which divides ``chunks.length``): (global
    index of its first tile, the index after its last full tile, the static size of the tail tile that only the last
    chunk has and that follows its full tiles)."""
    per_chunk = chunks.length // tile_steps
    full, tail = divmod(chunks.last, tile_steps)
    first = chunk * per_chunk
    if chunks.count > 1 and full != per_chunk:
        # Integer arithmetic rather than a select: Triton's loop bounds must be plain i32 values. chunk // (count - 1)
        # is 1 in the last chunk and 0 before it.
        full = per_chunk - (chunk // (chunks.count - 1)) * (per_chunk - full)
    return first, first + full, tail


def if_last(chunks: Chunks, chunk, fn, carry):
    """fn(carry) in the last chunk, carry unchanged in the others (no branch when there is one chunk)."""
    if chunks.count == 1:
        return fn(carry)
    return lax.cond(chunk == chunks.count - 1, fn, lambda carry: carry, carry)


def _forward_kernel(
    ins, outs, *, blocks: ScanBlocks, steps: int, group_dim: int, delta_softplus: bool, chunks: Chunks, ops: KernelMath
):
    """One program: scan ``blocks.channels`` channels of one batch row over one chunk of time steps, in tiles of
    ``steps`` steps (``blocks.steps``, or ``blocks.backward_steps`` when storing checkpoints: fewer states to hold).

    ins: u, delta (b, l, di) [z (b, l, di)]; B, C float32 or BC uint32 (b, l, g, n) (``load_BC``); A2 = A log2(e)
    float32 (n, di); D, delta_bias float32 (di,); and the start states: [h_start float32 (b, K, n, di), each chunk's]
    or [h0 float32 (b, n, di), the first chunk's] [ends float32 (b, K - 1, n, di), dtsum float32 (b, K - 1, di): the
    "chunk_ends" launch's results, from which each program computes its chunk's start]; zeros when absent. outs, one
    of
    - out (b, l, di) and h_end float32 (b, K, n, di), each chunk's end state (the last one is the last state);
    - h_end float32 (b, K, n, di) and dtsum float32 (b, K, di): the chunks' end states from a zero start and their
      sums of dt (this launch's grid covers only the chunks whose end state a later chunk needs);
    - checkpoints float32 (b, cdiv(l, s) + 1, n, di) with s = blocks.backward_steps: the state before steps 0, s,
      2s, ... and after the last step, for the backward.

    Loads run ahead of their use in program order: u, delta, z one tile ahead, B_t and C_t ``blocks.lookahead`` steps
    ahead. Stores wait for the end of a tile: the compiler keeps every load after an earlier store (it cannot tell the
    pointers apart), so a store inside the tile would hold the next loads back until the step that needs them.
    """
    batch, group, lanes = program_lanes(blocks, group_dim)
    chunk = pl.program_id(3)
    seqlen = ins["u"].shape[1]
    d_state = ins["A2"].shape[0]
    with_output = "out" in outs
    every = blocks.backward_steps
    A2 = [lanes.load(ins["A2"], k) for k in range(d_state)]
    D = lanes.load(ins["D"])
    bias = lanes.load(ins["delta_bias"])
    zeros = jnp.zeros((blocks.channels,), jnp.float32)
    if "h_start" in ins:
        h = [lanes.load(ins["h_start"], batch, chunk, k) for k in range(d_state)]
    elif "h0" in ins:
        h = [lanes.load(ins["h0"], batch, k) for k in range(d_state)]
    else:
        h = [zeros] * d_state
    if "ends" in ins:
        # This chunk's start state from the chunks before it (the "chunk_ends" launch's results), in the prologue:
        # start_{j+1} = exp(A sum dt_j) start_j + end_j. Chunk j + 1's results load while chunk j's are used.
        def chunk_end(j):
            return lanes.load(ins["dtsum"], batch, j), [lanes.load(ins["ends"], batch, j, k) for k in range(d_state)]

        def stitch(j, carry):
            h, (dtsum_j, end_j) = carry
            following = chunk_end(clamp(j + 1, chunks.count - 2))
            return [ops.fma(ops.exp2(dtsum_j * A2[k]), h[k], end_j[k]) for k in range(d_state)], following

        h, _ = lax.fori_loop(chunk * 0, chunk, stitch, (h, chunk_end(0)))  # traced bounds, as Triton wants
    row_names = [name for name in ("u", "delta", "z") if name in ins and (with_output or name != "z")]

    def load_rows(t0, size: int):
        """Rows t0 .. t0 + size - 1 of u, delta (and z), each a list of (channels,) float32; rows past the end repeat
        the last (the prefetch after the last full tile)."""
        return {
            name: [lanes.load(ins[name], batch, clamp(t0 + s, seqlen - 1)) for s in range(size)] for name in row_names
        }

    names = ("B", "C") if with_output else ("B",)

    def load_scalars(t):
        """B_t (and C_t) as ``load_BC`` has them; past the end, the last step's."""
        return load_BC(ins, batch, clamp(t, seqlen - 1), group, names)

    def scan_tile(carry, tile, rows):
        """Run the recurrence over global tile ``tile`` with its ``rows``, then store its outputs. carry: the state
        (n rows), the sum of dt so far, and ``ahead``, B and C of the next ``lookahead`` steps."""
        h, dtsum, ahead = list(carry[0]), carry[1], list(carry[2])
        t0 = tile * steps
        outputs, checkpoints = [], []
        for s in range(len(rows["u"])):
            scalars = unpack_BC(ahead.pop(0), names)
            ahead.append(load_scalars(t0 + s + blocks.lookahead))
            u = rows["u"][s]
            dt = rows["delta"][s] + bias
            if delta_softplus:
                dt = ops.softplus(dt)
            if "dtsum" in outs:
                dtsum = dtsum + dt
            dtu = dt * u
            for k in range(d_state):
                h[k] = ops.fma(ops.exp2(dt * A2[k]), h[k], dtu * scalars["B"][k])
            if with_output:
                y = ops.dot(h, scalars["C"], D * u)
                if "z" in rows:
                    y = y * (rows["z"][s] * ops.sigmoid(rows["z"][s]))
                outputs.append(y)
            elif (s + 1) % every == 0:
                checkpoints.append(list(h))
        for s, y in enumerate(outputs):
            lanes.store(outs["out"], y, batch, t0 + s)
        if "checkpoints" in outs:
            for j, state in enumerate(checkpoints):
                for k in range(d_state):
                    lanes.store(outs["checkpoints"], state[k], batch, tile * (steps // every) + j + 1, k)
        return h, dtsum, ahead

    first_tile, end_tile, tail = chunk_tiles(chunks, chunk, steps)
    if "checkpoints" in outs:

        @pl.when(chunk == 0)
        def _():
            for k in range(d_state):
                lanes.store(outs["checkpoints"], h[k], batch, 0, k)

    t_start = first_tile * steps
    carry = (h, zeros, [load_scalars(t_start + s) for s in range(blocks.lookahead)])

    def tile_body(tile, carry_and_rows):
        carry, rows = carry_and_rows
        next_rows = load_rows((tile + 1) * steps, steps)
        return scan_tile(carry, tile, rows), next_rows

    # Both bounds traced (program ids): Triton wants the same integer type for the loop's bounds.
    carry, _ = lax.fori_loop(first_tile, end_tile, tile_body, (carry, load_rows(t_start, steps)))
    if tail:
        tail_tile = end_tile
        carry = if_last(chunks, chunk, lambda c: scan_tile(c, tail_tile, load_rows(tail_tile * steps, tail)), carry)
    h, dtsum, _ = carry
    if "h_end" in outs:
        for k in range(d_state):
            lanes.store(outs["h_end"], h[k], batch, chunk, k)
    if "dtsum" in outs:
        lanes.store(outs["dtsum"], dtsum, batch, chunk)
    if "checkpoints" in outs:

        @pl.when(chunk == chunks.count - 1)
        def _():  # the state after the last step closes the checkpoints
            for k in range(d_state):
                lanes.store(outs["checkpoints"], h[k], batch, pl.cdiv(seqlen, every), k)


def scan_forward(
    inputs: dict[str, jax.Array],
    *,
    delta_softplus: bool,
    blocks: ScanBlocks,
    interpret: bool,
    mode: str = "out",
) -> dict[str, jax.Array]:
    """Launch the forward kernel on every chunk (``mode`` "out" or "checkpoints") or on all chunks but the last
    ("chunk_ends").

    inputs: the kernel's ``ins`` (see ``_forward_kernel``), already normalised by ``pallas.py``.
    Returns by mode (K chunks, ``chunks_of``):
    - "out": {out (b, l, di) in u's dtype, h_end float32 (b, K, n, di)}
    - "chunk_ends": {h_end float32 (b, K - 1, n, di), dtsum float32 (b, K - 1, di)}, from zero start states
    - "checkpoints": {checkpoints float32 (b, cdiv(l, s) + 1, n, di)}: the state every s = blocks.backward_steps steps
      and after the last, which the backward recomputes from.
    """
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    d_state = inputs["A2"].shape[0]
    chunks = chunks_of(inputs, blocks)
    num_programs = chunks.count
    if mode == "checkpoints":
        num_checkpoints = pl.cdiv(seqlen, blocks.backward_steps) + 1
        out_shape = {"checkpoints": jax.ShapeDtypeStruct((batch, num_checkpoints, d_state, dim), jnp.float32)}
    elif mode == "chunk_ends":
        num_programs = chunks.count - 1
        chunks = Chunks(chunks.length, num_programs, chunks.length)  # every chunk launched is a full one
        out_shape = {
            "h_end": jax.ShapeDtypeStruct((batch, num_programs, d_state, dim), jnp.float32),
            "dtsum": jax.ShapeDtypeStruct((batch, num_programs, dim), jnp.float32),
        }
    elif mode == "out":
        out_shape = {
            "out": jax.ShapeDtypeStruct(u.shape, u.dtype),
            "h_end": jax.ShapeDtypeStruct((batch, chunks.count, d_state, dim), jnp.float32),
        }
    else:
        raise ValueError(f"scan_forward: mode must be 'out', 'chunk_ends' or 'checkpoints', got {mode!r}")
    return launch(
        _forward_kernel,
        inputs,
        out_shape,
        blocks=blocks,
        num_programs=num_programs,
        name=f"selective_scan_{mode}",
        interpret=interpret,
        steps=blocks.backward_steps if mode == "checkpoints" else blocks.steps,
        delta_softplus=delta_softplus,
        chunks=chunks,
    )


def launch(kernel, inputs, out_shape, *, blocks: ScanBlocks, num_programs: int, name: str, interpret: bool, **options):
    """``pl.pallas_call`` of one of the scan kernels over the grid (b, g, channel blocks per group, num_programs),
    with ``blocks``, the group width, ``ops`` (the kernel arithmetic, compiled or interpreted) and ``options`` bound
    to it. inputs: the kernel's ``ins`` (holding delta (b, l, di) and B, C or BC (b, l, g, n)); out_shape: its
    ``outs`` as ShapeDtypeStructs."""
    batch, _, dim = inputs["delta"].shape
    groups = groups_of(inputs)
    group_dim = dim // groups
    return pl.pallas_call(
        functools.partial(kernel, blocks=blocks, group_dim=group_dim, ops=KernelMath(interpret), **options),
        out_shape=out_shape,
        grid=(batch, groups, pl.cdiv(group_dim, blocks.channels), num_programs),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(inputs)


def chunks_of(inputs: dict[str, jax.Array], blocks: ScanBlocks) -> Chunks:
    """The time chunks of the kernels' ``inputs`` (u (b, l, di), B, C or BC (b, l, g, n))."""
    return chunks_for(blocks, inputs["u"].shape, groups_of(inputs))


def chunks_for(blocks: ScanBlocks, shape: tuple[int, int, int], groups: int) -> Chunks:
    """The time chunks for u of ``shape`` (b, l, di) in ``groups`` B/C groups: the grid has b x g x channel blocks
    per group programs per chunk."""
    batch, seqlen, dim = shape
    return chunking(blocks, seqlen, batch * groups * pl.cdiv(dim // groups, blocks.channels))
