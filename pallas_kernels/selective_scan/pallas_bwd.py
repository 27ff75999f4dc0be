"""Backward Pallas kernel of the selective scan: a reverse scan over time, tile by tile.

Per channel d and state index k (t = 1 .. l, x_t = delta_t + delta_bias, dt_t = softplus(x_t) or x_t):
    a_t = exp(dt_t A),  h_t = a_t h_{t-1} + dt_t u_t B_t,  y_t = <h_t, C_t> + D u_t,  out_t = y_t silu(z_t).
With g_t the output's cotangent and gy_t = g_t silu(z_t), the state's cotangent runs backwards,
    lam_t = gy_t C_t + a_{t+1} lam_{t+1}     (lam_l starts from the last state's cotangent),
and every gradient is a product of lam_t with something the forward had at step t:
    dB_t += lam_t dt_t u_t,  dC_t += gy_t h_t  (both summed over the channels of a group),
    du_t = gy_t D + dt_t <lam_t, B_t>,  ddt_t = u_t <lam_t, B_t> + <lam_t, a_t h_{t-1}> A,
    dA += lam_t a_t h_{t-1} dt_t,  dD += gy_t u_t,  dz_t = g_t y_t silu'(z_t),  dx_t = ddt_t softplus'(x_t),
    dh_0 = a_1 lam_1.
The kernel needs h_{t-1} while walking time backwards. The forward kernel, run again first from each chunk's start
state, stores the state before every tile of ``backward_steps`` steps; each tile then recomputes its states into
registers from that checkpoint and walks them in reverse. Chunks of time run in parallel here too: lam entering a
chunk from the right depends on every later chunk, so a first launch (``_adjoint_kernel``) walks each chunk but the
first backwards from lam = 0 (lam is affine in its start value: out = local + exp(A sum dt) in), and ``pallas.py``
stitches those into each chunk's starting lam. Nothing of size (b, l, di, n) is stored; the sums over channels for
dB and dC are reduced within the program and written as one float32 partial per program, summed by the caller.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.selective_scan.kernel_math import LN_2, KernelMath
from pallas_kernels.selective_scan.pallas_config import Chunks, ScanBlocks
from pallas_kernels.selective_scan.pallas_fwd import (
    as_index,
    chunk_tiles,
    chunks_of,
    clamp,
    groups_of,
    if_last,
    launch,
    load_BC,
    program_lanes,
    unpack_BC,
)


def kahan_add(total, compensation, term):
    """total + term, carrying the rounding error in ``compensation`` (Kahan): a sum over thousands of steps keeps
    float32 accuracy instead of an error that grows with the number of terms. Used for dD and ddelta_bias, whose
    reference gradients are tree reductions. dA keeps a plain running sum: Kahan there changed nothing on the GPU (its
    error is the terms' own rounding, benchmarks/notes_selective_scan.md, v6) and costs n registers."""
    term = term - compensation
    new_total = total + term
    return new_total, (new_total - total) - term


def gated_cotangent(g, z, ops: KernelMath):
    """(gy, sigmoid(z)): the cotangent of y = <h, C> + D u from that of the output g, through out = y silu(z)."""
    if z is None:
        return g, None
    sig_z = ops.sigmoid(z)
    return g * z * sig_z, sig_z


def reverse_step(step: dict, lam: list, dA: list, A2: list, D: jax.Array, delta_softplus: bool, ops: KernelMath):
    """Step t of the reverse walk, for both backends' kernels (rows of one value per channel, lists over the n state
    indices). step: u, g (the output's cotangent), z (or None), x (delta + delta_bias), dt, B and C (n scalars each),
    h (h_{t-1}) and h_next (h_t). Updates lam (lam_t + the readout's share -> what step t - 1 receives) and the dA
    sums in place; returns {dz (None without z), dD (this step's term), du, ddelta, dBC: the 2n rows dB_t, then
    dC_t, before their sum over channels}."""
    u, g, dt = step["u"], step["g"], step["dt"]
    gy, sig_z = gated_cotangent(g, step["z"], ops)
    dz = None
    if step["z"] is not None:
        y = ops.dot(step["h_next"], step["C"], D * u)
        dz = g * y * sig_z * ops.fma(step["z"], 1.0 - sig_z, 1.0)
    dtu = dt * u
    lam_B = lam_ah_A2 = None  # <lam_t, B_t> and <lam_t, a_t h_{t-1}> A log2(e)
    dB, dC = [], []
    for k in range(len(lam)):
        lam[k] = ops.fma(gy, step["C"][k], lam[k])
        dC.append(gy * step["h_next"][k])
        dB.append(lam[k] * dtu)
        decay = ops.exp2(dt * A2[k])
        lam_ah = lam[k] * decay * step["h"][k]
        if k == 0:
            lam_B, lam_ah_A2 = lam[k] * step["B"][k], lam_ah * A2[k]
        else:
            lam_B, lam_ah_A2 = ops.fma(lam[k], step["B"][k], lam_B), ops.fma(lam_ah, A2[k], lam_ah_A2)
        dA[k] = ops.fma(lam_ah, dt, dA[k])
        lam[k] = decay * lam[k]
    ddt = ops.fma(u, lam_B, lam_ah_A2 * LN_2)
    return {
        "dz": dz,
        "dD": gy * u,
        "du": ops.fma(gy, D, dt * lam_B),
        "ddelta": ddt * ops.sigmoid(step["x"]) if delta_softplus else ddt,
        "dBC": dB + dC,
    }


def _adjoint_kernel(
    ins, outs, *, blocks: ScanBlocks, group_dim: int, delta_softplus: bool, chunks: Chunks, ops: KernelMath
):
    """One program: walk chunk ``program_id(3) + 1`` backwards from lam = 0, carrying only lam.

    ins: delta, dout (b, l, di) [z (b, l, di)]; C float32 or BC uint32 (b, l, g, n) (``load_BC``); A2 float32 (n, di);
    delta_bias float32 (di,).
    outs: lam float32 (b, K - 1, n, di), what the chunk passes to the one before it, and dtsum float32 (b, K - 1, di),
    its sum of dt. Per step: lam <- exp(dt A) (lam + gy C). Rows and C_t are loaded one tile of
    ``blocks.backward_steps`` ahead (a short tile: its C_t scalars are n registers a step).
    """
    batch, group, lanes = program_lanes(blocks, group_dim)
    chunk = pl.program_id(3) + 1
    seqlen = ins["delta"].shape[1]
    d_state = ins["A2"].shape[0]
    steps = blocks.backward_steps
    A2 = [lanes.load(ins["A2"], k) for k in range(d_state)]
    bias = lanes.load(ins["delta_bias"])
    zeros = jnp.zeros((blocks.channels,), jnp.float32)
    names = [name for name in ("delta", "dout", "z") if name in ins]

    def load_tile(tile, size: int):
        """Rows of delta, dout (and z) and C_t as scalars for steps tile * steps .. + size - 1 (clamped)."""
        t0 = tile * steps
        data = {name: [lanes.load(ins[name], batch, clamp(t0 + s, seqlen - 1)) for s in range(size)] for name in names}
        data["C"] = [load_BC(ins, batch, clamp(t0 + s, seqlen - 1), group, ("C",)) for s in range(size)]
        return data

    def reverse_tile(carry, data):
        lam, dtsum = list(carry[0]), carry[1]
        for s in reversed(range(len(data["delta"]))):
            dt = data["delta"][s] + bias
            if delta_softplus:
                dt = ops.softplus(dt)
            dtsum = dtsum + dt
            gy, _ = gated_cotangent(data["dout"][s], data["z"][s] if "z" in data else None, ops)
            C = unpack_BC(data["C"][s], ("C",))["C"]
            for k in range(d_state):
                lam[k] = ops.exp2(dt * A2[k]) * ops.fma(gy, C[k], lam[k])
        return lam, dtsum

    first_tile, end_tile, tail = chunk_tiles(chunks, chunk, steps)
    carry = ([zeros] * d_state, zeros)
    if tail:
        carry = if_last(chunks, chunk, lambda c: reverse_tile(c, load_tile(end_tile, tail)), carry)

    def tile_body(i, carry_and_data):
        """Tile end - 1 - (i - first): the tiles in reverse; the next one's rows load before this one's work."""
        carry, data = carry_and_data
        tile = end_tile - 1 - (i - first_tile)
        return reverse_tile(carry, data), load_tile(jnp.maximum(tile - 1, first_tile), steps)

    last_full = jnp.maximum(end_tile - 1, 0)
    carry, _ = lax.fori_loop(first_tile, end_tile, tile_body, (carry, load_tile(last_full, steps)))
    lam, dtsum = carry
    for k in range(d_state):
        lanes.store(outs["lam"], lam[k], batch, chunk - 1, k)
    lanes.store(outs["dtsum"], dtsum, batch, chunk - 1)


def shuffle_xor(row: jax.Array, mask: int, interpret: bool) -> jax.Array:
    """(channels,) row with lane i holding lane i ^ mask's value: one warp shuffle (``shfl.sync.bfly``) on the GPU,
    the same permutation with array ops in the interpreter. Lane i holds element i of a one-warp (channels,) row."""
    if interpret:
        return row.reshape(-1, 2, mask)[:, ::-1].reshape(row.shape)
    [shuffled] = plt.elementwise_inline_asm(
        f"shfl.sync.bfly.b32 $0, $1, {mask}, 0x1f, -1;",
        args=[row],
        constraints="=f,f",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(row.shape, row.dtype)],
    )
    return shuffled


