"""MambaConfig: mamba_ssm's language-model config as a frozen, hashable dataclass, with loaders for the mamba_ssm and
transformers config.json formats and presets for the published checkpoints.

The fields and defaults are exactly those of ``mamba_ssm.models.config_mamba.MambaConfig``. ``ssm_cfg`` and
``attn_cfg`` (dicts there) are stored as ``FrozenMapping`` and ``attn_layer_idx`` as a tuple, so a config can be a
static argument to ``jax.jit``; dicts and lists are accepted and returned.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pallas_kernels.arguments import integer

MIXER_LAYERS = ("Mamba1", "Mamba2", "Mamba3")
DEFAULT_DT_LIMIT = (0.0, math.inf)  # mamba_ssm's Mamba2 dt_limit: no limit


class FrozenMapping(Mapping[str, Any]):
    """A read-only, hashable dict. Lists inside become tuples and dicts become FrozenMappings."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any] | None = None):
        if data is not None and not isinstance(data, Mapping):
            raise ValueError(f"expected a mapping (dict), found {type(data).__name__}: {data!r}")
        self._data = {key: _freeze(value) for key, value in (data or {}).items()}

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return f"FrozenMapping({self._data!r})"


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return FrozenMapping(value)
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"config values must be JSON-like (numbers, strings, lists, dicts), found {value!r}") from None
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _thaw(v) for key, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    """mamba_ssm's MambaConfig (``models/config_mamba.py``): same field names, same defaults.

    ssm_cfg: arguments of the mixer; ``layer`` in {"Mamba1" (default), "Mamba2", "Mamba3"} picks it, every other key
    goes to its constructor. attn_layer_idx: layers that are MHA (built from attn_cfg) instead of a mixer.
    d_intermediate > 0 adds a GatedMLP after every mixer. Vocab rows are padded to a multiple of
    pad_vocab_size_multiple. fused_add_norm only picks a CUDA kernel in mamba_ssm; it does not change the math.
    """

    d_model: int = 2560
    d_intermediate: int = 0
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: Mapping[str, Any] = dataclasses.field(default_factory=FrozenMapping)
    attn_layer_idx: tuple[int, ...] = ()
    attn_cfg: Mapping[str, Any] = dataclasses.field(default_factory=FrozenMapping)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple"):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "d_intermediate", _check_int("d_intermediate", self.d_intermediate, minimum=0))
        for name in ("rms_norm", "residual_in_fp32", "fused_add_norm", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name} must be a bool, found {getattr(self, name)!r}")
        object.__setattr__(self, "ssm_cfg", FrozenMapping(self.ssm_cfg))
        object.__setattr__(self, "attn_cfg", FrozenMapping(self.attn_cfg))
        if isinstance(self.attn_layer_idx, str | bytes) or not hasattr(self.attn_layer_idx, "__iter__"):
            raise ValueError(
                f"MambaConfig.attn_layer_idx must be a list of layer indices, found {self.attn_layer_idx!r}"
            )
        object.__setattr__(self, "attn_layer_idx", tuple(self.attn_layer_idx))
        for idx in self.attn_layer_idx:
            if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < self.n_layer:
                raise ValueError(
                    f"MambaConfig.attn_layer_idx entries must be ints in [0, n_layer={self.n_layer}), found {idx!r}"
                )
        if len(set(self.attn_layer_idx)) != len(self.attn_layer_idx):
            raise ValueError(f"MambaConfig.attn_layer_idx has repeated entries: {list(self.attn_layer_idx)}")
        if self.ssm_layer not in MIXER_LAYERS:
            raise ValueError(f"MambaConfig.ssm_cfg['layer'] must be one of {MIXER_LAYERS}, found {self.ssm_layer!r}")
        if "dt_limit" in self.ssm_cfg:
            _check_dt_limit("MambaConfig.ssm_cfg['dt_limit']", self.ssm_cfg["dt_limit"])

    # ---- derived sizes ----

    @property
    def padded_vocab_size(self) -> int:
        """vocab_size rounded up to a multiple of pad_vocab_size_multiple: the embedding / logits width (v)."""
        multiple = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / multiple) * multiple

    @property
    def ssm_layer(self) -> str:
        """Which mixer the non-attention layers use: "Mamba1", "Mamba2" or "Mamba3"."""
        return self.ssm_cfg.get("layer", "Mamba1")

    @property
    def mixer_kwargs(self) -> dict[str, Any]:
        """ssm_cfg without ``layer``: the keyword arguments of the mixer constructor."""
        return {key: value for key, value in self.ssm_cfg.items() if key != "layer"}

    # ---- serialisation ----

    def to_dict(self) -> dict[str, Any]:
        """The mamba_ssm config.json form (plain dicts and lists)."""
        return {field.name: _thaw(getattr(self, field.name)) for field in dataclasses.fields(self)}

    def to_json(self, path: str | os.PathLike) -> None:
        """Write the mamba_ssm config.json form to ``path``; inf and nan (e.g. a dt_limit (0.1, inf) in ssm_cfg) as
        transformers 5 writes them (``encode_special_floats``), so the file is standard JSON."""
        with open(path, "w") as f:
            json.dump(encode_special_floats(self.to_dict()), f, indent=2, allow_nan=False)
            f.write("\n")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MambaConfig:
        """From a mamba_ssm config.json dict, or a transformers MambaConfig / Mamba2Config dict (has ``model_type``).

        Missing mamba_ssm keys take mamba_ssm's defaults (as mamba_ssm does); unknown keys raise ValueError.
        See ``from_transformers_dict`` for the transformers form.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"config must be a dict, found {type(data).__name__}")
        if "model_type" in data or "hidden_size" in data:
            return cls.from_transformers_dict(data)
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown mamba_ssm MambaConfig keys {unknown}; the keys are {names}")
        return cls(**decode_special_floats(data))

    @classmethod
    def from_transformers_dict(cls, data: Mapping[str, Any]) -> MambaConfig:
        """From a transformers ``MambaConfig`` (model_type "mamba") or ``Mamba2Config`` ("mamba2") dict.

        The result describes the model transformers builds from that dict: RMSNorm, vocab_size rows exactly
        (pad_vocab_size_multiple=1: transformers' vocab_size is already the padded one), and for Mamba-2 the gated
        RMSNorm gating before the norm whatever ``norm_before_gate`` says (transformers ignores that key; Codestral's
        config.json sets it True, yet mamba_ssm ran that model with the default False). Keys transformers ignores
        are ignored; values mamba_ssm cannot express (eps other than 1e-5, activation other than silu) raise.
        A time_step_limit equal to mamba_ssm's default dt_limit (0, inf) is left out of ssm_cfg (transformers always
        writes one), so that ``to_json`` writes no {"__float__": "Infinity"}, which mamba_ssm's plain json loader
        would hand to Mamba2 as is.
        """
        model_type = data.get("model_type")
        if model_type not in _TRANSFORMERS_FORMATS:
            raise ValueError(
                f"transformers config model_type must be one of {sorted(_TRANSFORMERS_FORMATS)}, found {model_type!r}"
            )
        fmt = _TRANSFORMERS_FORMATS[model_type]
        data = decode_special_floats(data)
        known = set(fmt["top"]) | set(fmt["ssm"]) | set(fmt["defaults"]) | fmt["ignored"] | _TRANSFORMERS_METADATA
        known |= {"layer_norm_epsilon", "hidden_act"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown keys {unknown} in a transformers {model_type!r} config")
        missing = sorted(key for key in ("hidden_size", "num_hidden_layers", "vocab_size") if key not in data)
        if missing:
            raise ValueError(f"transformers {model_type!r} config is missing required keys {missing}")
        if data.get("layer_norm_epsilon", 1e-5) != 1e-5:
            raise ValueError(f"layer_norm_epsilon must be 1e-5 (mamba_ssm's norms), found {data['layer_norm_epsilon']}")
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act must be 'silu' (mamba_ssm's mixers), found {data['hidden_act']!r}")
        data = {**fmt["defaults"], **data}

        ssm_cfg = dict(fmt["fixed_ssm"])
        ssm_cfg.update({ours: data[theirs] for theirs, ours in fmt["ssm"].items() if theirs in data})
        if model_type == "mamba2":
            if "time_step_limit" in data:  # checked here, to name the user's key (ours is ssm_cfg's dt_limit)
                _check_dt_limit("time_step_limit", data["time_step_limit"])
                if tuple(data["time_step_limit"]) == DEFAULT_DT_LIMIT:
                    del ssm_cfg["dt_limit"]
            d_inner = ssm_cfg.get("expand", 2) * data["hidden_size"]
            heads, head_dim = data["num_heads"], ssm_cfg.get("headdim", 64)
            if heads * head_dim != d_inner:
                raise ValueError(
                    f"num_heads * head_dim = {heads} * {head_dim} must equal expand * hidden_size = {d_inner}"
                )
        top = {ours: data[theirs] for theirs, ours in fmt["top"].items() if theirs in data}
        return cls(**top, ssm_cfg=ssm_cfg, pad_vocab_size_multiple=1)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> MambaConfig:
        """Read a mamba_ssm or transformers config.json (see ``from_dict``)."""
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str) -> MambaConfig:
        """The config of a published checkpoint, e.g. "mamba-130m" or "mamba2-2.7b" (see ``PRESETS``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; the presets are {sorted(PRESETS)}")
        return PRESETS[name]


def _check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum`` (a Python or NumPy integer, not a bool), or a ValueError naming it."""
    index = integer(value)
    if index is None or index < minimum:
        raise ValueError(f"MambaConfig.{name} must be an int >= {minimum}, found {value!r}")
    return index


def _check_dt_limit(name: str, value: Any) -> None:
    """dt_limit (transformers: time_step_limit) must be [low, high] with 0 <= low <= high; ``name`` is the key the
    user wrote."""
    numbers = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )
    if not (numbers and 0 <= value[0] <= value[1]):
        raise ValueError(f"{name} must be a list [low, high] of two numbers with 0 <= low <= high, found {value!r}")


# transformers >= 5 writes inf / nan in config.json as {"__float__": "Infinity"} (and "-Infinity", "NaN").
_FLOAT_TAG = "__float__"
_FLOAT_TAGS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def decode_special_floats(value: Any) -> Any:
    """A config dict (or any JSON value) with every {"__float__": "Infinity" | "-Infinity" | "NaN"} replaced by the
    float, as transformers reads its config.json; dicts and lists are copied, anything else is returned as is."""
    if isinstance(value, Mapping):
        tag = value.get(_FLOAT_TAG) if set(value) == {_FLOAT_TAG} else None
        if isinstance(tag, str) and tag in _FLOAT_TAGS:
            return _FLOAT_TAGS[tag]
        return {key: decode_special_floats(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [decode_special_floats(v) for v in value]
    return value


def encode_special_floats(value: Any) -> Any:
    """The inverse of ``decode_special_floats``: inf, -inf and nan as {"__float__": ...}, as transformers 5 writes
    them (Python's json would write the non-standard literals Infinity / NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, Mapping):
        return {key: encode_special_floats(v) for key, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode_special_floats(v) for v in value]
    return value


# Keys every transformers config carries (PreTrainedConfig, 4.x and 5.x, incl. 4.x generation defaults and token
# ids): metadata, not architecture.
_TRANSFORMERS_METADATA = frozenset(
    {
        "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures", "auto_map", "model_type",
        "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "torchscript", "tf_legacy_loss",
        "id2label", "label2id", "problem_type", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
        "return_dict", "output_hidden_states", "output_attentions", "output_scores", "return_dict_in_generate",
        "chunk_size_feed_forward", "pruned_heads", "is_encoder_decoder", "is_decoder", "add_cross_attention",
        "cross_attention_hidden_size", "tie_encoder_decoder", "bos_token_id", "eos_token_id", "pad_token_id",
        "sep_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "max_length",
        "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
        "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
        "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "remove_invalid_values",
        "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
        "use_cache", "initializer_range", "rescale_prenorm_residual",
    }
)  # fmt: skip

# Per transformers model_type: top-level and mixer keys (transformers name -> mamba_ssm name), transformers' own
# defaults where they differ from mamba_ssm's (an absent key means transformers' default; every other absent key has
# the same default in both), mixer arguments fixed by what transformers computes, and keys transformers ignores
# (intermediate_size is recomputed from expand; the rest are init-only or leftovers of the mamba_ssm conversion,
# as in state-spaces/mamba-*-hf: d_model, n_layer, d_inner, rms_norm, fused_add_norm, pad_vocab_size_multiple, ssm_cfg).
_TOP_KEYS = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
}
_LEGACY_KEYS = {"d_model", "n_layer", "d_inner", "rms_norm", "fused_add_norm", "pad_vocab_size_multiple", "ssm_cfg"}
_TRANSFORMERS_FORMATS: dict[str, dict[str, Any]] = {
    "mamba": {
        "top": _TOP_KEYS,
        "ssm": {
            "state_size": "d_state",
            "conv_kernel": "d_conv",
            "expand": "expand",
            "time_step_rank": "dt_rank",
            "time_step_min": "dt_min",
            "time_step_max": "dt_max",
            "time_step_init_scheme": "dt_init",
            "time_step_scale": "dt_scale",
            "time_step_floor": "dt_init_floor",
            "use_conv_bias": "conv_bias",
            "use_bias": "bias",
        },
        "defaults": {"tie_word_embeddings": True},
        "fixed_ssm": {},
        "ignored": {"intermediate_size", "use_mambapy", "use_associative_scan"} | _LEGACY_KEYS,
    },
    "mamba2": {
        "top": _TOP_KEYS,
        "ssm": {
            "state_size": "d_state",
            "conv_kernel": "d_conv",
            "expand": "expand",
            "head_dim": "headdim",
            "n_groups": "ngroups",
            "chunk_size": "chunk_size",
            "time_step_min": "dt_min",
            "time_step_max": "dt_max",
            "time_step_floor": "dt_init_floor",
            "time_step_limit": "dt_limit",
            "use_conv_bias": "conv_bias",
            "use_bias": "bias",
        },
        "defaults": {"tie_word_embeddings": False, "n_groups": 8, "num_heads": 128},
        "fixed_ssm": {"layer": "Mamba2", "rmsnorm": True, "norm_before_gate": False},
        "ignored": {
            "intermediate_size",
            "norm_before_gate",
            "time_step_rank",
            "time_step_init_scheme",
            "time_step_scale",
        }
        | _LEGACY_KEYS,
    },
}


def _mamba_ssm_lm(d_model: int, n_layer: int, **fields: Any) -> MambaConfig:
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, **fields)


