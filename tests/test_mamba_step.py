"""mamba_step: the fused Mamba-1 decode step's kernels against its reference (in Pallas's interpreter on CPU; compiled,
at published sizes, under the ``gpu`` marker), the reference against ``Mamba``'s full-sequence forward, derivatives,
the dispatch and argument errors."""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax import Mamba
from mamba_jax.generation.cache import SSMCache
from pallas_kernels.mamba_step import MambaStepWeights, PartialSums, PreNorm, mamba_step
from pallas_kernels.mamba_step.pallas import OUT_PARTS, mamba_step_pallas
from pallas_kernels.mamba_step.reference import mamba_step_reference
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
    d_inner: int
    d_state: int
    rank: int
    width: int
    dtype: str
    biases: bool = False  # in_proj and out_proj biases, and no conv bias (the layouts no published model uses)
    param_dtype: str = "float32"
    cache_dtype: str | None = None  # None: the compute dtype
    state_dtype: str = "float32"  # the SSM state's (a 16-bit state is read and written in its dtype)

    def __str__(self):
        return "-".join(str(v) for v in dataclasses.astuple(self) if v is not None)


def arguments(shape: Shape, seed: int):
    """Random (u, conv_state, ssm_state, weights) for ``shape``, scaled like a trained layer's activations."""
    rng = np.random.default_rng(seed)
    b, d, di, n, r, w = shape.batch, shape.d_model, shape.d_inner, shape.d_state, shape.rank, shape.width

    def normal(*dims, scale=1.0, dtype=shape.param_dtype):
        return jnp.asarray(rng.standard_normal(dims) * scale, jnp.float32).astype(dtype)

    weights = MambaStepWeights(
        in_proj=normal(d, 2 * di, scale=d**-0.5),
        in_proj_bias=normal(2 * di, scale=0.1) if shape.biases else None,
        conv=normal(w, di, scale=0.5),
        conv_bias=None if shape.biases else normal(di, scale=0.5),
        x_proj=normal(di, r + 2 * n, scale=di**-0.5),
        dt_proj=normal(r, di, scale=r**-0.5),
        dt_bias=normal(di, scale=0.5, dtype="float32") - 3.0,
        A_log=jnp.log(jnp.asarray(rng.uniform(1.0, 16.0, (di, n)), jnp.float32)),
        D=normal(di, dtype="float32"),
        out_proj=normal(di, d, scale=di**-0.5),
        out_proj_bias=normal(d, scale=0.1) if shape.biases else None,
    )
    u = normal(b, d, dtype=shape.dtype)
    conv_state = normal(b, w, di, dtype=shape.cache_dtype or shape.dtype)
    ssm_state = normal(b, di, n, dtype=shape.state_dtype)
    return u, conv_state, ssm_state, weights


def check_kernels(
    shape: Shape, seed: int, interpret: bool | None, prenorm: PreNorm | None = None, x64: bool = False, **options
) -> None:
    """The kernels against the reference on random arguments for ``shape`` (``assert_step_results``). ``x64``: the
    kernels run under ``jax.enable_x64`` (the reference as always, without it)."""
    args = arguments(shape, seed)
    dtype = jnp.dtype(shape.dtype)
    reference = jax.jit(mamba_step_reference, static_argnums=4)
    expected = reference(*args, dtype, prenorm)
    kernels = jax.jit(functools.partial(mamba_step_pallas, **options), static_argnames=("dtype", "interpret"))
    with jax.enable_x64(True) if x64 else contextlib.nullcontext():
        actual = kernels(*args, dtype=dtype, prenorm=prenorm, interpret=interpret)
    exact = reference(*as_float32(args), jnp.float32, float32_prenorm(prenorm))
    assert_step_results(actual, expected, exact, shape, prenorm)


# Small: the interpreter runs each program one after another. Odd sizes: batch 3 (rows padded to 16), d_model 48
# (tiles of 16), d_state 6 (columns padded to 8), rank 3 (padded to 16), width 3.
INTERPRETED = [
    Shape(1, 32, 64, 4, 2, 4, "float32"),
    Shape(3, 48, 96, 6, 3, 3, "float32", biases=True),
    Shape(2, 64, 128, 16, 4, 4, "bfloat16"),
    Shape(2, 32, 64, 4, 2, 4, "bfloat16", biases=True),  # float32 biases, bf16 compute
    Shape(2, 32, 64, 16, 2, 4, "float16", param_dtype="float16"),
    Shape(1, 32, 96, 8, 5, 4, "bfloat16", cache_dtype="float32"),
    Shape(16, 32, 64, 4, 2, 2, "float32"),
    Shape(2, 32, 64, 16, 2, 4, "float32", state_dtype="bfloat16"),
    Shape(3, 48, 96, 6, 3, 3, "float16", param_dtype="float16", state_dtype="float16"),
]


