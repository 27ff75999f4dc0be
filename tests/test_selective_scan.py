"""Selective scan: the reference against a float64 NumPy loop, every implementation against the reference (forward,
last state and gradients in every float argument), chunk tails, the chunked path's memory, dispatch and errors.

Reusable by other implementations' test files (``from tests.test_selective_scan import CASES, ...``):

- ``Case``: one test configuration (sizes, dtype, which optional arguments are present); ``CASES`` is a covering set
  (every seqlen of 1, 7, 128, 1000; ungrouped, 1 and 2+ groups; each option on and off; float32 and bfloat16).
- ``make_inputs(key, batch, seqlen, dim, d_state, ngroups, dtype, with_D, with_z, with_bias, softplus, with_init)``:
  keyword arguments for ``selective_scan`` (ngroups None: B and C as (b, l, n); else (b, l, g, n)).
- ``check_forward_and_grads(implementation, case)``: compares out, last_state and the gradients of a random
  cotangent-weighted sum of both with the reference, at ``tests/tolerances.py``'s tolerance for each argument's
  dtype. ``implementation`` is a name for ``selective_scan(implementation=...)`` or a function with the normalised
  interface of ``pallas_kernels/selective_scan/api.py`` (e.g. a kernel in interpret mode).
"""

import dataclasses
import functools
import logging
import math
import zlib

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan.api import default_implementation
from pallas_kernels.selective_scan.reference import selective_scan_reference
from pallas_kernels.selective_scan.xla import selective_scan_chunked
from tests.tolerances import PARITY_REL_ERR_FP32, assert_close, rel_err

FLOAT_ARGUMENTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    seqlen: int
    dim: int
    d_state: int
    ngroups: int | None  # None: B and C passed as (b, l, n)
    dtype: str = "float32"
    with_D: bool = True
    with_z: bool = True
    with_bias: bool = True
    softplus: bool = True
    with_init: bool = True

    @property
    def key(self) -> jax.Array:
        return jax.random.key(zlib.crc32(repr(self).encode()))


CASES = [
    Case(2, 1, 4, 3, None),
    Case(1, 7, 6, 4, 2, with_D=False, with_z=False, with_bias=False, softplus=False, with_init=False),
    Case(2, 7, 4, 2, 4, "bfloat16", with_z=False, with_bias=False, softplus=False),
    Case(2, 128, 8, 16, None, with_z=False, with_init=False),
    Case(2, 128, 6, 5, 2, "bfloat16", with_bias=False),
    Case(1, 1000, 4, 4, 1),
    Case(2, 1000, 6, 3, 2, "bfloat16", with_D=False, softplus=False, with_init=False),
]