def lane_sums(values: list[jax.Array], lane: jax.Array, shuffle, lanes: int) -> list[jax.Array]:
    """Sum each of V rows over each group of ``lanes`` consecutive lanes (a power of 2 up to a warp), all at once, by
    a butterfly that halves the list at every round: lanes with bit m set keep the upper half, the others the lower,
    and each adds its partner's copy of the half it keeps. V rows cost V / 2 + V / 4 + ... shuffles instead of
    V log2(lanes). ``lane``: each element's lane within its group; ``shuffle(row, m)``: the row with lane i holding
    lane i ^ m's value (``shuffle_xor``).

    With P = V rounded up to a power of 2 and C = lanes, returns R = max(1, P / C) rows: row r, lane L holds the
    sum of value R L + r when P >= C, of value L // (C / P) otherwise (``unpack_lane_sums`` undoes this)."""
    values = values + [jnp.zeros_like(values[0])] * (pl.next_power_of_2(len(values)) - len(values))
    mask = lanes // 2
    while mask:
        if len(values) == 1:
            values = [values[0] + shuffle(values[0], mask)]
        else:
            half = len(values) // 2
            upper = (lane & mask) != 0
            values = [
                jnp.where(upper, values[i + half], values[i])
                + shuffle(jnp.where(upper, values[i], values[i + half]), mask)
                for i in range(half)
            ]
        mask //= 2
    return values


