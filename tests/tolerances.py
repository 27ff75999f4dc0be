"""The one dtype -> (rtol, atol) table for every correctness test. Never loosened to make a test pass.

Fast paths are compared with their reference on the same inputs. float32 paths accumulate in float32 and differ only
by summation order; 16-bit paths compute in float32 too, so they differ by about one rounding of the 16-bit output.
Model parity against torch uses the relative norm error (``rel_err``) with the limits below.
"""

import jax
import jax.numpy as jnp
import numpy as np

TOLERANCES = {
    jnp.dtype(jnp.float32): (1e-4, 1e-5),
    jnp.dtype(jnp.bfloat16): (2e-2, 2e-2),
    jnp.dtype(jnp.float16): (2e-3, 2e-3),
}

# ||ours - reference|| / ||reference|| for whole-model logits in float32 (issue: parity with mamba_ssm/transformers),
# and for the selective scan's dA, dD and d delta_bias against its float64 reference (tests/test_selective_scan.py
# says why).
PARITY_REL_ERR_FP32 = 1e-5


# A 16-bit path made of several ops, each rounding to 16 bits where its reference rounds too but not always at the same
# points (a whole decode step: the kernels round once where XLA may round per op): the outputs may differ by several
# roundings. Both are then compared with the float32 computation on the same inputs, and the fast path's norm-wise
# error must be at most this factor times the 16-bit reference's own (the criterion flash-attention's tests use).
COMPOSED_ERROR_FACTOR = 2.0


def tolerance(dtype) -> tuple[float, float]:
    return TOLERANCES[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype, err_msg: str = "") -> None:
    """Elementwise |actual - expected| <= atol + rtol * |expected| with the table's values for ``dtype``."""
    rtol, atol = tolerance(dtype)
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float32),
        np.asarray(expected, dtype=np.float32),
        rtol=rtol,
        atol=atol,
        err_msg=err_msg,
    )


def rel_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def assert_no_worse(actual, reference, exact, what: str = "") -> tuple[float, float]:
    """The composed 16-bit rule (COMPOSED_ERROR_FACTOR): returns (rel_err(actual, exact), rel_err(reference, exact))
    and raises AssertionError unless the first is at most the factor times the second."""
    ours, theirs = rel_err(actual, exact), rel_err(reference, exact)
    assert ours <= COMPOSED_ERROR_FACTOR * theirs, f"{what}: error {ours:.2e}, the reference's {theirs:.2e}"
    return ours, theirs


def as_float32(tree):
    """``tree`` with its floating arrays in float32 (other leaves, and None, as they are): the inputs of the float32
    computation ``assert_no_worse`` compares with."""

    def cast(a):
        return a.astype(jnp.float32) if a is not None and jnp.issubdtype(a.dtype, jnp.floating) else a

    return jax.tree.map(cast, tree)
