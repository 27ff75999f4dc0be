"""Mamba2 and RMSNormGated against independent references.

- transformers' ``Mamba2Mixer`` (torch, its slow path), with our random weights copied in: the configurations it
  supports (ngroups 1 and 2; seqlen below, at and past the chunk size; biases; dt_limit), forward and gradients.
- A sequential recurrence written here (NumPy float64 forward, the same code in jnp for gradients) for what
  transformers lacks: the d_ssm < d_inner gated-MLP branch, rmsnorm=False, norm_before_gate=True, D_has_hdim.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.verify import transformers_norms_per_group
from mamba_jax.mamba2 import Mamba2, RMSNormGated
from tests.tolerances import PARITY_REL_ERR_FP32, assert_close, rel_err


def silu(xp, x):
    return x / (1 + xp.exp(-x))


def rms_norm_gated_reference(xp, x, weight, z, group_size, norm_before_gate, eps=1e-5):
    """x, z (..., dim); RMS over consecutive groups of group_size channels."""
    if z is not None and not norm_before_gate:
        x = x * silu(xp, z)
    groups = x.reshape(*x.shape[:-1], -1, group_size)
    normed = groups / xp.sqrt((groups**2).mean(axis=-1, keepdims=True) + eps)
    out = normed.reshape(x.shape) * weight
    return out * silu(xp, z) if z is not None and norm_before_gate else out


def mamba2_reference(xp, params, u, cfg):
    """The Mamba-2 mixer step by step in time. params: our pure parameter dict; u (b, l, d)."""
    b, l, _ = u.shape
    h, p, g, n = cfg["nheads"], cfg["headdim"], cfg["ngroups"], cfg["d_state"]
    d_ssm, d_mlp = cfg["d_ssm"], cfg["d_inner"] - cfg["d_ssm"]
    proj = u @ params["in_proj"]["kernel"] + params["in_proj"].get("bias", 0)
    ends = np.cumsum([d_mlp, d_mlp, d_ssm, d_ssm + 2 * g * n])
    z0, x0, z, xbc, dt = (proj[..., start:end] for start, end in zip([0, *ends], [*ends, None], strict=True))

    kernel = params["conv1d"]["kernel"]  # (w, c): kernel[w-1] multiplies the current step
    w = kernel.shape[0]
    padded = xp.concatenate([xp.zeros((b, w - 1, xbc.shape[-1]), xbc.dtype), xbc], axis=1)
    xbc = sum(padded[:, j : j + l] * kernel[j] for j in range(w)) + params["conv1d"].get("bias", 0)
    xbc = silu(xp, xbc)
    x = xbc[..., :d_ssm].reshape(b, l, h, p)
    B = xp.repeat(xbc[..., d_ssm : d_ssm + g * n].reshape(b, l, g, n), h // g, axis=2)  # head i reads group i//(h/g)
    C = xp.repeat(xbc[..., d_ssm + g * n :].reshape(b, l, g, n), h // g, axis=2)

    dt = xp.clip(xp.logaddexp(0.0, dt + params["dt_bias"]), *cfg["dt_limit"])  # (b, l, h)
    A = -xp.exp(params["A_log"])
    D = params["D"].reshape(h, p) if cfg["D_has_hdim"] else params["D"][:, None]
    state = xp.zeros((b, h, p, n), x.dtype)
    ys = []
    for t in range(l):
        decay = xp.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(xp.einsum("bhpn,bhn->bhp", state, C[:, t]) + D * x[:, t])
    y = xp.stack(ys, axis=1).reshape(b, l, d_ssm)

    if cfg["rmsnorm"]:
        y = rms_norm_gated_reference(xp, y, params["norm"]["weight"], z, d_ssm // g, cfg["norm_before_gate"])
    else:
        y = y * silu(xp, z)
    if d_mlp:
        y = xp.concatenate([silu(xp, z0) * x0, y], axis=-1)
    return y @ params["out_proj"]["kernel"] + params["out_proj"].get("bias", 0)


def output_and_grads(fn, params, x, cotangent):
    """fn(params, x) and the gradients of <fn(params, x), cotangent> w.r.t. params and x, in one jit."""

    @jax.jit
    def run(params, x):
        out, vjp = jax.vjp(fn, params, x)
        return out, vjp(cotangent)

    return run(params, x)


def randomized_params(module, seed):
    """The module's parameters as a pure dict, with D and the norm weight (ones at init) made random too."""
    params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    keys = jax.random.split(jax.random.key(seed), 2)
    params["D"] = jax.random.normal(keys[0], params["D"].shape, params["D"].dtype)
    if "norm" in params:
        params["norm"]["weight"] = 1 + 0.5 * jax.random.normal(keys[1], params["norm"]["weight"].shape)
    return params


