"""Convert a published checkpoint (local directory or Hub repo id) into our Orbax checkpoint directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from convert.errors import ConversionError
from convert.formats import CONFIG_FILE, inspect_source
from convert.hub import resolve_source
from convert.pipeline import convert_tensors, model_config, plan_source, set_path
from convert.readers import Weights
from convert.verify import torch_config, verify
from convert.writer import check_destination, check_not_overlapping, is_converted, save_params, staged_directory

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def convert_checkpoint(
    src: str,
    dst: Path,
    *,
    dtype: str = "float32",
    revision: str | None = None,
    verify_logits: bool = False,
    force: bool = False,
    progress: bool = True,
) -> float | None:
    """Write ``dst`` (config.json, params/, tokenizer files) from the checkpoint ``src``.

    dtype: parameter dtype name (A_log and D stay float32). revision: Hub revision (repo ids only). verify_logits:
    compare with transformers in torch before committing ``dst``; returns the relative logits error then.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, found {dtype!r}")
    check_destination(dst, force)  # before any download
    directory = resolve_source(src, revision)
    if revision is not None and directory == Path(src).expanduser():
        raise ConversionError(f"--revision applies to Hub repo ids, but {src} is a local directory")
    check_not_overlapping(directory, dst)
    if is_converted(directory):
        raise ConversionError(
            f"{directory} looks like a checkpoint converted by python -m convert (config.json and params/): load it "
            "with mamba_jax.load_pretrained, or export it with python -m convert --to hf SRC DST"
        )
    source = inspect_source(directory)
    config = model_config(source)
    if verify_logits:
        torch_config(source, config)  # fail now, not after converting, if verification cannot run
    error = None
    host = jax.devices("cpu")[0]  # a CPU jax array, which Orbax writes with bounded copies (see save_params)
    with Weights([source.weights]) as weights:
        steps = plan_source(source, weights, config, DTYPES[dtype])
        with staged_directory(dst, force) as staging:
            params: dict = {}
            bar = tqdm(convert_tensors(weights, steps), total=len(steps), desc="converting", disable=not progress)
            for path, array in bar:
                set_path(params, path, jax.device_put(array, host))  # host memory; the numpy copy is dropped
            save_params(staging, params)
            del params
            config.to_json(staging / CONFIG_FILE)
            for file in source.tokenizer_files:
                shutil.copy2(file, staging / file.name)
            if verify_logits:
                error = verify(source, config, weights, steps, staging)
    return error