def unpack_lane_sums(rows: jax.Array, count: int) -> jax.Array:
    """(..., R, C) rows of ``lane_sums`` -> (..., count) values in their original order."""
    channels = rows.shape[-1]
    padded = pl.next_power_of_2(count)
    if padded >= channels:
        return jnp.swapaxes(rows, -1, -2).reshape(*rows.shape[:-2], padded)[..., :count]
    return rows[..., 0, :: channels // padded][..., :count]


def _backward_kernel(
    ins, outs, *, blocks: ScanBlocks, group_dim: int, delta_softplus: bool, chunks: Chunks, ops: KernelMath
):
    """One program: the reverse scan of ``blocks.channels`` channels of one batch row over one chunk of time steps.

    ins: u, delta, dout (b, l, di) [z (b, l, di)]; B, C float32 or BC uint32 (b, l, g, n) (``load_BC``); A2 = A
    log2(e) float32 (n, di); D, delta_bias float32 (di,); checkpoints float32 (b, cdiv(l, s) + 1, n, di) with s =
    blocks.backward_steps; lam_in float32 (b, K, n, di), the state cotangent entering each chunk from its right (the
    last state's cotangent for the last).
    outs: du, ddelta [dz] (b, l, di) in their inputs' dtypes; dBC float32 (b, l, g, blocks per group, R,
    channels): this program's sums over its channels of dB_t (values 0 .. n - 1) and dC_t (n .. 2n - 1) as
    ``lane_sums`` lays them out; dA, lam_out float32 (b, K, n, di) (lam_out of chunk 0 is the initial state's
    cotangent); dD, ddelta_bias float32 (b, K, di). The caller sums the float32 outputs over programs.

    As in the forward, every store of a tile waits for its end, and the next tile's loads are issued before them.
    """
    batch, group, lanes = program_lanes(blocks, group_dim)
    block, chunk = pl.program_id(2), pl.program_id(3)
    d_state = ins["A2"].shape[0]
    steps = blocks.backward_steps
    A2 = [lanes.load(ins["A2"], k) for k in range(d_state)]
    D = lanes.load(ins["D"])
    bias = lanes.load(ins["delta_bias"])
    zeros = jnp.zeros((blocks.channels,), jnp.float32)
    lane = lax.iota(jnp.int32, blocks.channels)
    shuffle = functools.partial(shuffle_xor, interpret=ops.interpret)

    def load_tile(tile, size: int):
        """Everything tile ``tile`` (steps tile * s .. + size - 1) reads: its checkpoint (n rows), rows of delta, u,
        dout (and z), and B_t, C_t as ``load_BC`` has them."""
        t0 = tile * steps
        data = {"h": [lanes.load(ins["checkpoints"], batch, tile, k) for k in range(d_state)]}
        for name in ("delta", "u", "dout", "z")[: 3 + ("z" in ins)]:
            data[name] = [lanes.load(ins[name], batch, t0 + s) for s in range(size)]
        data["BC"] = [load_BC(ins, batch, t0 + s, group) for s in range(size)]
        return data

    def reverse_tile(carry, tile, data):
        """Walk tile ``tile`` backwards with ``data`` from ``load_tile``; store its gradients at the end.
        carry: lam (n rows), the sums over time of dA (n rows) and of dD, ddelta_bias with their compensations."""
        lam, dA, totals, compensations = (list(part) for part in carry)

        def accumulate(index, term):
            totals[index], compensations[index] = kahan_add(totals[index], compensations[index], term)

        size = len(data["u"])
        t0 = tile * steps
        x = [delta + bias for delta in data["delta"]]
        dt = [ops.softplus(x_s) for x_s in x] if delta_softplus else x
        scalars = [unpack_BC(words) for words in data["BC"]]
        B, C = [step["B"] for step in scalars], [step["C"] for step in scalars]
        # states[s] is h before step t0 + s; states[size] is h after the tile.
        states = [data["h"]]
        for s in range(size):
            dtu = dt[s] * data["u"][s]
            states.append([ops.fma(ops.exp2(dt[s] * A2[k]), states[s][k], dtu * B[s][k]) for k in range(d_state)])
        grads = {name: [None] * size for name in ("du", "ddelta", "dz", "dBC")}
        for s in reversed(range(size)):
            step = {"u": data["u"][s], "g": data["dout"][s], "z": data["z"][s] if "z" in data else None, "x": x[s]}
            step.update(dt=dt[s], B=B[s], C=C[s], h=states[s], h_next=states[s + 1])
            step_grads = reverse_step(step, lam, dA, A2, D, delta_softplus, ops)
            grads["dBC"][s] = lane_sums(step_grads["dBC"], lane, shuffle, blocks.channels)
            for name in ("du", "ddelta", "dz"):
                grads[name][s] = step_grads[name]
            accumulate(0, step_grads["dD"])
            accumulate(1, step_grads["ddelta"])  # ddelta_bias
        for s in range(size):
            for name in ("du", "ddelta", "dz"):
                if name in outs:
                    lanes.store(outs[name], grads[name][s], batch, t0 + s)
            for row, value in enumerate(grads["dBC"][s]):
                plt.store(outs["dBC"].at[batch, as_index(t0 + s), group, block, as_index(row)], value)
        return lam, dA, totals, compensations

    first_tile, end_tile, tail = chunk_tiles(chunks, chunk, steps)
    lam = [lanes.load(ins["lam_in"], batch, chunk, k) for k in range(d_state)]
    carry = (lam, [zeros] * d_state, [zeros] * 2, [zeros] * 2)
    if tail:
        carry = if_last(chunks, chunk, lambda c: reverse_tile(c, end_tile, load_tile(end_tile, tail)), carry)

    def tile_body(i, carry_and_data):
        """Tile end - 1 - (i - first): the tiles in reverse; the next one's data is loaded before this one's stores."""
        carry, data = carry_and_data
        tile = end_tile - 1 - (i - first_tile)
        next_data = load_tile(jnp.maximum(tile - 1, first_tile), steps)
        return reverse_tile(carry, tile, data), next_data

    last_full = jnp.maximum(end_tile - 1, 0)
    carry, _ = lax.fori_loop(first_tile, end_tile, tile_body, (carry, load_tile(last_full, steps)))
    lam, dA, (dD, dbias), _ = carry
    for k in range(d_state):
        lanes.store(outs["lam_out"], lam[k], batch, chunk, k)
        lanes.store(outs["dA"], dA[k], batch, chunk, k)
    lanes.store(outs["dD"], dD, batch, chunk)
    lanes.store(outs["ddelta_bias"], dbias, batch, chunk)


def scan_adjoints(
    inputs: dict[str, jax.Array], *, delta_softplus: bool, blocks: ScanBlocks, interpret: bool
) -> dict[str, jax.Array]:
    """Launch ``_adjoint_kernel`` on chunks 1 .. K - 1 (K > 1): {lam float32 (b, K - 1, n, di), dtsum float32
    (b, K - 1, di)}, entry j for chunk j + 1."""
    batch, _, dim = inputs["dout"].shape
    d_state = inputs["A2"].shape[0]
    chunks = chunks_of(inputs, blocks)
    out_shape = {
        "lam": jax.ShapeDtypeStruct((batch, chunks.count - 1, d_state, dim), jnp.float32),
        "dtsum": jax.ShapeDtypeStruct((batch, chunks.count - 1, dim), jnp.float32),
    }
    names = ("delta", "dout", "z", "C", "BC", "A2", "delta_bias")
    return launch(
        _adjoint_kernel,
        {name: inputs[name] for name in names if name in inputs},
        out_shape,
        blocks=blocks,
        num_programs=chunks.count - 1,
        name="selective_scan_adjoints",
        interpret=interpret,
        delta_softplus=delta_softplus,
        chunks=chunks,
    )


def scan_backward(
    inputs: dict[str, jax.Array], *, delta_softplus: bool, blocks: ScanBlocks, interpret: bool
) -> dict[str, jax.Array]:
    """Launch the backward kernel on the ``ins`` of ``_backward_kernel``; returns its ``outs`` (per-program partial
    sums not yet reduced)."""
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    groups, d_state = groups_of(inputs), inputs["A2"].shape[0]
    group_dim = dim // groups
    chunks = chunks_of(inputs, blocks)
    blocks_per_group = pl.cdiv(group_dim, blocks.channels)
    rows = max(1, pl.next_power_of_2(2 * d_state) // blocks.channels)
    partial_BC = jax.ShapeDtypeStruct((batch, seqlen, groups, blocks_per_group, rows, blocks.channels), jnp.float32)
    per_state = jax.ShapeDtypeStruct((batch, chunks.count, d_state, dim), jnp.float32)
    per_channel = jax.ShapeDtypeStruct((batch, chunks.count, dim), jnp.float32)
    out_shape = {
        "du": jax.ShapeDtypeStruct(u.shape, u.dtype),
        "ddelta": jax.ShapeDtypeStruct(u.shape, inputs["delta"].dtype),
        "dBC": partial_BC,
        "dA": per_state,
        "lam_out": per_state,
        "dD": per_channel,
        "ddelta_bias": per_channel,
    }
    if "z" in inputs:
        out_shape["dz"] = jax.ShapeDtypeStruct(u.shape, inputs["z"].dtype)
    return launch(
        _backward_kernel,
        inputs,
        out_shape,
        blocks=blocks,
        num_programs=chunks.count,
        name="selective_scan_bwd",
        interpret=interpret,
        delta_softplus=delta_softplus,
        chunks=chunks,
    )
