"""MambaConfig: mamba_ssm fields and defaults, hashing, json round trips (mamba_ssm and transformers forms), errors,
and presets built abstractly with the parameter shapes the reference implies."""

import dataclasses
import inspect
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from mamba_jax.config import PRESETS, FrozenMapping, MambaConfig
from mamba_jax.mamba1 import Mamba
from mamba_jax.model import MambaLMHeadModel

# mamba_ssm models/config_mamba.py (REFERENCE.md).
MAMBA_SSM_DEFAULTS = {
    "d_model": 2560,
    "d_intermediate": 0,
    "n_layer": 64,
    "vocab_size": 50277,
    "ssm_cfg": {},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}

# mamba_ssm modules/mamba2.py constructor defaults (REFERENCE.md), in transformers' key names.
MAMBA2_MIXER_DEFAULTS = {
    "state_size": 128,
    "conv_kernel": 4,
    "expand": 2,
    "head_dim": 64,
    "chunk_size": 256,
    "time_step_min": 0.001,
    "time_step_max": 0.1,
    "time_step_floor": 1e-4,
    "time_step_limit": (0.0, math.inf),
    "use_bias": False,
    "use_conv_bias": True,
}

# state-spaces/mamba-130m-hf config.json as published (legacy mamba_ssm keys included).
MAMBA_130M_HF = {
    "_name_or_path": "state-spaces/mamba-130m-hf",
    "architectures": ["MambaForCausalLM"],
    "bos_token_id": 0,
    "conv_kernel": 4,
    "d_inner": 1536,
    "d_model": 768,
    "eos_token_id": 0,
    "expand": 2,
    "fused_add_norm": True,
    "hidden_act": "silu",
    "hidden_size": 768,
    "initializer_range": 0.1,
    "intermediate_size": 1536,
    "layer_norm_epsilon": 1e-05,
    "model_type": "mamba",
    "n_layer": 24,
    "num_hidden_layers": 24,
    "pad_token_id": 0,
    "pad_vocab_size_multiple": 8,
    "rescale_prenorm_residual": False,
    "residual_in_fp32": True,
    "rms_norm": True,
    "ssm_cfg": {},
    "state_size": 16,
    "time_step_floor": 0.0001,
    "time_step_init_scheme": "random",
    "time_step_max": 0.1,
    "time_step_min": 0.001,
    "time_step_rank": 48,
    "time_step_scale": 1.0,
    "torch_dtype": "float32",
    "transformers_version": "4.39.0.dev0",
    "use_bias": False,
    "use_cache": True,
    "use_conv_bias": True,
    "vocab_size": 50280,
}

# mistralai/Mamba-Codestral-7B-v0.1 config.json (transformers 4.44 port): note norm_before_gate true.
CODESTRAL_HF = {
    "architectures": ["Mamba2ForCausalLM"],
    "bos_token_id": 0,
    "chunk_size": 256,
    "conv_kernel": 4,
    "eos_token_id": 0,
    "expand": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.1,
    "intermediate_size": 8192,
    "layer_norm_epsilon": 1e-05,
    "model_type": "mamba2",
    "n_groups": 8,
    "norm_before_gate": True,
    "num_heads": 128,
    "num_hidden_layers": 64,
    "pad_token_id": 0,
    "rescale_prenorm_residual": False,
    "residual_in_fp32": True,
    "rms_norm": True,
    "state_size": 128,
    "tie_word_embeddings": False,
    "time_step_floor": 0.0001,
    "time_step_init_scheme": "random",
    "time_step_limit": [0.0, math.inf],
    "time_step_max": 0.1,
    "time_step_min": 0.001,
    "time_step_rank": 256,
    "time_step_scale": 1.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.44.0.dev0",
    "use_bias": False,
    "use_cache": True,
    "use_conv_bias": True,
    "vocab_size": 32768,
}


def test_fields_and_defaults_are_mamba_ssms():
    assert [f.name for f in dataclasses.fields(MambaConfig)] == list(MAMBA_SSM_DEFAULTS)
    assert MambaConfig().to_dict() == MAMBA_SSM_DEFAULTS


