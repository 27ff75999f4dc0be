"""selective_state_update: Mamba-2 decode steps against mamba_chunk_scan over the same tokens, Mamba-1 decode steps
against a float64 NumPy recurrence written here, the layouts mamba_ssm passes, dtypes, and argument errors; then the
Pallas kernel against the reference (in Pallas's interpreter on CPU; compiled, at full size, under the ``gpu``
marker)."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mamba_chunk_scan, selective_state_update
from pallas_kernels.selective_scan.pallas import pallas_supported
from pallas_kernels.state_update.pallas import state_update_pallas
from pallas_kernels.state_update.reference import state_update_reference
from tests.test_selective_scan import all_eqns
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
    ("dt_softplus_array", MAMBA1, {"dt_softplus": jnp.array(True)}, "dt_softplus must be a Python bool"),
]


@pytest.mark.parametrize("arguments, changes, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(arguments, changes, message):
    with pytest.raises(ValueError, match=message):
        selective_state_update(**{**arguments, **changes})


# ---- implementation="pallas" (the kernel; in Pallas's interpreter on CPU) against the reference ----


@dataclasses.dataclass(frozen=True)
class Step:
    """One decode step's sizes and options. layout: "mamba1" (state (b, di, n), ``heads`` = di), "mamba2" (per-head
    dt (b, h), A (h,), D and dt_bias (h,)) or "expanded" (mamba_ssm's Mamba-2 kernel arguments: dt (b, h, p),
    A (h, p, n), D and dt_bias (h, p)). groups None: B and C as (b, n)."""

    layout: str
    batch: int
    heads: int
    headdim: int
    d_state: int
    groups: int | None
    dtype: str = "float32"
    with_D: bool = True
    with_z: bool = True
    with_bias: bool = True
    softplus: bool = True

    def __str__(self) -> str:
        return "-".join(str(v) for v in dataclasses.astuple(self))


def step_inputs(step: Step, seed: int = 0) -> dict:
    """Keyword arguments of ``selective_state_update`` at Mamba-like scales (decays exp(dt A) in about (0.01, 1))."""
    rng = np.random.default_rng(seed)
    mamba1 = step.layout == "mamba1"
    b, h, p, n, g = step.batch, step.heads, step.headdim, step.d_state, step.groups
    per_channel = (b, h) if mamba1 else (b, h, p)  # x, z
    dt_shape = {"mamba1": (b, h), "mamba2": (b, h), "expanded": (b, h, p)}[step.layout]
    A_shape = {"mamba1": (h, n), "mamba2": (h,), "expanded": (h, p, n)}[step.layout]
    param_shape = {"mamba1": (h,), "mamba2": (h,), "expanded": (h, p)}[step.layout]  # D, dt_bias

    def array(x, dtype="float32"):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    if step.softplus:
        dt, dt_bias = rng.normal(-1.0, 0.5, dt_shape), rng.uniform(-1.5, 0.5, param_shape)
    else:  # dt + dt_bias stays positive
        dt, dt_bias = rng.uniform(0.02, 0.6, dt_shape), rng.uniform(0.0, 0.1, param_shape)
    bc_shape = (b, n) if g is None else (b, g, n)
    return {
        "state": array(rng.normal(size=(b, h, n) if mamba1 else (b, h, p, n))),
        "x": array(rng.normal(size=per_channel), step.dtype),
        "dt": array(dt, step.dtype),
        "A": array(-np.exp(rng.uniform(-2.0, 1.5, A_shape))),
        "B": array(rng.normal(size=bc_shape), step.dtype),
        "C": array(rng.normal(size=bc_shape), step.dtype),
        "D": array(rng.normal(size=param_shape)) if step.with_D else None,
        "z": array(rng.normal(size=per_channel), step.dtype) if step.with_z else None,
        "dt_bias": array(dt_bias) if step.with_bias else None,
        "dt_softplus": step.softplus,
    }


def check_pallas_step(step: Step, seed: int = 0, x64: bool = False) -> None:
    """The kernel against the reference; ``x64``: the kernel under ``jax.enable_x64`` (the reference without it)."""
    inputs = step_inputs(step, seed)
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        out, state = selective_state_update(**inputs, implementation="pallas")
    expected, expected_state = selective_state_update(**inputs, implementation="reference")
    assert out.shape == inputs["x"].shape and out.dtype == jnp.dtype(step.dtype)
    assert state.shape == inputs["state"].shape and state.dtype == jnp.float32
    assert_close(out, expected, step.dtype, "out")
    assert_close(state, expected_state, jnp.float32, "state")


# Small: the interpreter compiles each case (about a second). Rows of p per program come from rows_per_program (256
# state values a program): 16 rows at n = 16, 4 at n = 64. Mamba-1 with di 200 in 2 groups is 2 heads of p = 100 rows
# (6 blocks of 16 and a masked tail of 4); p = 48 is 3 blocks at n = 16 and 12 at n = 64, p = 24 one full block and a
# masked one; p = 6 with n = 12 is one block of 8 rows by 16 columns, 2 rows and 4 columns masked.
PALLAS_STEPS = [
    Step("mamba1", 1, 200, 1, 16, 2),
    Step("mamba1", 3, 64, 1, 16, None, "bfloat16", with_D=False, with_z=False, with_bias=False, softplus=False),
    Step("mamba1", 3, 200, 1, 16, 2, "float16"),
    Step("mamba2", 3, 4, 48, 16, 2),
    Step("mamba2", 1, 2, 48, 64, 1, "bfloat16", with_z=False, with_bias=False),
    Step("mamba2", 3, 4, 6, 12, None, with_D=False, softplus=False),
    Step("expanded", 3, 4, 16, 64, 2, "float16"),
    Step("expanded", 1, 2, 24, 16, 1, with_D=False, with_z=False, with_bias=False, softplus=False),
]


@pytest.mark.parametrize("step", PALLAS_STEPS, ids=str)
def test_pallas_matches_reference(step):
    check_pallas_step(step)


# Rows masked (Mamba-1: 2 heads of 100 rows), neither (p = 48, n = 16), rows and columns (p = 6, n = 12), the
# expanded layout in float16.
X64_STEPS = [PALLAS_STEPS[0], PALLAS_STEPS[3], PALLAS_STEPS[5], PALLAS_STEPS[6]]


@pytest.mark.parametrize("step", X64_STEPS, ids=str)
def test_pallas_under_enable_x64(step):
    """With jax_enable_x64 the kernel traces in Pallas's interpreter and matches the reference. (Its stores' Python
    int slice starts were int64 there, beside the int32 program ids, and the interpreter's store refused the mix.)"""
    check_pallas_step(step, x64=True)