def reference_cfg(module: Mamba2, dt_limit=(0.0, math.inf), rmsnorm=True, norm_before_gate=False):
    return dict(
        nheads=module.nheads,
        headdim=module.headdim,
        ngroups=module.ngroups,
        d_state=module.d_state,
        d_ssm=module.d_ssm,
        d_inner=module.d_inner,
        D_has_hdim=module.D_has_hdim,
        dt_limit=dt_limit,
        rmsnorm=rmsnorm,
        norm_before_gate=norm_before_gate,
    )


# --- RMSNormGated ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "norm_before_gate, group_size, gated", [(False, None, True), (True, 8, True), (False, 8, True), (True, 8, False)]
)
def test_rms_norm_gated(norm_before_gate, group_size, gated):
    norm = RMSNormGated(24, group_size=group_size, norm_before_gate=norm_before_gate)
    keys = jax.random.split(jax.random.key(0), 3)
    weight = jax.random.normal(keys[0], (24,))
    x = 3 * jax.random.normal(keys[1], (2, 5, 24))
    z = jax.random.normal(keys[2], (2, 5, 24)) if gated else None
    graphdef = nnx.graphdef(norm)
    params = {"weight": weight}

    out, grads = output_and_grads(lambda p, x: nnx.merge(graphdef, p)(x, z), params, x, jnp.cos(x))
    f64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    expected = rms_norm_gated_reference(np, f64(x), f64(weight), f64(z), group_size or 24, norm_before_gate)
    assert_close(out, expected, jnp.float32)
    reference = lambda p, x: rms_norm_gated_reference(jnp, x, p["weight"], z, group_size or 24, norm_before_gate)  # noqa: E731
    _, expected_grads = output_and_grads(reference, params, x, jnp.cos(x))
    jax.tree.map(lambda a, b: assert_close(a, b, jnp.float32), grads, expected_grads)


def test_rms_norm_gated_dtypes_and_errors():
    norm = RMSNormGated(16, group_size=4, param_dtype=jnp.bfloat16)
    assert norm.weight[...].dtype == jnp.bfloat16 and norm.weight.get_metadata()["logical_axes"] == ("inner",)
    x = jnp.ones((3, 16), jnp.bfloat16)
    assert norm(x, x).dtype == jnp.bfloat16
    assert RMSNormGated(16, dtype=jnp.float32)(x).dtype == jnp.float32
    with pytest.raises(ValueError, match="group_size"):
        RMSNormGated(16, group_size=5)
    with pytest.raises(ValueError, match="last dimension 16"):
        norm(jnp.ones((3, 8)))
    with pytest.raises(ValueError, match=r"z must have x's shape \(3, 16\)"):
        norm(x, jnp.ones((3, 15)))


# --- Mamba2 vs transformers' Mamba2Mixer ------------------------------------------------------------------------


def transformers_mixer(module: Mamba2, params, *, bias, conv_bias, dt_limit, chunk_size):
    """transformers' Mamba2Mixer with the same configuration and our (JAX-layout) parameters copied in."""
    torch = pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")
    from transformers import Mamba2Config

    config = Mamba2Config(
        hidden_size=module.d_model,
        num_heads=module.nheads,
        head_dim=module.headdim,
        expand=2,
        state_size=module.d_state,
        n_groups=module.ngroups,
        conv_kernel=params["conv1d"]["kernel"].shape[0],
        chunk_size=chunk_size,
        use_bias=bias,
        use_conv_bias=conv_bias,
        time_step_limit=dt_limit,
        layer_norm_epsilon=1e-5,
        num_hidden_layers=1,
        vocab_size=16,
    )
    mixer = modeling.Mamba2Mixer(config, layer_idx=0).eval()
    t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
    state = {
        "in_proj.weight": t(params["in_proj"]["kernel"]).T,
        "conv1d.weight": t(params["conv1d"]["kernel"]).T[:, None, :],
        "dt_bias": t(params["dt_bias"]),
        "A_log": t(params["A_log"]),
        "D": t(params["D"]),
        "norm.weight": t(params["norm"]["weight"]),
        "out_proj.weight": t(params["out_proj"]["kernel"]).T,
    }
    if conv_bias:
        state["conv1d.bias"] = t(params["conv1d"]["bias"])
    if bias:
        state["in_proj.bias"] = t(params["in_proj"]["bias"])
        state["out_proj.bias"] = t(params["out_proj"]["bias"])
    mixer.load_state_dict(state, strict=True)
    return mixer, state