def make_inputs(
    key, batch, seqlen, dim, d_state, ngroups, dtype, with_D, with_z, with_bias, softplus, with_init
) -> dict:
    """Random ``selective_scan`` keyword arguments at Mamba-like scales: decays exp(delta A) in about (0.01, 1).

    ``key`` is a jax PRNG key; the draws use NumPy seeded from it (jax.random compiles a function per shape: seconds
    per case on CPU)."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    bc_shape = (batch, seqlen, d_state) if ngroups is None else (batch, seqlen, ngroups, d_state)

    def array(x, dtype=jnp.float32):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    if softplus:  # softplus(delta + bias) lands around 0.05-1
        delta = rng.normal(-1.0, 0.5, (batch, seqlen, dim))
        delta_bias = rng.uniform(-1.5, 0.5, dim)
    else:  # delta + bias must stay positive for a stable recurrence
        delta = rng.uniform(0.02, 0.6, (batch, seqlen, dim))
        delta_bias = rng.uniform(0.0, 0.1, dim)
    return {
        "u": array(rng.normal(size=(batch, seqlen, dim)), dtype),
        "delta": array(delta, dtype),
        "A": array(-np.exp(rng.uniform(-2.0, 1.5, (dim, d_state)))),
        "B": array(rng.normal(size=bc_shape), dtype),
        "C": array(rng.normal(size=bc_shape), dtype),
        "D": array(rng.normal(size=dim)) if with_D else None,
        "z": array(rng.normal(size=(batch, seqlen, dim)), dtype) if with_z else None,
        "delta_bias": array(delta_bias) if with_bias else None,
        "delta_softplus": softplus,
        "initial_state": array(rng.normal(size=(batch, dim, d_state))) if with_init else None,
    }


def case_inputs(case: Case) -> dict:
    fields = dataclasses.asdict(case)
    fields["dtype"] = jnp.dtype(case.dtype)
    return make_inputs(case.key, **fields)


def _grouped(x):
    return x[:, :, None, :] if x.ndim == 3 else x


def _run(implementation, inputs):
    """(out, last_state) from a name (through the public api) or a function with the normalised interface."""
    if isinstance(implementation, str):
        return selective_scan(**inputs, return_last_state=True, implementation=implementation)
    normalised = {**inputs, "B": _grouped(inputs["B"]), "C": _grouped(inputs["C"])}
    return implementation(**normalised)


def forward_and_grads(implementation, case: Case, float64: bool = False):
    """out, last_state and the gradient of <ct_out, out> + <ct_state, last_state> in every float argument.

    float64: run ``implementation`` on the same inputs and cotangents converted to float64 (inside
    ``jax.enable_x64``), and return the results in the dtypes the case's own run has."""
    inputs = case_inputs(case)
    arrays = {name: inputs[name] for name in FLOAT_ARGUMENTS if inputs[name] is not None}
    static = {name: value for name, value in inputs.items() if name not in arrays}
    rng = np.random.default_rng(np.asarray(jax.random.key_data(jax.random.fold_in(case.key, 1))))
    ct_out = jnp.asarray(rng.normal(size=inputs["u"].shape).astype(np.float32), inputs["u"].dtype)
    ct_state = jnp.asarray(rng.normal(size=(case.batch, case.dim, case.d_state)).astype(np.float32))
    dtypes = {name: value.dtype for name, value in arrays.items()}

    @jax.jit
    def run(arrays, ct_out, ct_state):
        def loss(arrays):
            out, last_state = _run(implementation, {**arrays, **static})
            weighted = jnp.sum(out.astype(ct_state.dtype) * ct_out) + jnp.sum(last_state * ct_state)
            return weighted, (out, last_state)

        (_, (out, last_state)), grads = jax.value_and_grad(loss, has_aux=True)(arrays)
        return out, last_state, grads

    if not float64:
        return run(arrays, ct_out.astype(jnp.float32), ct_state)
    with jax.enable_x64(True):
        wide = {name: value.astype(jnp.float64) for name, value in arrays.items()}
        out, last_state, grads = run(wide, ct_out.astype(jnp.float64), ct_state.astype(jnp.float64))
        return (
            out.astype(case.dtype),
            last_state.astype(jnp.float32),
            {name: grad.astype(dtypes[name]) for name, grad in grads.items()},
        )


@functools.cache
def reference_results(case: Case, float64: bool = False):
    # float64 bypasses the public API, whose A must be float32
    return forward_and_grads(selective_scan_reference if float64 else "reference", case, float64)


def check_forward_and_grads(implementation, case: Case, float64_reference: bool = False) -> None:
    """``implementation`` against the reference on ``case``, with tests/tolerances.py's table.

    float64_reference: the reference runs in float64, so the comparison measures the implementation's rounding alone.
    The gradients of the per-channel parameters A, D and delta_bias are then held to the table's norm-wise float32
    limit instead of the elementwise one. Each element sums b x l terms of ~100 that can cancel to ~0.1, so float32
    rounding of the terms (in any implementation) leaves up to ~5e-4 absolute error on such an element: the float32
    reference itself has 5 of 4096 dA elements outside the elementwise table at (2, 2048, 256, 16), and the kernel
    had 1 of 256 d delta_bias elements off by 6e-5 on 0.22 there. Every other output stays elementwise."""
    out, last_state, grads = forward_and_grads(implementation, case)
    ref_out, ref_state, ref_grads = reference_results(case, float64_reference)
    assert out.shape == ref_out.shape and out.dtype == jnp.dtype(case.dtype)
    assert_close(out, ref_out, case.dtype, err_msg=f"out, {case}")
    assert_close(last_state, ref_state, jnp.float32, err_msg=f"last_state, {case}")
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == ref_grads[name].dtype
        if float64_reference and name in ("A", "D", "delta_bias"):
            assert rel_err(grad, ref_grads[name]) <= PARITY_REL_ERR_FP32, f"d{name}, {case}"
        else:
            assert_close(grad, ref_grads[name], grad.dtype, err_msg=f"d{name}, {case}")