def test_frozen_hashable_and_a_static_jit_argument():
    config = MambaConfig(d_model=64, n_layer=2, ssm_cfg={"d_state": 8, "dt_limit": [0.0, 1.0]}, attn_cfg={"a": {}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 32
    assert isinstance(config.ssm_cfg, FrozenMapping) and config.ssm_cfg["dt_limit"] == (0.0, 1.0)
    assert config.ssm_cfg == {"d_state": 8, "dt_limit": (0.0, 1.0)}
    same = MambaConfig(d_model=64, n_layer=2, ssm_cfg={"dt_limit": (0.0, 1.0), "d_state": 8}, attn_cfg={"a": {}})
    assert config == same and hash(config) == hash(same)
    assert config != dataclasses.replace(config, ssm_cfg={"d_state": 16})
    padded = jax.jit(lambda c, x: x + c.padded_vocab_size, static_argnums=0)(config, 0)
    assert int(padded) == 50280


@pytest.mark.parametrize(
    ("vocab", "multiple", "padded"), [(50277, 8, 50280), (50277, 16, 50288), (100, 8, 104), (96, 8, 96), (7, 1, 7)]
)
def test_padded_vocab_size(vocab, multiple, padded):
    assert MambaConfig(vocab_size=vocab, pad_vocab_size_multiple=multiple).padded_vocab_size == padded


def test_derived_properties():
    config = MambaConfig(ssm_cfg={"layer": "Mamba2", "ngroups": 8}, d_intermediate=128)
    assert config.ssm_layer == "Mamba2" and config.mixer_kwargs == {"ngroups": 8}
    assert MambaConfig().ssm_layer == "Mamba1"


def test_numpy_integers_are_stored_as_python_ints():
    config = MambaConfig(
        d_model=np.int64(16), n_layer=np.int32(2), vocab_size=np.int64(100), d_intermediate=np.int64(0)
    )
    assert config == MambaConfig(d_model=16, n_layer=2, vocab_size=100)
    assert all(type(getattr(config, name)) is int for name in ("d_model", "n_layer", "vocab_size", "d_intermediate"))
    assert json.loads(json.dumps(config.to_dict()))["d_model"] == 16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_mamba_ssm_json_round_trip(name, tmp_path):
    config = MambaConfig.preset(name)
    path = tmp_path / "config.json"
    config.to_json(path)
    assert json.loads(path.read_text()) == config.to_dict()
    assert MambaConfig.from_json(path) == config
    assert MambaConfig.from_dict(config.to_dict()) == config


def test_mamba_ssm_json_with_old_keys_only_takes_defaults():
    """The original Mamba-1 config.json files predate d_intermediate, attn_* and tie_embeddings."""
    old = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}  # fmt: skip
    assert MambaConfig.from_dict(old) == MambaConfig.preset("mamba-130m")


def test_transformers_mamba_config_maps_every_field(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.MambaConfig(
        hidden_size=40, num_hidden_layers=3, vocab_size=100, state_size=8, conv_kernel=3, expand=3,
        time_step_rank=5, use_bias=True, use_conv_bias=False, tie_word_embeddings=False, residual_in_fp32=False,
        time_step_init_scheme="constant", time_step_scale=2.0, time_step_min=0.002, time_step_max=0.2,
        time_step_floor=1e-3,
    )  # fmt: skip
    expected = MambaConfig(
        d_model=40, n_layer=3, vocab_size=100, residual_in_fp32=False, tie_embeddings=False, pad_vocab_size_multiple=1,
        ssm_cfg={"d_state": 8, "d_conv": 3, "expand": 3, "dt_rank": 5, "dt_min": 0.002, "dt_max": 0.2,
                 "dt_init": "constant", "dt_scale": 2.0, "dt_init_floor": 1e-3, "conv_bias": False, "bias": True},
    )  # fmt: skip
    assert MambaConfig.from_dict(hf.to_dict()) == expected
    # The file save_pretrained writes (only non-default base keys).
    path = tmp_path / "config.json"
    path.write_text(hf.to_json_string(use_diff=True))
    assert MambaConfig.from_json(path) == expected


def test_transformers_mamba2_config_maps_every_field(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Mamba2Config(
        hidden_size=64, num_hidden_layers=2, vocab_size=100, num_heads=6, head_dim=32, expand=3, n_groups=2,
        state_size=16, conv_kernel=3, chunk_size=32, time_step_min=0.002, time_step_max=0.2, time_step_floor=1e-3,
        use_bias=True, use_conv_bias=False, tie_word_embeddings=True, residual_in_fp32=False,
    )  # fmt: skip
    expected = MambaConfig(
        d_model=64, n_layer=2, vocab_size=100, residual_in_fp32=False, tie_embeddings=True, pad_vocab_size_multiple=1,
        ssm_cfg={"layer": "Mamba2", "rmsnorm": True, "norm_before_gate": False, "d_state": 16, "d_conv": 3,
                 "expand": 3, "headdim": 32, "ngroups": 2, "chunk_size": 32, "dt_min": 0.002, "dt_max": 0.2,
                 "dt_init_floor": 1e-3, "bias": True, "conv_bias": False},
    )  # fmt: skip
    assert MambaConfig.from_dict(hf.to_dict()) == expected
    path = tmp_path / "config.json"
    path.write_text(hf.to_json_string(use_diff=True))  # transformers 5 writes inf as {"__float__": "Infinity"}
    assert MambaConfig.from_json(path) == expected
    limited = MambaConfig.from_dict({**hf.to_dict(), "time_step_limit": [0.01, math.inf]})
    assert limited.ssm_cfg["dt_limit"] == (0.01, math.inf)


def test_transformers_mamba2_default_dt_limit_is_left_out(tmp_path):
    """transformers always writes time_step_limit, [0.0, inf] by default: mamba_ssm's default dt_limit, left out of
    ssm_cfg so that our config.json holds no {"__float__": "Infinity"}, which mamba_ssm's plain json loader would
    pass to Mamba2 as is."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.Mamba2Config(hidden_size=64, num_hidden_layers=2, vocab_size=100, num_heads=2, n_groups=1)
    config = MambaConfig.from_dict(hf.to_dict())
    assert "dt_limit" not in config.ssm_cfg
    path = tmp_path / "config.json"
    config.to_json(path)
    text = path.read_text()
    assert "dt_limit" not in text and "__float__" not in text
    loaded = MambaConfig.from_json(path)
    assert loaded == config and hash(loaded) == hash(config)
    assert MambaConfig.from_dict(config.to_dict()) == config


def test_published_transformers_configs():
    """mamba-130m-hf describes the architecture of the mamba-130m preset, Codestral's that of its preset."""
    ours = MambaConfig.from_dict(MAMBA_130M_HF)
    preset = MambaConfig.preset("mamba-130m")
    assert (ours.d_model, ours.n_layer, ours.padded_vocab_size) == (preset.d_model, preset.n_layer, 50280)
    assert ours.ssm_layer == "Mamba1" and ours.ssm_cfg["dt_rank"] == math.ceil(768 / 16)

    codestral = MambaConfig.from_dict(CODESTRAL_HF)
    preset = MambaConfig.preset("codestral-mamba-7b")
    for field in ("d_model", "n_layer", "padded_vocab_size", "tie_embeddings", "residual_in_fp32", "ssm_layer"):
        assert getattr(codestral, field) == getattr(preset, field), field
    assert codestral.ssm_cfg["ngroups"] == preset.ssm_cfg["ngroups"] == 8
    # transformers (and mamba_ssm's default) gate before the norm whatever the file says.
    assert codestral.ssm_cfg["norm_before_gate"] is False


def test_absent_transformers_keys_mean_the_same_in_both_libraries():
    """from_transformers_dict leaves an absent mixer key out of ssm_cfg, so the mamba_ssm default applies: that is
    only right where transformers' default is the same. (n_groups and tie_word_embeddings differ; they are filled
    in with transformers' default.)"""
    transformers = pytest.importorskip("transformers")
    mamba1 = transformers.MambaConfig()
    mixer_defaults = {k: p.default for k, p in inspect.signature(Mamba.__init__).parameters.items()}
    fields = {"state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "time_step_min": "dt_min",
              "time_step_max": "dt_max", "time_step_init_scheme": "dt_init", "time_step_scale": "dt_scale",
              "time_step_floor": "dt_init_floor", "use_conv_bias": "conv_bias", "use_bias": "bias"}  # fmt: skip
    for theirs, ours in fields.items():
        assert getattr(mamba1, theirs) == mixer_defaults[ours], theirs
    assert mamba1.time_step_rank == math.ceil(mamba1.hidden_size / 16)  # "auto"
    mamba2 = transformers.Mamba2Config()
    for key, value in MAMBA2_MIXER_DEFAULTS.items():
        assert tuple(getattr(mamba2, key)) == value if key == "time_step_limit" else getattr(mamba2, key) == value
    assert mamba1.residual_in_fp32 == mamba2.residual_in_fp32 == MambaConfig().residual_in_fp32
    minimal = {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 10}
    assert MambaConfig.from_dict({"model_type": "mamba", **minimal}).tie_embeddings is True
    from_minimal = MambaConfig.from_dict({"model_type": "mamba2", "num_heads": 2, **minimal})
    assert from_minimal.tie_embeddings is False and from_minimal.ssm_cfg["ngroups"] == 8


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"d_model": 64, "n_layers": 2}, r"unknown mamba_ssm MambaConfig keys \['n_layers'\]"),
        ({"d_model": 0}, r"d_model must be an int >= 1, found 0"),
        ({"d_model": "768"}, r"d_model must be an int >= 1, found '768'"),
        ({"d_intermediate": -1}, r"d_intermediate must be an int >= 0"),
        ({"rms_norm": 1}, r"rms_norm must be a bool"),
        ({"ssm_cfg": {"layer": "Mamba4"}}, r"ssm_cfg\['layer'\] must be one of"),
        ({"ssm_cfg": [1, 2]}, r"expected a mapping"),
        ({"n_layer": 4, "attn_layer_idx": [4]}, r"attn_layer_idx entries must be ints in \[0, n_layer=4\)"),
        ({"attn_layer_idx": [1, 1]}, r"repeated"),
        ({"model_type": "llama", "hidden_size": 8}, r"model_type must be one of \['mamba', 'mamba2'\], found 'llama'"),
        ({"hidden_size": 8}, r"model_type must be one of"),
        ({"model_type": "mamba", "hidden_size": 8, "num_hidden_layers": 1}, r"missing required keys \['vocab_size'\]"),
        ({**MAMBA_130M_HF, "mystery": 1}, r"unknown keys \['mystery'\] in a transformers 'mamba' config"),
        ({**MAMBA_130M_HF, "layer_norm_epsilon": 1e-6}, r"layer_norm_epsilon must be 1e-5"),
        ({**MAMBA_130M_HF, "hidden_act": "gelu"}, r"hidden_act must be 'silu'"),
        ({**CODESTRAL_HF, "num_heads": 64}, r"num_heads \* head_dim = 64 \* 64 must equal expand \* hidden_size"),
    ],
)
def test_bad_configs_raise_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        MambaConfig.from_dict(data)


