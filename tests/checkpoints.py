"""Small random-weight Mamba checkpoints in every published layout, for the converter tests; and the mamba_ssm
state-dict shapes of a config, written from the reference's module definitions (an independent account of what the
converter must map).

The model builders use torch and transformers (the independent reference) and import them inside, so tests that
need no torch can use this module where torch is not installed (the device stack).
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

# Small sizes with odd corners: vocab 37 (padded to 40 in the mamba_ssm layout), conv width 3.
MAMBA1 = dict(hidden_size=16, num_hidden_layers=2, state_size=4, expand=2, conv_kernel=3, time_step_rank=3)
MAMBA2 = dict(
    hidden_size=16, num_hidden_layers=2, num_heads=4, head_dim=8, state_size=8, n_groups=2, conv_kernel=4, chunk_size=8
)
VOCAB, PAD_MULTIPLE = 37, 8
PADDED_VOCAB = math.ceil(VOCAB / PAD_MULTIPLE) * PAD_MULTIPLE


def random_model(kind: str, *, vocab_size: int, tie: bool, seed: int = 0):
    """A transformers Mamba ("mamba") or Mamba2 ("mamba2") LM in float32 with every parameter perturbed away from its
    structured init (A_log, D, norms), so a mis-mapped tensor changes the logits."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "mamba":
        config = transformers.MambaConfig(**MAMBA1, vocab_size=vocab_size, tie_word_embeddings=tie)
        model = transformers.MambaForCausalLM(config)
    else:
        config = transformers.Mamba2Config(**MAMBA2, vocab_size=vocab_size, tie_word_embeddings=tie)
        model = transformers.Mamba2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model.float().eval()


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """float32 logits (b, l, v) of a transformers model."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.from_numpy(np.asarray(ids)).long()).logits.float().numpy()


def save_transformers(model, directory: Path, layout: str) -> Path:
    """Write ``model`` as transformers does: layout "safetensors" (model.safetensors), "sharded" (several
    safetensors + index json), "bin" (pytorch_model.bin) or "bin-sharded" (several .bin + index json)."""
    import torch

    if layout == "safetensors":
        model.save_pretrained(directory)
    elif layout == "sharded":
        model.save_pretrained(directory, max_shard_size="4KB")
    else:
        model.config.save_pretrained(directory)
        state = model.state_dict()  # a tied lm_head.weight included, sharing the embedding's storage
        if layout == "bin":
            torch.save(state, directory / "pytorch_model.bin")
        else:
            names = list(state)
            shards = [names[: len(names) // 2], names[len(names) // 2 :]]
            weight_map = {}
            for k, shard in enumerate(shards):
                file = f"pytorch_model-{k + 1:05d}-of-{len(shards):05d}.bin"
                torch.save({name: state[name] for name in shard}, directory / file)
                weight_map.update(dict.fromkeys(shard, file))
            (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def save_original(model, directory: Path, *, vocab_size: int, pad_multiple: int) -> Path:
    """Write ``model`` in the state-spaces layout: a mamba_ssm config.json (vocab_size before padding) and
    torch.save(state_dict) with mamba_ssm names; a tied model's lm_head.weight shares the embedding's storage."""
    import torch

    hf = model.config
    if hf.model_type == "mamba":
        ssm_cfg = {
            "d_state": hf.state_size,
            "d_conv": hf.conv_kernel,
            "expand": hf.expand,
            "dt_rank": hf.time_step_rank,
        }
    else:
        ssm_cfg = {
            "layer": "Mamba2",
            "d_state": hf.state_size,
            "d_conv": hf.conv_kernel,
            "expand": hf.expand,
            "headdim": hf.head_dim,
            "ngroups": hf.n_groups,
            "chunk_size": hf.chunk_size,
        }
    config = {
        "d_model": hf.hidden_size,
        "d_intermediate": 0,
        "n_layer": hf.num_hidden_layers,
        "vocab_size": vocab_size,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple,
        "tie_embeddings": hf.tie_word_embeddings,
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in model.state_dict().items()}
    if hf.tie_word_embeddings:
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def mamba_ssm_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of mamba_ssm's MambaLMHeadModel(config).state_dict() with its shape (torch layout), from the
    definitions in mamba_ssm's modules (mamba_simple, mamba2, mha, mlp, block, mixer_seq_simple)."""
    d, n_layer = config["d_model"], config["n_layer"]
    multiple = config.get("pad_vocab_size_multiple", 8)
    vocab = math.ceil(config["vocab_size"] / multiple) * multiple
    ssm, attn = config.get("ssm_cfg", {}), config.get("attn_cfg", {})
    shapes = {"backbone.embedding.weight": (vocab, d), "lm_head.weight": (vocab, d), "backbone.norm_f.weight": (d,)}
    norm_leaves = ["weight"] if config.get("rms_norm", True) else ["weight", "bias"]
    for leaf in norm_leaves[1:]:
        shapes[f"backbone.norm_f.{leaf}"] = (d,)
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        shapes.update({f"{p}norm.{leaf}": (d,) for leaf in norm_leaves})
        if i in config.get("attn_layer_idx", []):
            heads = attn["num_heads"]
            heads_kv = attn.get("num_heads_kv") or heads
            head_dim = attn.get("head_dim") or d // heads
            mlp_dim = math.ceil(attn.get("mlp_dim", 0) / 256) * 256
            qkv = head_dim * (heads + 2 * heads_kv)
            shapes[p + "mixer.in_proj.weight"] = (qkv + mlp_dim, d)
            if attn.get("qkv_proj_bias", True):
                shapes[p + "mixer.in_proj.bias"] = (qkv + mlp_dim,)
            if attn.get("d_conv", 0) > 0:
                shapes[p + "mixer.conv1d.weight"] = (qkv, 1, attn["d_conv"])
                shapes[p + "mixer.conv1d.bias"] = (qkv,)
            shapes[p + "mixer.out_proj.weight"] = (d, head_dim * heads + mlp_dim // 2)
            if attn.get("out_proj_bias", True):
                shapes[p + "mixer.out_proj.bias"] = (d,)
        elif ssm.get("layer", "Mamba1") == "Mamba1":
            di, n, w = ssm.get("expand", 2) * d, ssm.get("d_state", 16), ssm.get("d_conv", 4)
            r = ssm.get("dt_rank", "auto")
            r = math.ceil(d / 16) if r == "auto" else r
            shapes.update(
                {
                    p + "mixer.in_proj.weight": (2 * di, d),
                    p + "mixer.conv1d.weight": (di, 1, w),
                    p + "mixer.conv1d.bias": (di,),
                    p + "mixer.x_proj.weight": (r + 2 * n, di),
                    p + "mixer.dt_proj.weight": (di, r),
                    p + "mixer.dt_proj.bias": (di,),
                    p + "mixer.A_log": (di, n),
                    p + "mixer.D": (di,),
                    p + "mixer.out_proj.weight": (d, di),
                }
            )
        else:
            di, n, w = ssm.get("expand", 2) * d, ssm.get("d_state", 128), ssm.get("d_conv", 4)
            groups, heads = ssm.get("ngroups", 1), di // ssm.get("headdim", 64)
            conv_dim = di + 2 * groups * n
            shapes.update(
                {
                    p + "mixer.in_proj.weight": (2 * di + 2 * groups * n + heads, d),
                    p + "mixer.conv1d.weight": (conv_dim, 1, w),
                    p + "mixer.conv1d.bias": (conv_dim,),
                    p + "mixer.dt_bias": (heads,),
                    p + "mixer.A_log": (heads,),
                    p + "mixer.D": (heads,),
                    p + "mixer.norm.weight": (di,),
                    p + "mixer.out_proj.weight": (d, di),
                }
            )
        if config.get("d_intermediate", 0) > 0:
            hidden = (config["d_intermediate"] + 127) // 128 * 128
            shapes.update({f"{p}norm2.{leaf}": (d,) for leaf in norm_leaves})
            shapes[p + "mlp.fc1.weight"] = (2 * hidden, d)
            shapes[p + "mlp.fc2.weight"] = (d, hidden)
    return shapes


def write_transformers_mamba(directory: Path, seed: int = 0) -> Path:
    """A tied transformers Mamba checkpoint (config.json + model.safetensors, sizes MAMBA1, vocab VOCAB) with random
    tensors, written without torch."""
    config = {"model_type": "mamba", "architectures": ["MambaForCausalLM"], **MAMBA1, "vocab_size": VOCAB}
    mamba_ssm = {"d_model": 16, "n_layer": 2, "vocab_size": VOCAB, "pad_vocab_size_multiple": 1}
    shapes = mamba_ssm_shapes({**mamba_ssm, "ssm_cfg": {"d_state": 4, "d_conv": 3, "expand": 2, "dt_rank": 3}})
    del shapes["lm_head.weight"]  # tied: transformers does not save it
    rng = np.random.default_rng(seed)
    tensors = {
        name.replace(".embedding.", ".embeddings."): rng.standard_normal(shape).astype(np.float32)
        for name, shape in shapes.items()
    }
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def write_pickle_zip(path: Path, obj) -> Path:
    """A file in torch.save's zip layout whose data.pkl pickles ``obj`` (any object: e.g. a malicious one)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
        archive.writestr("archive/version", "3\n")
    return path
