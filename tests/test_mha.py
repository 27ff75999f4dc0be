"""MHA against plain softmax attention written here: forward in NumPy float64, gradients through the same code in jnp.

The reference states rotary per dimension (partner dim, sign, frequency) and attention as an explicit masked softmax,
so it shares no code path with the module (which uses half-splits and ``jax.nn.dot_product_attention``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.mha import MHA
from tests.tolerances import assert_close


def rotary_reference(xp, x, rotary_dim, base, interleaved):
    """x (b, l, heads, e): dim j < rotary_dim becomes x_j cos(t f_j) + sign_j x_partner(j) sin(t f_j)."""
    e, half = x.shape[-1], rotary_dim // 2
    j = np.arange(e)
    if interleaved:  # pairs (2i, 2i+1), frequency index i
        partner, sign, freq_idx = j ^ 1, np.where(j % 2 == 0, -1.0, 1.0), j // 2
    else:  # pairs (i, i + half), frequency index i
        partner, sign, freq_idx = (j + half) % rotary_dim, np.where(j < half, -1.0, 1.0), j % half
    rotated = j < rotary_dim
    partner, sign = np.where(rotated, partner, j), np.where(rotated, sign, 0.0)
    angle = np.arange(x.shape[1])[:, None] * base ** (-2.0 * freq_idx / rotary_dim)[None, :]  # (l, e)
    cos, sin = np.where(rotated, np.cos(angle), 1.0), np.sin(angle) * sign
    return x * xp.asarray(cos[:, None, :], x.dtype) + x[..., partner] * xp.asarray(sin[:, None, :], x.dtype)


def conv_reference(xp, x, kernel, bias):
    """Causal depthwise conv: out[t] = bias + sum_j kernel[j] * x[t - (w - 1) + j]; x (b, l, c), kernel (w, c)."""
    w, l = kernel.shape[0], x.shape[1]
    padded = xp.concatenate([xp.zeros((x.shape[0], w - 1, x.shape[2]), x.dtype), x], axis=1)
    return bias + sum(padded[:, j : j + l] * kernel[j] for j in range(w))


def mha_reference(xp, params, x, cfg):
    a, k, e = cfg["num_heads"], cfg["num_heads_kv"], cfg["head_dim"]
    b, l, _ = x.shape
    proj = x @ params["in_proj"]["kernel"] + params["in_proj"].get("bias", 0)
    qkv_dim = (a + 2 * k) * e
    qkv, mlp = proj[..., :qkv_dim], proj[..., qkv_dim:]
    if "conv1d" in params:
        qkv = conv_reference(xp, qkv, params["conv1d"]["kernel"], params["conv1d"]["bias"])
    q = qkv[..., : a * e].reshape(b, l, a, e)
    key = qkv[..., a * e : (a + k) * e].reshape(b, l, k, e)
    value = qkv[..., (a + k) * e :].reshape(b, l, k, e)
    if cfg["rotary_emb_dim"]:
        rot = (cfg["rotary_emb_dim"], 10000.0, cfg["rotary_emb_interleaved"])
        q, key = rotary_reference(xp, q, *rot), rotary_reference(xp, key, *rot)
    key, value = xp.repeat(key, a // k, axis=2), xp.repeat(value, a // k, axis=2)  # query head i -> kv head i//(a/k)
    scale = cfg["softmax_scale"] or e**-0.5
    scores = xp.einsum("blhe,bshe->bhls", q, key) * scale
    if cfg["causal"]:
        scores = xp.where(np.tril(np.ones((l, l), bool)), scores, -np.inf)
    probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = probs / probs.sum(axis=-1, keepdims=True)
    ctx = xp.einsum("bhls,bshe->blhe", probs, value).reshape(b, l, a * e)
    if mlp.shape[-1]:
        up, gate = mlp[..., : mlp.shape[-1] // 2], mlp[..., mlp.shape[-1] // 2 :]
        ctx = xp.concatenate([ctx, up * gate / (1 + xp.exp(-gate))], axis=-1)
    return ctx @ params["out_proj"]["kernel"] + params["out_proj"].get("bias", 0)


BASE = dict(
    num_heads_kv=None,
    head_dim=None,
    mlp_dim=0,
    qkv_proj_bias=True,
    out_proj_bias=True,
    softmax_scale=None,
    causal=False,
    d_conv=0,
    rotary_emb_dim=0,
    rotary_emb_interleaved=False,
)
CASES = {
    "plain": dict(embed_dim=32, num_heads=4, seqlen=5),
    "gqa_causal_partial_rotary": dict(
        embed_dim=32, num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=4, seqlen=7
    ),
    "mqa_interleaved_full_rotary_one_token": dict(
        embed_dim=40, num_heads=3, num_heads_kv=1, head_dim=16, causal=True, rotary_emb_dim=16,
        rotary_emb_interleaved=True, seqlen=1,
    ),
    "conv_mlp_nobias": dict(
        embed_dim=32, num_heads=4, num_heads_kv=2, d_conv=3, mlp_dim=100, causal=True, rotary_emb_dim=8,
        qkv_proj_bias=False, out_proj_bias=False, softmax_scale=0.3, seqlen=6,
    ),
}  # fmt: skip


def output_and_grads(fn, params, x, cotangent):
    """fn(params, x) and the gradients of <fn(params, x), cotangent> w.r.t. params and x, in one jit."""

    @jax.jit
    def run(params, x):
        out, vjp = jax.vjp(fn, params, x)
        return out, vjp(cotangent)

    return run(params, x)


@pytest.mark.parametrize("name", CASES)
def test_matches_reference(name):
    cfg = {**BASE, **CASES[name]}
    seqlen = cfg.pop("seqlen")
    mha = MHA(**cfg, rngs=nnx.Rngs(0))
    ref_cfg = {**cfg, "num_heads_kv": mha.num_heads_kv, "head_dim": mha.head_dim}
    params = nnx.to_pure_dict(nnx.state(mha, nnx.Param))
    x = jax.random.normal(jax.random.key(1), (2, seqlen, cfg["embed_dim"]), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    graphdef = nnx.graphdef(mha)
    out, grads = output_and_grads(lambda p, x: nnx.merge(graphdef, p)(x), params, x, cotangent)
    np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = mha_reference(np, np_params, np.asarray(x, np.float64), ref_cfg)
    assert out.shape == expected.shape
    assert_close(out, expected, jnp.float32)

    _, expected_grads = output_and_grads(lambda p, x: mha_reference(jnp, p, x, ref_cfg), params, x, cotangent)
    jax.tree.map(lambda a, b: assert_close(a, b, jnp.float32), grads, expected_grads)


def test_causal_mask_hides_the_future():
    mha = MHA(32, 4, causal=True, rotary_emb_dim=8, d_conv=4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 9, 32), jnp.float32)
    changed = x.at[:, 5:].set(jax.random.normal(jax.random.key(2), (1, 4, 32)))
    run = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(run(mha, x)[:, :5], run(mha, changed)[:, :5])


def test_parameters_axes_and_mlp_rounding():
    mha = MHA(32, 4, num_heads_kv=2, mlp_dim=100, d_conv=4, rngs=nnx.Rngs(0))
    qkv_dim = 8 * (4 + 2 * 2)
    assert mha.mlp_dim == 256
    shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(mha, nnx.Param)))
    assert shapes == {
        "in_proj": {"kernel": (32, qkv_dim + 256), "bias": (qkv_dim + 256,)},
        "conv1d": {"kernel": (4, qkv_dim), "bias": (qkv_dim,)},
        "out_proj": {"kernel": (4 * 8 + 128, 32), "bias": (32,)},
    }
    assert mha.in_proj.kernel.get_metadata()["logical_axes"] == ("embed", "qkv")
    assert mha.conv1d.kernel.get_metadata()["logical_axes"] == ("conv", "qkv")
    assert mha.out_proj.kernel.get_metadata()["logical_axes"] == ("qkv", "embed")
    bound = 1 / np.sqrt(32)  # torch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    kernel = np.asarray(mha.in_proj.kernel[...])
    assert np.abs(kernel).max() <= bound and kernel.std() == pytest.approx(bound / np.sqrt(3), rel=0.05)


def test_jit_and_bfloat16():
    run = nnx.jit(lambda m, x: m(x))
    x = jax.random.normal(jax.random.key(1), (2, 6, 32), jnp.float32)
    expected = run(MHA(32, 4, num_heads_kv=2, causal=True, rotary_emb_dim=8, rngs=nnx.Rngs(0)), x)
    assert expected.dtype == jnp.float32
    mha16 = MHA(32, 4, num_heads_kv=2, causal=True, rotary_emb_dim=8, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    out16 = run(mha16, x)
    assert out16.dtype == jnp.bfloat16
    assert_close(out16, expected, jnp.bfloat16)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(embed_dim=30, num_heads=4), "embed_dim"),
        (dict(embed_dim=32, num_heads=4, num_heads_kv=3), "num_heads_kv"),
        (dict(embed_dim=32, num_heads=4, rotary_emb_dim=5), "rotary_emb_dim"),
        (dict(embed_dim=32, num_heads=4, rotary_emb_dim=16), "rotary_emb_dim"),
        (dict(embed_dim=32, num_heads=4, d_conv=-1), "d_conv"),
        (dict(embed_dim=32, num_heads=4, mlp_dim=-2), "mlp_dim"),
        (dict(embed_dim=32, num_heads=4, device="cuda"), "device"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MHA(**kwargs, rngs=nnx.Rngs(0))


def test_bad_input_shape():
    mha = MHA(32, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, 32\)"):
        mha(jnp.zeros((2, 5, 16)))
