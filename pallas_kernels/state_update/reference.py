"""One decode step of the selective scan, in float32, on the general head layout that covers Mamba-1 and Mamba-2."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def state_update_reference(
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
) -> tuple[jax.Array, jax.Array]:
    """Advance the state by one token and read it out.

    Head h reads group h // (h_total / g) of B and C. Everything is computed in float32::

        dt    = softplus(dt + dt_bias)                 # bias and softplus optional
        state = exp(dt A) state + dt outer(x, B)       # per head, state (p, n)
        out   = (state C + D x) * silu(z)              # D and z optional

    Args ("p|1" means either size, broadcast):
      state: (b, h, p, n).
      x: (b, h, p).
      dt: (b, h, p|1).
      A: (h, p|1, n|1).
      B, C: (b, g, n).
      D: (h, p|1) or None.
      z: (b, h, p) or None.
      dt_bias: (h, p|1) or None.
      dt_softplus: whether to apply softplus to dt.

    Returns:
      out (b, h, p) in x's dtype and the new state (b, h, p, n) float32.
    """
    f32 = jnp.float32
    heads_per_group = x.shape[1] // B.shape[1]
    B = jnp.repeat(B.astype(f32), heads_per_group, axis=1)[:, :, None, :]  # (b, h, 1, n)
    C = jnp.repeat(C.astype(f32), heads_per_group, axis=1)[:, :, None, :]
    x32 = x.astype(f32)

    dt = dt.astype(f32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(f32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    dt = dt[..., None]  # (b, h, p|1, 1)

    state = jnp.exp(dt * A.astype(f32)) * state.astype(f32) + dt * x32[..., None] * B
    out = jnp.sum(state * C, axis=-1)
    if D is not None:
        out = out + D.astype(f32) * x32
    if z is not None:
        out = out * jax.nn.silu(z.astype(f32))
    return out.astype(x.dtype), state
