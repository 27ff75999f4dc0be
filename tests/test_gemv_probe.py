"""benchmarks/gemv.py's product kernels (a probe, not used by the model) against the float64 product, in the
interpreters: the Triton tiling at one row and at 16 (tl.dot tiles), on W's blocked layout too, and, where jax has
Mosaic GPU's interpreter (>= 0.11), the Mosaic GPU kernel."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.gemv import blocked, mosaic_gemv, pallas_gemv
from pallas_kernels.selective_scan import mosaic_fwd


@pytest.mark.parametrize(
    "variant, rows",
    [
        ((64, 16, 2, 4, 3), 1),
        ((64, 32, 2, 4, 3), 16),
        (("blocked", 64, 16, 2, 4, 3), 1),
        pytest.param(
            ("mosaic", 128, 64, 2, 2),
            1,
            marks=pytest.mark.skipif(not mosaic_fwd.available(), reason="Mosaic GPU's interpreter needs jax >= 0.11"),
        ),
    ],
    ids=str,
)
def test_gemv_kernels_match_product(variant, rows):
    rng = np.random.default_rng(0)
    k, n = 256, 384
    u = jnp.asarray(rng.standard_normal((rows, k)), jnp.float16)
    w = jnp.asarray(rng.standard_normal((k, n)) / k**0.5, jnp.float16)
    gemv = mosaic_gemv(variant, True) if variant[0] == "mosaic" else pallas_gemv(variant, True)
    expected = np.asarray(u, np.float64) @ np.asarray(w, np.float64)
    operand = blocked(w, variant[1]) if variant[0] == "blocked" else w
    np.testing.assert_allclose(np.asarray(jax.jit(gemv)(u, operand)), expected, rtol=0, atol=1e-5)
