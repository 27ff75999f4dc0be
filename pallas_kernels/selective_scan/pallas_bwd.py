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
The kernel needs h_{t-1} while walking time backwards. The forward kernel, run again first, stores the state before
every tile of ``backward_steps`` steps; each tile then recomputes its states into registers from that checkpoint and
walks them in reverse. Nothing of size (b, l, di, n) is stored; the sums over channels for dB and dC are reduced within
the program and written as one float32 partial per program, summed by the caller.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.selective_scan.pallas_config import ScanBlocks
from pallas_kernels.selective_scan.pallas_fwd import LOG2_E, as_index, program_lanes, sigmoid, softplus

LN_2 = 1.0 / LOG2_E


def kahan_add(total, compensation, term):
    """total + term, carrying the rounding error in ``compensation`` (Kahan): a sum over thousands of steps keeps
    float32 accuracy instead of an error that grows with the number of terms. Used for dD and ddelta_bias, whose
    reference gradients are tree reductions; dA (n registers more) keeps a plain running sum, as the reference's."""
    term = term - compensation
    new_total = total + term
    return new_total, (new_total - total) - term


def _backward_kernel(ins, outs, *, blocks: ScanBlocks, group_dim: int, delta_softplus: bool):
    """One program: the reverse scan of ``blocks.channels`` channels of one batch row.

    ins: u, delta, dout (b, l, di) [z (b, l, di)]; B, C (b, l, g, n); A2 = A log2(e) float32 (n, di); D, delta_bias
    float32 (di,); checkpoints float32 (b, cdiv(l, s) + 1, n, di) with s = blocks.backward_steps; dlast float32
    (b, n, di). outs: du, ddelta [dz] (b, l, di) in their inputs' dtypes; dBC float32 (b, l, g, blocks per group,
    packs * channels): this program's sums over its channels of dB_t (entries 0 .. n - 1) and dC_t (n .. 2n - 1),
    packed across the lanes; dA, dh0 float32 (b, n, di); dD, ddelta_bias float32 (b, di). The caller sums the
    float32 outputs over programs.

    As in the forward, every store of a tile waits for its end, and the next tile's loads are issued before them.
    """
    batch, group, lanes = program_lanes(blocks, group_dim)
    block = pl.program_id(2)
    seqlen = ins["u"].shape[1]
    d_state = ins["A2"].shape[0]
    steps = blocks.backward_steps
    A2 = [lanes.load(ins["A2"], k) for k in range(d_state)]
    D = lanes.load(ins["D"])
    bias = lanes.load(ins["delta_bias"])
    zeros = jnp.zeros((blocks.channels,), jnp.float32)
    lane = lax.iota(jnp.int32, blocks.channels)
    packs = pl.cdiv(2 * d_state, blocks.channels)

    def pack(sums):
        """2n scalars (the same in every lane) -> ``packs`` rows holding sum j in lane j % channels of row j //
        channels: one store per row instead of one per scalar."""
        rows = [zeros] * packs
        for j, value in enumerate(sums):
            row, position = divmod(j, blocks.channels)
            rows[row] = jnp.where(lane == position, value, rows[row])
        return rows

    def load_tile(tile, size: int):
        """Everything tile ``tile`` (steps tile * s .. + size - 1) reads: its checkpoint (n rows), rows of delta, u,
        dout (and z), and B_t, C_t as scalars in their dtype."""
        t0 = tile * steps
        data = {"h": [lanes.load(ins["checkpoints"], batch, tile, k) for k in range(d_state)]}
        for name in ("delta", "u", "dout", "z")[: 3 + ("z" in ins)]:
            data[name] = [lanes.load(ins[name], batch, t0 + s) for s in range(size)]
        for name in ("B", "C"):
            data[name] = [[ins[name][batch, t0 + s, group, k] for k in range(d_state)] for s in range(size)]
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
        dt = [softplus(x_s) for x_s in x] if delta_softplus else x
        B = [[b.astype(jnp.float32) for b in row] for row in data["B"]]
        C = [[c.astype(jnp.float32) for c in row] for row in data["C"]]
        # states[s] is h before step t0 + s; states[size] is h after the tile.
        states = [data["h"]]
        for s in range(size):
            dtu = dt[s] * data["u"][s]
            states.append([jnp.exp2(dt[s] * A2[k]) * states[s][k] + dtu * B[s][k] for k in range(d_state)])
        grads = {name: [None] * size for name in ("du", "ddelta", "dz", "dBC")}
        for s in reversed(range(size)):
            u, g = data["u"][s], data["dout"][s]
            gy = g
            if "z" in data:
                z = data["z"][s]
                sig_z = sigmoid(z)
                y = D * u
                for k in range(d_state):
                    y = y + states[s + 1][k] * C[s][k]
                gy = g * z * sig_z
                grads["dz"][s] = g * y * sig_z * (1.0 + z * (1.0 - sig_z))
            accumulate(0, gy * u)  # dD
            dtu = dt[s] * u
            lam_B = zeros  # <lam_t, B_t>
            lam_ah_A2 = zeros  # <lam_t, a_t h_{t-1}> A log2(e)
            dB, dC = [], []
            for k in range(d_state):
                lam[k] = lam[k] + gy * C[s][k]
                dC.append(jnp.sum(gy * states[s + 1][k]))
                dB.append(jnp.sum(lam[k] * dtu))
                lam_B = lam_B + lam[k] * B[s][k]
                decay = jnp.exp2(dt[s] * A2[k])
                lam_ah = lam[k] * decay * states[s][k]
                lam_ah_A2 = lam_ah_A2 + lam_ah * A2[k]
                dA[k] = dA[k] + lam_ah * dt[s]
                lam[k] = decay * lam[k]
            grads["dBC"][s] = pack(dB + dC)
            grads["du"][s] = gy * D + dt[s] * lam_B
            ddt = u * lam_B + lam_ah_A2 * LN_2
            grads["ddelta"][s] = ddt * sigmoid(x[s]) if delta_softplus else ddt
            accumulate(1, grads["ddelta"][s])  # ddelta_bias
        for s in range(size):
            for name in ("du", "ddelta", "dz"):
                if name in outs:
                    lanes.store(outs[name], grads[name][s], batch, t0 + s)
            for row, value in enumerate(grads["dBC"][s]):
                span = pl.ds(row * blocks.channels, blocks.channels)
                plt.store(outs["dBC"].at[batch, as_index(t0 + s), group, block, span], value)
        return lam, dA, totals, compensations

    lam = [lanes.load(ins["dlast"], batch, k) for k in range(d_state)]
    carry = (lam, [zeros] * d_state, [zeros] * 2, [zeros] * 2)
    full_tiles, tail = divmod(seqlen, steps)
    if tail:
        carry = reverse_tile(carry, full_tiles, load_tile(full_tiles, tail))
    if full_tiles:

        def tile_body(i, carry_and_data):
            """Tile full_tiles - 1 - i; the next one's data is loaded before this one's stores."""
            carry, data = carry_and_data
            tile = full_tiles - 1 - i
            next_data = load_tile(jnp.maximum(tile - 1, 0), steps)
            return reverse_tile(carry, tile, data), next_data

        carry, _ = lax.fori_loop(0, full_tiles, tile_body, (carry, load_tile(full_tiles - 1, steps)))
    lam, dA, (dD, dbias), _ = carry
    for k in range(d_state):
        lanes.store(outs["dh0"], lam[k], batch, k)
        lanes.store(outs["dA"], dA[k], batch, k)
    lanes.store(outs["dD"], dD, batch)
    lanes.store(outs["ddelta_bias"], dbias, batch)