@pytest.mark.parametrize("shape", INTERPRETED, ids=str)
def test_kernels_match_reference(shape):
    check_kernels(shape, seed=0, interpret=True)


@pytest.mark.parametrize(
    "shape, options",
    [
        (Shape(1, 64, 64, 4, 2, 4, "float32"), dict(depth=16, prefetch=0)),
        (Shape(1, 64, 64, 4, 2, 4, "float32"), dict(depth=16, prefetch=2)),  # 4 tiles of in_proj, 2 ahead
        (Shape(3, 64, 128, 8, 3, 4, "bfloat16"), dict(channels=64, depth=32, columns=16, prefetch=3)),
        (Shape(1, 96, 64, 4, 6, 4, "float32"), dict(depth=16, splits=3, proj_columns=32)),  # d_model in 3 parts
        (Shape(5, 48, 96, 4, 3, 4, "float32"), dict(depth=16, splits=1, proj_columns=64)),  # one part, tl.dot
        (Shape(3, 48, 96, 6, 3, 3, "bfloat16", biases=True), dict(xla_in_proj=True)),  # in_proj by XLA
        (Shape(3, 48, 96, 6, 3, 3, "bfloat16", biases=True), dict(xla_out_proj=True)),  # out_proj by XLA
        (Shape(1, 32, 64, 4, 2, 4, "float32"), dict(xla_in_proj=True, xla_out_proj=True)),  # both: two kernels
        (Shape(3, 48, 96, 6, 3, 3, "bfloat16", state_dtype="bfloat16"), dict(xla_out_proj=True)),  # 16-bit state
        (Shape(17, 32, 64, 4, 2, 4, "float32"), {}),  # past 16 rows: blocks of 16, the last of one row
        (Shape(40, 48, 96, 6, 3, 3, "bfloat16", biases=True), dict(channels=32)),  # 3 blocks, 3 x 3 programs
        (Shape(3, 48, 96, 6, 3, 3, "bfloat16", biases=True), dict(xla_x_proj=False)),  # x_proj's partial sums
        (Shape(1, 32, 64, 4, 2, 4, "float32"), dict(xla_x_proj=True)),  # x_proj by XLA at one row
        # past 16 rows in_proj's kernel still holds every row: 40 padded to 64 in one tl.dot tile
        (Shape(40, 48, 96, 6, 3, 3, "float16", param_dtype="float16"), dict(xla_in_proj=False, depth=16, splits=1)),
        # the conv in in_proj's kernel (by default past one row in 16 bits where one split fills the grid)
        (Shape(3, 48, 96, 6, 3, 3, "bfloat16", biases=True), dict(conv_in_proj=True, proj_columns=32)),
        (Shape(20, 32, 64, 4, 2, 4, "float16", param_dtype="float16"), dict(conv_in_proj=True)),
        (Shape(2, 32, 64, 16, 2, 4, "float32"), dict(xla_in_proj=False, conv_in_proj=True)),
    ],
    ids=str,
)
def test_kernel_options_match_reference(shape, options):
    check_kernels(shape, seed=1, interpret=True, **options)


@pytest.mark.parametrize(
    "shape, first, options",
    [
        (Shape(1, 48, 96, 6, 3, 3, "float32", biases=True), False, dict(depth=16)),  # 3 tiles, d padded to 64
        (Shape(1, 64, 128, 16, 4, 4, "bfloat16"), True, dict(depth=16, splits=2)),  # the first block: no residual
        (Shape(1, 32, 64, 16, 2, 4, "float16", param_dtype="float16"), False, {}),
        (Shape(3, 48, 96, 6, 3, 3, "float32"), False, dict(xla_in_proj=False)),  # the norm launch, then tl.dot
        (Shape(3, 48, 96, 6, 3, 3, "bfloat16"), False, {}),  # past one row: the norm by XLA before its in_proj
        (Shape(20, 48, 96, 6, 3, 3, "bfloat16"), False, dict(xla_in_proj=False)),  # the norm launch, then the kernel
        (Shape(3, 32, 64, 4, 2, 4, "bfloat16"), False, dict(conv_in_proj=True)),  # the norm launch, in_proj + conv
        (Shape(20, 32, 64, 4, 2, 4, "bfloat16", biases=True), True, dict(conv_in_proj=True)),  # the norm launch first
    ],
    ids=str,
)
def test_kernels_with_prenorm_match_reference(shape, first, options):
    """The block's add + RMSNorm taken into the step (``PreNorm``): out, both states and the new residual."""
    check_kernels(shape, seed=4, interpret=True, prenorm=random_prenorm(shape, 4, first), **options)


