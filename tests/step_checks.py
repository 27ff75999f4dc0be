"""Checks shared by the fused decode steps' tests (tests/test_mamba_step.py, tests/test_mamba2_step.py): the kernels
against the reference result by result, through jax.grad, inside a mixer and a language model, and repeated on a GPU."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.generation.cache import NormedStep
from pallas_kernels.mamba_step import PreNorm
from tests.tolerances import as_float32, assert_close, assert_no_worse


def random_prenorm(shape, seed: int, first: bool = False) -> PreNorm:
    """A block's add + RMSNorm in front of the mixer for a test ``shape`` (batch, d_model, dtype, param_dtype): a
    float32 residual (None for the first block), a random weight, the norm in the compute dtype (as the language
    model builds it)."""
    rng = np.random.default_rng(seed + 100)
    residual = None if first else jnp.asarray(rng.standard_normal((shape.batch, shape.d_model)) * 3, jnp.float32)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, shape.d_model), shape.param_dtype)
    return PreNorm(residual, weight, 1e-5, jnp.dtype(shape.dtype))


def float32_prenorm(prenorm: PreNorm | None) -> PreNorm | None:
    """``prenorm`` for the float32 computation: its arrays and its output dtype float32."""
    if prenorm is None:
        return None
    return as_float32(dataclasses.replace(prenorm, dtype=jnp.dtype(jnp.float32)))


def assert_step_results(actual, expected, exact, shape, prenorm: PreNorm | None) -> None:
    """A step's results (out, conv_state, ssm_state[, residual with ``prenorm``]) from the kernels (``actual``)
    against the reference's in the compute dtype ``shape.dtype`` (``expected``) and in float32 (``exact``). float32
    (computed and stored): elementwise within the table's tolerance of the reference. 16-bit (computed, or stored: a
    16-bit SSM state): norm-wise within COMPOSED_ERROR_FACTOR times the 16-bit reference's own error, both against
    the float32 computation."""
    names = ("out", "conv_state", "ssm_state") + (() if prenorm is None else ("residual",))
    for name, a, e, x in zip(names, actual, expected, exact, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype, name
        if jnp.dtype(shape.dtype) == jnp.float32 and a.dtype == jnp.float32:
            assert_close(a, e, shape.dtype, err_msg=f"{name} of {shape}")
        else:
            assert_no_worse(a, e, x, f"{name} of {shape}")


def assert_gradients_match(step, args) -> None:
    """jax.grad through ``step(..., implementation="pallas")`` (which runs the reference under differentiation)
    equals jax.grad through "reference", for every input and weight of ``args`` (u, conv_state, ssm_state, weights)."""

    def gradients(implementation):
        def f(u, conv_state, ssm_state, weights):
            out, conv_state, ssm_state = step(
                u, conv_state, ssm_state, weights, dtype=jnp.float32, implementation=implementation
            )
            return jnp.sum(out**2) + jnp.sum(jnp.sin(ssm_state)) + jnp.sum(conv_state)

        return jax.grad(f, argnums=(0, 1, 2, 3))(*args)

    for actual, expected in zip(
        jax.tree.leaves(gradients("pallas")), jax.tree.leaves(gradients("reference")), strict=True
    ):
        assert_close(actual, expected, "float32")


def assert_mixer_steps_agree(make_mixer, u: jax.Array) -> None:
    """``make_mixer(implementation).step`` over the tokens of u (b, l, d), carrying the cache: the kernels
    (interpreted) give the reference's outputs and caches (float32)."""
    results = {}
    for implementation in ("pallas", "reference"):
        mixer = make_mixer(implementation)
        cache, outs = mixer.init_cache(u.shape[0]), []
        for t in range(u.shape[1]):
            out, cache = mixer.step(u[:, t], cache)
            outs.append(out)
        results[implementation] = (jnp.stack(outs, axis=1), cache)
    (out, cache), (expected, expected_cache) = results["pallas"], results["reference"]
    assert_close(out, expected, "float32")
    assert_close(cache.ssm_state, expected_cache.ssm_state, "float32")
    np.testing.assert_array_equal(cache.conv_state, expected_cache.conv_state)


def assert_language_model_steps_agree(config, batch: int, monkeypatch) -> None:
    """MambaLMHeadModel(step_implementation=...) reaches every layer: the kernels' logits over a few decode steps
    equal the reference's (float32), both with each block's add + RMSNorm inside the mixer's step
    (``normed_step``), and equal the reference without that (the norm by the block, before ``step``)."""
    from mamba_jax import MambaLMHeadModel

    def logits(implementation):
        model = MambaLMHeadModel(config, rngs=nnx.Rngs(0), step_implementation=implementation)
        assert all(layer.mixer.step_implementation == implementation for layer in model.backbone.layers)
        cache, steps = model.init_cache(batch, 8), []
        for token in range(3):
            out, cache = model.step(jnp.arange(token, token + batch), cache)
            steps.append(out)
        return jnp.stack(steps)

    kernels, reference = logits("pallas"), logits("reference")
    monkeypatch.delattr(NormedStep, "normed_step")  # Block.step then norms before the mixer's step
    unfused = logits("reference")
    assert_close(kernels, reference, "float32")
    assert_close(reference, unfused, "float32")


def assert_repeats_exactly(kernels, args, dtype, times: int = 200) -> None:
    """The compiled ``kernels(*args, dtype=dtype)`` gives the same results ``times`` times over: a race between
    programs or launches that one call may miss shows here."""
    step = jax.jit(kernels, static_argnames="dtype")
    first = [np.asarray(x) for x in step(*args, dtype=dtype)]
    for _ in range(times):
        for a, b in zip(step(*args, dtype=dtype), first, strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)