def test_bad_input_files_and_names(tmp_path):
    with pytest.raises(ValueError, match="config must be a dict, found list"):
        MambaConfig.from_dict([1])
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        MambaConfig.from_json(path)
    with pytest.raises(ValueError, match=r"unknown preset 'mamba-3b'; the presets are \["):
        MambaConfig.preset("mamba-3b")


def test_preset_names_and_sizes():
    assert MAMBA1_PRESETS == ["mamba-1.4b", "mamba-130m", "mamba-2.8b", "mamba-2.8b-slimpj", "mamba-370m", "mamba-790m"]
    """Sizes from REFERENCE.md: d_model / n_layer and the padded vocab of each family."""
    assert set(PRESETS) == {
        "mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b", "mamba-2.8b-slimpj",
        "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b",
        "mamba2attn-2.7b", "transformerpp-2.7b", "codestral-mamba-7b",
    }  # fmt: skip
    sizes = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "780m": (1536, 48), "1.4b": (2048, 48),
             "1.3b": (2048, 48), "2.8b": (2560, 64), "2.7b": (2560, 64)}  # fmt: skip
    for name, config in PRESETS.items():
        family, _, size = name.partition("-")
        if family in ("mamba", "mamba2"):
            assert (config.d_model, config.n_layer) == sizes[size.removesuffix("-slimpj")], name
            assert config.padded_vocab_size == (50280 if family == "mamba" else 50288), name
            assert config.ssm_layer == ("Mamba1" if family == "mamba" else "Mamba2"), name
    hybrid = PRESETS["mamba2attn-2.7b"]
    assert hybrid.attn_layer_idx == (9, 18, 27, 36, 45, 56)
    assert hybrid.attn_cfg["num_heads"] * hybrid.attn_cfg["head_dim"] == 3840  # 30 heads of 128
    codestral = PRESETS["codestral-mamba-7b"]
    assert (codestral.d_model, codestral.n_layer, codestral.padded_vocab_size) == (4096, 64, 32768)
    assert not codestral.tie_embeddings