@pytest.mark.parametrize(
    "shape, prenorm, options",
    [
        (Shape(1, 32, 64, 4, 2, 4, "float32"), False, {}),  # one row: in_proj's GEMV, the conv kernel, out_proj's
        (Shape(1, 48, 96, 6, 3, 3, "float32", biases=True), True, dict(depth=16)),  # the norm in in_proj's kernel
        (Shape(17, 32, 64, 4, 2, 4, "float32"), False, {}),  # past 16 rows: the state kernel, the last block masked
        (Shape(3, 32, 64, 4, 2, 4, "bfloat16"), True, dict(conv_in_proj=True)),  # the norm launch, in_proj + conv
    ],
    ids=str,
)
def test_kernels_under_enable_x64(shape, prenorm, options):
    """With jax_enable_x64 the kernels trace in Pallas's interpreter and match the reference. (Their stores' Python
    int slice starts were int64 there, beside the int32 program ids, and the interpreter's store refused the mix.)"""
    prenorm = random_prenorm(shape, 9) if prenorm else None
    check_kernels(shape, seed=9, interpret=True, prenorm=prenorm, x64=True, **options)


@pytest.mark.parametrize(
    "shape",
    [
        Shape(3, 48, 96, 6, 3, 3, "bfloat16"),
        Shape(20, 32, 64, 4, 2, 4, "float16", param_dtype="float16"),  # past 16 rows
        Shape(2, 32, 64, 4, 2, 4, "float32"),
    ],
    ids=str,
)
def test_partial_sums_from_one_step_into_the_next(shape):
    check_partial_sums_chain(shape, interpret=True)


@pytest.mark.gpu
def test_partial_sums_from_one_step_into_the_next_on_gpu():
    """The same at Mamba-1 130m's size, batch 64, compiled."""
    assert pallas_supported()
    check_partial_sums_chain(Shape(64, 768, 1536, 16, 48, 4, "float16", param_dtype="float16"), interpret=None)


def check_partial_sums_chain(shape: Shape, interpret: bool | None) -> None:
    """``partial_out`` past one row: out as OUT_PARTS float32 parts whose rounded sum is the step's out; the next
    step takes them as its u (its norm launch adds them) and matches the reference on the same parts."""
    args = arguments(shape, seed=8)
    dtype = jnp.dtype(shape.dtype)
    reference = jax.jit(mamba_step_reference, static_argnums=4)
    step = functools.partial(mamba_step_pallas, interpret=interpret)
    kernels = jax.jit(step, static_argnames=("dtype", "partial_out"))
    prenorm = random_prenorm(shape, 8, first=False)
    first = kernels(*args, dtype=dtype, prenorm=prenorm, partial_out=True)
    assert isinstance(first[0], PartialSums) and first[0].sums.shape == (OUT_PARTS, shape.batch, shape.d_model)
    settled_first = (first[0].total(), *first[1:])
    exact = reference(*as_float32(args), jnp.float32, float32_prenorm(prenorm))
    assert_step_results(settled_first, reference(*args, dtype, prenorm), exact, shape, prenorm)

    # the next step on the parts: a layer's weights again, the states and residual the first step left
    u, conv_state, ssm_state, residual = first[0], first[1], first[2], first[3]
    following = dataclasses.replace(prenorm, residual=residual)
    second = kernels(u, conv_state, ssm_state, args[3], dtype=dtype, prenorm=following)
    expected = reference(u, conv_state, ssm_state, args[3], dtype, following)
    exact_u = u.total().astype(jnp.float32)
    exact = reference(*as_float32((exact_u, conv_state, ssm_state, args[3])), jnp.float32, float32_prenorm(following))
    assert_step_results(second, expected, exact, shape, following)
    # without a prenorm XLA adds the parts first; the reference ignores partial_out
    plain = kernels(u, conv_state, ssm_state, args[3], dtype=dtype)
    exact = reference(*as_float32((exact_u, conv_state, ssm_state, args[3])), jnp.float32)
    assert_step_results(plain, reference(u, conv_state, ssm_state, args[3], dtype), exact, shape, None)
    out = mamba_step(*args, dtype=dtype, implementation="reference", partial_out=True)[0]
    assert not isinstance(out, PartialSums)