@pytest.mark.parametrize("rows", [1, 32])
def test_pallas_rows_and_broadcasts(rows):
    """The kernel on the general layout: p = 100 in blocks of ``rows`` (4 blocks, the last of 4 rows, for 32), A with
    each broadcast size (h, p, 1) and (h, 1, n), a bfloat16 state (not aliased)."""
    b, h, p, n, g = 2, 2, 100, 16, 2
    rng = np.random.default_rng(3)

    def normal(*shape, dtype="float32"):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)

    state, x, z = normal(b, h, p, n, dtype="bfloat16"), normal(b, h, p), normal(b, h, p)
    B, C, D, dt, dt_bias = normal(b, g, n), normal(b, g, n), normal(h, 1), normal(b, h, p), normal(h, 1)
    for A in (-jnp.exp(normal(h, p, 1)), -jnp.exp(normal(h, 1, n))):
        arguments = (state, x, dt, A, B, C, D, z, dt_bias, True)
        out, new_state = state_update_pallas(*arguments, interpret=True, rows=rows)
        expected, expected_state = state_update_reference(*arguments)
        assert new_state.dtype == jnp.float32
        assert_close(out, expected, jnp.float32, "out")
        assert_close(new_state, expected_state, jnp.float32, "state")


def _pallas_call_aliases(fn, *args) -> list:
    return [
        eqn.params["input_output_aliases"]
        for eqn in all_eqns(jax.make_jaxpr(fn)(*args).jaxpr)
        if eqn.primitive.name == "pallas_call"
    ]


