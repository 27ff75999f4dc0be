"""GatedMLP against a reference written here: forward in NumPy float64, gradients through the same code in jnp."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.mlp import GatedMLP
from tests.tolerances import assert_close


def silu(xp, x):
    return x / (1 + xp.exp(-x))


def gated_mlp_reference(xp, params, x):
    """fc1 -> [y, gate] (y first), fc2(y * silu(gate)). ``xp`` is numpy or jax.numpy."""
    h = x @ params["fc1"]["kernel"] + params["fc1"].get("bias", 0)
    half = h.shape[-1] // 2
    y, gate = h[..., :half], h[..., half:]
    return (y * silu(xp, gate)) @ params["fc2"]["kernel"] + params["fc2"].get("bias", 0)


def params_of(module):
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


@pytest.mark.parametrize(
    "in_features, hidden, multiple_of, expected",
    [(48, None, 128, 128), (64, None, 128, 256), (40, None, 16, 112), (32, 100, 32, 128), (32, 64, 32, 64)],
)
def test_hidden_width(in_features, hidden, multiple_of, expected):
    mlp = GatedMLP(in_features, hidden, multiple_of=multiple_of, rngs=nnx.Rngs(0))
    assert mlp.hidden_features == expected
    assert mlp.fc1.kernel[...].shape == (in_features, 2 * expected)
    assert mlp.fc2.kernel[...].shape == (expected, in_features)


@pytest.mark.parametrize(
    "shape, out_features, bias", [((2, 5, 24), None, False), ((3, 24), 40, True), ((1, 7, 24), 8, True)]
)
def test_matches_reference(shape, out_features, bias):
    mlp = GatedMLP(24, 40, out_features, bias=bias, multiple_of=8, rngs=nnx.Rngs(1))
    if bias:  # torch-style init already gives nonzero biases; check they are there
        assert np.abs(np.asarray(mlp.fc1.bias[...])).max() > 0
    params = params_of(mlp)
    x = jax.random.normal(jax.random.key(2), shape, jnp.float32)

    out = mlp(x)
    np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = gated_mlp_reference(np, np_params, np.asarray(x, np.float64))
    assert out.shape == expected.shape
    assert_close(out, expected, jnp.float32)

    cotangent = jax.random.normal(jax.random.key(3), out.shape, jnp.float32)

    graphdef = nnx.graphdef(mlp)

    def loss_ours(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x) * cotangent)

    def loss_ref(p, x):
        return jnp.sum(gated_mlp_reference(jnp, p, x) * cotangent)

    grads = jax.grad(loss_ours, argnums=(0, 1))(params, x)
    expected_grads = jax.grad(loss_ref, argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: assert_close(a, b, jnp.float32), grads, expected_grads)


def test_init_dtypes_axes_and_jit():
    mlp = GatedMLP(32, 64, bias=True, multiple_of=64, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bound = 1 / np.sqrt(32)
    kernel = np.asarray(mlp.fc1.kernel[...], np.float32)
    assert kernel.dtype == np.float32 and mlp.fc1.kernel[...].dtype == jnp.bfloat16
    assert np.abs(kernel).max() <= bound and kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.1)
    assert mlp.fc1.kernel.get_metadata()["logical_axes"] == ("embed", "mlp")
    assert mlp.fc2.kernel.get_metadata()["logical_axes"] == ("mlp", "embed")

    x = jax.random.normal(jax.random.key(1), (2, 3, 32), jnp.float32)
    out = nnx.jit(lambda m, x: m(x))(mlp, x)
    assert out.shape == (2, 3, 32) and out.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(in_features=0), "in_features"),
        (dict(in_features=8, hidden_features=-1), "hidden_features"),
        (dict(in_features=8, multiple_of=0), "multiple_of"),
        (dict(in_features=8, device="cuda"), "device"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GatedMLP(**kwargs, rngs=nnx.Rngs(0))