# 1. The reference against an independent float64 loop.


def numpy_selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state):
    """float64, one channel and one step at a time, straight from the recurrence."""
    u, delta, A = (np.asarray(x, np.float64) for x in (u, delta, A))
    B, C = (np.asarray(_grouped(x), np.float64) for x in (B, C))
    batch, seqlen, dim = u.shape
    channels_per_group = dim // B.shape[2]
    if delta_bias is not None:
        delta = delta + np.asarray(delta_bias, np.float64)
    if delta_softplus:
        delta = np.log1p(np.exp(delta))
    h = np.zeros((batch, dim, A.shape[1])) if initial_state is None else np.array(initial_state, np.float64)
    y = np.zeros((batch, seqlen, dim))
    for t in range(seqlen):
        for d in range(dim):
            group = d // channels_per_group
            dt = delta[:, t, d, None]
            h[:, d] = np.exp(dt * A[d]) * h[:, d] + dt * u[:, t, d, None] * B[:, t, group]
            y[:, t, d] = np.sum(h[:, d] * C[:, t, group], axis=-1)
    if D is not None:
        y = y + np.asarray(D, np.float64) * u
    if z is not None:
        z = np.asarray(z, np.float64)
        y = y * z / (1 + np.exp(-z))
    return y, h


@pytest.mark.parametrize(
    "case",
    [
        Case(2, 5, 4, 3, None),
        Case(1, 9, 6, 2, 3, with_D=False, with_z=False, softplus=False),
        Case(2, 4, 4, 2, 2, "bfloat16", with_bias=False, with_init=False),
    ],
    ids=str,
)
def test_reference_matches_float64_loop(case):
    inputs = case_inputs(case)
    out, last_state = selective_scan(**inputs, return_last_state=True, implementation="reference")
    expected_out, expected_state = numpy_selective_scan(**inputs)
    assert out.dtype == jnp.dtype(case.dtype)
    assert_close(out, expected_out.astype(np.float32).astype(out.dtype), case.dtype)
    assert_close(last_state, expected_state, jnp.float32)


# 2. Every implementation against the reference.


@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunked_matches_reference(case):
    check_forward_and_grads("chunked", case)


# Compiling associative_scan's gradient takes seconds per case on CPU: every seqlen, but not every option again.
@pytest.mark.parametrize("case", CASES[:4] + CASES[5:6], ids=str)
def test_associative_matches_reference(case):
    check_forward_and_grads("associative", case)


@pytest.mark.parametrize("seqlen", [16, 17, 47])
def test_chunk_tails(seqlen):
    """With 16-step chunks: exactly one chunk, just past one (2 chunks of 9, 1 step padded), and 47 (3 chunks of 16,
    1 padded). CASES add one short chunk (seqlen 1, 7), exact chunks (128) and a padded tail (1000 = 16 x 63 - 8)."""
    chunked = functools.partial(selective_scan_chunked, chunk_size=16)
    check_forward_and_grads(chunked, Case(2, seqlen, 4, 3, 2))


# 3. Degenerate shapes, jit, return_last_state, dispatch, memory.


@pytest.mark.parametrize("implementation", ["associative", "chunked"])
def test_unit_sizes(implementation):
    check_forward_and_grads(implementation, Case(1, 3, 1, 1, 1))


def test_return_last_state_and_jit_of_the_public_function():
    inputs = case_inputs(Case(2, 9, 4, 3, None))
    scan = jax.jit(selective_scan, static_argnames=("delta_softplus", "return_last_state", "implementation"))
    out = scan(**inputs)
    out_with_state, last_state = scan(**inputs, return_last_state=True)
    assert isinstance(out, jax.Array) and out.shape == (2, 9, 4)
    assert last_state.shape == (2, 4, 3)
    assert_close(out, out_with_state, jnp.float32)
    assert_close(
        out,
        selective_scan_reference(**{**inputs, "B": _grouped(inputs["B"]), "C": _grouped(inputs["C"])})[0],
        jnp.float32,
    )


