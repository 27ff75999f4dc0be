"""The SSD scan as Pallas GPU kernels (Triton), with a Pallas backward through ``jax.custom_vjp``.

One program per (batch row, head) walks the sequence in chunks of Q steps, carrying the head's (p, n) float32 state
from chunk to chunk in registers. Per chunk it does what xla.py does for all chunks at once (cum: the cumulative sum
of dt A inside the chunk; last: the chunk's total)::

    y     = ((C Bᵀ) ⊙ L ⊙ dt) x  +  exp(cum) ⊙ (C stateᵀ)        L[t, s] = exp(cum_t - cum_s) for s <= t, else 0
    state = exp(last) state  +  (x ⊙ exp(last - cum) dt)ᵀ B

four (Q, n) x (n, p)-sized products on the tensor cores and Q x Q exponentials; only y and the final state are
written, and nothing of size (b, l / Q, Q, Q, h) ever reaches memory. The backward runs the same walk once more to
store the state entering every chunk (``_forward_kernel(store_states=True)``, a transient (b, h, l / Q, p, n)
buffer), walks the chunks in reverse to store the state's cotangent leaving every chunk
(``_adjoint_kernel``), then computes every chunk's gradients from those two states, all chunks in parallel: dx, ddt
and dA per (row, head, chunk) (``_gradients_kernel``: the derivation is in its docstring), dB and dC per (row, chunk,
block of heads), each program summing its heads' shares in registers (``_bc_gradients_kernel``); XLA sums the
blocks of a group.

Sequence resets (``seq_idx``) are not handled here: api.py sends packed sequences to the chunked XLA form.
Products take their operands in the inputs' dtype with float32 accumulation, as xla.py's; float32 inputs multiply in
full float32 (IEEE), not TF32. The backward's stored states and their cotangents, and y's cotangent, are kept in that
dtype too: every product rounds them to it anyway (the one elementwise use, a chunk's sum(S ⊙ dS), takes them
widened), and in 16 bits they are half the bytes the gradient launches read.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.batch_split import ChannelSplit, over_batch

CHUNK = 64  # Q: steps per chunk (a power of two >= 16); shorter sequences use the next power of two >= 16
NUM_WARPS = 4  # per program, forward
# The name of the kernels' output y, for rematerialisation policies that keep it (mamba_jax.train.remat's
# "dots_scan"): the forward launch is then not run again in the backward.
SAVEABLE_NAMES = ("ssd_output",)
BACKWARD_WARPS = 8  # per program, the two gradient launches
HEAD_BLOCK = 8  # at most this many heads' dB and dC summed by one program of the second gradient launch
TENSOR_SPLIT = 8  # with one group, the launch's blocks of heads split over up to this many devices


def ssd_pallas(x, dt, A, B, C, D, initial_states, *, out_dtype, interpret: bool):
    """``reference.ssd_reference`` without resets, plus the skip connection: y + D x (b, l, h, p) in ``out_dtype``,
    and the final state (b, h, p, n) float32.

    x (b, l, h, p) and B, C (b, l, g, n) floating (their products run in their common dtype); dt (b, l, h) float32,
    already biased, softplus-ed and clamped; A (h,); D (h, p), (h, 1) or None (no skip); initial_states (b, h, p, n)
    float32. Any sizes: l is padded to a multiple of the chunk, p and n to powers of two >= 16 (zeros, which change
    nothing), and the results cut back. The kernels add D x to y in float32 before rounding it to ``out_dtype``, and
    give D's gradient from the dx launch, so neither needs a pass of its own over (b, l, h, p).
    """
    batch, length, heads, headdim = x.shape
    d_state = B.shape[3]
    dtype = jnp.result_type(x, B, C)
    chunk = min(CHUNK, _padded(length))
    length_p = -(-length // chunk) * chunk
    headdim_p, d_state_p = _padded(headdim), _padded(d_state)

    def pad(a, *sizes):
        return jnp.pad(a, [(0, size - dim) for dim, size in zip(a.shape, sizes, strict=True)])

    skip = jnp.zeros((heads, headdim), jnp.float32) if D is None else jnp.broadcast_to(D, (heads, headdim))
    y, final = _ssd(
        pad(x.astype(dtype), batch, length_p, heads, headdim_p),
        pad(dt.astype(jnp.float32), batch, length_p, heads),
        A.astype(jnp.float32),
        pad(B.astype(dtype), batch, length_p, B.shape[2], d_state_p),
        pad(C.astype(dtype), batch, length_p, B.shape[2], d_state_p),
        pad(skip.astype(jnp.float32), heads, headdim_p),
        pad(initial_states.astype(jnp.float32), batch, heads, headdim_p, d_state_p),
        chunk,
        jnp.dtype(out_dtype),
        interpret,
    )
    y = checkpoint_name(y, SAVEABLE_NAMES[0])
    return y[:, :length, :, :headdim], final[:, :, :headdim, :d_state]


def _padded(size: int) -> int:
    """The smallest power of two >= max(size, 16): Triton's tiles are powers of two, its products at least 16 wide."""
    return max(16, 1 << (size - 1).bit_length())


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _ssd(x, dt, A, B, C, D, init, chunk, out_dtype, interpret):
    """The kernels on padded arrays: (y + D x in ``out_dtype``, final state). Differentiable in every array
    argument."""
    return _forward(x, dt, A, B, C, D, init, chunk, out_dtype, interpret, store_states=False)