def torch_grads_in_our_layout(mixer, state, u, cotangent):
    """Output and gradients of <mixer(u), cotangent> w.r.t. u and every parameter, mapped back to our layout."""
    import torch

    u = torch.tensor(np.asarray(u), requires_grad=True)
    out = mixer(u)
    (out * torch.tensor(np.asarray(cotangent))).sum().backward()
    g = {name: p.grad.numpy() for name, p in mixer.named_parameters()}
    grads = {
        "in_proj": {"kernel": g["in_proj.weight"].T},
        "conv1d": {"kernel": g["conv1d.weight"][:, 0, :].T},
        "dt_bias": g["dt_bias"],
        "A_log": g["A_log"],
        "D": g["D"],
        "norm": {"weight": g["norm.weight"]},
        "out_proj": {"kernel": g["out_proj.weight"].T},
    }
    for name in ("conv1d", "in_proj", "out_proj"):
        if f"{name}.bias" in state:
            grads[name]["bias"] = g[f"{name}.bias"]
    return out.detach().numpy(), grads, u.grad.numpy()


@pytest.mark.parametrize(
    "ngroups, seqlen, bias, conv_bias, dt_limit",
    [
        (1, 5, False, True, (0.0, math.inf)),  # seqlen < chunk
        (2, 8, True, False, (0.0, math.inf)),  # seqlen == chunk
        (2, 19, False, True, (0.01, 0.08)),  # not a multiple of the chunk, dt clamped
    ],
)
def test_matches_transformers(ngroups, seqlen, bias, conv_bias, dt_limit):
    pytest.importorskip("torch")
    if ngroups > 1 and not transformers_norms_per_group():
        pytest.skip("this transformers version normalises Mamba-2's gated norm across groups (a bug fixed by 5.23)")
    chunk_size = 8
    module = Mamba2(
        32,
        d_state=8,
        headdim=16,
        ngroups=ngroups,
        bias=bias,
        conv_bias=conv_bias,
        dt_limit=dt_limit,
        chunk_size=chunk_size,
        rngs=nnx.Rngs(seqlen),
    )
    params = randomized_params(module, seed=1)
    mixer, state = transformers_mixer(
        module, params, bias=bias, conv_bias=conv_bias, dt_limit=dt_limit, chunk_size=chunk_size
    )
    u = jax.random.normal(jax.random.key(2), (2, seqlen, 32), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(3), u.shape, jnp.float32)

    graphdef = nnx.graphdef(module)
    out, (grads, u_grad) = output_and_grads(lambda p, u: nnx.merge(graphdef, p)(u), params, u, cotangent)
    expected, expected_grads, expected_u_grad = torch_grads_in_our_layout(mixer, state, u, cotangent)

    assert out.shape == u.shape
    assert rel_err(out, expected) <= PARITY_REL_ERR_FP32
    assert rel_err(u_grad, expected_u_grad) <= PARITY_REL_ERR_FP32
    errors = jax.tree.map(rel_err, grads, expected_grads)
    assert all(e <= PARITY_REL_ERR_FP32 for e in jax.tree.leaves(errors)), errors


