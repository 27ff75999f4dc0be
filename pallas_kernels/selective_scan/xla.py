"""Selective scan in plain XLA: ``chunked`` (the default off-GPU) and ``associative`` (a parallel scan over time).

Both hold the state per group as (..., g, p, n), p = di / g channels per group, so grouped B and C broadcast rather
than being repeated, and contract over n or p with einsums (on XLA:CPU a multiply-and-sum was up to 10x slower when
g = 1). Arguments and results of both are those of ``selective_scan_reference``.

CPU time on the 2-core dev machine (shared, +-15%), batch 2, seqlen 1024, di 256, n 16, g 1, float32, softplus,
forward / forward+backward: chunked 13 / 70 ms; the same chunks under ``jax.checkpoint`` with an autodiffed chunk
body 12 / 340 ms (104 ms at g = 2), hence the hand-written backward; reference (``lax.scan``) 87 / 291 ms;
associative 181 / 843 ms. The chunked forward computes exp(delta A) inside the time loop: on CPU writing any
(b, l, di, n) tensor to memory costs more than the arithmetic.
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.selective_scan.reference import discretize_delta, gate_output

# Chunk length of the chunked scan. Its CPU time moved by less than 20% between 16 and 256 (seqlen 1024 and 4096);
# 64 keeps both the chunk-boundary states (l / 64 of them) and one chunk's per-step states small at l = 2k-4k.
CHUNK_SIZE = 64


def _einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """float32 einsum at full precision (TPU and GPU would otherwise round its inputs to bf16 / tf32)."""
    return jnp.einsum(spec, x, y, precision=lax.Precision.HIGHEST)


def _step_terms(A: jax.Array, delta: jax.Array, u: jax.Array, B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A (g, p, n); delta, u (..., g, p); B (..., g, n) -> decay exp(delta A) and drive delta u B, (..., g, p, n)."""
    return jnp.exp(delta[..., None] * A), (delta * u)[..., None] * B[..., None, :]


def _readout(h: jax.Array, C: jax.Array) -> jax.Array:
    """h (..., g, p, n), C (..., g, n) -> y = <h, C> over n, (..., g, p)."""
    return _einsum("...gpn,...gn->...gp", h, C)


def _chunk_forward(A, h, delta, u, B, C):
    """Scan one chunk: A (g, p, n); h (b, g, p, n); delta, u (c, b, g, p); B, C (c, b, g, n) -> h, y (c, b, g, p)."""

    def step(h, inputs):
        delta_t, u_t, B_t, C_t = inputs
        decay, drive = _step_terms(A, delta_t, u_t, B_t)
        h = decay * h + drive
        return h, _readout(h, C_t)

    return lax.scan(step, h, (delta, u, B, C))


def _chunk_backward(A, h, delta, u, B, C, dy, dh, dA):
    """Backward of one chunk, from its starting state h (b, g, p, n) and the chunk's inputs (as ``_chunk_forward``).

    dh (b, g, p, n) is the cotangent of the chunk's last state, dA (b, g, p, n) the running dA before the sum over
    b, dy (c, b, g, p) the cotangent of y. Going back in time, with G_t = dL/dh_t and E_t = G_t h_{t-1} decay_t:
    dC_t = sum_p dy_t h_t, dA += E_t delta_t, ddelta_t = sum_n E_t A + u_t sum_n G_t B_t, du_t = delta_t sum_n G_t B_t,
    dB_t = sum_p G_t delta_t u_t, and G_{t-1} = decay_t G_t + dy_{t-1} C_{t-1}.
    Returns (dh of the chunk's starting state, dA) and (ddelta, du, dB, dC) shaped like the inputs.
    """

    def state_before(h, inputs):
        decay, drive = _step_terms(A, *inputs)
        return decay * h + drive, h

    _, h_prev = lax.scan(state_before, h, (delta, u, B))  # (c, b, g, p, n): this chunk's states, recomputed

    def step(carry, inputs):
        dh, dA = carry
        delta_t, u_t, B_t, C_t, dy_t, h_prev_t = inputs
        decay, drive = _step_terms(A, delta_t, u_t, B_t)
        h_t = decay * h_prev_t + drive
        dh = dh + dy_t[..., None] * C_t[..., None, :]
        d_exponent = dh * h_prev_t * decay  # dL / d(delta_t A)
        dh_B = _einsum("...gpn,...gn->...gp", dh, B_t)
        ddelta = _einsum("...gpn,gpn->...gp", d_exponent, A) + dh_B * u_t
        dB = _einsum("...gp,...gpn->...gn", delta_t * u_t, dh)
        dC = _einsum("...gp,...gpn->...gn", dy_t, h_t)
        return (dh * decay, dA + d_exponent * delta_t[..., None]), (ddelta, dh_B * delta_t, dB, dC)

    return lax.scan(step, (dh, dA), (delta, u, B, C, dy, h_prev), reverse=True)


@jax.custom_vjp
def _scan_chunks(A, h0, delta, u, B, C):
    """A (g, p, n); h0 (b, g, p, n); delta, u (k, c, b, g, p); B, C (k, c, b, g, n), k chunks of c steps, float32
    -> last state (b, g, p, n), y (k, c, b, g, p)."""
    return lax.scan(lambda h, chunk: _chunk_forward(A, h, *chunk), h0, (delta, u, B, C))