def test_layers_trace_the_scan_once(monkeypatch):
    """Every layer of a model calls one traced (and lowered) scan: its forward and backward are not traced again
    per layer (for the Pallas kernels that was minutes of a 48-layer training step's compile)."""
    from pallas_kernels.selective_scan import api

    traces = []

    def counted(*args):
        traces.append(1)
        return selective_scan_chunked(*args)

    monkeypatch.setattr(api, "selective_scan_chunked", counted)
    api._implementation.cache_clear()
    try:
        inputs = case_inputs(Case(2, 9, 4, 3, None))

        def loss(u):
            for _ in range(4):
                u = selective_scan(**{**inputs, "u": u}, implementation="chunked")
            return jnp.sum(u**2)

        jax.jit(jax.grad(loss)).lower(inputs["u"])
        assert len(traces) == 1
    finally:
        api._implementation.cache_clear()  # drop the counting wrapper for the other tests


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU default")
def test_default_implementation_off_gpu_is_chunked(caplog):
    default_implementation.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="pallas_kernels"):
        assert default_implementation() == "chunked"
        assert default_implementation() == "chunked"
    assert [r.levelno for r in caplog.records if "implementation=None" in r.getMessage()] == [logging.DEBUG]
    inputs = case_inputs(Case(1, 5, 2, 2, None))
    assert_close(selective_scan(**inputs), selective_scan(**inputs, implementation="chunked"), jnp.float32)


def all_eqns(jaxpr: jax.extend.core.Jaxpr):
    """Every equation of a jaxpr and of its nested jaxprs (scan bodies, remat, custom rules, pallas_call kernels)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for item in param if isinstance(param, tuple | list) else (param,):
                if isinstance(item, jax.extend.core.ClosedJaxpr):
                    yield from all_eqns(item.jaxpr)
                elif isinstance(item, jax.extend.core.Jaxpr):
                    yield from all_eqns(item)


def _largest_array(jaxpr: jax.extend.core.Jaxpr) -> int:
    """The most elements of any value in a jaxpr, nested jaxprs (scan bodies, remat, custom rules) included."""
    return max(
        (math.prod(getattr(var.aval, "shape", ())) for eqn in all_eqns(jaxpr) for var in (*eqn.invars, *eqn.outvars)),
        default=0,
    )


@pytest.mark.parametrize("implementation", ["chunked", "reference"])
def test_only_chunked_avoids_full_state_tensors(implementation):
    """fwd + bwd at seqlen 4096: chunked never holds a (b, l, di, n) value, the reference does (which shows the check
    can see one). Checked in the jaxpr and in XLA's temporary buffers."""
    batch, seqlen, dim, d_state = 1, 4096, 32, 32
    full_state_elements = batch * seqlen * dim * d_state
    inputs = make_inputs(
        jax.random.key(0), batch, seqlen, dim, d_state, None, jnp.float32, True, True, True, True, True
    )
    arrays = {name: inputs[name] for name in FLOAT_ARGUMENTS}

    def loss(arrays):
        out, last_state = selective_scan(
            **arrays, delta_softplus=True, return_last_state=True, implementation=implementation
        )
        return jnp.sum(out) + jnp.sum(last_state)

    grad = jax.grad(loss)
    largest = _largest_array(jax.make_jaxpr(grad)(arrays).jaxpr)
    temp_bytes = jax.jit(grad).lower(arrays).compile().memory_analysis().temp_size_in_bytes
    if implementation == "chunked":  # measured: largest 1/32 (B, C), temporaries 0.30 x the full state's bytes
        assert largest <= full_state_elements // 16
        assert temp_bytes < 4 * full_state_elements // 2
    else:  # measured: 1 and 7.2
        assert largest >= full_state_elements
        assert temp_bytes >= 4 * full_state_elements


# 4. Errors.