# --- Mamba2 vs the sequential reference ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, seqlen",
    [
        # gated-MLP branch (d_mlp = 64 - 32), the other gate order, D per channel, dt clamped, biases
        (dict(d_ssm=32, ngroups=2, norm_before_gate=True, D_has_hdim=True, dt_limit=(0.02, 0.05), bias=True), 9),
        # no norm: the scan gates y * silu(z) itself
        (dict(rmsnorm=False, conv_bias=False), 6),
    ],
)
def test_matches_sequential_reference(kwargs, seqlen):
    module = Mamba2(32, d_state=8, headdim=8, chunk_size=4, **kwargs, rngs=nnx.Rngs(0))
    cfg = reference_cfg(
        module,
        dt_limit=kwargs.get("dt_limit", (0.0, math.inf)),
        rmsnorm=kwargs.get("rmsnorm", True),
        norm_before_gate=kwargs.get("norm_before_gate", False),
    )
    params = randomized_params(module, seed=1)
    u = jax.random.normal(jax.random.key(2), (2, seqlen, 32), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(3), u.shape, jnp.float32)

    graphdef = nnx.graphdef(module)
    out, grads = output_and_grads(lambda p, u: nnx.merge(graphdef, p)(u), params, u, cotangent)
    np_params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = mamba2_reference(np, np_params, np.asarray(u, np.float64), cfg)
    assert rel_err(out, expected) <= PARITY_REL_ERR_FP32

    _, expected_grads = output_and_grads(lambda p, u: mamba2_reference(jnp, p, u, cfg), params, u, cotangent)
    errors = jax.tree.map(rel_err, grads, expected_grads)
    assert all(e <= PARITY_REL_ERR_FP32 for e in jax.tree.leaves(errors)), errors


# --- init, layout, dtypes, errors ---------------------------------------------------------------------------------


def test_parameter_shapes_names_and_axes():
    module = Mamba2(32, d_state=8, headdim=8, d_ssm=48, ngroups=2, D_has_hdim=True, rngs=nnx.Rngs(0))
    d_inner, d_ssm, h, gn = 64, 48, 6, 16
    params = nnx.state(module, nnx.Param)
    shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(params))
    assert shapes == {
        "in_proj": {"kernel": (32, 2 * d_inner + 2 * gn + h)},
        "conv1d": {"kernel": (4, d_ssm + 2 * gn), "bias": (d_ssm + 2 * gn,)},
        "dt_bias": (h,),
        "A_log": (h,),
        "D": (d_ssm,),
        "norm": {"weight": (d_ssm,)},
        "out_proj": {"kernel": (d_inner, 32)},
    }
    axes = [
        (module.in_proj.kernel, ("embed", "proj")),
        (module.conv1d.kernel, ("conv", "inner")),
        (module.dt_bias, ("heads",)),
        (module.A_log, ("heads",)),
        (module.D, ("inner",)),
        (module.norm.weight, ("inner",)),
        (module.out_proj.kernel, ("inner", "embed")),
    ]
    for variable, expected in axes:
        assert variable.get_metadata()["logical_axes"] == expected
    assert Mamba2(32, d_state=8, headdim=8, rmsnorm=False, rngs=nnx.Rngs(0)).norm is None


def test_init_statistics():
    module = Mamba2(
        64, d_state=4, headdim=1, dt_min=1e-3, dt_max=1e-1, dt_init_floor=5e-3, conv_init=0.2, rngs=nnx.Rngs(0)
    )
    h = 128
    A = np.exp(np.asarray(module.A_log[...]))
    assert A.shape == (h,) and A.min() >= 1 and A.max() <= 16 and 6.5 < A.mean() < 10.5  # U(1, 16): mean 8.5
    np.testing.assert_array_equal(module.D[...], np.ones(h))
    np.testing.assert_array_equal(module.norm.weight[...], np.ones(128))
    # softplus(dt_bias) recovers dt: log-uniform on [1e-3, 1e-1], then floored at 5e-3.
    dt = np.log1p(np.exp(np.asarray(module.dt_bias[...], np.float64)))
    assert dt.min() >= 5e-3 * (1 - 1e-5) and dt.max() <= 1e-1 * (1 + 1e-5)
    floored = np.mean(np.abs(dt - 5e-3) < 1e-7)
    assert 0.2 < floored < 0.5  # P(log-uniform < 5e-3) = log(5) / log(100) = 0.35
    log_dt = np.log(dt[dt > 5e-3 * (1 + 1e-5)])
    assert abs(log_dt.mean() - (np.log(5e-3) + np.log(1e-1)) / 2) < 0.4  # uniform in log above the floor
    conv = np.asarray(module.conv1d.kernel[...])
    assert np.abs(conv).max() <= 0.2 and conv.std() == pytest.approx(0.2 / np.sqrt(3), rel=0.1)
    in_proj = np.asarray(module.in_proj.kernel[...])  # torch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(in_proj).max() <= 1 / 8 and in_proj.std() == pytest.approx(1 / 8 / np.sqrt(3), rel=0.05)