def _scan_chunks_fwd(A, h0, delta, u, B, C):
    """Forward that saves only the state entering each chunk, (k, b, g, p, n), besides the inputs."""

    def chunk_step(h, chunk):
        h_next, y = _chunk_forward(A, h, *chunk)
        return h_next, (y, h)

    h_last, (y, h_starts) = lax.scan(chunk_step, h0, (delta, u, B, C))
    return (h_last, y), (A, h_starts, delta, u, B, C)


def _scan_chunks_bwd(residuals, cotangents):
    """Chunks in reverse order, each recomputing its own states from its saved starting state."""
    A, h_starts, delta, u, B, C = residuals
    dh_last, dy = cotangents

    def chunk_step(carry, chunk):
        dh, dA = carry
        h, delta_c, u_c, B_c, C_c, dy_c = chunk
        return _chunk_backward(A, h, delta_c, u_c, B_c, C_c, dy_c, dh, dA)

    dA = jnp.zeros(h_starts.shape[1:], jnp.float32)
    (dh0, dA), (ddelta, du, dB, dC) = lax.scan(chunk_step, (dh_last, dA), (h_starts, delta, u, B, C, dy), reverse=True)
    return jnp.sum(dA, axis=0), dh0, ddelta, du, dB, dC


_scan_chunks.defvjp(_scan_chunks_fwd, _scan_chunks_bwd)


def selective_scan_chunked(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    z: jax.Array | None,
    delta_bias: jax.Array | None,
    delta_softplus: bool,
    initial_state: jax.Array | None,
    *,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Selective scan in time chunks of at most ``chunk_size`` steps, rematerialised chunk by chunk in the backward.

    The forward is a ``lax.scan`` over chunks of a ``lax.scan`` over steps that computes exp(delta A) and
    delta u B on the fly, so no (b, l, di, n) tensor is ever built. Its hand-written VJP (the CUDA kernel's strategy)
    keeps only the state entering each chunk, (l / c, b, di, n), and the inputs; the backward recomputes one chunk's
    states (c, b, di, n) at a time and runs the reverse-time recurrence on them. The sequence is cut into
    ceil(l / chunk_size) chunks of equal length c, the last padded with delta = 0: a step that leaves the state as
    it is. Reverse-mode differentiable only (``jax.grad``, ``jax.vjp``), not forward-mode (``jax.jvp``).
    """
    batch, seqlen, dim = u.shape
    groups, d_state = B.shape[2:]
    per_group = dim // groups
    num_chunks = -(-seqlen // chunk_size)
    chunk = -(-seqlen // num_chunks)  # the fewest chunks, then the least padding
    pad = num_chunks * chunk - seqlen

    def to_chunks(x):
        """(b, l, g, k) -> float32 (num_chunks, c, b, g, k), zero-padded at the end of time."""
        x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
        return jnp.moveaxis(x.reshape(batch, num_chunks, chunk, groups, x.shape[-1]), 0, 2)

    def by_group(x):
        """(b, l, di) -> (b, l, g, p)."""
        return x.reshape(batch, seqlen, groups, per_group)

    if initial_state is None:
        h0 = jnp.zeros((batch, groups, per_group, d_state), jnp.float32)
    else:
        h0 = initial_state.astype(jnp.float32).reshape(batch, groups, per_group, d_state)
    delta = discretize_delta(delta, delta_bias, delta_softplus)
    h_last, y = _scan_chunks(
        A.reshape(groups, per_group, d_state),
        h0,
        to_chunks(by_group(delta)),
        to_chunks(by_group(u)),
        to_chunks(B),
        to_chunks(C),
    )
    y = jnp.moveaxis(y, 2, 0).reshape(batch, num_chunks * chunk, dim)[:, :seqlen]
    return gate_output(y, u, D, z), h_last.reshape(batch, dim, d_state)


def selective_scan_associative(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    z: jax.Array | None,
    delta_bias: jax.Array | None,
    delta_softplus: bool,
    initial_state: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Selective scan as ``lax.associative_scan`` over time: O(log l) depth, but it builds several float32
    (b, l, di, n) tensors (and autodiff keeps them for the backward)."""
    batch, seqlen, dim = u.shape
    groups, d_state = B.shape[2:]
    per_group = dim // groups

    def by_group(x):
        """(b, l, di) -> float32 (b, l, g, p)."""
        return x.astype(jnp.float32).reshape(batch, seqlen, groups, per_group)

    delta = discretize_delta(delta, delta_bias, delta_softplus)
    A = A.reshape(groups, per_group, d_state)
    decay, drive = _step_terms(A, by_group(delta), by_group(u), B.astype(jnp.float32))  # (b, l, g, p, n)
    if initial_state is not None:
        h0 = initial_state.astype(jnp.float32).reshape(batch, groups, per_group, d_state)
        drive = drive.at[:, 0].add(decay[:, 0] * h0)

    def compose(earlier, later):
        """The affine map h -> a h + b of ``earlier`` followed by that of ``later``."""
        (a_early, b_early), (a_late, b_late) = earlier, later
        return a_late * a_early, a_late * b_early + b_late

    _, h = lax.associative_scan(compose, (decay, drive), axis=1)
    y = _readout(h, C.astype(jnp.float32)).reshape(batch, seqlen, dim)
    return gate_output(y, u, D, z), h[:, -1].reshape(batch, dim, d_state)
