"""mamba2_step: the fused Mamba-2 decode step's kernels against its reference (in Pallas's interpreter on CPU;
compiled, at published sizes, under the ``gpu`` marker), the reference against ``Mamba2``'s full-sequence forward,
derivatives, the dispatch and argument errors."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import Mamba2
from mamba_jax.generation.cache import SSMCache
from pallas_kernels.mamba2_step import Mamba2StepOptions, Mamba2StepWeights, mamba2_step
from pallas_kernels.mamba2_step.pallas import mamba2_step_pallas
from pallas_kernels.mamba2_step.reference import mamba2_step_reference
from pallas_kernels.mamba_step import PreNorm
from pallas_kernels.selective_scan.pallas import pallas_supported
from tests.step_checks import (
    assert_gradients_match,
    assert_language_model_steps_agree,
    assert_mixer_steps_agree,
    assert_repeats_exactly,
    assert_step_results,
    float32_prenorm,
    random_prenorm,
)
from tests.tolerances import as_float32, assert_close


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    d_model: int
    heads: int
    headdim: int
    d_state: int
    groups: int
    width: int
    dtype: str
    biases: bool = False  # in_proj and out_proj biases, and no conv bias (the layouts no published model uses)
    norm: bool = True  # the gated RMSNorm (rmsnorm=True) or y * silu(z)
    d_has_hdim: bool = False  # D per channel (h * p,) instead of per head
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    param_dtype: str = "float32"
    state_dtype: str = "float32"  # the SSM state's (a 16-bit state is read and written in its dtype)

    def __str__(self):
        return "-".join(str(v) for v in dataclasses.astuple(self))


def arguments(shape: Shape, seed: int):
    """Random (u, conv_state, ssm_state, weights) for ``shape``, scaled like a trained layer's activations."""
    rng = np.random.default_rng(seed)
    b, d, h, p, n, g, w = (
        shape.batch,
        shape.d_model,
        shape.heads,
        shape.headdim,
        shape.d_state,
        shape.groups,
        shape.width,
    )
    d_ssm = h * p
    conv_dim, width = d_ssm + 2 * g * n, 2 * d_ssm + 2 * g * n + h

    def normal(*dims, scale=1.0, dtype=shape.param_dtype):
        return jnp.asarray(rng.standard_normal(dims) * scale, jnp.float32).astype(dtype)

    weights = Mamba2StepWeights(
        in_proj=normal(d, width, scale=d**-0.5),
        in_proj_bias=normal(width, scale=0.1) if shape.biases else None,
        conv=normal(w, conv_dim, scale=0.5),
        conv_bias=None if shape.biases else normal(conv_dim, scale=0.5),
        dt_bias=normal(h, scale=0.5, dtype="float32") - 3.0,
        A_log=jnp.log(jnp.asarray(rng.uniform(1.0, 16.0, (h,)), jnp.float32)),
        D=normal(d_ssm if shape.d_has_hdim else h, dtype="float32"),
        norm=1.0 + normal(d_ssm, scale=0.1) if shape.norm else None,
        out_proj=normal(d_ssm, d, scale=d_ssm**-0.5),
        out_proj_bias=normal(d, scale=0.1) if shape.biases else None,
    )
    u = normal(b, d, dtype=shape.dtype)
    conv_state = normal(b, w, conv_dim, dtype=shape.dtype)
    ssm_state = normal(b, h, p, n, dtype=shape.state_dtype)
    return u, conv_state, ssm_state, weights


def options_of(shape: Shape) -> Mamba2StepOptions:
    return Mamba2StepOptions(ngroups=shape.groups, dt_limit=shape.dt_limit)


