"""The sequential selective scan: one ``lax.scan`` step per token, the ground truth every fast path is tested against.

Also holds the two element-wise pieces every implementation shares: the delta prologue and the output epilogue.
Shapes follow docs/architecture.md: b batch, l seqlen, di channels, n d_state, g groups of B/C.
"""

import jax
import jax.numpy as jnp
from jax import lax


def widen(x: jax.Array) -> jax.Array:
    """x in float32, or float64 if it is float64 (the references' float64 runs in the tests)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def discretize_delta(delta: jax.Array, delta_bias: jax.Array | None, delta_softplus: bool) -> jax.Array:
    """delta (b, l, di), delta_bias (di,) or None -> float32 (b, l, di): softplus(delta + delta_bias), each optional."""
    delta = widen(delta)
    if delta_bias is not None:
        delta = delta + widen(delta_bias)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    return delta


def gate_output(y: jax.Array, u: jax.Array, D: jax.Array | None, z: jax.Array | None) -> jax.Array:
    """y float32 (b, l, di), u (b, l, di), D (di,) or None, z (b, l, di) or None -> (y + D u) silu(z), u's dtype."""
    if D is not None:
        y = y + widen(D) * widen(u)
    if z is not None:
        y = y * jax.nn.silu(widen(z))
    return y.astype(u.dtype)


def selective_scan_reference(
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
    """Selective scan, one time step at a time, in float32 (float64 when the arguments are).

    u, delta, z (b, l, di); A float32 (di, n); B, C (b, l, g, n); D, delta_bias (di,); initial_state float32
    (b, di, n). Returns out (b, l, di) in u's dtype and the last state h_l float32 (b, di, n), where
    h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t and y_t = <h_t, C_t> over n.
    """
    batch, _, dim = u.shape
    groups = B.shape[2]
    delta = discretize_delta(delta, delta_bias, delta_softplus)
    # Channel d reads group d // (di / g).
    B = jnp.repeat(widen(B), dim // groups, axis=2)  # (b, l, di, n)
    C = jnp.repeat(widen(C), dim // groups, axis=2)  # (b, l, di, n)
    # The state's dtype: float32, or float64 when any argument is (then the zeros and a float32 initial_state too).
    state_dtype = jnp.result_type(delta.dtype, A.dtype, B.dtype, widen(u).dtype)
    if initial_state is None:
        initial_state = jnp.zeros((batch, dim, A.shape[1]), state_dtype)

    def step(h, inputs):
        delta_t, u_t, B_t, C_t = inputs  # (b, di), (b, di), (b, di, n), (b, di, n)
        h = jnp.exp(delta_t[..., None] * A) * h + (delta_t * u_t)[..., None] * B_t
        return h, jnp.sum(h * C_t, axis=-1)

    def time_major(x):
        return jnp.moveaxis(x, 1, 0)

    inputs = (time_major(delta), time_major(widen(u)), time_major(B), time_major(C))
    last_state, y = lax.scan(step, initial_state.astype(state_dtype), inputs)
    return gate_output(time_major(y), u, D, z), last_state
