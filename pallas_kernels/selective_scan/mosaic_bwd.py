"""The backward's adjoint and reverse launches of the selective scan for Mosaic GPU (``plgpu.kernel``), for Hopper.

The same computations as ``pallas_bwd.py``'s two kernels (its docstring has the formulas), laid out as the Mosaic GPU
forward (``mosaic_fwd.py``): a program is one warpgroup, 128 threads, one channel each, walking one chunk of time
backwards with the state cotangent lam as n (128,) float32 register rows. Tiles of a few steps of u, delta, dout, z,
the B/C words and the tile's state checkpoints reach shared memory through the copy engine, last tile first; each
tile is walked in sub-tiles of ``every`` steps (the checkpoints' spacing), whose states are recomputed into registers
from their checkpoint. B_t and C_t are words shared by the warpgroup, read from shared memory as broadcasts (the
Triton kernel loads them from global memory in every one-warp program). The sums of dB_t and dC_t over channels run
inside each warp (``pallas_bwd.lane_sums``, on warp shuffles) and are written as one partial per warp, the layout of
the Triton kernel's one-warp programs, so the caller sums them the same way.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.selective_scan.mosaic_fwd import OPS, WIDTH, launch, load_row, row_layout, with_words
from pallas_kernels.selective_scan.pallas_bwd import gated_cotangent, kahan_add, lane_sums, reverse_step
from pallas_kernels.selective_scan.pallas_fwd import unpack_BC

# Time steps per staged tile, timed at (8, 2048, 2048, 16) on an H100 (benchmarks/RESULTS.md, v8): the reverse launch
# 0.758 ms with tiles of 8, 1.25 with 16 (a tile's float32 checkpoints, steps / every x n x 128 words, then crowd out
# a second program per multiprocessor), 0.716 with 4 (not yet checked on the GPU against the reference, so not the
# default); the adjoints 0.194 ms with 8, 0.211 with 4.
REVERSE_STEPS = 8  # at least ``every``: a tile holds whole sub-tiles
ADJOINT_STEPS = 8
STAGES = 2  # tiles in flight (3: 1.28 ms, tiles of 8)
WARP = 32


def _shuffle_xor(row: jax.Array, mask: int, interpret: bool) -> jax.Array:
    """(WIDTH,) row with thread i holding thread i ^ mask's value (mask < 32: within a warp); one ``shfl.sync.bfly``
    per thread on the GPU, the same permutation with array ops in the interpreter."""
    if interpret:
        return row.reshape(-1, 2, mask)[:, ::-1].reshape(row.shape)

    @plgpu.inline_mgpu(
        arg_types=(row_layout(),),
        return_type=plgpu.ShapeDtypeStruct((WIDTH,), jnp.float32, layout=row_layout()),
    )
    def shuffle(ctx, x):
        registers = np.vectorize(lambda r: mgpu.utils.shfl_bfly(r, mask), otypes=[object])(x.registers)
        return mgpu.FragmentedArray(_registers=registers, _layout=x.layout, _is_signed=x.is_signed)

    return shuffle(row)


def _reverse_kernel(ins, outs, *, chunk: int, group_dim: int, delta_softplus: bool, every: int, shuffle):
    """One program: WIDTH channels of one batch row over one chunk, walked backwards. Grid (b, di / WIDTH, chunks),
    named b, c, j.

    ins: u, delta, dout (b, l, di) [z (b, l, di)]; BC (b, l, g, n) uint32 (packed bfloat16 pairs) or (b, l, g, 2n)
    float32 (B, then C); A2 float32 (n, di); D, delta_bias float32 (di,); checkpoints float32 (b, l / every + 1, n,
    di), the state before steps 0, every, 2 every, ...; lam_in float32 (b, K, n, di), the state cotangent entering each
    chunk from its right.
    outs: du, ddelta [dz] (b, l, di) in their inputs' dtypes; dBC float32 (b, l, g, group_dim / WIDTH, R, WIDTH):
    row r, thread 32 w + L holds warp w's sum over its 32 channels of ``lane_sums``' row r, lane L; dA, lam_out
    float32 (b, K, n, di); dD, ddelta_bias float32 (b, K, di): this chunk's sums over its steps."""
    batch, block, chunk_index = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("j")
    cols = pl.ds(block * WIDTH, WIDTH)
    blocks_per_group = group_dim // WIDTH
    group = block // blocks_per_group
    block_in_group = block - group * blocks_per_group
    d_state = ins["A2"].shape[0]
    A2 = [load_row(ins["A2"].at[k, cols]) for k in range(d_state)]
    D = load_row(ins["D"].at[cols])
    bias = load_row(ins["delta_bias"].at[cols])
    zeros = plgpu.layout_cast(jnp.zeros((WIDTH,), jnp.float32), row_layout())
    lane = plgpu.broadcasted_iota(jnp.int32, (WIDTH,), 0, layout=row_layout()) & (WARP - 1)
    row_names = ["u", "delta", "dout"] + (["z"] if "z" in ins else [])
    steps = max(REVERSE_STEPS, every)
    tiles = chunk // steps

    def walk_back(carry, rows, words_ref, h_start, t0: int, tile_start):
        """Steps t0 .. t0 + every - 1 of the staged tile (starting at global step ``tile_start``), backwards, from
        their start state ``h_start``; writes their per-step gradients."""
        lam, dA, totals, compensations = (list(part) for part in carry)

        def accumulate(index, term):
            totals[index], compensations[index] = kahan_add(totals[index], compensations[index], term)

        data = {name: [load_row(rows[name].at[t0 + s]) for s in range(every)] for name in row_names}
        count = words_ref.shape[1]
        scalars = [
            unpack_BC([jnp.broadcast_to(words_ref[t0 + s, k], (WIDTH,)) for k in range(count)]) for s in range(every)
        ]
        x = [delta + bias for delta in data["delta"]]
        dt = [OPS.softplus(x_s) for x_s in x] if delta_softplus else x
        states = [h_start]  # states[s]: h before step t0 + s
        for s in range(every):
            dtu = dt[s] * data["u"][s]
            states.append(
                [OPS.fma(OPS.exp2(dt[s] * A2[k]), states[s][k], dtu * scalars[s]["B"][k]) for k in range(d_state)]
            )
        for s in reversed(range(every)):
            t = tile_start + t0 + s
            step = {"u": data["u"][s], "g": data["dout"][s], "z": data["z"][s] if "z" in data else None, "x": x[s]}
            step.update(dt=dt[s], B=scalars[s]["B"], C=scalars[s]["C"], h=states[s], h_next=states[s + 1])
            grads = reverse_step(step, lam, dA, A2, D, delta_softplus, OPS)
            for r, row in enumerate(lane_sums(grads["dBC"], lane, shuffle, lanes=WARP)):
                outs["dBC"][batch, t, group, block_in_group, r, pl.ds(0, WIDTH)] = row
            for name in ("du", "ddelta", "dz"):
                if grads[name] is not None:
                    outs[name][batch, t, cols] = grads[name].astype(outs[name].dtype)
            accumulate(0, grads["dD"])
            accumulate(1, grads["ddelta"])  # ddelta_bias
        return lam, dA, totals, compensations

    def tile(indices, *refs_and_carry):
        *refs, carry = refs_and_carry
        rows = dict(zip(row_names, refs[: len(row_names)], strict=True))
        words_ref, checkpoints_ref = refs[len(row_names) :]
        tile_start = chunk_index * chunk + (tiles - 1 - indices[0]) * steps
        for sub in reversed(range(steps // every)):
            h_start = [load_row(checkpoints_ref.at[sub, k]) for k in range(d_state)]
            carry = walk_back(carry, rows, words_ref, h_start, sub * every, tile_start)
        return carry

    times = pl.ds(chunk_index * chunk, chunk)

    def reverse(i, *rest):  # the tiles last first
        return (tiles - 1 - i, *rest)

    pipeline = plgpu.emit_pipeline(
        tile,
        grid=(tiles,),
        in_specs=[plgpu.BlockSpec((steps, WIDTH), lambda i: reverse(i, 0))] * len(row_names)
        + [
            plgpu.BlockSpec((steps, ins["BC"].shape[3]), lambda i: reverse(i, 0)),
            plgpu.BlockSpec((steps // every, d_state, WIDTH), lambda i: reverse(i, 0, 0)),
        ],
        max_concurrent_steps=STAGES,
        init_carry=(
            [load_row(ins["lam_in"].at[batch, chunk_index, k, cols]) for k in range(d_state)],
            [zeros] * d_state,
            [zeros] * 2,
            [zeros] * 2,
        ),
    )
    checkpoints = ins["checkpoints"].at[batch, pl.ds(chunk_index * (chunk // every), chunk // every), :, cols]
    lam, dA, (dD, dbias), _ = pipeline(
        *[ins[name].at[batch, times, cols] for name in row_names], ins["BC"].at[batch, times, group], checkpoints
    )
    for k in range(d_state):
        outs["lam_out"][batch, chunk_index, k, cols] = lam[k]
        outs["dA"][batch, chunk_index, k, cols] = dA[k]
    outs["dD"][batch, chunk_index, cols] = dD
    outs["ddelta_bias"][batch, chunk_index, cols] = dbias


def _adjoint_kernel(ins, outs, *, chunk: int, delta_softplus: bool):
    """One program: WIDTH channels of one batch row over chunk j + 1, walked backwards from lam = 0, carrying only
    lam. Grid (b, di / WIDTH, chunks - 1), named b, c, j.

    ins: delta, dout (b, l, di) [z (b, l, di)]; BC as ``_reverse_kernel``'s; A2 float32 (n, di); delta_bias float32
    (di,). outs: lam float32 (b, K - 1, n, di), what the chunk passes to the one before it, and dtsum float32
    (b, K - 1, di), its sum of dt. Per step: lam <- exp(dt A) (lam + gy C)."""
    batch, block, j = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("j")
    cols = pl.ds(block * WIDTH, WIDTH)
    group = block * WIDTH // (ins["delta"].shape[2] // ins["BC"].shape[2])
    d_state = ins["A2"].shape[0]
    A2 = [load_row(ins["A2"].at[k, cols]) for k in range(d_state)]
    bias = load_row(ins["delta_bias"].at[cols])
    zeros = plgpu.layout_cast(jnp.zeros((WIDTH,), jnp.float32), row_layout())
    row_names = ["delta", "dout"] + (["z"] if "z" in ins else [])
    tiles = chunk // ADJOINT_STEPS

    def tile(indices, *refs_and_carry):
        *refs, (lam, dtsum) = refs_and_carry
        rows = dict(zip(row_names, refs[:-1], strict=True))
        words_ref = refs[-1]
        lam = list(lam)
        count = words_ref.shape[1]
        for s in reversed(range(ADJOINT_STEPS)):
            dt = load_row(rows["delta"].at[s]) + bias
            if delta_softplus:
                dt = OPS.softplus(dt)
            dtsum = dtsum + dt
            z = load_row(rows["z"].at[s]) if "z" in rows else None
            gy, _ = gated_cotangent(load_row(rows["dout"].at[s]), z, OPS)
            C = unpack_BC([jnp.broadcast_to(words_ref[s, k], (WIDTH,)) for k in range(count)])["C"]
            for k in range(d_state):
                lam[k] = OPS.exp2(dt * A2[k]) * OPS.fma(gy, C[k], lam[k])
        return lam, dtsum

    times = pl.ds((j + 1) * chunk, chunk)

    def reverse(i):  # the tiles last first
        return (tiles - 1 - i, 0)

    pipeline = plgpu.emit_pipeline(
        tile,
        grid=(tiles,),
        in_specs=[plgpu.BlockSpec((ADJOINT_STEPS, WIDTH), reverse)] * len(row_names)
        + [plgpu.BlockSpec((ADJOINT_STEPS, ins["BC"].shape[3]), reverse)],
        max_concurrent_steps=STAGES,
        init_carry=([zeros] * d_state, zeros),
    )
    lam, dtsum = pipeline(*[ins[name].at[batch, times, cols] for name in row_names], ins["BC"].at[batch, times, group])
    for k in range(d_state):
        outs["lam"][batch, j, k, cols] = lam[k]
    outs["dtsum"][batch, j, cols] = dtsum


def scan_adjoints(inputs: dict[str, jax.Array], *, delta_softplus: bool, chunk: int, interpret: bool):
    """The adjoint launch on chunks 1 .. K - 1 (K = l / chunk > 1): {lam float32 (b, K - 1, n, di), dtsum float32
    (b, K - 1, di)}, entry j for chunk j + 1, as ``pallas_bwd.scan_adjoints``."""
    inputs = with_words(inputs)
    batch, seqlen, dim = inputs["delta"].shape
    d_state = inputs["A2"].shape[0]
    count = seqlen // chunk
    out_type = {
        "lam": jax.ShapeDtypeStruct((batch, count - 1, d_state, dim), jnp.float32),
        "dtsum": jax.ShapeDtypeStruct((batch, count - 1, dim), jnp.float32),
    }
    ins = {name: inputs[name] for name in ("delta", "dout", "z", "BC", "A2", "delta_bias") if name in inputs}
    options = {"chunk": chunk, "delta_softplus": delta_softplus}
    return launch(_adjoint_kernel, ins, out_type, count - 1, interpret=interpret, **options)


def scan_backward(inputs: dict[str, jax.Array], *, delta_softplus: bool, chunk: int, every: int, interpret: bool):
    """The reverse launch on the inputs of ``pallas_bwd.scan_backward`` (checkpoints every ``every`` steps, a divisor
    of ``mosaic_fwd.STEPS``; chunks of ``chunk`` steps as the Mosaic GPU forward's); returns its outputs, dBC laid out
    as the Triton kernel's (b, l, g, group_dim / 32, R, 32)."""
    inputs = with_words(inputs)
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    groups, d_state = inputs["BC"].shape[2], inputs["A2"].shape[0]
    group_dim = dim // groups
    count = seqlen // chunk
    rows = max(1, pl.next_power_of_2(2 * d_state) // WARP)
    f32 = jnp.float32
    out_type = {
        "du": jax.ShapeDtypeStruct(u.shape, u.dtype),
        "ddelta": jax.ShapeDtypeStruct(u.shape, inputs["delta"].dtype),
        "dBC": jax.ShapeDtypeStruct((batch, seqlen, groups, group_dim // WIDTH, rows, WIDTH), f32),
        "dA": jax.ShapeDtypeStruct((batch, count, d_state, dim), f32),
        "lam_out": jax.ShapeDtypeStruct((batch, count, d_state, dim), f32),
        "dD": jax.ShapeDtypeStruct((batch, count, dim), f32),
        "ddelta_bias": jax.ShapeDtypeStruct((batch, count, dim), f32),
    }
    if "z" in inputs:
        out_type["dz"] = jax.ShapeDtypeStruct(u.shape, inputs["z"].dtype)
    names = ("u", "delta", "dout", "z", "BC", "A2", "D", "delta_bias", "checkpoints", "lam_in")
    ins = {name: inputs[name] for name in names if name in inputs}
    shuffle = functools.partial(_shuffle_xor, interpret=interpret)
    options = {"chunk": chunk, "group_dim": group_dim, "delta_softplus": delta_softplus, "every": every}
    results = launch(_reverse_kernel, ins, out_type, count, interpret=interpret, shuffle=shuffle, **options)
    # (b, l, g, blocks of 128, R, 4 warps x 32) -> (b, l, g, blocks of 32, R, 32): one partial per warp, in order.
    dBC = results["dBC"].reshape(batch, seqlen, groups, group_dim // WIDTH, rows, WIDTH // WARP, WARP)
    results["dBC"] = jnp.swapaxes(dBC, 4, 5).reshape(batch, seqlen, groups, group_dim // WARP, rows, WARP)
    return results
