"""linear_parts: the same numbers as the whole layer split, forward and gradients. The norms' and CausalConv1d's
argument checks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.layers import CausalConv1d, LayerNorm, RMSNorm, linear, linear_parts, positive_int
from tests.tolerances import assert_close


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [False, True])
def test_linear_parts_equal_the_split_layer(dtype, use_bias, ordered):
    sizes = [5, 11, 3]
    layer = linear(7, sum(sizes), axes=(None, None), use_bias=use_bias, rngs=nnx.Rngs(0), dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (2, 9, 7), jnp.float32)
    cotangents = [jax.random.normal(jax.random.key(2 + i), (2, 9, s), jnp.float32) for i, s in enumerate(sizes)]

    def loss(parts):
        return sum(jnp.sum(p.astype(jnp.float32) * c) for p, c in zip(parts, cotangents, strict=True))

    def whole(model, x):
        return loss(jnp.split(model(x), np.cumsum(sizes)[:-1].tolist(), axis=-1))

    def in_parts(model, x):
        return loss(linear_parts(model, x, sizes, ordered))

    parts = linear_parts(layer, x, sizes, ordered)
    barriers = str(jax.make_jaxpr(lambda x: linear_parts(layer, x, sizes, ordered))(x)).count("optimization_barrier")
    assert barriers == (len(sizes) - 1 if ordered else 0)
    assert [p.shape for p in parts] == [(2, 9, s) for s in sizes]
    assert all(p.dtype == dtype for p in parts)
    for got, want in zip(parts, jnp.split(layer(x), np.cumsum(sizes)[:-1].tolist(), axis=-1), strict=True):
        assert_close(got, want, dtype)
    want_model, want_x = nnx.grad(whole, argnums=(0, 1))(layer, x)
    got_model, got_x = nnx.grad(in_parts, argnums=(0, 1))(layer, x)
    assert_close(got_x, want_x, dtype)
    assert_close(got_model.kernel[...], want_model.kernel[...], dtype)
    if use_bias:
        assert_close(got_model.bias[...], want_model.bias[...], dtype)


def test_linear_parts_sizes_must_cover_the_outputs():
    layer = linear(4, 6, axes=(None, None), use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"sizes \(2, 3\) must be positive and add up to 6"):
        linear_parts(layer, jnp.ones((1, 4)), [2, 3])
    with pytest.raises(ValueError, match=r"sizes \(6, 0\) must be positive"):
        linear_parts(layer, jnp.ones((1, 4)), [6, 0])


@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
def test_norms_refuse_a_last_dimension_that_would_broadcast(norm_cls):
    """RMSNorm(16) of (2, 5, 1) used to broadcast to (2, 5, 16)."""
    norm = norm_cls(16)
    for shape in ((2, 5, 1), (2, 5, 8), ()):
        message = re.escape(f"{norm_cls.__name__}: x must have shape (..., dim=16), found {shape}")
        with pytest.raises(ValueError, match=message):
            norm(jnp.ones(shape))
        with pytest.raises(ValueError, match=message):
            jax.jit(norm)(jnp.ones(shape))


@pytest.mark.parametrize("norm_cls", [RMSNorm, LayerNorm])
def test_norms_trace_under_jit_vmap_and_remat(norm_cls):
    norm = norm_cls(16)
    x = jax.random.normal(jax.random.key(0), (3, 4, 16))
    expected = norm(x)
    assert expected.shape == x.shape
    assert_close(jax.jit(norm)(x), expected, jnp.float32)
    assert_close(jax.vmap(norm)(x), expected, jnp.float32)
    assert_close(jax.checkpoint(norm)(x), expected, jnp.float32)
    assert jax.grad(lambda x: jax.checkpoint(norm)(x).sum())(x).shape == x.shape


def test_causal_conv_implementation_is_checked_when_built():
    message = r"^CausalConv1d: implementation must be None or one of \('reference', 'xla', 'pallas'\), found 'fast'$"
    with pytest.raises(ValueError, match=message):
        CausalConv1d(8, 4, rngs=nnx.Rngs(0), implementation="fast")


def test_positive_int():
    assert positive_int("M", "n", np.int64(3)) == 3 and type(positive_int("M", "n", np.int64(3))) is int
    for value in (0, -1, True, np.True_, 2.0, "2", None):
        with pytest.raises(ValueError, match=re.escape(f"M: n must be a positive int, found {value!r}")):
            positive_int("M", "n", value)
