"""linear_parts: the same numbers as the whole layer split, forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.layers import linear, linear_parts
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