def _valid(**overrides) -> dict:
    inputs = make_inputs(jax.random.key(0), 2, 5, 4, 3, 2, jnp.float32, True, True, True, True, True)
    return {**inputs, **overrides}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"u": jnp.zeros((2, 5))}, r"u must have shape \(batch, seqlen, dim\).*found \(2, 5\)"),
        ({"u": jnp.zeros((2, 0, 4))}, r"u must have shape .*every size positive, found \(2, 0, 4\)"),
        ({"u": jnp.zeros((2, 5, 4), jnp.int32)}, r"u must have a floating dtype, found int32"),
        ({"delta": jnp.zeros((2, 5, 3))}, r"delta must have shape u's shape .* = \(2, 5, 4\), found \(2, 5, 3\)"),
        ({"A": jnp.zeros((3, 3))}, r"A must have shape \(dim, d_state\) = \(4, d_state\).*found \(3, 3\)"),
        ({"A": jnp.zeros((4, 3), jnp.bfloat16)}, r"A must be float32, found bfloat16"),
        ({"B": jnp.zeros((2, 5, 2, 4))}, r"B must have shape .* d_state = 2, 5, 3, found \(2, 5, 2, 4\)"),
        ({"B": jnp.zeros((2, 6, 3))}, r"B must have shape .*found \(2, 6, 3\)"),
        ({"B": jnp.zeros((2, 5, 3, 3)), "C": jnp.zeros((2, 5, 3, 3))}, r"ngroups .* divide dim = 4, found ngroups = 3"),
        ({"C": jnp.zeros((2, 5, 3))}, r"C must have B's ngroups = 2, found ngroups = 1"),
        ({"C": jnp.zeros((2, 5, 2))}, r"C must have shape .* d_state = 2, 5, 3, found \(2, 5, 2\)"),
        ({"B": jnp.zeros((2, 5, 2, 3), jnp.int8)}, r"B must have a floating dtype, found int8"),
        ({"D": jnp.zeros((5,))}, r"D must have shape \(dim,\) = \(4,\), found \(5,\)"),
        ({"z": jnp.zeros((2, 4, 4))}, r"z must have shape u's shape .* = \(2, 5, 4\), found \(2, 4, 4\)"),
        ({"delta_bias": jnp.zeros((4, 1))}, r"delta_bias must have shape \(dim,\) = \(4,\), found \(4, 1\)"),
        ({"initial_state": jnp.zeros((2, 4))}, r"initial_state must have shape .* = \(2, 4, 3\), found \(2, 4\)"),
        ({"initial_state": jnp.zeros((2, 4, 3), jnp.bfloat16)}, r"initial_state must be float32, found bfloat16"),
        ({"delta_softplus": jnp.array(True)}, r"delta_softplus must be a Python bool"),
        ({"return_last_state": "yes"}, r"return_last_state must be a Python bool .*found 'yes'"),
        ({"implementation": "cuda"}, r"implementation must be None or one of .*'chunked'.*found 'cuda'"),
    ],
)
def test_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        selective_scan(**_valid(**overrides))


def test_reference_takes_float64_arguments_with_a_float32_A():
    """With x64 on, float64 u, delta, B, C and the API's float32 A: the sequential reference keeps its state in
    float64 from zeros (its scan's carry was float32 zeros, a float64 state after one step: a type error)."""
    keys = jax.random.split(jax.random.key(3), 5)
    with jax.enable_x64(True):
        u, delta = (jax.random.normal(k, (2, 7, 8), jnp.float64) for k in keys[:2])
        B, C = (jax.random.normal(k, (2, 7, 4), jnp.float64) for k in keys[2:4])
        A = -jnp.exp(jax.random.normal(keys[4], (8, 4), jnp.float32))
        out, last = selective_scan(
            u, delta, A, B, C, delta_softplus=True, return_last_state=True, implementation="reference"
        )
        assert out.dtype == last.dtype == jnp.float64
        other, other_last = selective_scan(
            u, delta, A, B, C, delta_softplus=True, return_last_state=True, implementation="associative"
        )
        np.testing.assert_allclose(np.asarray(out), np.asarray(other), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(last), np.asarray(other_last), rtol=1e-5, atol=1e-5)
