"""Mamba mixer, Block and MambaLMHeadModel: shapes, dtypes, jit and grad, init statistics, residual semantics,
structure, logical axes and errors. (Numerical parity with transformers: test_parity_mamba1.py.)"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.block import Block
from mamba_jax.config import MambaConfig
from mamba_jax.layers import LayerNorm, RMSNorm
from mamba_jax.mamba1 import Mamba
from mamba_jax.model import MambaLMHeadModel, create_block
from mamba_jax.sharding import LOGICAL_AXIS_RULES
from tests.tolerances import assert_close

IMPLEMENTATION = "reference"
# One small mixer shape shared by most tests (and by tiny_config below), so XLA compiles each op once.
D_MODEL, MIXER_KWARGS = 24, {"d_state": 4, "d_conv": 3}


def mixer(**kwargs) -> Mamba:
    return Mamba(D_MODEL, **(MIXER_KWARGS | kwargs), rngs=nnx.Rngs(0), scan_implementation=IMPLEMENTATION)


def params_by_name(module: nnx.Module) -> dict[str, nnx.Param]:
    return {".".join(map(str, p)): v for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


# One jitted function for every module and input (jax caches compilations per function object).
forward = nnx.jit(lambda module, x: module(x))


@pytest.fixture(scope="module")
def layer() -> Mamba:
    return mixer()


@pytest.mark.parametrize(("batch", "seqlen"), [(1, 1), (3, 5)])
def test_mixer_shapes(layer, batch, seqlen):
    u = jax.random.normal(jax.random.key(1), (batch, seqlen, D_MODEL))
    y = forward(layer, u)
    assert y.shape == u.shape and y.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(y)))


def test_mixer_parameter_layout_and_dtypes():
    layer = nnx.eval_shape(
        lambda: Mamba(40, d_state=8, d_conv=3, expand=3, bias=True, conv_bias=False, param_dtype=jnp.bfloat16,
                      rngs=nnx.Rngs(0))
    )  # fmt: skip
    d, di, n, r, w = 40, 120, 8, 3, 3  # r = ceil(40 / 16)
    shapes = {name: (v.get_value().shape, v.get_value().dtype) for name, v in params_by_name(layer).items()}
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert shapes == {
        "in_proj.kernel": ((d, 2 * di), bf16),
        "in_proj.bias": ((2 * di,), bf16),
        "conv1d.kernel": ((w, di), bf16),
        "x_proj.kernel": ((di, r + 2 * n), bf16),
        "dt_proj.kernel": ((r, di), bf16),
        "dt_proj.bias": ((di,), bf16),
        "A_log": ((di, n), f32),  # float32 whatever param_dtype, as in mamba_ssm
        "D": ((di,), f32),
        "out_proj.kernel": ((di, d), bf16),
        "out_proj.bias": ((d,), bf16),
    }


def test_mixer_computes_in_dtype(layer):
    """dtype=bfloat16 (bfloat16 parameters too) gives bfloat16 activations, about one bfloat16 rounding per op away
    from float32. (bfloat16 compute with float32 parameters: test_parity_mamba1.py.)"""
    low = nnx.eval_shape(lambda: mixer(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    reference = params_by_name(layer)
    for name, variable in params_by_name(low).items():
        variable.set_value(reference[name][...].astype(variable.get_value().dtype))
    u = jax.random.normal(jax.random.key(1), (2, 6, D_MODEL))
    y, expected = forward(low, u), forward(layer, u)
    assert y.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(y.astype(jnp.float32) - expected) / jnp.linalg.norm(expected))
    assert rel < 2e-2, rel


def test_mixer_is_causal_and_differentiable(layer):
    u = jax.random.normal(jax.random.key(1), (3, 5, D_MODEL))
    # Changing the last token leaves every earlier output unchanged.
    y, y2 = forward(layer, u), forward(layer, u.at[:, -1].add(1.0))
    np.testing.assert_array_equal(y[:, :-1], y2[:, :-1])
    assert not np.allclose(y[:, -1], y2[:, -1])

    def loss(module, u):
        return jnp.sum(module(u) ** 2)

    grads, du = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(layer, u)
    assert du.shape == u.shape and bool(jnp.all(jnp.isfinite(du)))
    for name, g in params_by_name(grads).items():
        assert bool(jnp.all(jnp.isfinite(g[...]))) and float(jnp.abs(g[...]).max()) > 0, name


def test_mixer_init_statistics():
    dt_min, dt_max = 1e-3, 1e-1
    layer = mixer(expand=8, dt_min=dt_min, dt_max=dt_max)
    di, n, r = 8 * D_MODEL, MIXER_KWARGS["d_state"], math.ceil(D_MODEL / 16)
    # S4D-real A = -(1..n) for every channel; D = 1.
    np.testing.assert_allclose(layer.A_log[...], np.log(np.tile(np.arange(1, n + 1), (di, 1))), rtol=1e-6)
    np.testing.assert_array_equal(layer.D[...], np.ones(di))
    # softplus(dt bias) = dt, log-uniform in [dt_min, dt_max]: mean of log dt near the midpoint (log dt has std
    # 1.33, so the mean of 192 draws has std 0.1).
    dt = np.asarray(jax.nn.softplus(layer.dt_proj.bias[...]))
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    assert abs(np.log(dt).mean() - (math.log(dt_min) + math.log(dt_max)) / 2) < 0.3
    # dt_proj kernel ~ U(-s, s), s = r**-0.5; torch-default U(+-1/sqrt(fan_in)) for in_proj and conv.
    s = r**-0.5
    kernel = np.abs(layer.dt_proj.kernel[...])
    assert kernel.max() <= s and kernel.max() > 0.9 * s
    assert np.abs(layer.in_proj.kernel[...]).max() <= 1 / math.sqrt(D_MODEL)
    assert np.abs(layer.conv1d.kernel[...]).max() <= 1 / math.sqrt(MIXER_KWARGS["d_conv"])


def test_dt_init_constant_and_floor():
    constant = mixer(expand=8, dt_init="constant", dt_scale=2.0)
    np.testing.assert_allclose(constant.dt_proj.kernel[...], 2.0 * math.ceil(D_MODEL / 16) ** -0.5, rtol=1e-6)
    clamped = mixer(expand=8, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3)
    np.testing.assert_allclose(jax.nn.softplus(clamped.dt_proj.bias[...]), 1e-3, rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(d_model=0), "d_model must be a positive int, found 0"),
        (dict(d_model=16, d_state=2.5), "d_state must be a positive int, found 2.5"),
        (dict(d_model=16, dt_rank="full"), r"dt_rank \(an int or 'auto'\) must be a positive int, found 'full'"),
        (dict(d_model=16, dt_init="zeros"), "dt_init must be 'random' or 'constant', found 'zeros'"),
        (dict(d_model=16, dt_min=0.2, dt_max=0.1), "need 0 < dt_min <= dt_max"),
        (dict(d_model=True), "d_model must be a positive int, found True"),
        (dict(d_model=16, expand=True), "expand must be a positive finite number, found True"),
        (dict(d_model=16, expand=-1.5), "expand must be a positive finite number, found -1.5"),
        (dict(d_model=16, expand="2"), "expand must be a positive finite number, found '2'"),
        (
            dict(d_model=16, expand=0.05),
            r"d_inner = int\(expand \* d_model\) must be >= 1, found int\(0.05 \* 16\) = 0",
        ),
        (dict(d_model=16, scan_implementation="bogus"), r"scan_implementation must be None or one of \('reference',"),
        (dict(d_model=16, step_implementation="fused"), r"step_implementation must be None or one of \('pallas',"),
    ],
)
def test_mixer_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=f"^Mamba: {message}"):
        Mamba(**kwargs, rngs=nnx.Rngs(0))


def test_mixer_takes_numpy_ints_and_a_real_expand():
    """mamba_ssm: d_inner = int(expand * d_model); NumPy integers are stored as Python ints."""
    layer = nnx.eval_shape(lambda: Mamba(np.int64(16), d_state=np.int32(4), expand=1.5, rngs=nnx.Rngs(0)))
    assert (layer.d_model, layer.d_state, layer.d_inner) == (16, 4, 24)
    assert type(layer.d_model) is int and type(layer.d_state) is int
    assert layer.in_proj.kernel.shape == (16, 48) and layer.out_proj.kernel.shape == (24, 16)
    assert nnx.eval_shape(lambda: Mamba(10, expand=1.25, rngs=nnx.Rngs(0))).d_inner == 12  # int(12.5)


def test_mixer_bad_input_shape(layer):
    with pytest.raises(ValueError, match=r"u must have shape \(batch, seqlen, d_model=24\), found \(2, 5, 16\)"):
        layer(jnp.zeros((2, 5, 16)))


@pytest.mark.parametrize("shape", [(2, 0, D_MODEL), (0, 3, D_MODEL)])
def test_mixer_rejects_an_empty_batch_or_sequence(layer, shape):
    message = re.escape(f"Mamba: u must have batch >= 1 and seqlen >= 1, found shape {shape}")
    with pytest.raises(ValueError, match=message):
        layer(jnp.zeros(shape))
    with pytest.raises(ValueError, match=message):
        layer.prefill(jnp.zeros(shape), layer.init_cache(shape[0]))


class Scale(nnx.Module):
    """A stand-in branch: x -> c * x."""

    def __init__(self, c: float):
        self.c = c

    def __call__(self, x):
        return self.c * x


@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_block_residual_semantics(residual_in_fp32):
    """mamba_ssm's Block: residual = hidden + residual; out = mixer(norm(residual)); with an MLP: residual += out,
    out = mlp(norm2(residual))."""
    d = 8
    norm, norm2 = RMSNorm(d, dtype=jnp.bfloat16), RMSNorm(d, dtype=jnp.bfloat16)
    block = Block(Scale(2.0), norm, Scale(-3.0), norm2, residual_in_fp32=residual_in_fp32)
    hidden = jax.random.normal(jax.random.key(0), (2, 3, d)).astype(jnp.bfloat16)
    residual = jax.random.normal(jax.random.key(1), (2, 3, d)).astype(jnp.bfloat16)
    out, res = block(hidden, residual)
    res_dtype = jnp.float32 if residual_in_fp32 else jnp.bfloat16
    assert res.dtype == res_dtype and out.dtype == jnp.bfloat16
    r1 = (hidden + residual.astype(res_dtype)).astype(res_dtype)
    h1 = 2.0 * norm(r1)
    r2 = (h1 + r1).astype(res_dtype)
    assert_close(res, r2, res_dtype)
    assert_close(out, -3.0 * norm2(r2), jnp.bfloat16)
    # First block: no residual yet, the residual is the input.
    out, res = Block(Scale(2.0), norm, residual_in_fp32=residual_in_fp32)(hidden)
    assert_close(res, hidden, jnp.bfloat16)
    assert_close(out, 2.0 * norm(hidden), jnp.bfloat16)


def test_block_needs_mlp_and_norm2_together():
    with pytest.raises(ValueError, match="mlp and norm2 come together, found mlp=Scale, norm2=NoneType"):
        Block(Scale(1.0), RMSNorm(4), mlp=Scale(1.0))


def test_block_rejects_shapes_that_would_broadcast():
    """A last dimension of 1 or a residual of another shape would broadcast against the (d,) norm weight or the
    hidden states; every path of the block refuses them."""
    block = Block(Scale(2.0), RMSNorm(8))
    with pytest.raises(ValueError, match=re.escape("RMSNorm: x must have shape (..., dim=8), found (2, 5, 1)")):
        block(jnp.ones((2, 5, 1)))
    for residual in (jnp.ones((2, 5, 1)), jnp.ones((1, 5, 8))):
        message = re.escape(f"Block: residual must have hidden's shape (2, 5, 8), found {residual.shape}")
        with pytest.raises(ValueError, match=message):
            block(jnp.ones((2, 5, 8)), residual)
    mamba_block = Block(mixer(step_implementation="reference"), RMSNorm(D_MODEL))  # step: the fused normed_step
    cache = mamba_block.init_cache(2, 4, jnp.float32)
    message = re.escape(f"Block: residual must have hidden's shape (2, {D_MODEL}), found (2, 1)")
    with pytest.raises(ValueError, match=message):
        mamba_block.step(jnp.ones((2, D_MODEL)), jnp.ones((2, 1)), cache)
    message = re.escape(f"Block: residual must have hidden's shape (2, 3, {D_MODEL}), found (2, 3, 1)")
    with pytest.raises(ValueError, match=message):
        mamba_block.prefill(jnp.ones((2, 3, D_MODEL)), jnp.ones((2, 3, 1)), cache, None)


def tiny_config(**kwargs) -> MambaConfig:
    fields = dict(d_model=D_MODEL, n_layer=2, vocab_size=50, ssm_cfg=MIXER_KWARGS)
    return MambaConfig(**(fields | kwargs))


def lm(config: MambaConfig, **kwargs) -> MambaLMHeadModel:
    return MambaLMHeadModel(config, rngs=nnx.Rngs(0), scan_implementation=IMPLEMENTATION, **kwargs)


def test_model_structure_tied_rmsnorm():
    model = lm(tiny_config())
    assert isinstance(model.backbone.embedding, nnx.Embed)
    assert isinstance(model.backbone.layers, nnx.List) and len(model.backbone.layers) == 2
    assert all(isinstance(block, Block) and isinstance(block.mixer, Mamba) for block in model.backbone.layers)
    assert isinstance(model.backbone.norm_f, RMSNorm)
    assert not hasattr(model, "lm_head")
    assert model.backbone.embedding.embedding[...].shape == (56, 24)  # 50 padded to a multiple of 8


def test_model_structure_untied_layernorm():
    model = lm(tiny_config(tie_embeddings=False, rms_norm=False))
    assert model.lm_head.kernel[...].shape == (24, 56) and model.lm_head.bias is None
    assert isinstance(model.backbone.norm_f, LayerNorm)
    assert all(isinstance(block.norm, LayerNorm) for block in model.backbone.layers)


def test_model_logits_tied():
    model = lm(tiny_config())
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 5)), jnp.int32)
    logits = forward(model, ids)
    assert logits.shape == (2, 5, 56) and logits.dtype == jnp.float32
    hidden = forward(model.backbone, ids)
    assert_close(logits, hidden @ model.backbone.embedding.embedding[...].T, jnp.float32)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_model_bfloat16_logits_are_float32(tie_embeddings):
    config = tiny_config(tie_embeddings=tie_embeddings)
    model = nnx.eval_shape(lambda: lm(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))
    logits = nnx.eval_shape(lambda m: m(jnp.zeros((1, 3), jnp.int32)), model)
    assert logits.shape == (1, 3, 56) and logits.dtype == jnp.float32


def test_model_init_statistics():
    """mamba_ssm's _init_weights: embedding N(0, 0.02); linear biases zero but dt_proj's; out_proj rescaled by
    1/sqrt(n_layer) (one residual branch per layer) after the torch-default U(+-1/sqrt(di))."""
    model = lm(tiny_config(n_layer=4, vocab_size=1000, ssm_cfg=MIXER_KWARGS | {"bias": True}))
    embedding = np.asarray(model.backbone.embedding.embedding[...])
    assert abs(embedding.std() - 0.02) < 0.02 * 0.03 and abs(embedding.mean()) < 1e-3  # 24k draws
    bound = 1 / math.sqrt(2 * D_MODEL) / math.sqrt(4)
    for block in model.backbone.layers:
        mamba = block.mixer
        np.testing.assert_array_equal(mamba.in_proj.bias[...], 0.0)
        np.testing.assert_array_equal(mamba.out_proj.bias[...], 0.0)
        assert float(jnp.abs(mamba.dt_proj.bias[...]).min()) > 0
        out_proj = np.asarray(mamba.out_proj.kernel[...])
        assert np.abs(out_proj).max() <= bound and np.abs(out_proj).max() > 0.9 * bound
        assert abs(out_proj.std() - bound / math.sqrt(3)) < 0.08 * bound / math.sqrt(3)  # 1152 draws


def test_model_init_scale_with_an_mlp():
    """With d_intermediate > 0 out_proj and fc2 end at 1/sqrt(n_layer) of torch's default, as without an MLP:
    mamba_ssm's MixerModel scales them by 1/sqrt(2 * n_layer), then MambaLMHeadModel runs _init_weights again with
    n_residuals_per_layer=1, which re-draws them (torch's default) and scales them by 1/sqrt(n_layer)."""
    n_layer, hidden = 8, 128
    model = lm(tiny_config(n_layer=n_layer, d_intermediate=hidden))
    for name, fan_in in (("out_proj", 2 * D_MODEL), ("fc2", hidden)):
        branch = "mixer" if name == "out_proj" else "mlp"
        kernels = np.stack([getattr(getattr(block, branch), name).kernel[...] for block in model.backbone.layers])
        bound = 1 / math.sqrt(fan_in) / math.sqrt(n_layer)
        assert np.abs(kernels).max() <= bound and np.abs(kernels).max() > 0.99 * bound, name
        # U(-bound, bound) has std bound / sqrt(3). The sample std's relative standard error is ~0.45 / sqrt(draws),
        # under 0.5% for these 9216 and 24576 draws: 5% is ten of them, and 1/sqrt(2 * n_layer) would be 29% off.
        assert abs(kernels.std() / (bound / math.sqrt(3)) - 1) < 0.05, name


def test_every_parameter_has_logical_axes():
    config = tiny_config(tie_embeddings=False, rms_norm=False, ssm_cfg={"bias": True})
    model = nnx.eval_shape(lambda: lm(config))
    known = set(LOGICAL_AXIS_RULES) | {"state", "dt_rank", "conv", "norm", None}
    for name, variable in params_by_name(model).items():
        axes = variable.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == variable.get_value().ndim, (name, axes)
        assert set(axes) <= known, (name, axes)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (tiny_config(ssm_cfg={"layer": "Mamba3"}), r"ssm_cfg\['layer'\] = 'Mamba3' is not supported .*Mamba3 is not"),
        (tiny_config(attn_layer_idx=[1], attn_cfg={"num_head": 2}), r"attn_cfg \{'num_head': 2\} does not fit MHA"),
        (tiny_config(ssm_cfg={"d_stat": 4}), r"ssm_cfg \{'d_stat': 4\} does not fit Mamba"),
    ],
)
def test_create_block_rejects_what_it_cannot_build(config, message):
    with pytest.raises(ValueError, match=message):
        create_block(config, 1, rngs=nnx.Rngs(0))