def test_reference_prenorm_is_the_blocks_add_and_norm():
    """mamba_step_reference with a PreNorm = RMSNorm(hidden + residual) then the step, and returns the sum."""
    from mamba_jax.layers import RMSNorm

    shape = Shape(2, 32, 64, 4, 2, 4, "bfloat16")
    u, conv_state, ssm_state, weights = arguments(shape, seed=5)
    prenorm = random_prenorm(shape, 5, first=False)
    norm = RMSNorm(32, dtype=jnp.bfloat16)
    norm.weight[...] = prenorm.weight
    s = u.astype(jnp.float32) + prenorm.residual
    want = mamba_step_reference(norm(s), conv_state, ssm_state, weights, jnp.bfloat16)
    got = mamba_step_reference(u, conv_state, ssm_state, weights, jnp.bfloat16, prenorm)
    for a, e in zip(got, (*want, s), strict=True):
        np.testing.assert_array_equal(a, e)


def test_reference_steps_equal_mamba_forward():
    """Token by token through mamba_step's reference from an empty cache = Mamba's full-sequence forward (float32)."""
    mixer = Mamba(32, d_state=4, d_conv=4, expand=2, rngs=nnx.Rngs(0), step_implementation="reference")
    u = jax.random.normal(jax.random.key(1), (2, 7, 32))
    cache = mixer.init_cache(2)
    outs = []
    for t in range(u.shape[1]):
        out, cache = mixer.step(u[:, t], cache)
        outs.append(out)
    assert_close(jnp.stack(outs, axis=1), mixer(u), "float32")


def test_mamba_step_implementations_agree_in_module():
    """Mamba.step with the kernels (interpreted) = with the reference, over a few tokens carrying the cache."""
    u = jax.random.normal(jax.random.key(2), (3, 4, 32))
    assert_mixer_steps_agree(
        lambda implementation: Mamba(32, d_state=8, rngs=nnx.Rngs(0), step_implementation=implementation), u
    )


def test_kernels_differentiate_as_reference():
    """jax.grad through the kernels' path runs the reference: the same gradients for every input and weight."""
    assert_gradients_match(mamba_step, arguments(Shape(2, 32, 64, 4, 2, 4, "float32", biases=True), seed=3))


def test_default_implementation():
    from pallas_kernels.mamba_step.api import default_implementation

    expected = "pallas" if pallas_supported() else "reference"
    assert default_implementation(1, 2048, 4096) == expected  # Mamba-1 1.4b
    assert default_implementation(1, 2560, 5120) == expected  # 2.8b: both projections by XLA
    assert default_implementation(64, 2048, 4096) == expected  # past one row: XLA's x_proj and out_proj
    assert default_implementation(64, 2560, 5120) == expected  # at every size (XLA's step was faster at 2.8b once)


@pytest.mark.parametrize(
    "batch, dtype, kernel",
    [(1, "float32", True), (64, "bfloat16", True), (65, "bfloat16", False), (2, "float32", False)],
)
def test_in_proj_kernel_holds_up_to_64_rows(batch, dtype, kernel):
    """By default in_proj is the first kernel's up to MAX_PROJ_ROWS rows (every row in one tl.dot tile past one
    row, in 16-bit compute dtypes), XLA's product past them and past one row in float32."""
    args = arguments(Shape(batch, 32, 64, 4, 2, 4, dtype), seed=0)
    step = functools.partial(mamba_step_pallas, dtype=jnp.dtype(dtype), interpret=True)
    assert ("mamba_step_proj" in str(jax.make_jaxpr(step)(*args))) == kernel


@pytest.mark.parametrize("batch", [1, 4])
def test_prenorm_in_in_proj_kernel_at_one_row_only(batch):
    """The block's norm runs inside in_proj's kernel at one row; past it ``prenorm_launch`` first (every program
    norming several rows was 40% slower in generation at batch 16)."""
    shape = Shape(batch, 32, 64, 4, 2, 4, "bfloat16")
    step = functools.partial(mamba_step_pallas, dtype=jnp.bfloat16, interpret=True)
    jaxpr = str(jax.make_jaxpr(step)(*arguments(shape, seed=0), prenorm=random_prenorm(shape, 0)))
    assert "mamba_step_proj" in jaxpr
    assert ("mamba_step_norm" in jaxpr) == (batch > 1)


