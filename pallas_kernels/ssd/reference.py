"""The SSD recurrence one time step at a time: float32, sequential, obviously correct. The ground truth for xla.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def ssd_reference(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    initial_states: jax.Array,
    resets: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The SSD scan as a ``lax.scan`` over time, in float32.

    For every batch row and head (head h reads group h // (h_total / g) of B and C)::

        state = 0                                  where resets[t]
        state = exp(dt[t] * A) * state + dt[t] * outer(x[t], B[t])
        y[t]  = state @ C[t]

    Args:
      x: (b, l, h, p).
      dt: (b, l, h) float32, already biased, softplus-ed and clamped.
      A: (h,).
      B, C: (b, l, g, n).
      initial_states: (b, h, p, n) float32, the state before position 0.
      resets: (b, l) bool, True where a new sequence starts (the state is zeroed before that step).

    Returns:
      y (b, l, h, p) float32 (no D skip, no z gate) and the state after the last position (b, h, p, n) float32.
    """
    heads_per_group = x.shape[2] // B.shape[2]
    f32 = jnp.float32
    # Time-major so lax.scan walks over l; B and C repeated per head: (l, b, h, n).
    xs = (
        jnp.moveaxis(x.astype(f32), 1, 0),
        jnp.moveaxis(dt.astype(f32), 1, 0),
        jnp.moveaxis(jnp.repeat(B.astype(f32), heads_per_group, axis=2), 1, 0),
        jnp.moveaxis(jnp.repeat(C.astype(f32), heads_per_group, axis=2), 1, 0),
        jnp.moveaxis(resets, 1, 0),
    )
    A = A.astype(f32)

    def step(state, inputs):
        x_t, dt_t, B_t, C_t, reset_t = inputs  # (b, h, p), (b, h), (b, h, n), (b, h, n), (b,)
        state = jnp.where(reset_t[:, None, None, None], 0.0, state)
        decay = jnp.exp(dt_t * A)[:, :, None, None]
        state = decay * state + (dt_t[:, :, None] * x_t)[..., None] * B_t[:, :, None, :]
        y_t = jnp.sum(state * C_t[:, :, None, :], axis=-1)
        return state, y_t

    final_state, ys = jax.lax.scan(step, initial_states.astype(f32), xs)
    return jnp.moveaxis(ys, 0, 1), final_state