def scan_backward(
    inputs: dict[str, jax.Array], *, delta_softplus: bool, blocks: ScanBlocks, interpret: bool
) -> dict[str, jax.Array]:
    """Launch the backward kernel on the ``ins`` of ``_backward_kernel``; returns its ``outs`` (per-program partial
    sums not yet reduced)."""
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    groups, d_state = inputs["B"].shape[2:]
    group_dim = dim // groups
    blocks_per_group = pl.cdiv(group_dim, blocks.channels)
    packs = pl.cdiv(2 * d_state, blocks.channels)
    partial_BC = jax.ShapeDtypeStruct((batch, seqlen, groups, blocks_per_group, packs * blocks.channels), jnp.float32)
    per_state = jax.ShapeDtypeStruct((batch, d_state, dim), jnp.float32)
    per_channel = jax.ShapeDtypeStruct((batch, dim), jnp.float32)
    out_shape = {
        "du": jax.ShapeDtypeStruct(u.shape, u.dtype),
        "ddelta": jax.ShapeDtypeStruct(u.shape, inputs["delta"].dtype),
        "dBC": partial_BC,
        "dA": per_state,
        "dh0": per_state,
        "dD": per_channel,
        "ddelta_bias": per_channel,
    }
    if "z" in inputs:
        out_shape["dz"] = jax.ShapeDtypeStruct(u.shape, inputs["z"].dtype)
    kernel = functools.partial(_backward_kernel, blocks=blocks, group_dim=group_dim, delta_softplus=delta_softplus)
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, groups, blocks_per_group),
        compiler_params=plt.CompilerParams(num_warps=blocks.num_warps, num_stages=1),
        interpret=interpret,
        name="selective_scan_bwd",
    )(inputs)