def abstract_params(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    model = nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0)))
    return {
        ".".join(map(str, path)): tuple(v.get_value().shape)
        for path, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param)
    }


MAMBA1_PRESETS = [name for name, c in sorted(PRESETS.items()) if c.ssm_layer == "Mamba1" and not c.attn_layer_idx]


@pytest.mark.parametrize("name", MAMBA1_PRESETS)
def test_mamba1_presets_build_abstractly_with_reference_shapes(name):
    """Shapes implied by REFERENCE.md: di = 2d, n = 16, w = 4, r = ceil(d / 16), tied embedding of 50280 rows.
    mamba-130m is built at full depth; the deeper ones with 2 layers to keep the test fast (depth is checked above)."""
    config = MambaConfig.preset(name)
    if name != "mamba-130m":
        config = dataclasses.replace(config, n_layer=2)
    d, n_layer = config.d_model, config.n_layer
    di, r = 2 * d, math.ceil(d / 16)
    shapes = abstract_params(config)
    mixer = {
        "in_proj.kernel": (d, 2 * di),
        "conv1d.kernel": (4, di),
        "conv1d.bias": (di,),
        "x_proj.kernel": (di, r + 32),
        "dt_proj.kernel": (r, di),
        "dt_proj.bias": (di,),
        "A_log": (di, 16),
        "D": (di,),
        "out_proj.kernel": (di, d),
    }
    expected = {"backbone.embedding.embedding": (50280, d), "backbone.norm_f.weight": (d,)}
    for i in range(n_layer):
        expected[f"backbone.layers.{i}.norm.weight"] = (d,)
        expected.update({f"backbone.layers.{i}.mixer.{key}": shape for key, shape in mixer.items()})
    assert shapes == expected