def check_kernels(
    shape: Shape, seed: int, interpret: bool | None, prenorm: PreNorm | None = None, x64: bool = False, **options
) -> None:
    """The kernels against the reference on random arguments for ``shape`` (``assert_step_results``). ``x64``: the
    kernels run under ``jax.enable_x64`` (the reference as always, without it)."""
    args = arguments(shape, seed)
    dtype, settings = jnp.dtype(shape.dtype), options_of(shape)
    reference = jax.jit(mamba2_step_reference, static_argnums=(4, 5))
    expected = reference(*args, dtype, settings, prenorm)
    kernels = jax.jit(
        functools.partial(mamba2_step_pallas, **options), static_argnames=("dtype", "options", "interpret")
    )
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        actual = kernels(*args, dtype=dtype, options=settings, prenorm=prenorm, interpret=interpret)
    exact = reference(*as_float32(args), jnp.float32, settings, float32_prenorm(prenorm))
    assert_step_results(actual, expected, exact, shape, prenorm)


# Small: the interpreter runs each program one after another. Odd sizes: batch 3 (rows padded to 16), 6 heads in 2
# groups, d_state 24 (padded to 32), d_model 48 (tiles of 16), in_proj's 6 + 2 * 192 + 96 = 486 columns (the last
# block of columns overlapping its neighbour), width 3.
INTERPRETED = [
    Shape(1, 64, 4, 16, 16, 1, 4, "float32"),
    Shape(3, 48, 6, 32, 24, 2, 3, "float32", biases=True, d_has_hdim=True, dt_limit=(0.0, 0.05)),
    Shape(1, 128, 4, 32, 16, 1, 4, "float32", norm=False),
    Shape(2, 64, 4, 16, 16, 2, 4, "bfloat16", biases=True),  # float32 biases, bf16 compute
    Shape(2, 64, 4, 32, 32, 1, 4, "float16", param_dtype="float16"),
    Shape(16, 32, 2, 16, 8, 1, 2, "float32"),
    Shape(2, 64, 4, 16, 16, 2, 4, "float32", state_dtype="bfloat16"),
    Shape(3, 64, 4, 32, 32, 1, 4, "float16", param_dtype="float16", state_dtype="float16"),
]


@pytest.mark.parametrize("shape", INTERPRETED, ids=str)
def test_kernels_match_reference(shape):
    check_kernels(shape, seed=0, interpret=True, parts=2 if shape.headdim >= 32 else 1)


@pytest.mark.parametrize(
    "shape, options",
    [
        (Shape(1, 64, 4, 32, 16, 1, 4, "float32"), dict(depth=16, prefetch=0, parts=1)),
        (Shape(1, 64, 4, 32, 16, 1, 4, "float32"), dict(depth=16, prefetch=2, splits=2, out_splits=4)),
        (Shape(3, 96, 4, 64, 16, 2, 4, "bfloat16"), dict(depth=32, proj_columns=128, columns=32, parts=4)),
        (Shape(1, 96, 2, 48, 8, 1, 4, "float32"), dict(depth=16, splits=3, proj_columns=32, parts=1)),
        # in_proj by XLA's product (a 16-bit one, with and without the bias, added in the kernels)
        (Shape(3, 48, 6, 32, 24, 2, 3, "bfloat16", biases=True), dict(xla_in_proj=True)),
        (Shape(1, 64, 4, 32, 32, 1, 4, "float16", param_dtype="float16"), dict(xla_in_proj=True)),
        # B's and C's window, the norm and out_proj by XLA (the default past one row), and past 16 rows
        (Shape(3, 48, 6, 32, 24, 2, 3, "bfloat16", biases=True), {}),
        (Shape(1, 64, 4, 32, 32, 1, 4, "float32", norm=False), dict(xla_out_proj=True)),
        (Shape(2, 64, 4, 16, 16, 1, 4, "float32"), dict(xla_in_proj=False, parts=1)),  # out_proj alone by XLA
        # past one row with a float32 state: the conv and gate-and-norm kernels around XLA's state update (the
        # default; the conv's last block of 64 channels half masked, 17 rows in two blocks), and the fused state
        # kernel
        (Shape(3, 48, 6, 32, 24, 2, 3, "float32", biases=True, d_has_hdim=True), dict(conv_channels=64)),
        (Shape(17, 32, 2, 16, 8, 1, 2, "float32", biases=True), dict(conv_channels=16)),
        (Shape(3, 48, 6, 32, 24, 2, 3, "float32", biases=True, dt_limit=(0.0, 0.05)), dict(xla_state=False)),
        (Shape(17, 32, 2, 16, 8, 1, 2, "float32", biases=True), dict(parts=1, xla_state=False)),
        (Shape(1, 64, 4, 16, 16, 1, 4, "bfloat16", biases=True), dict(xla_state=True)),  # at one row, if asked
        # the gate and norm kernel after XLA's readout needs the norm and a power-of-2 headdim; else XLA's
        (Shape(3, 64, 4, 32, 16, 1, 4, "float32", norm=False), {}),
        (Shape(2, 96, 2, 48, 8, 1, 4, "float32"), {}),
    ],
    ids=str,
)
def test_kernel_options_match_reference(shape, options):
    check_kernels(shape, seed=1, interpret=True, **options)