def test_pallas_updates_a_float32_state_in_place():
    """The kernel's new state is its state input's buffer when that is float32 (not for a bfloat16 state)."""
    inputs = step_inputs(Step("mamba2", 1, 2, 4, 16, 1))

    def update(state):
        return selective_state_update(**{**inputs, "state": state}, implementation="pallas")

    [aliases] = _pallas_call_aliases(update, inputs["state"])
    assert len(aliases) == 1
    assert _pallas_call_aliases(update, inputs["state"].astype(jnp.bfloat16)) == [()]


@pytest.mark.parametrize("layout", ["mamba1", "mamba2"])
def test_pallas_steps_in_a_loop(layout):
    """Decoding several tokens with the kernel inside lax.scan (the state carried, updated in place)."""
    b, l, h, p, n, g = 2, 5, 4, 8, 16, 2
    mamba1 = layout == "mamba1"
    rng = np.random.default_rng(4)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    channels = (b, l, h) if mamba1 else (b, l, h, p)
    xs = {"x": normal(*channels), "dt": normal(*channels[:3]), "z": normal(*channels)}
    xs["B"], xs["C"] = normal(b, l, g, n), normal(b, l, g, n)
    params = {"A": -jnp.exp(normal(h, n) if mamba1 else normal(h)), "D": normal(h), "dt_bias": normal(h)}
    initial_state = normal(*((b, h, n) if mamba1 else (b, h, p, n)))
    outs, state = decode(initial_state, xs, {**params, "implementation": "pallas"}, dt_softplus=True)
    expected, expected_state = decode(initial_state, xs, {**params, "implementation": "reference"}, dt_softplus=True)
    assert_close(outs, expected, jnp.float32, "out")
    assert_close(state, expected_state, jnp.float32, "state")


def test_pallas_gradient_is_the_references():
    """Under differentiation the Pallas path runs the reference: same gradients in every float argument."""
    inputs = step_inputs(Step("mamba2", 2, 4, 3, 4, 2))
    arrays = {k: v for k, v in inputs.items() if isinstance(v, jax.Array)}

    def loss(arrays, implementation):
        out, state = selective_state_update(**arrays, dt_softplus=True, implementation=implementation)
        return jnp.sum(out * out) + jnp.sum(jnp.sin(state))

    grads = jax.grad(loss)(arrays, "pallas")
    expected = jax.grad(loss)(arrays, "reference")
    for name in arrays:
        assert_close(grads[name], expected[name], jnp.float32, name)


def test_implementation_dispatch():
    with pytest.raises(ValueError, match=r"implementation must be None or one of \('pallas', 'reference'\)"):
        selective_state_update(**MAMBA2, implementation="triton")


def test_pallas_rows_must_be_a_power_of_two():
    inputs = step_inputs(Step("expanded", 1, 2, 4, 16, 1))
    arguments = [inputs[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias", "dt_softplus")]
    with pytest.raises(ValueError, match="rows must be a power of 2, got 3"):
        state_update_pallas(*arguments, interpret=True, rows=3)


# Published sizes: Mamba-1 1.4b (di 4096, n 16) at batch 1 and 64; Mamba-2 1.3b (h 64, p 64, n 128, 1 group).
GPU_STEPS = [
    Step("mamba1", 1, 4096, 1, 16, None, "bfloat16"),
    Step("mamba1", 64, 4096, 1, 16, None, "float16"),
    Step("mamba2", 64, 64, 64, 128, 1, "bfloat16", with_z=False),
    Step("expanded", 64, 64, 64, 128, 1, "float16"),
    Step("mamba2", 3, 48, 48, 64, 4, "float32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("step", GPU_STEPS, ids=str)
def test_pallas_matches_reference_on_gpu(step):
    """The compiled kernel (single-instruction exp2, softplus, sigmoid) against the reference at full size."""
    assert pallas_supported()
    check_pallas_step(step, seed=5)