@pytest.mark.parametrize("d_inner, fused", [(3072, True), (1536, False)])
def test_conv_in_proj_kernel_where_one_split_fills_the_grid(d_inner, fused):
    """Past one row the conv runs in in_proj's kernel where one split of d_model gives it BATCHED_PROJ_PROGRAMS
    programs (2 d_inner / 64 >= 96), else in a launch of its own."""
    args = arguments(Shape(64, 32, d_inner, 4, 2, 4, "bfloat16"), seed=0)
    jaxpr = str(jax.make_jaxpr(functools.partial(mamba_step_pallas, dtype=jnp.bfloat16, interpret=True))(*args))
    assert ("mamba_step_proj_conv" in jaxpr) == fused
    assert ("mamba_step_in" in jaxpr) == (not fused)


def test_errors():
    shape = Shape(2, 32, 64, 4, 2, 4, "float32")
    u, conv_state, ssm_state, weights = arguments(shape, seed=0)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        mamba_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, implementation="cuda")
    with pytest.raises(ValueError, match=r"u as PartialSums needs float32 sums \(parts, batch, d_model\)"):
        mamba_step(
            PartialSums(jnp.zeros((2, 2, 32), jnp.bfloat16), jnp.bfloat16),
            conv_state,
            ssm_state,
            weights,
            dtype=jnp.float32,
        )
    with pytest.raises(ValueError, match=r"u must have shape \(batch, d_model\)"):
        mamba_step(u[0], conv_state, ssm_state, weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"conv_state must have shape \(2, 4, 64\)"):
        mamba_step(u, conv_state[:, 1:], ssm_state, weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"mamba_step: ssm_state must be floating \(float32, .*\), got int32"):
        mamba_step(u, conv_state, ssm_state.astype(jnp.int32), weights, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"x_proj must have shape \(64, 10\)"):
        mamba_step(u, conv_state, ssm_state, weights._replace(x_proj=weights.x_proj[:, 1:]), dtype=jnp.float32)
    prenorm = random_prenorm(shape, 0)
    with pytest.raises(ValueError, match="prenorm must be a PreNorm or None, got tuple"):
        mamba_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, prenorm=(prenorm.residual, prenorm.weight))
    with pytest.raises(ValueError, match=r"prenorm.residual must have u's shape \(2, 32\), got \(2, 31\)"):
        bad = dataclasses.replace(prenorm, residual=prenorm.residual[:, 1:])
        mamba_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, prenorm=bad)
    with pytest.raises(ValueError, match=r"prenorm.weight must have shape \(32,\), got \(16,\)"):
        bad = dataclasses.replace(prenorm, weight=prenorm.weight[:16])
        mamba_step(u, conv_state, ssm_state, weights, dtype=jnp.float32, prenorm=bad)
    with pytest.raises(ValueError, match=r"dividing d_model / depth = 32 / 16 \(1 with conv_in_proj\), got 3"):
        mamba_step_pallas(u, conv_state, ssm_state, weights, dtype=jnp.float32, interpret=True, depth=16, splits=3)
    with pytest.raises(ValueError, match=r"batch 17 > 16 needs xla_out_proj True \(XLA's product\) or None, got F"):
        big = arguments(dataclasses.replace(shape, batch=17), seed=0)
        mamba_step_pallas(*big, dtype=jnp.float32, interpret=True, xla_out_proj=False)
    with pytest.raises(ValueError, match="conv_in_proj needs more than one row, in_proj by the kernel"):
        mamba_step_pallas(u[:1], conv_state[:1], ssm_state[:1], weights, dtype=jnp.float32, conv_in_proj=True)
    with pytest.raises(ValueError, match=r"got batch 2, d_inner 64, xla_in_proj=True"):
        mamba_step_pallas(u, conv_state, ssm_state, weights, dtype=jnp.float32, conv_in_proj=True, xla_in_proj=True)
    with pytest.raises(ValueError, match=r"\(1 with conv_in_proj\), got 2"):
        mamba_step_pallas(
            *arguments(Shape(2, 64, 64, 4, 2, 4, "bfloat16"), seed=0),
            dtype=jnp.bfloat16,
            splits=2,
            conv_in_proj=True,
            depth=16,
            interpret=True,
        )
    with pytest.raises(ValueError, match="batch 65 > 64 needs xla_in_proj True"):
        big = arguments(dataclasses.replace(shape, batch=65), seed=0)
        mamba_step_pallas(*big, dtype=jnp.float32, interpret=True, xla_in_proj=False)