@pytest.mark.parametrize(
    "shape, first, options",
    [
        (Shape(1, 48, 6, 32, 24, 2, 3, "float32", biases=True), False, dict(depth=16, parts=1)),  # d padded to 64
        (Shape(1, 64, 4, 16, 16, 1, 4, "bfloat16"), True, dict(parts=1)),  # the first block: no residual
        (Shape(1, 64, 4, 32, 32, 1, 4, "float16", param_dtype="float16"), False, dict(xla_in_proj=True)),
        (Shape(3, 48, 6, 32, 24, 2, 3, "bfloat16"), False, {}),  # past one row: XLA's norm and projections
    ],
    ids=str,
)
def test_kernels_with_prenorm_match_reference(shape, first, options):
    """The block's add + RMSNorm taken into the step (``PreNorm``): out, both states and the new residual."""
    check_kernels(shape, seed=4, interpret=True, prenorm=random_prenorm(shape, 4, first), **options)


@pytest.mark.parametrize(
    "shape, prenorm, options",
    [
        # one row: in_proj's kernel, the state kernel, out_proj's kernel (B's and C's window shifted there)
        (Shape(1, 64, 4, 16, 16, 1, 4, "float32"), False, dict(parts=1)),
        (Shape(1, 48, 6, 32, 24, 2, 3, "float32", biases=True), True, dict(depth=16)),  # the norm in in_proj's
        # past 16 rows: the conv and gate-and-norm kernels around XLA's state update; the state kernel
        (Shape(17, 32, 2, 16, 8, 1, 2, "float32", biases=True), False, dict(conv_channels=16)),
        (Shape(17, 32, 2, 16, 8, 1, 2, "float32", biases=True), False, dict(parts=1, xla_state=False)),
    ],
    ids=str,
)
def test_kernels_under_enable_x64(shape, prenorm, options):
    """With jax_enable_x64 the kernels trace in Pallas's interpreter and match the reference. (Their stores' Python
    int slice starts were int64 there, beside the int32 program ids, and the interpreter's store refused the mix.)"""
    prenorm = random_prenorm(shape, 9) if prenorm else None
    check_kernels(shape, seed=9, interpret=True, prenorm=prenorm, x64=True, **options)


@pytest.mark.parametrize("rmsnorm", [True, False])
def test_reference_steps_equal_mamba2_forward(rmsnorm):
    """Token by token through mamba2_step's reference from an empty cache = Mamba2's full-sequence forward (float32),
    with two groups and a dt limit."""
    mixer = Mamba2(
        32,
        d_state=8,
        headdim=16,
        ngroups=2,
        rmsnorm=rmsnorm,
        dt_limit=(0.0, 0.05),
        chunk_size=4,
        rngs=nnx.Rngs(0),
        step_implementation="reference",
    )
    u = jax.random.normal(jax.random.key(1), (2, 7, 32))
    cache = mixer.init_cache(2)
    outs = []
    for t in range(u.shape[1]):
        out, cache = mixer.step(u[:, t], cache)
        outs.append(out)
    assert_close(jnp.stack(outs, axis=1), mixer(u), "float32")


def test_mamba2_step_implementations_agree_in_module():
    """Mamba2.step with the kernels (interpreted) = with the reference, over a few tokens carrying the cache."""
    u = jax.random.normal(jax.random.key(2), (3, 4, 32))

    def mixer(implementation):
        return Mamba2(32, d_state=16, headdim=16, rngs=nnx.Rngs(0), step_implementation=implementation)

    assert_mixer_steps_agree(mixer, u)


