"""selective_state_update: Mamba-2 decode steps against mamba_chunk_scan over the same tokens, Mamba-1 decode steps
against a float64 NumPy recurrence written here, the layouts mamba_ssm passes, dtypes, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mamba_chunk_scan, selective_state_update
from tests.tolerances import assert_close


def decode(state, xs: dict, params: dict, dt_softplus: bool):
    """Apply selective_state_update token by token (lax.scan over axis 1 of every array in ``xs``).
    Returns the outputs stacked on axis 1 and the last state."""

    def step(state, token):
        out, state = selective_state_update(state, **token, **params, dt_softplus=dt_softplus)
        return state, out

    state, outs = jax.lax.scan(step, state, {k: jnp.moveaxis(v, 1, 0) for k, v in xs.items()})
    return jnp.moveaxis(outs, 0, 1), state


@pytest.mark.parametrize(
    "dtype, groups, D_shape, gated",
    [("float32", 2, "h", True), ("float32", 1, "hp", False), ("bfloat16", 3, "h", True)],
)
def test_mamba2_steps_equal_chunk_scan(dtype, groups, D_shape, gated):
    b, l, h, p, n = 2, 9, 6, 3, 4
    rng = np.random.default_rng(0)

    def normal(*shape, dtype=dtype):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    xs = {"x": normal(b, l, h, p), "dt": normal(b, l, h), "B": normal(b, l, groups, n), "C": normal(b, l, groups, n)}
    if gated:
        xs["z"] = normal(b, l, h, p)
    params = {
        "A": jnp.asarray(-rng.uniform(0.5, 4.0, h), jnp.float32),
        "D": normal(*((h,) if D_shape == "h" else (h, p)), dtype="float32"),
        "dt_bias": jnp.asarray(rng.uniform(-4.0, -1.0, h), jnp.float32),
    }
    initial_state = normal(b, h, p, n, dtype="float32")

    outs, state = decode(initial_state, xs, params, dt_softplus=True)
    expected, expected_state = mamba_chunk_scan(
        **xs,
        **params,
        chunk_size=4,
        dt_softplus=True,
        initial_states=initial_state,
        return_final_states=True,
        implementation="reference",
    )
    assert outs.dtype == jnp.dtype(dtype) and state.dtype == jnp.float32
    assert_close(outs, expected, dtype, "out")
    assert_close(state, expected_state, jnp.float32, "state")


def test_mamba2_expanded_forms_equal_per_head_forms():
    """mamba_ssm's Mamba-2 passes dt (b, h, p), A (h, p, n), dt_bias (h, p), D (h, p): the same step."""
    b, h, p, n, g = 2, 4, 3, 5, 2
    rng = np.random.default_rng(1)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    state, x, z, B, C = normal(b, h, p, n), normal(b, h, p), normal(b, h, p), normal(b, g, n), normal(b, g, n)
    dt, A, dt_bias, D = normal(b, h), -jnp.exp(normal(h)), normal(h), normal(h)
    per_head = selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    expanded = selective_state_update(
        state,
        x,
        jnp.broadcast_to(dt[..., None], (b, h, p)),
        jnp.broadcast_to(A[:, None, None], (h, p, n)),
        B,
        C,
        D=jnp.broadcast_to(D[:, None], (h, p)),
        z=z,
        dt_bias=jnp.broadcast_to(dt_bias[:, None], (h, p)),
        dt_softplus=True,
    )
    for ours, theirs, name in zip(per_head, expanded, ("out", "state"), strict=True):
        assert_close(ours, theirs, jnp.float32, name)


def numpy_mamba1(state, xs: dict, params: dict):
    """Mamba-1 recurrence in float64, channel d reading group d // (di / g): (outputs (b, l, di), last state)."""
    state = np.asarray(state, np.float64)
    x, dt, z = (np.asarray(xs[k], np.float64) for k in ("x", "dt", "z"))
    A, D, dt_bias = (np.asarray(params[k], np.float64) for k in ("A", "D", "dt_bias"))
    B, C = (np.asarray(xs[k], np.float64) for k in ("B", "C"))
    if B.ndim == 3:  # (b, l, n): one group
        B, C = B[:, :, None], C[:, :, None]
    group_of_channel = np.arange(x.shape[2]) // (x.shape[2] // B.shape[2])
    B, C = B[:, :, group_of_channel], C[:, :, group_of_channel]  # (b, l, di, n)
    dt = np.logaddexp(0.0, dt + dt_bias)
    outs = np.zeros(x.shape)
    for t in range(x.shape[1]):
        state = np.exp(dt[:, t, :, None] * A) * state + (dt[:, t] * x[:, t])[..., None] * B[:, t]
        outs[:, t] = np.sum(state * C[:, t], axis=-1) + D * x[:, t]
    return outs * z / (1.0 + np.exp(-z)), state


