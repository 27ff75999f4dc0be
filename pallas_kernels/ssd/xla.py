"""The SSD scan in its chunked matrix form (Mamba-2 paper, section 6), in plain XLA.

The sequence is cut into chunks of c steps. Within a chunk the scan is a masked attention-like product
(C Bᵀ ⊙ decay) X, which runs on the matrix units; across chunks only the (h, p, n) states are carried by a short
sequential scan over l / c chunks. Memory is linear in l: the largest arrays are (b, l / c, c, c, h).

Decays are exponentials of differences of cumulative sums of dt * A inside one chunk. Every exponent is masked to
-inf where it does not apply (above the diagonal, across a sequence reset) before ``exp``, so no exp of a large
positive number is ever formed and the gradients stay finite.

Matmul inputs are kept in the inputs' dtype (decay-weighted operands are cast back to it, as mamba_ssm's Triton
kernels do) with float32 accumulation, so bfloat16 runs on the tensor cores. float32 inputs follow the default
matmul precision (TF32 on recent NVIDIA GPUs, like mamba_ssm's Triton dots); set
``jax.default_matmul_precision("highest")`` for full float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_exp(exponent: jax.Array, mask: jax.Array) -> jax.Array:
    """exp(exponent) where mask, else 0; the masked exponents never reach exp (nor its gradient)."""
    return jnp.exp(jnp.where(mask, exponent, -jnp.inf))


def ssd_chunked(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    initial_states: jax.Array,
    resets: jax.Array,
    chunk_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Same contract as ``reference.ssd_reference``, computed chunk by chunk.

    Args:
      x: (b, l, h, p).
      dt: (b, l, h) float32, already biased, softplus-ed and clamped.
      A: (h,).
      B, C: (b, l, g, n).
      initial_states: (b, h, p, n) float32.
      resets: (b, l) bool, True where a new sequence starts.
      chunk_size: c; l need not be a multiple of it.

    Returns:
      y (b, l, h, p) float32 and the final state (b, h, p, n) float32.
    """
    batch, length, heads, headdim = x.shape
    groups, d_state = B.shape[2], B.shape[3]
    r = heads // groups  # heads per group: head h = (group h // r, member h % r)
    c = chunk_size
    k = -(-length // c)  # number of chunks
    pad = k * c - length

    # Pad the tail: dt = 0 there gives decay 1 and no input, so the final state is unchanged; no resets there.
    def pad_time(a):
        return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))

    xc = pad_time(x).reshape(batch, k, c, groups, r, headdim)
    Bc = pad_time(B).reshape(batch, k, c, groups, d_state)
    Cc = pad_time(C).reshape(batch, k, c, groups, d_state)
    dt = pad_time(dt).reshape(batch, k, c, heads)
    resets = pad_time(resets)

    # Sequence membership: segment[t] counts the resets up to t, so two positions share a sequence iff their
    # segments are equal. segment_before[k] is the segment of the position just before chunk k (0 before the start,
    # the sequence the initial state belongs to).
    segment = jnp.cumsum(resets, axis=1, dtype=jnp.int32).reshape(batch, k, c)
    segment_before = segment[:, :, 0] - resets.reshape(batch, k, c)[:, :, 0]
    segment_last = segment[:, :, -1]

    # Log-decays: cum[t] = sum of dt * A from the chunk start up to and including t.  (b, k, c, h)
    cum = jnp.cumsum(dt * A.astype(jnp.float32), axis=2)
    cum_last = cum[:, :, -1]  # (b, k, h)

    # 1. Within each chunk: y[i] = sum_{j <= i, same sequence} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j.
    causal = jnp.tril(jnp.ones((c, c), dtype=bool))
    same = (segment[:, :, :, None] == segment[:, :, None, :]) & causal  # (b, k, i, j)
    decay = _masked_exp(cum[:, :, :, None, :] - cum[:, :, None, :, :], same[..., None])  # (b, k, i, j, h)
    scores = jnp.einsum("bkign,bkjgn->bkijg", Cc, Bc, preferred_element_type=jnp.float32)
    weights = decay.reshape(batch, k, c, c, groups, r) * scores[..., None] * dt.reshape(batch, k, 1, c, groups, r)
    y_diag = jnp.einsum("bkijgr,bkjgrp->bkigrp", weights.astype(x.dtype), xc, preferred_element_type=jnp.float32)

    # 2. The state each chunk adds by its end: sum_{j in the chunk's last sequence} exp(cum_last - cum_j) dt_j x_j B_jᵀ.
    in_last_sequence = (segment == segment_last[:, :, None])[..., None]
    to_end = _masked_exp(cum_last[:, :, None, :] - cum, in_last_sequence)  # (b, k, c, h)
    x_weighted = (xc * (to_end * dt).reshape(batch, k, c, groups, r, 1)).astype(x.dtype)
    chunk_states = jnp.einsum("bkcgrp,bkcgn->bkgrpn", x_weighted, Bc, preferred_element_type=jnp.float32)
    chunk_states = chunk_states.reshape(batch, k, heads, headdim, d_state)

    # 3. Across chunks, sequentially: state entering chunk k+1 = carry_k * (state entering chunk k) + chunk_states_k,
    # where the carry is the chunk's total decay, or 0 if a sequence starts inside the chunk.
    carry = _masked_exp(cum_last, (segment_last == segment_before)[..., None])  # (b, k, h)

    def pass_state(state, inputs):
        carry_k, added_k = inputs  # (b, h), (b, h, p, n)
        return carry_k[:, :, None, None] * state + added_k, state

    final_state, states_in = jax.lax.scan(
        pass_state, initial_states, (jnp.moveaxis(carry, 1, 0), jnp.moveaxis(chunk_states, 1, 0))
    )
    states_in = jnp.moveaxis(states_in, 0, 1).reshape(batch, k, groups, r, headdim, d_state)

    # 4. What the incoming state contributes: y[i] += exp(cum_i) C_i . state_in, for positions still in that sequence.
    from_start = _masked_exp(cum, (segment == segment_before[:, :, None])[..., None])  # (b, k, c, h)
    y_off = jnp.einsum("bkcgn,bkgrpn->bkcgrp", Cc, states_in.astype(C.dtype), preferred_element_type=jnp.float32)
    y_off = y_off * from_start.reshape(batch, k, c, groups, r, 1)

    y = (y_diag + y_off).reshape(batch, k * c, heads, headdim)[:, :length]
    return y, final_state