def test_kernels_differentiate_as_reference():
    """jax.grad through the kernels' path runs the reference: the same gradients for every input and weight."""
    assert_gradients_match(mamba2_step, arguments(Shape(2, 32, 2, 16, 8, 1, 4, "float32", biases=True), seed=3))


def test_default_implementation():
    """The kernels on a GPU where they take the mixer; XLA elsewhere; on CPU bit for bit the reference."""
    from pallas_kernels.mamba2_step.api import default_implementation

    def pick(batch, d_model, headdim=64, d_state=128, **options):
        args = arguments(Shape(batch, d_model, 2 * d_model // headdim, headdim, d_state, 1, 4, "float16"), seed=0)
        options = Mamba2StepOptions()._replace(**options)
        return default_implementation(batch, args[3], args[2].shape, options)

    expected = "pallas" if pallas_supported() else "reference"
    assert pick(1, 2048) == expected  # Mamba-2 1.3b
    assert pick(1, 768) == expected  # 130m
    assert pick(1, 2560) == expected  # 2.7b
    assert pick(2, 2048) == expected  # past one row: with a float32 state two kernels around XLA's state update
    assert pick(64, 2048) == expected
    assert pick(1, 2048, norm_before_gate=True) == "reference"  # a mixer the kernels do not take
    assert pick(1, 64, headdim=8, d_state=16) == "reference"  # heads narrower than a state tile's 16 rows

    args = arguments(Shape(2, 64, 4, 16, 16, 1, 4, "float32"), seed=4)
    default = mamba2_step(*args, dtype=jnp.float32)
    reference = mamba2_step(*args, dtype=jnp.float32, implementation="reference")
    for a, b in zip(default, reference, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_errors():
    shape = Shape(2, 64, 4, 16, 16, 1, 4, "float32")
    u, conv_state, ssm_state, weights = arguments(shape, seed=0)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        mamba2_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, implementation="cuda")
    with pytest.raises(ValueError, match=r"u must have shape \(batch, d_model\)"):
        mamba2_step(u[0], conv_state, ssm_state, weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"conv_state must have shape \(2, 4, 96\)"):
        mamba2_step(u, conv_state[:, 1:], ssm_state, weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"mamba2_step: ssm_state must be floating \(float32, .*\), got int32"):
        mamba2_step(u, conv_state, ssm_state.astype(jnp.int32), weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"in_proj must have shape \(64, 164\)"):
        mamba2_step(u, conv_state, ssm_state, weights._replace(in_proj=weights.in_proj[:, 1:]), dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"options\.ngroups must be a positive divisor of nheads 4, got 3"):
        mamba2_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, options=Mamba2StepOptions(ngroups=3))
    with pytest.raises(ValueError, match=r"options\.dt_limit must satisfy low <= high, got \(1\.0, 0\.0\)"):
        options = Mamba2StepOptions(dt_limit=(1.0, 0.0))
        mamba2_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, options=options)
    with pytest.raises(ValueError, match="options must be a Mamba2StepOptions"):
        mamba2_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, options={"ngroups": 1})
    with pytest.raises(ValueError, match=r"splits must be a positive int dividing 64 / 16, got 3"):
        mamba2_step_pallas(u, conv_state, ssm_state, weights, jnp.float32, interpret=True, depth=16, splits=3)
    with pytest.raises(ValueError, match="parts must be a power of 2 dividing headdim 16"):
        mamba2_step_pallas(u, conv_state, ssm_state, weights, jnp.float32, interpret=True, parts=2)
    with pytest.raises(ValueError, match="batch 17 > 16 needs xla_out_proj True"):
        big = arguments(dataclasses.replace(shape, batch=17), seed=0)
        mamba2_step_pallas(*big, jnp.float32, interpret=True, parts=1, xla_out_proj=False)