@pytest.mark.parametrize("dtype, groups", [("float32", None), ("float32", 2), ("bfloat16", 1)])
def test_mamba1_steps_equal_recurrence(dtype, groups):
    """Mamba-1 layout: state (b, di, n), A (di, n), B and C (b, n) (groups None) or (b, g, n)."""
    b, l, di, n = 2, 7, 6, 4
    rng = np.random.default_rng(2)

    def normal(*shape, dtype=dtype):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    bc_shape = (b, l, n) if groups is None else (b, l, groups, n)
    xs = {"x": normal(b, l, di), "dt": normal(b, l, di), "z": normal(b, l, di), "B": normal(*bc_shape)}
    xs["C"] = normal(*bc_shape)
    params = {
        "A": -jnp.asarray(np.tile(np.arange(1, n + 1), (di, 1)), jnp.float32),  # S4D-real init
        "D": normal(di, dtype="float32"),
        "dt_bias": jnp.asarray(rng.uniform(-4.0, -1.0, di), jnp.float32),
    }
    initial_state = normal(b, di, n, dtype="float32")

    outs, state = decode(initial_state, xs, params, dt_softplus=True)
    expected, expected_state = numpy_mamba1(initial_state, xs, params)
    assert outs.shape == (b, l, di) and outs.dtype == jnp.dtype(dtype)
    assert state.shape == (b, di, n) and state.dtype == jnp.float32
    assert_close(outs, expected, dtype, "out")
    assert_close(state, expected_state, jnp.float32, "state")


def test_16bit_state_comes_back_float32():
    b, di, n = 1, 4, 2
    state = jnp.ones((b, di, n), jnp.bfloat16)
    x = jnp.ones((b, di), jnp.bfloat16)
    out, new_state = selective_state_update(state, x, x, -jnp.ones((di, n)), jnp.ones((b, n)), jnp.ones((b, n)))
    assert out.dtype == jnp.bfloat16 and new_state.dtype == jnp.float32
    expected = np.exp(-1.0) + 1.0  # exp(dt A) state + dt x B, with every input 1 (A = -1)
    assert_close(new_state, np.full((b, di, n), expected), jnp.float32)


f32 = jnp.float32
MAMBA2 = {
    "state": jnp.zeros((2, 4, 3, 5), f32),
    "x": jnp.zeros((2, 4, 3), f32),
    "dt": jnp.zeros((2, 4), f32),
    "A": jnp.zeros((4,), f32),
    "B": jnp.zeros((2, 2, 5), f32),
    "C": jnp.zeros((2, 2, 5), f32),
}
MAMBA1 = {
    "state": jnp.zeros((2, 6, 5), f32),
    "x": jnp.zeros((2, 6), f32),
    "dt": jnp.zeros((2, 6), f32),
    "A": jnp.zeros((6, 5), f32),
    "B": jnp.zeros((2, 5), f32),
    "C": jnp.zeros((2, 5), f32),
}
ERRORS = [
    ("state_rank", MAMBA2, {"state": jnp.zeros((2, 4), f32)}, "state must have shape"),
    ("state_int", MAMBA2, {"state": jnp.zeros((2, 4, 3, 5), jnp.int32)}, "state must have a floating dtype"),
    ("x", MAMBA2, {"x": jnp.zeros((2, 4, 2), f32)}, r"x must have shape \(2, 4, 3\)"),
    ("dt", MAMBA2, {"dt": jnp.zeros((2, 3), f32)}, r"dt must have shape \(2, 4\) or \(2, 4, 3\)"),
    ("A", MAMBA2, {"A": jnp.zeros((4, 5), f32)}, r"A must have shape \(4,\) or \(4, 3, 5\)"),
    ("groups", MAMBA2, {"B": jnp.zeros((2, 3, 5), f32), "C": jnp.zeros((2, 3, 5), f32)}, r"nheads \(4\).*ngroups"),
    ("B_state", MAMBA2, {"B": jnp.zeros((2, 2, 4), f32)}, r"B must have shape \(2, 5\) or \(2, 2, 5\)"),
    ("C", MAMBA2, {"C": jnp.zeros((2, 1, 5), f32)}, r"C must have shape \(2, 2, 5\)"),
    ("D", MAMBA2, {"D": jnp.zeros((3,), f32)}, r"D must have shape \(4,\) or \(4, 3\)"),
    ("z", MAMBA2, {"z": jnp.zeros((2, 4), f32)}, r"z must have shape \(2, 4, 3\)"),
    ("dt_bias", MAMBA2, {"dt_bias": jnp.zeros((5,), f32)}, r"dt_bias must have shape \(4,\) or \(4, 3\)"),
    ("mamba1_x", MAMBA1, {"x": jnp.zeros((2, 6, 1), f32)}, r"x must have shape \(2, 6\)"),
    ("mamba1_A", MAMBA1, {"A": jnp.zeros((6,), f32)}, r"A must have shape \(6, 5\)"),
    ("mamba1_groups", MAMBA1, {"B": jnp.zeros((2, 4, 5), f32), "C": jnp.zeros((2, 4, 5), f32)}, r"dim \(6\).*ngroups"),
    ("mamba1_D", MAMBA1, {"D": jnp.zeros((6, 1), f32)}, r"D must have shape \(6,\)"),
    ("mamba1_dt_int", MAMBA1, {"dt": jnp.zeros((2, 6), jnp.int32)}, "dt must have a floating dtype"),
]


@pytest.mark.parametrize("arguments, changes, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(arguments, changes, message):
    with pytest.raises(ValueError, match=message):
        selective_state_update(**{**arguments, **changes})
