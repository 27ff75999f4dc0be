"""mamba_chunk_scan: both implementations against a float64 NumPy loop written here, the chunked form against the
sequential reference in forward and gradients, packed sequences against separate runs, and argument errors."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mamba_chunk_scan
from tests.tolerances import as_float32, assert_close, assert_no_worse


@dataclasses.dataclass(frozen=True)
class Case:
    """One covering configuration: sizes (b, l, h, p, g, n), chunk size c and which optional inputs are present."""

    name: str
    sizes: tuple[int, int, int, int, int, int]
    c: int
    dtype: str = "float32"
    D: str | None = None  # "h" -> D (h,), "hp" -> D (h, p)
    z: bool = False
    dt_bias: bool = False  # also turns on dt_softplus, as in Mamba-2
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    initial_states: bool = False
    seq_idx: tuple[tuple[int, ...], ...] | None = None  # per batch row: the positions where a new sequence starts
    first_index: int = 0  # seq_idx of the first sequence (not 0: the initial state must be ignored)

    def __getattr__(self, name: str) -> int:
        """case.b, case.l, ...: the sizes by their legend letters."""
        if len(name) != 1 or name not in "blhpgn":
            raise AttributeError(name)
        return self.sizes["blhpgn".index(name)]


CASES = [
    # l < c; a negative raw dt (no softplus) must be clamped to 0 by the default dt_limit.
    Case("shorter_than_chunk", (1, 5, 2, 3, 1, 4), c=8, D="h"),
    # l == 2 c; grouped B/C, D per channel, z gate, dt_bias + softplus, initial state.
    Case("two_full_chunks", (2, 16, 4, 2, 2, 3), c=8, D="hp", z=True, dt_bias=True, initial_states=True),
    # Ragged tail; packed sequences starting at a chunk boundary (8), inside a chunk (13, 3, 5) and at the last step.
    Case(
        "ragged_packed",
        (2, 21, 6, 3, 3, 4),
        c=8,
        D="h",
        z=True,
        dt_bias=True,
        dt_limit=(0.05, 0.6),
        initial_states=True,
        seq_idx=((8, 13), (3, 5, 20)),
    ),
    # seq_idx not starting at 0: the initial state applies to nothing; odd sizes; c == 1 (one step per chunk).
    Case("first_index_not_zero", (1, 7, 3, 5, 1, 1), c=1, initial_states=True, seq_idx=((4,),), first_index=3),
    # l == c, odd.
    Case("one_odd_chunk", (1, 7, 2, 2, 2, 5), c=7, D="hp", z=True, initial_states=True),
    Case(
        "bfloat16",
        (2, 19, 4, 4, 2, 8),
        c=8,
        dtype="bfloat16",
        D="h",
        z=True,
        dt_bias=True,
        initial_states=True,
        seq_idx=((10,), ()),
    ),
    # bf16 with the skip and no gate (a Mamba-2 layer's call): the Pallas kernels then round y to bf16 themselves.
    Case("bfloat16_skip_no_gate", (2, 24, 4, 16, 1, 16), c=8, dtype="bfloat16", D="hp", dt_bias=True),
]


# The Pallas kernels take no seq_idx (api.py sends packed sequences to "chunked"): the same cases without it.
PALLAS_CASES = [dataclasses.replace(case, seq_idx=None, first_index=0) for case in CASES]


def make_inputs(case: Case, seed: int = 0) -> tuple[dict, dict]:
    """(differentiable arrays, static keyword arguments) for ``mamba_chunk_scan``."""
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)

    def normal(*shape, scale=1.0):
        return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32).astype(dtype)

    arrays = {
        "x": normal(case.b, case.l, case.h, case.p),
        "B": normal(case.b, case.l, case.g, case.n),
        "C": normal(case.b, case.l, case.g, case.n),
        "A": jnp.asarray(-rng.uniform(0.5, 4.0, case.h), jnp.float32),
    }
    if case.dt_bias:
        arrays["dt"] = normal(case.b, case.l, case.h, scale=0.5)
        arrays["dt_bias"] = jnp.asarray(rng.uniform(-4.0, -1.0, case.h), jnp.float32)
    else:
        # Mostly positive; a few negative values exercise the clamp at dt_limit[0].
        arrays["dt"] = jnp.asarray(rng.uniform(-0.05, 0.5, (case.b, case.l, case.h)), jnp.float32).astype(dtype)
    if case.D is not None:
        arrays["D"] = jnp.asarray(rng.standard_normal((case.h,) if case.D == "h" else (case.h, case.p)), jnp.float32)
    if case.z:
        arrays["z"] = normal(case.b, case.l, case.h, case.p)
    if case.initial_states:
        arrays["initial_states"] = jnp.asarray(rng.standard_normal((case.b, case.h, case.p, case.n)), jnp.float32)
    static = {"chunk_size": case.c, "dt_softplus": case.dt_bias, "dt_limit": case.dt_limit}
    if case.seq_idx is not None:
        seq_idx = np.full((case.b, case.l), case.first_index, np.int32)
        for row, starts in enumerate(case.seq_idx):
            for start in starts:
                seq_idx[row, start:] += 1
        static["seq_idx"] = jnp.asarray(seq_idx)
    return arrays, static


def numpy_ssd(arrays: dict, static: dict) -> tuple[np.ndarray, np.ndarray]:
    """The SSD recurrence in float64, one position at a time: (out (b, l, h, p), final state (b, h, p, n))."""
    a = {k: np.asarray(v, np.float64) for k, v in arrays.items()}
    x, B, C, A = a["x"], a["B"], a["C"], a["A"]
    batch, length, heads, headdim = x.shape
    d_state = B.shape[-1]
    group_of_head = np.arange(heads) // (heads // B.shape[2])
    B, C = B[:, :, group_of_head], C[:, :, group_of_head]  # (b, l, h, n)
    dt = a["dt"] + a.get("dt_bias", 0.0)
    if static["dt_softplus"]:
        dt = np.logaddexp(0.0, dt)
    dt = np.clip(dt, *static["dt_limit"])
    state = a.get("initial_states", np.zeros((batch, heads, headdim, d_state)))
    seq_idx = np.asarray(static.get("seq_idx", np.zeros((batch, length), np.int32)))
    previous_index = np.zeros(batch, np.int32)
    y = np.zeros(x.shape)
    for t in range(length):
        state = np.where((seq_idx[:, t] != previous_index)[:, None, None, None], 0.0, state)
        previous_index = seq_idx[:, t]
        decay = np.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", state, C[:, t])
    if "D" in a:
        y = y + (a["D"] if a["D"].ndim == 2 else a["D"][:, None]) * x
    if "z" in a:
        y = y * a["z"] / (1.0 + np.exp(-a["z"]))
    return y, state


def run(arrays: dict, static: dict, implementation: str | None = None):
    return mamba_chunk_scan(**arrays, **static, return_final_states=True, implementation=implementation)


@functools.cache
def forward_and_gradients(case: Case, implementation: str | None, widened: bool = False):
    """(out, final_states, gradients of a random projection of both w.r.t. every differentiable input), in one
    compiled program per case and implementation, shared by the tests below. ``widened``: on the case's (16-bit)
    inputs widened to float32, the float32 computation a 16-bit path is compared with."""
    arrays, static = make_inputs(case)
    if widened:
        arrays = as_float32(arrays)
    rng = np.random.default_rng(1)
    out_cotangent = jnp.asarray(rng.standard_normal(arrays["x"].shape), jnp.float32)
    final_cotangent = jnp.asarray(rng.standard_normal((case.b, case.h, case.p, case.n)), jnp.float32)

    def loss(arrays):
        out, final_states = run(arrays, static, implementation)
        value = jnp.sum(out.astype(jnp.float32) * out_cotangent) + jnp.sum(final_states * final_cotangent)
        return value, (out, final_states)

    (_, (out, final_states)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(arrays)
    return out, final_states, grads


@pytest.mark.parametrize(
    "case, implementation",
    [(case, impl) for case in CASES for impl in ("reference", "chunked")] + [(c, "pallas") for c in PALLAS_CASES],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_matches_numpy_float64(case, implementation):
    arrays, static = make_inputs(case)
    out, final_states, _ = forward_and_gradients(case, implementation)
    expected_out, expected_final = numpy_ssd(arrays, static)
    assert out.dtype == jnp.dtype(case.dtype) and out.shape == arrays["x"].shape
    assert final_states.dtype == jnp.float32 and final_states.shape == (case.b, case.h, case.p, case.n)
    assert_close(out, expected_out, case.dtype, "out")
    # float32 in every case, but from 16-bit matmul operands in the chunked form: the inputs' tolerance applies.
    assert_close(final_states, expected_final, case.dtype, "final_states")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_chunked_matches_reference_forward_and_gradients(case):
    check_against_reference(case, "chunked")


@pytest.mark.parametrize("case", PALLAS_CASES, ids=lambda case: case.name)
def test_pallas_matches_reference_forward_and_gradients(case):
    """The Pallas kernels (in Pallas's interpreter here; compiled in the gpu tests below)."""
    check_against_reference(case, "pallas")


def check_against_reference(case: Case, implementation: str):
    arrays, _ = make_inputs(case)
    reference_out, reference_final, reference_grads = forward_and_gradients(case, "reference")
    out, final, grads = forward_and_gradients(case, implementation)
    assert_close(out, reference_out, case.dtype, "out")
    assert_close(final, reference_final, case.dtype, "final_states")
    for name in arrays:
        assert grads[name].dtype == arrays[name].dtype
        assert np.all(np.isfinite(np.asarray(grads[name], np.float32))), name
        # float32 parameters (A, D, dt_bias) of a bfloat16 call get their gradient through 16-bit operands too.
        assert_close(grads[name], reference_grads[name], case.dtype, f"d{name}")


def test_packed_sequences_equal_separate_runs():
    """Three sequences packed in one row (the second starting inside a chunk, the third at a chunk boundary) give
    the outputs of three separate calls; the initial state feeds only the first; the final state is the third's."""
    case = Case("packed", (1, 20, 4, 2, 2, 3), c=4, D="h", z=True, dt_bias=True, initial_states=True)
    arrays, static = make_inputs(case)
    starts = [0, 6, 12, 20]
    seq_idx = jnp.asarray(np.repeat(np.arange(3), np.diff(starts))[None], jnp.int32)
    packed, packed_final = mamba_chunk_scan(**arrays, **static, seq_idx=seq_idx, return_final_states=True)

    per_position = ("x", "dt", "B", "C", "z")
    for i, (start, stop) in enumerate(itertools.pairwise(starts)):
        part = {k: v[:, start:stop] if k in per_position else v for k, v in arrays.items()}
        if i > 0:
            del part["initial_states"]
        out, final = mamba_chunk_scan(**part, **static, return_final_states=True)
        assert_close(packed[:, start:stop], out, jnp.float32, f"sequence {i}")
    assert_close(packed_final, final, jnp.float32, "final_states")


def test_jit_and_default_implementation():
    arrays, static = make_inputs(CASES[2])
    jitted = jax.jit(
        mamba_chunk_scan,
        static_argnames=("chunk_size", "dt_softplus", "dt_limit", "return_final_states", "implementation"),
    )
    out = jitted(**arrays, **static)
    np.testing.assert_array_equal(out, mamba_chunk_scan(**arrays, **static, implementation="chunked"))
    assert_close(out, mamba_chunk_scan(**arrays, **static, implementation="reference"), jnp.float32)


f32 = jnp.float32
ERRORS = [
    ("x", {"x": jnp.zeros((1, 8, 4), f32)}, "x must have shape"),
    ("x_int", {"x": jnp.zeros((1, 8, 4, 2), jnp.int32)}, "x must have a floating dtype"),
    ("empty", {"x": jnp.zeros((1, 0, 4, 2), f32)}, "seqlen >= 1"),
    ("groups", {"B": jnp.zeros((1, 8, 3, 3), f32), "C": jnp.zeros((1, 8, 3, 3), f32)}, r"nheads \(4\).*ngroups \(3"),
    ("B", {"B": jnp.zeros((1, 7, 2, 3), f32)}, "B must have shape"),
    ("C", {"C": jnp.zeros((1, 8, 2, 4), f32)}, r"C must have shape \(1, 8, 2, 3\)"),
    ("dt", {"dt": jnp.zeros((1, 8, 2), f32)}, r"dt must have shape \(1, 8, 4\)"),
    ("A", {"A": jnp.zeros((4, 3), f32)}, r"A must have shape \(4,\)"),
    ("D", {"D": jnp.zeros((2,), f32)}, r"D must have shape \(4,\) or \(4, 2\)"),
    ("z", {"z": jnp.zeros((1, 8, 4, 3), f32)}, "z must have shape"),
    ("dt_bias", {"dt_bias": jnp.zeros((4, 2), f32)}, r"dt_bias must have shape \(4,\)"),
    ("initial_states", {"initial_states": jnp.zeros((1, 4, 2, 2), f32)}, r"initial_states must have shape"),
    ("seq_idx_dtype", {"seq_idx": jnp.zeros((1, 8), f32)}, "seq_idx must have an integer dtype"),
    ("seq_idx_shape", {"seq_idx": jnp.zeros((1, 9), jnp.int32)}, r"seq_idx must have shape \(1, 8\)"),
    ("chunk_size_zero", {"chunk_size": 0}, "chunk_size must be an int >= 1, got 0"),
    ("chunk_size_float", {"chunk_size": 2.5}, "chunk_size must be an int >= 1, got 2.5"),
    ("chunk_size_bool", {"chunk_size": True}, "chunk_size must be an int >= 1, got True"),
    ("dt_softplus_array", {"dt_softplus": jnp.array(True)}, "dt_softplus must be a Python bool"),
    ("dt_limit_order", {"dt_limit": (1.0, 0.1)}, "low <= high"),
    ("dt_limit_form", {"dt_limit": 0.1}, "dt_limit must be a pair"),
    ("implementation", {"implementation": "triton"}, "implementation must be one of"),
    ("pallas_seq_idx", {"implementation": "pallas", "seq_idx": jnp.zeros((1, 8), jnp.int32)}, "does not take seq_idx"),
]


@pytest.mark.parametrize("changes, message", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(changes, message):
    arrays = {
        "x": jnp.zeros((1, 8, 4, 2), f32),
        "dt": jnp.zeros((1, 8, 4), f32),
        "A": jnp.zeros((4,), f32),
        "B": jnp.zeros((1, 8, 2, 3), f32),
        "C": jnp.zeros((1, 8, 2, 3), f32),
    }
    with pytest.raises(ValueError, match=message):
        mamba_chunk_scan(**{**arrays, "chunk_size": 4, **changes})


# Full-size checks of the compiled kernels (``make test-gpu`` on the device): Mamba-2 130m's layer shape, a ragged
# length with grouped B and C, and float32. 16-bit: the kernels' error against the float32 computation (the reference
# on the same inputs in float32) is at most COMPOSED_ERROR_FACTOR times the chunked XLA form's, which rounds its
# products' operands alike; float32: elementwise within the table against the reference.
GPU_CASES = [
    Case("mamba2_130m_bf16", (2, 2048, 24, 64, 1, 128), c=256, dtype="bfloat16", D="h", dt_bias=True),
    Case(
        "ragged_groups_fp16",
        (1, 1000, 8, 64, 2, 64),
        c=256,
        dtype="float16",
        D="hp",
        z=True,
        dt_bias=True,
        initial_states=True,
    ),
    Case("float32", (1, 700, 4, 32, 1, 16), c=256, D="h", dt_bias=True, initial_states=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda case: case.name)
def test_pallas_on_gpu(case):
    from pallas_kernels.selective_scan.pallas import pallas_supported

    assert pallas_supported()
    if case.dtype == "float32":
        check_against_reference(case, "pallas")
        return
    arrays, _ = make_inputs(case)
    out, final, grads = forward_and_gradients(case, None)  # the default on a GPU: the kernels
    xla_out, xla_final, xla_grads = forward_and_gradients(case, "chunked")
    exact_out, exact_final, exact_grads = forward_and_gradients(case, "reference", widened=True)
    assert_no_worse(out, xla_out, exact_out, "out")
    assert_no_worse(final, xla_final, exact_final, "final_states")
    for name in arrays:
        assert grads[name].dtype == arrays[name].dtype
        assert_no_worse(grads[name], xla_grads[name], exact_grads[name], f"d{name}")