def test_cache_passes_through_module():
    """Mamba2.step returns an SSMCache of the cache's dtypes whichever implementation runs."""
    mixer = Mamba2(32, d_state=16, headdim=16, rngs=nnx.Rngs(0), step_implementation="pallas")
    cache = SSMCache(jnp.zeros((1, 4, 96), jnp.bfloat16), jnp.zeros((1, 4, 16, 16), jnp.float32))
    out, new = mixer.step(jnp.ones((1, 32)), cache)
    assert out.shape == (1, 32) and new.conv_state.dtype == jnp.bfloat16 and new.ssm_state.dtype == jnp.float32


# Published sizes: Mamba-2 130m (d 768, 24 heads: in_proj's 3352 columns end in a partial block), 1.3b (d 2048),
# 2.7b (d 2560, 80 heads), all headdim 64, d_state 128, one group.
GPU_SHAPES = [
    Shape(1, 2048, 64, 64, 128, 1, 4, "float16", param_dtype="float16"),
    Shape(1, 2560, 80, 64, 128, 1, 4, "bfloat16", param_dtype="bfloat16"),
    Shape(16, 768, 24, 64, 128, 1, 4, "bfloat16", param_dtype="bfloat16"),
    Shape(5, 768, 24, 64, 128, 1, 4, "float32"),
    Shape(1, 2048, 64, 64, 128, 1, 4, "float16", param_dtype="float16", state_dtype="float16"),
    Shape(64, 2048, 64, 64, 128, 1, 4, "float16", param_dtype="float16", state_dtype="float16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_kernels_match_reference_on_gpu(shape):
    """The compiled kernels (tl.dot, single-instruction exp2, softplus, sigmoid) against the reference."""
    assert pallas_supported()
    check_kernels(shape, seed=5, interpret=None)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, options",
    [
        (GPU_SHAPES[0], {}),  # 1.3b: the norm by XLA before XLA's in_proj
        (GPU_SHAPES[0], dict(xla_in_proj=False)),  # the norm in the first kernel
        (Shape(1, 768, 24, 64, 128, 1, 4, "bfloat16", param_dtype="bfloat16"), {}),  # 130m: in the first kernel
    ],
    ids=str,
)
def test_kernels_with_prenorm_on_gpu(shape, options):
    """The block's add + RMSNorm taken into the step at published sizes."""
    assert pallas_supported()
    check_kernels(shape, seed=6, interpret=None, prenorm=random_prenorm(shape, 6), **options)


@pytest.mark.gpu
@pytest.mark.parametrize("xla_state", [None, False])
def test_kernels_past_16_rows_on_gpu(xla_state):
    """Batch 64 at 1.3b's size: the conv and gate-and-norm kernels around XLA's state update (the default with a
    float32 state), and the state kernel between XLA's projections (and XLA's norm and B/C window)."""
    assert pallas_supported()
    shape = Shape(64, 2048, 64, 64, 128, 1, 4, "float16", param_dtype="float16")
    check_kernels(shape, seed=5, interpret=None, xla_state=xla_state)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [GPU_SHAPES[0], Shape(64, 768, 24, 64, 128, 1, 4, "float16", param_dtype="float16")])
def test_kernels_repeat_exactly_on_gpu(shape):
    """The same step 200 times gives the same result each time: both caches are updated in place, B's and C's conv
    window by the last kernel (at one row) or the whole window by the conv kernel (past it), so a race between
    programs, launches or warps would show (one did: before ``KernelMath.barrier`` warps of the state kernel read
    taps of the window that another warp had shifted)."""
    assert pallas_supported()
    assert_repeats_exactly(mamba2_step_pallas, arguments(shape, seed=7), jnp.float16)


@pytest.mark.parametrize("batch", [1, 2])
def test_language_model_steps_agree(batch, monkeypatch):
    """MambaLMHeadModel(step_implementation=...) reaches every Mamba-2 layer: the kernels' logits equal the
    reference's."""
    from mamba_jax import MambaConfig

    ssm_cfg = {"layer": "Mamba2", "d_state": 16, "headdim": 16}
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=50, ssm_cfg=ssm_cfg)
    assert_language_model_steps_agree(config, batch, monkeypatch)