def test_model_bad_inputs():
    with pytest.raises(ValueError, match="config must be a MambaConfig, found dict"):
        MambaLMHeadModel({"d_model": 8}, rngs=nnx.Rngs(0))
    model = nnx.eval_shape(lambda: lm(tiny_config()))
    with pytest.raises(ValueError, match=r"input_ids must be integer \(batch, seqlen\), found shape \(2, 3\) dtype"):
        model(jnp.zeros((2, 3), jnp.float32))
    with pytest.raises(ValueError, match=r"found shape \(3,\)"):
        model(jnp.zeros((3,), jnp.int32))


def test_model_rejects_token_ids_outside_the_vocabulary():
    """Concrete ids outside [0, padded vocab) raise, naming the id; traced ids (under jit) are not checked (no host
    sync inside a trace): an id past the vocabulary then gives NaN logits, as documented."""
    model = lm(tiny_config())  # padded vocab 56
    cache = model.init_cache(1, 4)
    in_range = r" must be token ids in \[0, 56\) \(the padded vocabulary\), found "
    with pytest.raises(ValueError, match="^input_ids" + in_range + "56$"):
        model(jnp.asarray([[1, 56]]))
    with pytest.raises(ValueError, match="^input_ids" + in_range + "-1$"):
        model(np.asarray([[-1, 3]]))
    with pytest.raises(ValueError, match="^input_ids" + in_range + "99$"):
        model.prefill(jnp.asarray([[0, 99]]), cache)
    with pytest.raises(ValueError, match="^tokens" + in_range + "-2$"):
        model.step(jnp.asarray([-2]), cache)
    with pytest.raises(ValueError, match="^tokens" + in_range + "56$"):
        model.greedy_step(jnp.asarray([56]), cache)
    assert model(jnp.asarray([[0, 55]])).shape == (1, 2, 56)  # the padding rows are valid ids
    logits = forward(model, jnp.asarray([[1, 56]]))
    assert bool(jnp.isfinite(logits[0, 0]).all()) and not bool(jnp.isfinite(logits[0, 1]).any())