def _ssd_fwd(x, dt, A, B, C, D, init, chunk, out_dtype, interpret):
    return _ssd(x, dt, A, B, C, D, init, chunk, out_dtype, interpret), (x, dt, A, B, C, D, init)


def _ssd_bwd(chunk, out_dtype, interpret, residuals, cotangents):
    x, dt, A, B, C, D, init = residuals
    dy, dfinal = cotangents
    states = _forward(x, dt, A, B, C, D, init, chunk, out_dtype, interpret, store_states=True)
    dx, ddt, dB, dC, dA, dD, dinit = _backward(x, dt, A, B, C, D, states, dy, dfinal, chunk, interpret)
    batch, length, groups, d_state = B.shape

    def per_group(per_block):  # (b, l, h / block, n) float32 -> (b, l, g, n) in B's dtype (no block spans groups)
        return per_block.reshape(batch, length, groups, -1, d_state).sum(3).astype(B.dtype)

    return dx, ddt, dA.sum(0), per_group(dB), per_group(dC), dD, dinit


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def _forward(x, dt, A, B, C, D, init, chunk, out_dtype, interpret, *, store_states):
    """(y + D x (b, l, h, p) in ``out_dtype``, final (b, h, p, n) float32), or with ``store_states`` the state
    entering each chunk (b, h, l / Q, p, n) in x's dtype."""
    kernel = functools.partial(_forward_kernel, chunk=chunk, store_states=store_states)
    name = "ssd_states" if store_states else "ssd_forward"

    def launch(x, dt, A, B, C, D, init):  # shapes are a device's share inside a sharded jit
        batch, length, heads, headdim = x.shape
        d_state = B.shape[3]
        if store_states:
            out_shape = jax.ShapeDtypeStruct((batch, heads, length // chunk, headdim, d_state), x.dtype)
        else:
            out_shape = (
                jax.ShapeDtypeStruct(x.shape, out_dtype),
                jax.ShapeDtypeStruct((batch, heads, headdim, d_state), jnp.float32),
            )
        call = _launch(kernel, out_shape, x, B, (batch, heads), NUM_WARPS, name, interpret)
        return call(x, dt, A, B, C, D, init)

    results = (lambda r: 1) if store_states else (lambda r: (2, 1))
    return _rows_and_heads(launch, [x, dt, A, B, C, D, init], [2, 2, 0, None, None, 0, 1], results, B.shape[2])


def _backward(x, dt, A, B, C, D, states, dy, dfinal, chunk, interpret):
    """(dx (b, l, h, p) in x's dtype, ddt (b, l, h), dB and dC per block of heads (b, l, h / block, n), dA per row
    (b, h), dD (h, p), dinit (b, h, p, n)), all float32 but dx. Three launches: the state's cotangent leaving every
    chunk, walked in reverse over (b, h); then from the two states every chunk's dx, ddt, dA and dD over (b, h, l / Q),
    and its dB and dC over (b, l / Q, h / block), each program summing its block of heads (``_head_block``). The
    state cotangents and dy go to the launches in x's dtype (the module's docstring says why)."""
    f32 = jnp.float32
    dy, dfinal = dy.astype(x.dtype), dfinal.astype(f32)
    groups = B.shape[2]
    block = _head_block(x.shape[2], groups)

    def adjoints(dt, A, C, dy, dfinal):
        batch, length, heads = dt.shape
        out_shape = (
            jax.ShapeDtypeStruct((batch, heads, length // chunk, *dfinal.shape[2:]), dy.dtype),
            jax.ShapeDtypeStruct(dfinal.shape, f32),
        )
        kernel = functools.partial(_adjoint_kernel, chunk=chunk)
        call = _launch(kernel, out_shape, dy, C, (batch, heads), NUM_WARPS, "ssd_adjoints", interpret)
        return call(dt, A, C, dy, dfinal)

    def gradients(x, dt, A, B, C, D, states, adjoints, dy):
        batch, length, heads, headdim = x.shape
        out_shape = (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(dt.shape, f32),
            jax.ShapeDtypeStruct((batch, heads, length // chunk), f32),
            jax.ShapeDtypeStruct((batch, heads, length // chunk, headdim), f32),
        )
        kernel = functools.partial(_gradients_kernel, chunk=chunk)
        grid = (batch, heads, length // chunk)
        call = _launch(kernel, out_shape, x, B, grid, BACKWARD_WARPS, "ssd_backward", interpret)
        return call(x, dt, A, B, C, D, states, adjoints, dy)

    def bc_gradients(x, dt, A, B, C, states, adjoints, dy):
        batch, length, heads, _ = x.shape
        per_block = jax.ShapeDtypeStruct((batch, length, heads // block, B.shape[3]), f32)
        kernel = functools.partial(_bc_gradients_kernel, chunk=chunk, block=block)
        grid = (batch, length // chunk, heads // block)
        call = _launch(kernel, (per_block, per_block), x, B, grid, BACKWARD_WARPS, "ssd_backward_bc", interpret, 1)
        return call(x, dt, A, B, C, states, adjoints, dy)

    cotangents, dinit = _rows_and_heads(adjoints, [dt, A, C, dy, dfinal], [2, 0, None, 2, 1], lambda r: (1, 1), groups)
    args, head_dims = [x, dt, A, B, C, states, cotangents, dy], [2, 2, 0, None, None, 1, 1, 2]
    with_skip, skip_dims = [*args[:5], D, *args[5:]], [*head_dims[:5], 0, *head_dims[5:]]
    dx, ddt, dA, dD = _rows_and_heads(gradients, with_skip, skip_dims, lambda r: (2, 2, 1, 1), groups)
    dB, dC = _rows_and_heads(bc_gradients, args, head_dims, lambda r: (2, 2), groups)
    return dx, ddt, dB, dC, dA.sum(2), dD.sum((0, 2)), dinit


def _head_block(heads: int, groups: int) -> int:
    """Heads whose dB and dC one program sums: the largest power of two <= HEAD_BLOCK that divides the heads of a
    group (a block never spans two groups). With one group the heads can be split over devices (tensor parallelism:
    ``_rows_and_heads``), by blocks here, so the blocks are kept at least TENSOR_SPLIT many."""
    limit = HEAD_BLOCK if groups > 1 else max(1, heads // TENSOR_SPLIT)
    block = 1
    while block * 2 <= limit and (heads // groups) % (block * 2) == 0:
        block *= 2
    return block


def _launch(kernel, out_shape, x, B, grid, num_warps: int, name: str, interpret: bool, num_stages: int = 2):
    """``pl.pallas_call`` of ``kernel`` over ``grid`` for x (b, l, h, ...) and B (b, l, g, n); every operand whole in
    every program. ``num_stages``: Triton's software pipelining of a loop's loads (2 for the walks over chunks; the
    loop over heads runs faster without it)."""
    return pl.pallas_call(
        functools.partial(kernel, heads_per_group=x.shape[2] // B.shape[2]),
        out_shape=out_shape,
        grid=grid,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )


def _rows_and_heads(call, args, head_dims, results, groups: int):
    """``call(*args)`` through ``over_batch``: rows split over the batch axes of a sharded jit; with one group of B and
    C, heads over the tensor axes too (``head_dims``: each operand's head dimension, None for B and C, which every head
    reads; ``results``: the results' head dimensions)."""
    channels = ChannelSplit(head_dims, results) if groups == 1 else None
    return over_batch(call, args, [a.ndim > 1 for a in args], channels)


def _precision(dtype):
    return lax.Precision.HIGHEST if dtype == jnp.float32 else None


def _dot(a, b, contract: tuple[int, int], precision):
    """a (i, j) and b (k, l) contracted over a's dimension contract[0] and b's contract[1], float32 result."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _chunk_decays(dt, A, chunk: int):
    """For one chunk: cum (Q,) = cumulative sum of dt A, last = its total, L (Q, Q) = exp(cum_t - cum_s) for s <= t
    else 0 (masked before exp, so no overflow)."""
    a = dt * A
    cum = jnp.cumsum(a)
    step = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
    causal = step >= lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
    L = jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))
    return cum, jnp.sum(a), L


def _forward_kernel(
    x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, init_ref, *out_refs, chunk, store_states, heads_per_group
):
    """One program: row b, head h; the state carried over the l / Q chunks.

    Refs (whole arrays): x (b, l, h, p), dt (b, l, h) float32, A (h,) float32, B and C (b, l, g, n), D (h, p)
    float32, init (b, h, p, n) float32. Writes y + D x (b, l, h, p) and the final state (b, h, p, n), or with
    ``store_states`` the state entering each chunk, states (b, h, l / Q, p, n).
    """
    b, h = pl.program_id(0), pl.program_id(1)
    g = h // heads_per_group
    A = A_ref[h]
    dtype = x_ref.dtype
    precision = _precision(dtype)

    def step(k, state):
        t = pl.ds(k * chunk, chunk)
        x, dt = x_ref[b, t, h, :], dt_ref[b, t, h]
        Bk, Ck = B_ref[b, t, g, :], C_ref[b, t, g, :]
        cum, last, L = _chunk_decays(dt, A, chunk)
        to_end = jnp.exp(last - cum) * dt
        if store_states:
            out_refs[0][b, h, k] = state.astype(out_refs[0].dtype)
        else:
            scores = _dot(Ck, Bk, (1, 1), precision) * L * dt[None, :]  # (Q, Q)
            y = _dot(scores.astype(dtype), x, (1, 0), precision) + D_ref[h, :][None, :] * x.astype(jnp.float32)
            y += jnp.exp(cum)[:, None] * _dot(Ck, state.astype(dtype), (1, 1), precision)
            out_refs[0][b, t, h, :] = y.astype(out_refs[0].dtype)
        added = _dot((x.astype(jnp.float32) * to_end[:, None]).astype(dtype), Bk, (0, 0), precision)  # (p, n)
        return jnp.exp(last) * state + added

    state = lax.fori_loop(0, x_ref.shape[1] // chunk, step, init_ref[b, h])
    if not store_states:
        out_refs[1][b, h] = state


def _adjoint_kernel(dt_ref, A_ref, C_ref, dy_ref, dfinal_ref, adjoints_ref, dinit_ref, *, chunk, heads_per_group):
    """One program: row b, head h; the chunks in reverse. Stores dS, the cotangent of the state leaving each chunk
    (adjoints (b, h, l / Q, p, n)), and the initial state's (dinit (b, h, p, n)). Through a chunk (y's term
    exp(cum) ⊙ (C Sᵀ) and S_out = exp(last) S + ...): dS_in = exp(last) dS_out + (exp(cum) ⊙ dy)ᵀ C."""
    b, h = pl.program_id(0), pl.program_id(1)
    g = h // heads_per_group
    A = A_ref[h]
    dtype = C_ref.dtype
    precision = _precision(dtype)
    num_chunks = dt_ref.shape[1] // chunk

    def step(i, dS):
        k = num_chunks - 1 - i
        t = pl.ds(k * chunk, chunk)
        dt, dy, Ck = dt_ref[b, t, h], dy_ref[b, t, h, :], C_ref[b, t, g, :]
        adjoints_ref[b, h, k] = dS.astype(adjoints_ref.dtype)
        a = dt * A
        into = jnp.exp(jnp.cumsum(a))
        return jnp.exp(jnp.sum(a)) * dS + _dot((dy * into[:, None]).astype(dtype), Ck, (0, 0), precision)

    dinit_ref[b, h] = lax.fori_loop(0, num_chunks, step, dfinal_ref[b, h])


def _gradients_kernel(
    x_ref,
    dt_ref,
    A_ref,
    B_ref,
    C_ref,
    D_ref,
    states_ref,
    adjoints_ref,
    dy_ref,
    dx_ref,
    ddt_ref,
    dA_ref,
    dD_ref,
    *,
    chunk,
    heads_per_group,
):
    """One program: row b, head h, chunk k, from S, the state entering the chunk (``states``), and dS, the cotangent
    of the one leaving it (``adjoints``). Writes the chunk's rows of dx and ddt and its shares of dA and D's gradient,
    dA (b, h, l / Q) and dD (b, h, l / Q, p).

    With w = exp(last - cum) dt and the forward's y and S_out::

        y     = (CBᵀ ⊙ L ⊙ dt) x + exp(cum) ⊙ (C Sᵀ) + D ⊙ x          S_out = exp(last) S + (x ⊙ w)ᵀ B

    G = dy xᵀ (G[t, s] = dy_t . x_s) and BdS = B dSᵀ (the cotangent of x ⊙ w) give::

        dx   = (CBᵀ ⊙ L ⊙ dt)ᵀ dy + w ⊙ BdS + D ⊙ dy
        dD   = colsum(dy ⊙ x)
        ddt  = colsum(G ⊙ L ⊙ CBᵀ) + exp(last - cum) ⊙ rowsum(x ⊙ BdS) + A da

    where da, the cotangent of a = dt A, is the reverse cumulative sum of dcum plus dlast (last = sum a):

        Z     = G ⊙ L ⊙ CBᵀ ⊙ dt
        dcum  = rowsum(Z) - colsum(Z) + exp(cum) ⊙ rowsum(dy ⊙ C Sᵀ) - w ⊙ rowsum(x ⊙ BdS)
        dlast = exp(last) sum(S ⊙ dS) + sum(w ⊙ rowsum(x ⊙ BdS))

    and the chunk's share of dA = sum of da dt. (dB and dC: ``_bc_gradients_kernel``.)
    """
    b, h, k = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = h // heads_per_group
    A = A_ref[h]
    dtype = x_ref.dtype
    precision = _precision(dtype)
    t = pl.ds(k * chunk, chunk)
    x, dt, dy = x_ref[b, t, h, :], dt_ref[b, t, h], dy_ref[b, t, h, :]
    Bk, Ck = B_ref[b, t, g, :], C_ref[b, t, g, :]
    S, dS = states_ref[b, h, k].astype(jnp.float32), adjoints_ref[b, h, k].astype(jnp.float32)
    cum, last, L = _chunk_decays(dt, A, chunk)
    into = jnp.exp(cum)
    to_end = jnp.exp(last - cum)
    w = to_end * dt

    CB = _dot(Ck, Bk, (1, 1), precision)  # (t, s): C_t . B_s
    BdS = _dot(Bk, dS.astype(dtype), (1, 1), precision)  # (Q, p)
    x_dS = jnp.sum(x.astype(jnp.float32) * BdS, axis=1)  # (Q,)
    dx = _dot((CB * L * dt[None, :]).astype(dtype), dy, (0, 0), precision) + w[:, None] * BdS
    dx_ref[b, t, h, :] = (dx + D_ref[h, :][None, :] * dy).astype(dx_ref.dtype)
    dD_ref[b, h, k, :] = jnp.sum(dy.astype(jnp.float32) * x.astype(jnp.float32), axis=0)

    Z1 = _dot(dy, x, (1, 1), precision) * L * CB  # G ⊙ L ⊙ CBᵀ: Z without dt
    Z = Z1 * dt[None, :]
    CS = _dot(Ck, S.astype(dtype), (1, 1), precision)  # (Q, p): C Sᵀ
    dcum = jnp.sum(Z, axis=1) - jnp.sum(Z, axis=0) + into * jnp.sum(dy * CS, axis=1) - w * x_dS
    dlast = jnp.exp(last) * jnp.sum(S * dS) + jnp.sum(w * x_dS)
    da = jnp.sum(dcum) - jnp.cumsum(dcum) + dcum + dlast  # reverse cumulative sum of dcum, plus dlast
    ddt_ref[b, t, h] = jnp.sum(Z1, axis=0) + to_end * x_dS + A * da
    dA_ref[b, h, k] = jnp.sum(da * dt)


def _bc_gradients_kernel(
    x_ref,
    dt_ref,
    A_ref,
    B_ref,
    C_ref,
    states_ref,
    adjoints_ref,
    dy_ref,
    dB_ref,
    dC_ref,
    *,
    chunk,
    block,
    heads_per_group,
):
    """One program: row b, chunk k, block j of ``block`` heads (all of one group). Sums the heads' cotangents of
    the chunk's B and C rows into dB and dC (b, l, h / block, n) at block j; with ``_gradients_kernel``'s names::

        dC   = (G ⊙ L ⊙ dt) B + exp(cum) ⊙ (dy S)
        dB   = (G ⊙ L ⊙ dt)ᵀ C + (x ⊙ w) dS

    B and C are read once for the block's heads, and nothing per head is written.
    """
    b, k, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = (j * block) // heads_per_group
    dtype = x_ref.dtype
    precision = _precision(dtype)
    t = pl.ds(k * chunk, chunk)
    Bk, Ck = B_ref[b, t, g, :], C_ref[b, t, g, :]

    def head(i, sums):
        dB, dC = sums
        h = j * block + i
        x, dt, dy = x_ref[b, t, h, :], dt_ref[b, t, h], dy_ref[b, t, h, :]
        S, dS = states_ref[b, h, k].astype(dtype), adjoints_ref[b, h, k].astype(dtype)
        cum, last, L = _chunk_decays(dt, A_ref[h], chunk)
        dscores = (_dot(dy, x, (1, 1), precision) * L * dt[None, :]).astype(dtype)  # G ⊙ L ⊙ dt
        dC += _dot(dscores, Bk, (1, 0), precision) + jnp.exp(cum)[:, None] * _dot(dy, S, (1, 0), precision)
        xw = (x.astype(jnp.float32) * (jnp.exp(last - cum) * dt)[:, None]).astype(dtype)
        dB += _dot(dscores, Ck, (0, 0), precision) + _dot(xw, dS, (1, 0), precision)
        return dB, dC

    zeros = jnp.zeros(Bk.shape, jnp.float32)
    dB, dC = lax.fori_loop(0, block, head, (zeros, zeros))
    dB_ref[b, t, j, :] = dB
    dC_ref[b, t, j, :] = dC
