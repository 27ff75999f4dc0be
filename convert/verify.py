"""``--verify``: run the source model in torch (transformers) and the converted model in JAX on a fixed prompt, and
require their logits to agree.

Both sides compute in float32 at full matmul precision. The torch model gets the source tensors rounded to the
converted dtypes first, so with ``--dtype bfloat16`` / ``float16`` the comparison checks the conversion itself, not
the rounding it asked for; the limit is 1e-5 either way. Original-format (mamba_ssm) sources run in transformers'
``MambaForCausalLM`` / ``Mamba2ForCausalLM`` through the config that ``--to hf`` would write; hybrids have no
transformers model and cannot be verified.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert import keymap
from convert.errors import ConversionError
from convert.export_hf import transformers_classes, transformers_config
from convert.formats import TRANSFORMERS, Source
from convert.pipeline import LM_HEAD, Step
from convert.readers import Weights
from mamba_jax.config import MambaConfig, decode_special_floats
from mamba_jax.pretrained import load_pretrained

REL_ERR_LIMIT = 1e-5
PROMPT_SHAPE = (2, 13)


def transformers_norms_per_group() -> bool:
    """Whether the installed transformers' Mamba-2 gated RMSNorm normalises each of the n_groups groups separately,
    as mamba_ssm does. Older releases (e.g. 5.17) normalise over all of d_inner, which changes any model with
    n_groups > 1; their grouped norm takes no ``group_size``."""
    from transformers.models.mamba2 import modeling_mamba2

    return "group_size" in inspect.signature(modeling_mamba2.MambaRMSNormGated.__init__).parameters


def torch_config(source: Source, config: MambaConfig) -> dict:
    """The transformers config dict to run the source in torch; raises if ``--verify`` cannot run."""
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise ConversionError("--verify needs torch and transformers installed") from None
    try:
        if source.dialect == TRANSFORMERS:  # transformers 5 writes inf as {"__float__": "Infinity"}
            hf_config = decode_special_floats(source.config)
        else:
            hf_config = transformers_config(config)
    except ConversionError as e:
        raise ConversionError(f"--verify cannot run: {e}") from None
    grouped = config.ssm_layer == "Mamba2" and config.mixer_kwargs.get("ngroups", 1) > 1
    if grouped and not transformers_norms_per_group():
        raise ConversionError(
            f"--verify cannot run: transformers {transformers.__version__} normalises Mamba-2's gated RMSNorm over "
            "all groups, not per group as mamba_ssm, so it computes a different model when n_groups > 1; "
            "install a newer transformers"
        )
    return hf_config


def fixed_prompt(vocab_size: int) -> np.ndarray:
    """Token ids (2, 13), the same every run."""
    return np.random.default_rng(20240101).integers(0, vocab_size, PROMPT_SHAPE, dtype=np.int32)


def torch_logits(hf_config: dict, source: Source, weights: Weights, steps: list[Step], prompt: np.ndarray):
    """float32 logits (b, l, v) of the transformers model holding the source tensors, each rounded to its step's
    dtype. Every tensor transformers expects must come from the source (a tied head from the embedding)."""
    import torch

    model_class, config_class = transformers_classes(hf_config["model_type"])
    model = model_class(config_class.from_dict(hf_config)).float().eval()
    state = {}
    for step in steps:
        name = step.source if source.dialect == TRANSFORMERS else keymap.to_transformers_name(step.source)
        array = np.asarray(weights.read(step.source)).astype(step.dtype).astype(np.float32)
        state[name] = torch.from_numpy(array)
    result = model.load_state_dict(state, strict=False)
    tied_head = [LM_HEAD] if hf_config.get("tie_word_embeddings", hf_config["model_type"] == "mamba") else []
    if result.unexpected_keys or set(result.missing_keys) - set(tied_head):
        raise ConversionError(
            f"--verify: transformers' model does not take the source tensors: missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(prompt).long()).logits.float().numpy()


def jax_logits(converted: Path, prompt: np.ndarray) -> np.ndarray:
    """float32 logits (b, l, v) of the converted checkpoint loaded in float32."""
    model = load_pretrained(converted, dtype=jnp.float32)
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(jnp.asarray(prompt)))


def verify(source: Source, config: MambaConfig, weights: Weights, steps: list[Step], converted: Path) -> float:
    """Relative logits error ||jax - torch|| / ||torch|| on the fixed prompt; raises above ``REL_ERR_LIMIT``."""
    prompt = fixed_prompt(config.vocab_size)
    expected = torch_logits(torch_config(source, config), source, weights, steps, prompt)
    actual = jax_logits(converted, prompt)
    if actual.shape != expected.shape:
        raise ConversionError(f"--verify: logits of shape {actual.shape} in JAX but {expected.shape} in torch")
    error = float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected.astype(np.float64)))
    if not error <= REL_ERR_LIMIT:
        raise ConversionError(f"--verify failed: relative logits error {error:.3e} exceeds {REL_ERR_LIMIT:.0e}")
    return error
