"""Forward Pallas kernel of the selective scan, and the pieces the backward kernel shares with it.

One program owns ``blocks.channels`` channels of one batch row, all inside one group of B/C; GPU thread i holds channel
i. The state h (b, di, n) of those channels stays in registers as n vectors of ``channels`` float32 values (one list
entry per state index, unrolled at trace time), so the per-channel work (softplus, D skip, silu gate) runs once per
channel, the readout <h_t, C_t> is a sum inside each thread, and B_t, C_t are scalars shared by the whole program.
The program walks the sequence in tiles of ``steps`` steps: it loads the next tile's rows of u, delta and z (and B_t,
C_t ``lookahead`` steps ahead), runs this tile's recurrence, then stores the tile's outputs, so memory latency hides
behind the exponentials instead of stalling every step (``_forward_kernel`` says why the order matters).
Shapes follow docs/architecture.md; inside the kernels the state is laid out (n, di) so one state index of a block of
channels is a contiguous row.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.selective_scan.pallas_config import ScanBlocks

# exp(x) = exp2(x log2 e): the kernels scale A once so each decay is one exp2, a single special-function instruction.
LOG2_E = math.log2(math.e)


def softplus(x: jax.Array) -> jax.Array:
    """log(1 + e^x) without overflow, through exp2 and log2 (single special-function instructions on the GPU).

    For very negative x it returns 0 where the exact value is below float32's resolution of 1 + e^x, an absolute
    error under 1e-7."""
    return jnp.maximum(x, 0.0) + jnp.log2(1.0 + jnp.exp2(-jnp.abs(x) * LOG2_E)) / LOG2_E


def sigmoid(x: jax.Array) -> jax.Array:
    """1 / (1 + e^-x) through exp2."""
    return 1.0 / (1.0 + jnp.exp2(-x * LOG2_E))


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


def clamp(t, last: int):
    """min(t, last) for a Python or traced step index."""
    return min(t, last) if isinstance(t, int) else jnp.minimum(t, last)


def _forward_kernel(ins, outs, *, blocks: ScanBlocks, group_dim: int, delta_softplus: bool):
    """One program: scan ``blocks.channels`` channels of one batch row over the whole sequence.

    ins: u, delta (b, l, di) [z (b, l, di)]; B, C (b, l, g, n); A2 = A log2(e) float32 (n, di); D, delta_bias
    float32 (di,) [h0 float32 (b, n, di)]. outs: either out (b, l, di) and last_state float32 (b, n, di), or
    checkpoints float32 (b, cdiv(l, s) + 1, n, di) with s = blocks.backward_steps: the state before steps 0, s, 2s,
    ... and after the last step, for the backward.

    Loads run ahead of their use in program order: u, delta, z one tile ahead, B_t and C_t ``blocks.lookahead`` steps
    ahead. Stores wait for the end of a tile: the compiler keeps every load after an earlier store (it cannot tell the
    pointers apart), so a store inside the tile would hold the next loads back until the step that needs them.
    """
    batch, group, lanes = program_lanes(blocks, group_dim)
    seqlen = ins["u"].shape[1]
    d_state = ins["A2"].shape[0]
    with_output = "out" in outs
    every = blocks.backward_steps
    A2 = [lanes.load(ins["A2"], k) for k in range(d_state)]
    D = lanes.load(ins["D"])
    bias = lanes.load(ins["delta_bias"])
    if "h0" in ins:
        h = [lanes.load(ins["h0"], batch, k) for k in range(d_state)]
    else:
        h = [jnp.zeros((blocks.channels,), jnp.float32)] * d_state
    row_names = [name for name in ("u", "delta", "z") if name in ins and (with_output or name != "z")]

    def load_rows(t0, size: int):
        """Rows t0 .. t0 + size - 1 of u, delta (and z), each a list of (channels,) float32; rows past the end repeat
        the last (the prefetch after the last full tile)."""
        return {
            name: [lanes.load(ins[name], batch, clamp(t0 + s, seqlen - 1)) for s in range(size)] for name in row_names
        }

    def load_scalars(t):
        """B_t (and C_t) as n (2n) scalars in their dtype, the same in every lane; past the end, the last step's."""
        t = clamp(t, seqlen - 1)
        return [ins[name][batch, t, group, k] for name in ("B", "C")[: 1 + with_output] for k in range(d_state)]

    def scan_tile(h, tile, t0, rows, ahead):
        """Run the recurrence over one tile, then store its outputs. ``ahead`` holds B, C of the next ``lookahead``
        steps. Returns the state after the tile and ``ahead`` for the steps after it."""
        ahead = list(ahead)
        outputs, checkpoints = [], []
        for s in range(len(rows["u"])):
            scalars = [x.astype(jnp.float32) for x in ahead.pop(0)]
            ahead.append(load_scalars(t0 + s + blocks.lookahead))
            u = rows["u"][s]
            dt = rows["delta"][s] + bias
            if delta_softplus:
                dt = softplus(dt)
            dtu = dt * u
            for k in range(d_state):
                h[k] = jnp.exp2(dt * A2[k]) * h[k] + dtu * scalars[k]
            if with_output:
                y = D * u
                for k in range(d_state):
                    y = y + h[k] * scalars[d_state + k]
                if "z" in rows:
                    y = y * (rows["z"][s] * sigmoid(rows["z"][s]))
                outputs.append(y)
            elif (s + 1) % every == 0:
                checkpoints.append(list(h))
        for s, y in enumerate(outputs):
            lanes.store(outs["out"], y, batch, t0 + s)
        for j, state in enumerate(checkpoints):
            for k in range(d_state):
                lanes.store(outs["checkpoints"], state[k], batch, tile * (blocks.steps // every) + j + 1, k)
        return h, ahead

    if not with_output:
        for k in range(d_state):
            lanes.store(outs["checkpoints"], h[k], batch, 0, k)
    ahead = [load_scalars(s) for s in range(blocks.lookahead)]
    full_tiles, tail = divmod(seqlen, blocks.steps)
    if full_tiles:

        def tile_body(i, carry):
            h, rows, ahead = carry
            next_rows = load_rows((i + 1) * blocks.steps, blocks.steps)
            h, ahead = scan_tile(list(h), i, i * blocks.steps, rows, ahead)
            return h, next_rows, ahead

        h, _, ahead = lax.fori_loop(0, full_tiles, tile_body, (h, load_rows(0, blocks.steps), ahead))
        h = list(h)
    if tail:
        t0 = full_tiles * blocks.steps
        h, _ = scan_tile(h, full_tiles, t0, load_rows(t0, tail), ahead)
    for k in range(d_state):
        if with_output:
            lanes.store(outs["last_state"], h[k], batch, k)
        else:  # the state after the last step closes the checkpoints
            lanes.store(outs["checkpoints"], h[k], batch, pl.cdiv(seqlen, every), k)


def scan_forward(
    inputs: dict[str, jax.Array],
    *,
    delta_softplus: bool,
    blocks: ScanBlocks,
    interpret: bool,
    checkpoints: bool = False,
) -> dict[str, jax.Array]:
    """Launch the forward kernel.

    inputs: the kernel's ``ins`` (see ``_forward_kernel``), already normalised by ``pallas.py``.
    Returns {out (b, l, di) in u's dtype, last_state float32 (b, n, di)}, or with ``checkpoints``
    {checkpoints float32 (b, cdiv(l, s) + 1, n, di)}: the state every s = blocks.backward_steps steps and after the
    last, which the backward recomputes from.
    """
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    groups = inputs["B"].shape[2]
    d_state = inputs["A2"].shape[0]
    group_dim = dim // groups
    if checkpoints:
        num_checkpoints = pl.cdiv(seqlen, blocks.backward_steps) + 1
        out_shape = {"checkpoints": jax.ShapeDtypeStruct((batch, num_checkpoints, d_state, dim), jnp.float32)}
    else:
        out_shape = {
            "out": jax.ShapeDtypeStruct(u.shape, u.dtype),
            "last_state": jax.ShapeDtypeStruct((batch, d_state, dim), jnp.float32),
        }
    kernel = functools.partial(_forward_kernel, blocks=blocks, group_dim=group_dim, delta_softplus=delta_softplus)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, groups, pl.cdiv(group_dim, blocks.channels)),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=interpret,
        name="selective_scan_fwd",
    )(inputs)