def _mamba2_lm(d_model: int, n_layer: int, **fields: Any) -> MambaConfig:
    return _mamba_ssm_lm(d_model, n_layer, ssm_cfg={"layer": "Mamba2"}, pad_vocab_size_multiple=16, **fields)


# The published checkpoints' config.json, in the mamba_ssm form.
# - mamba-*: huggingface.co/state-spaces/mamba-{130m,...}/config.json hold only d_model, n_layer, vocab_size 50277,
#   ssm_cfg {}, rms_norm, residual_in_fp32, fused_add_norm (all true) and pad_vocab_size_multiple 8 (the other fields
#   are defaults); sizes as in the mamba_ssm README and e.g. LaurentMazare/mamba.rs src/constants.rs, which cites those
#   files. mamba-2.8b-slimpj has the architecture of mamba-2.8b (trained on SlimPajama).
# - mamba2-*: d_intermediate 0, ssm_cfg {"layer": "Mamba2"}, attn_layer_idx [], attn_cfg {}, pad 16, tied, as quoted
#   from state-spaces/mamba2-2.7b/config.json in third-party tests; sizes from the mamba_ssm README / paper.
# - mamba2attn-2.7b: as quoted from its config.json: attention at layers 9, 18, 27, 36, 45, 56 with attn_cfg below.
# - transformerpp-2.7b: NOT confirmed from its published config.json (not found in the sources searched). Our
#   reconstruction: 32 layers, all attention (20 heads of 128 = 2560) with a GatedMLP of 6912 = 8/3 * 2560 rounded up
#   to 128, causal, no qkv/out biases, no conv, rotary_emb_dim 64 (as mamba2attn); check before relying on it.
# - codestral-mamba-7b: mistral_inference (src/mistral_inference/mamba.py) builds mamba_ssm's MambaConfig with
#   ssm_cfg {"ngroups": n_groups, "layer": "Mamba2"} from params.json; dim 4096, 64 layers, vocab 32768, 8 groups,
#   untied, as its transformers config.json. pad_vocab_size_multiple is NOT confirmed (32768 is a multiple of 16
#   anyway, so the padded vocab is 32768 for any power of two up to 32768).
PRESETS: dict[str, MambaConfig] = {
    "mamba-130m": _mamba_ssm_lm(768, 24),
    "mamba-370m": _mamba_ssm_lm(1024, 48),
    "mamba-790m": _mamba_ssm_lm(1536, 48),
    "mamba-1.4b": _mamba_ssm_lm(2048, 48),
    "mamba-2.8b": _mamba_ssm_lm(2560, 64),
    "mamba-2.8b-slimpj": _mamba_ssm_lm(2560, 64),
    "mamba2-130m": _mamba2_lm(768, 24),
    "mamba2-370m": _mamba2_lm(1024, 48),
    "mamba2-780m": _mamba2_lm(1536, 48),
    "mamba2-1.3b": _mamba2_lm(2048, 48),
    "mamba2-2.7b": _mamba2_lm(2560, 64),
    "mamba2attn-2.7b": _mamba2_lm(
        2560,
        64,
        attn_layer_idx=(9, 18, 27, 36, 45, 56),
        attn_cfg={
            "causal": True,
            "d_conv": 4,
            "head_dim": 128,
            "num_heads": 30,
            "out_proj_bias": False,
            "qkv_proj_bias": False,
            "rotary_emb_dim": 64,
        },
    ),
    "transformerpp-2.7b": _mamba_ssm_lm(
        2560,
        32,
        d_intermediate=6912,
        attn_layer_idx=tuple(range(32)),
        attn_cfg={
            "causal": True,
            "d_conv": 0,
            "head_dim": 128,
            "num_heads": 20,
            "out_proj_bias": False,
            "qkv_proj_bias": False,
            "rotary_emb_dim": 64,
        },
        pad_vocab_size_multiple=16,
    ),
    "codestral-mamba-7b": MambaConfig(
        d_model=4096,
        n_layer=64,
        vocab_size=32768,
        ssm_cfg={"layer": "Mamba2", "ngroups": 8},
        pad_vocab_size_multiple=1,
        tie_embeddings=False,
    ),
}