def test_cache_passes_through_module():
    """Mamba.step returns an SSMCache of the cache's dtypes whichever implementation runs."""
    mixer = Mamba(32, d_state=4, rngs=nnx.Rngs(0), step_implementation="pallas")
    cache = SSMCache(jnp.zeros((1, 4, 64), jnp.bfloat16), jnp.zeros((1, 64, 4), jnp.float32))
    out, new = mixer.step(jnp.ones((1, 32)), cache)
    assert out.shape == (1, 32) and new.conv_state.dtype == jnp.bfloat16 and new.ssm_state.dtype == jnp.float32


# Published sizes: Mamba-1 130m (d 768), 1.4b (d 2048) and 2.8b (d 2560, rank 160: x_proj's columns padded).
GPU_SHAPES = [
    Shape(1, 2048, 4096, 16, 128, 4, "float16", param_dtype="float16"),
    Shape(1, 2560, 5120, 16, 160, 4, "bfloat16", param_dtype="bfloat16"),
    Shape(16, 768, 1536, 16, 48, 4, "bfloat16", param_dtype="bfloat16"),
    Shape(5, 768, 1536, 16, 48, 4, "float32"),
    Shape(1, 2048, 4096, 16, 128, 4, "float16", param_dtype="float16", state_dtype="float16"),
    Shape(64, 2048, 4096, 16, 128, 4, "float16", param_dtype="float16", state_dtype="float16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_kernels_match_reference_on_gpu(shape):
    """The compiled kernels (tl.dot, single-instruction exp2, softplus, sigmoid) against the reference."""
    assert pallas_supported()
    check_kernels(shape, seed=5, interpret=None)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape", [GPU_SHAPES[0], GPU_SHAPES[1], Shape(1, 768, 1536, 16, 48, 4, "bfloat16", param_dtype="bfloat16")], ids=str
)
def test_kernels_with_prenorm_on_gpu(shape):
    """The block's add + RMSNorm in the first kernel (1.4b, 130m), or by XLA before its in_proj (2.8b)."""
    assert pallas_supported()
    check_kernels(shape, seed=6, interpret=None, prenorm=random_prenorm(shape, 6, first=False))


@pytest.mark.gpu
def test_kernels_repeat_exactly_on_gpu():
    """The same step 200 times gives the same result each time. Catches races between programs or launches that one
    call may miss: a version with both states updated in place gave a wrong state in about one call in two at 1.4b's
    size (test_kernels_match_reference_on_gpu checks the values)."""
    assert pallas_supported()
    assert_repeats_exactly(mamba_step_pallas, arguments(GPU_SHAPES[0], seed=7), jnp.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=str)
def test_state_kernel_in_place_on_gpu(shape):
    """With out_proj by XLA the last kernel updates the state in place: its values, and 200 calls alike."""
    assert pallas_supported()
    check_kernels(shape, seed=5, interpret=None, xla_out_proj=True)
    kernels = functools.partial(mamba_step_pallas, xla_out_proj=True)
    assert_repeats_exactly(kernels, arguments(shape, seed=7), jnp.dtype(shape.dtype))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape, channels",
    [
        (Shape(64, 2048, 4096, 16, 128, 4, "float16", param_dtype="float16"), None),
        (Shape(64, 2048, 4096, 16, 128, 4, "float16", param_dtype="float16"), 32),
        (Shape(40, 768, 1536, 16, 48, 4, "bfloat16", param_dtype="bfloat16"), None),  # 40 rows padded to 64
    ],
    ids=str,
)
def test_kernels_past_16_rows_on_gpu(shape, channels):
    """Past 16 rows (in_proj's kernel holding every row, the other kernels over blocks of 16 rows, XLA's x_proj and
    out_proj) at 1.4b's and 130m's sizes."""
    assert pallas_supported()
    check_kernels(shape, seed=5, interpret=None, channels=channels)


@pytest.mark.parametrize("batch", [1, 2])
def test_language_model_steps_agree(batch, monkeypatch):
    """MambaLMHeadModel(step_implementation=...) reaches every layer: the kernels' logits equal the reference's."""
    from mamba_jax import MambaConfig

    assert_language_model_steps_agree(MambaConfig(d_model=32, n_layer=2, vocab_size=50), batch, monkeypatch)