def test_param_dtype():
    module = Mamba2(32, d_state=8, headdim=16, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16)
    # D float32 as in mamba_ssm; A_log float32 too, where mamba_ssm's Mamba-2 keeps it in the model's dtype
    assert module.A_log[...].dtype == jnp.float32 and module.D[...].dtype == jnp.float32
    for variable in (module.dt_bias, module.in_proj.kernel, module.conv1d.kernel, module.norm.weight):
        assert variable[...].dtype == jnp.bfloat16


def test_jit_and_bfloat16():
    run = nnx.jit(lambda module, u: module(u))
    u = jax.random.normal(jax.random.key(1), (2, 6, 32), jnp.float32)
    expected = run(Mamba2(32, d_state=8, headdim=16, chunk_size=4, rngs=nnx.Rngs(0)), u)
    assert expected.shape == u.shape and expected.dtype == jnp.float32
    out16 = run(Mamba2(32, d_state=8, headdim=16, chunk_size=4, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), u)
    assert out16.dtype == jnp.bfloat16
    assert rel_err(out16, expected) < 2e-2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(headdim=24), "headdim=24 must divide d_ssm=64"),
        (dict(headdim=16, ngroups=3), "ngroups=3 must divide the number of heads"),
        (dict(d_ssm=80), r"d_ssm must be an int in \(0, d_inner=64\]"),
        (dict(A_init_range=(0, 16)), "A_init_range"),
        (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
        (dict(dt_limit=(0.1, 0.01)), "dt_limit"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(process_group=object()), "process_group"),
        (dict(device="cuda:0"), "device"),
        (dict(d_conv=True), "^Mamba2: d_conv must be a positive int, found True$"),
        (dict(headdim=16.0), "^Mamba2: headdim must be a positive int, found 16.0$"),
        (dict(d_ssm=True), "^Mamba2: d_ssm must be a positive int, found True$"),
        (dict(expand=True), "^Mamba2: expand must be a number, got True$"),
        (dict(A_init_range=2.0), r"^Mamba2: A_init_range must be a pair \(low, high\) of numbers, got 2.0$"),
        (dict(A_init_range=(1, 4, 16)), r"^Mamba2: A_init_range must be a pair \(low, high\) of numbers"),
        (dict(dt_limit=0.1), r"^Mamba2: dt_limit must be a pair \(low, high\) of numbers, got 0.1$"),
        (dict(dt_limit=("0", "1")), r"^Mamba2: dt_limit must be a pair \(low, high\) of numbers"),
        (dict(ssd_implementation="bogus"), r"^Mamba2: ssd_implementation must be None or one of \('reference',"),
        (dict(step_implementation="bogus"), r"^Mamba2: step_implementation must be None or one of \('pallas',"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(32, d_state=8, **kwargs, rngs=nnx.Rngs(0))


def test_bool_d_state_is_refused():
    with pytest.raises(ValueError, match=r"^Mamba2: d_state must be a positive int, found True$"):
        Mamba2(16, headdim=8, d_state=True, rngs=nnx.Rngs(0))


def test_numpy_integer_arguments_are_python_ints():
    module = nnx.eval_shape(
        lambda: Mamba2(np.int64(32), d_state=np.int32(8), headdim=np.int64(16), ngroups=np.int64(2), rngs=nnx.Rngs(0))
    )
    assert (module.d_model, module.d_state, module.headdim, module.ngroups, module.nheads) == (32, 8, 16, 2, 4)
    assert all(type(v) is int for v in (module.d_model, module.d_state, module.headdim, module.ngroups))


def test_torch_only_arguments_are_accepted():
    module = Mamba2(
        32, d_state=8, headdim=16, use_mem_eff_path=False, layer_idx=3, sequence_parallel=False, rngs=nnx.Rngs(0)
    )
    assert module.nheads == 4


def test_bad_input_shape():
    module = Mamba2(32, d_state=8, headdim=16, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, 32\)"):
        module(jnp.ones((2, 5, 16)))


@pytest.mark.parametrize("shape", [(0, 5, 32), (2, 0, 32)])
def test_empty_batch_or_sequence_raises(shape):
    """As Mamba does (an empty batch used to return an empty array)."""
    module = Mamba2(32, d_state=8, headdim=16, rngs=nnx.Rngs(0))
    message = re.escape(f"Mamba2: u must have batch >= 1 and seqlen >= 1, found shape {shape}")
    with pytest.raises(ValueError, match=message):
        module(jnp.ones(shape))
    with pytest.raises(ValueError, match=message):
        module.prefill(jnp.ones(shape), module.init_cache(shape[0]))
