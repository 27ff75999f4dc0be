"""What a source directory holds: which config dialect, which weight files, which tokenizer files.

Decided from the config's fields and the files present, never from the repository's name:

- state-spaces originals: a mamba_ssm ``config.json`` (``d_model``, ``n_layer``, ``ssm_cfg``, ...) and a
  ``pytorch_model.bin``; tensor names ``backbone.embedding.weight``, ``backbone.layers.{i}...``, ``lm_head.weight``.
- transformers (``MambaForCausalLM``, ``Mamba2ForCausalLM``, Codestral): a config with ``model_type`` "mamba" or
  "mamba2" and ``model.safetensors``, sharded safetensors with an index json, or ``pytorch_model.bin``; tensor names
  as the originals but ``backbone.embeddings.weight``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from convert.errors import ConversionError

MAMBA_SSM = "mamba_ssm"
TRANSFORMERS = "transformers"

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
# Weight files in order of preference: safetensors first (no pickle at all), then torch zip; an index json names shards.
WEIGHT_FILES = (
    "model.safetensors.index.json",
    SAFETENSORS_FILE,
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# Copied next to the converted weights when the source has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class Source:
    """A checkpoint directory, inspected: ``config`` is its raw config.json, ``weights`` one weight file or index."""

    directory: Path
    dialect: str
    config: dict
    weights: Path
    tokenizer_files: tuple[Path, ...]


def config_dialect(config: dict, where: Path) -> str:
    """MAMBA_SSM or TRANSFORMERS, from the config's fields."""
    if "d_model" in config and "n_layer" in config:
        return MAMBA_SSM
    if config.get("model_type") in ("mamba", "mamba2"):
        return TRANSFORMERS
    raise ConversionError(
        f"{where}: neither a mamba_ssm config (with d_model, n_layer) nor a transformers Mamba/Mamba2 config "
        f"(model_type 'mamba' or 'mamba2'); found model_type {config.get('model_type')!r}"
    )


def choose_weight_file(names: Iterable[str], where: str | Path) -> str:
    """The weight file (or index json) to read among the file ``names`` of a source, by ``WEIGHT_FILES`` order."""
    present = set(names)
    for name in WEIGHT_FILES:
        if name in present:
            return name
    raise ConversionError(f"{where}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")


def read_config(path: Path) -> dict:
    """A config.json as a dict, with one-line errors."""
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist: a checkpoint directory needs a {CONFIG_FILE}") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not valid json ({e})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path}: expected a json object, found {type(config).__name__}")
    return config


def inspect_source(directory: Path) -> Source:
    """Read ``directory``'s config, decide its dialect, pick its weight files and tokenizer files."""
    config = read_config(directory / CONFIG_FILE)
    dialect = config_dialect(config, directory / CONFIG_FILE)
    names = [p.name for p in directory.iterdir() if p.is_file()]
    weights = directory / choose_weight_file(names, directory)
    tokenizer = tuple(directory / name for name in TOKENIZER_FILES if (directory / name).is_file())
    return Source(directory, dialect, config, weights, tokenizer)
