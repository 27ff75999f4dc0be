"""Export one of our converted checkpoints as a transformers directory: ``model.safetensors`` + the ``config.json`` of
a ``MambaConfig`` (Mamba-1) or ``Mamba2Config`` (Mamba-2), loadable by ``MambaForCausalLM`` / ``Mamba2ForCausalLM``.

Tensors keep their stored dtype unless a dtype is asked for, so transformers -> ours -> transformers gives back the
same bytes. Hybrids (attention or MLP layers) have no transformers model and are refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from convert import keymap
from convert.errors import ConversionError
from convert.formats import SAFETENSORS_FILE, TOKENIZER_FILES
from convert.pipeline import abstract_model
from convert.writer import check_destination, check_not_overlapping, is_converted, staged_directory
from mamba_jax.config import MambaConfig
from mamba_jax.pretrained import EMBEDDING_PATH, read_config, restore_params, stored_params

# mamba_ssm mixer arguments (ssm_cfg) -> transformers config keys, with mamba_ssm's defaults.
_MAMBA1_KEYS = {
    "d_state": ("state_size", 16),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "dt_rank": ("time_step_rank", "auto"),
    "bias": ("use_bias", False),
    "conv_bias": ("use_conv_bias", True),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init": ("time_step_init_scheme", "random"),
    "dt_scale": ("time_step_scale", 1.0),
    "dt_init_floor": ("time_step_floor", 1e-4),
}
_MAMBA2_KEYS = {
    "d_state": ("state_size", 128),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "headdim": ("head_dim", 64),
    "ngroups": ("n_groups", 1),
    "chunk_size": ("chunk_size", 256),
    "bias": ("use_bias", False),
    "conv_bias": ("use_conv_bias", True),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init_floor": ("time_step_floor", 1e-4),
    "dt_limit": ("time_step_limit", (0.0, float("inf"))),
}
# Mamba-2 arguments transformers cannot express: only mamba_ssm's defaults (its fixed behaviour) are exportable.
_MAMBA2_FIXED = {"rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False, "activation": "silu"}
# Arguments that only affect initialisation or speed, not the function the model computes.
_NO_EFFECT = {"A_init_range", "use_fast_path", "use_mem_eff_path", "sequence_parallel"}


def transformers_config(config: MambaConfig) -> dict:
    """The transformers config dict (``model_type`` "mamba" or "mamba2") of the same model."""
    if config.attn_layer_idx or config.d_intermediate or not config.rms_norm:
        raise ConversionError(
            "transformers has no model for this config: attention layers, MLP blocks (d_intermediate > 0) and "
            "LayerNorm are mamba_ssm-only"
        )
    kwargs = config.mixer_kwargs
    if config.ssm_layer == "Mamba1":
        table, fixed, model_type, arch = _MAMBA1_KEYS, {}, "mamba", "MambaForCausalLM"
    elif config.ssm_layer == "Mamba2":
        table, fixed, model_type, arch = _MAMBA2_KEYS, _MAMBA2_FIXED, "mamba2", "Mamba2ForCausalLM"
    else:
        raise ConversionError(f"transformers has no model for ssm_cfg layer {config.ssm_layer!r}")
    for key, value in kwargs.items():
        if key in fixed and value != fixed[key]:
            raise ConversionError(f"transformers' Mamba-2 cannot express ssm_cfg {key}={value!r} (only {fixed[key]!r})")
        if key not in table and key not in fixed and key not in _NO_EFFECT:
            raise ConversionError(f"transformers' {arch} has no equivalent of ssm_cfg key {key!r}")
    hf = {theirs: kwargs.get(ours, default) for ours, (theirs, default) in table.items()}
    if model_type == "mamba2":
        d_inner = hf["expand"] * config.d_model
        if kwargs.get("d_ssm") not in (None, d_inner):
            raise ConversionError(f"transformers' Mamba-2 has no d_ssm < d_inner (found {kwargs['d_ssm']})")
        hf["num_heads"] = d_inner // hf["head_dim"]
        hf["time_step_limit"] = list(hf["time_step_limit"])
    return {
        "model_type": model_type,
        "architectures": [arch],
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "vocab_size": config.padded_vocab_size,
        "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings,
        "layer_norm_epsilon": 1e-5,
        **hf,
    }


def transformers_classes(model_type: str):
    """(MambaForCausalLM, MambaConfig) or (Mamba2ForCausalLM, Mamba2Config) for ``model_type``."""
    import transformers

    if model_type == "mamba":
        return transformers.MambaForCausalLM, transformers.MambaConfig
    return transformers.Mamba2ForCausalLM, transformers.Mamba2Config


def export_to_transformers(src: Path, dst: Path, *, dtype=None, force: bool = False) -> None:
    """Write our converted checkpoint ``src`` as a transformers directory ``dst`` (cast to ``dtype`` if given)."""
    check_destination(dst, force)
    if not is_converted(src):
        raise ConversionError(f"{src} is not a checkpoint written by python -m convert (no config.json + params/)")
    check_not_overlapping(src, dst)
    config = read_config(src)
    hf = transformers_config(config)
    stored_dtype = stored_params(src)[EMBEDDING_PATH].dtype
    _, params = nnx.split(abstract_model(config, stored_dtype), nnx.Param)
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    restored = restore_params(src, params, {path: cpu for path, _ in nnx.to_flat_state(params)})
    tensors = {}
    for path, _ in nnx.to_flat_state(params):
        node = restored
        for key in path:
            node = node[key]
        name, hook = keymap.to_source(".".join(map(str, path)))
        array = hook.to_torch(np.asarray(node))
        if dtype is not None:
            array = array.astype(dtype)
        tensors[keymap.to_transformers_name(name)] = np.ascontiguousarray(array)
    del restored
    _, config_class = transformers_classes(hf["model_type"])
    with staged_directory(dst, force) as staging:
        save_file(tensors, staging / SAFETENSORS_FILE, metadata={"format": "pt"})
        config_class(**{k: v for k, v in hf.items() if k != "model_type"}).save_pretrained(staging)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, staging / name)
