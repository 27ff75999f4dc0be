"""From a source checkpoint to our parameters, one tensor at a time.

1. ``model_config``: the source's config.json -> MambaConfig.
2. ``abstract_params``: the parameter tree of ``MambaLMHeadModel(config)``, built abstractly (no memory).
3. ``plan``: every source tensor matched to one parameter through ``keymap``, names, dtypes and shapes checked
   before any tensor data is read: nothing missing, nothing unexpected (but ``lm_head.weight`` of a tied model, which
   must equal the embedding), every dtype a float one, every shape as the config says.
4. ``convert_tensors``: read, re-lay out and cast each tensor in turn, so host memory holds about one copy of the
   converted parameters plus one source tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from convert import keymap
from convert.errors import ConversionError
from convert.formats import CONFIG_FILE, TRANSFORMERS, Source
from convert.readers import Weights
from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel

# A path in nnx.state(model, nnx.Param), e.g. ("backbone", "layers", 0, "norm", "weight").
ParamPath = tuple[str | int, ...]

LM_HEAD = "lm_head.weight"
EMBEDDING = "backbone.embedding.weight"
# Source tensors must hold real floating-point numbers (cast to the parameter dtype on conversion).
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def model_config(source: Source) -> MambaConfig:
    """The MambaConfig of a source (mamba_ssm or transformers config.json)."""
    try:
        return MambaConfig.from_dict(source.config)
    except ValueError as e:
        raise ConversionError(f"{source.directory / CONFIG_FILE}: {e}") from None


def abstract_model(config: MambaConfig, param_dtype, compute_dtype=None, **implementations) -> MambaLMHeadModel:
    """``MambaLMHeadModel(config)`` with abstract parameters (shapes and dtypes only, no memory); ``implementations``
    (scan_implementation, step_implementation) go to the model."""
    try:
        return nnx.eval_shape(
            lambda: MambaLMHeadModel(
                config, rngs=nnx.Rngs(0), dtype=compute_dtype, param_dtype=param_dtype, **implementations
            )
        )
    except (ValueError, NotImplementedError) as e:
        raise ConversionError(f"cannot build a model for this config: {e}") from None


def abstract_params(config: MambaConfig, param_dtype) -> dict[str, tuple[ParamPath, jax.ShapeDtypeStruct]]:
    """Our parameters by dotted path: (path, shape and dtype). A_log and D are float32 whatever ``param_dtype``."""
    params = nnx.state(abstract_model(config, param_dtype), nnx.Param)
    return {".".join(map(str, path)): (path, var.get_value()) for path, var in nnx.to_flat_state(params)}


@dataclass(frozen=True)
class Step:
    """Convert source tensor ``source`` with ``hook`` and cast it to ``dtype``: parameter ``path``."""

    source: str
    path: ParamPath
    hook: keymap.Hook
    dtype: np.dtype


def _shape_through(hook, shape: tuple[int, ...], to_ours: bool) -> tuple[int, ...]:
    """The shape a hook gives an array of ``shape``, computed on a zero-stride dummy (no memory)."""
    dummy = np.broadcast_to(np.zeros((), np.float32), shape)
    return (hook.to_ours if to_ours else hook.to_torch)(dummy).shape


def _listing(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def check_dtype(weights: Weights, name: str) -> None:
    """Refuse a tensor that is not of one of ``FLOAT_DTYPES`` (integers, complex, float8 ...)."""
    dtype = weights.dtype(name)
    if dtype not in FLOAT_DTYPES:
        raise ConversionError(
            f"{weights.file_of(name)}: tensor '{name}' has dtype {dtype}; expected one of {', '.join(FLOAT_DTYPES)}"
        )


def plan(
    weights: Weights, dialect: str, targets: dict[str, tuple[ParamPath, jax.ShapeDtypeStruct]], tied: bool
) -> list[Step]:
    """Match every tensor of ``weights`` to one of ``targets``; raise on anything missing, unexpected or misshapen."""
    steps: dict[str, Step] = {}
    unexpected = []
    for name in weights.names:
        canonical = keymap.from_transformers_name(name) if dialect == TRANSFORMERS else name
        mapped = keymap.to_ours(canonical)
        if mapped is None or mapped[0] not in targets:
            if not (tied and canonical == LM_HEAD):
                unexpected.append(name)
            continue
        dotted, hook = mapped
        path, target = targets[dotted]
        if dotted in steps:
            raise ConversionError(f"tensors '{steps[dotted].source}' and '{name}' both map to parameter {dotted}")
        check_dtype(weights, name)
        try:
            shape = _shape_through(hook, weights.shape(name), to_ours=True)
        except ConversionError as e:
            raise ConversionError(f"{weights.file_of(name)}: tensor '{name}': {e}") from None
        if shape != target.shape:
            expected = _shape_through(hook, target.shape, to_ours=False)
            raise ConversionError(
                f"{weights.file_of(name)}: tensor '{name}' has shape {weights.shape(name)}, but the config "
                f"needs {expected} (parameter {dotted} {target.shape})"
            )
        steps[dotted] = Step(name, path, hook, np.dtype(target.dtype))
    if unexpected:
        raise ConversionError(f"unexpected tensors that no parameter of this config takes: {_listing(unexpected)}")
    missing = [f"{keymap.to_source(dotted)[0]} (parameter {dotted})" for dotted in targets if dotted not in steps]
    if missing:
        raise ConversionError(f"tensors missing from the checkpoint: {_listing(missing)}")
    return list(steps.values())


def check_tied_head(weights: Weights, embedding: str) -> None:
    """A tied model's checkpoint may carry ``lm_head.weight``; if so it must equal the embedding exactly."""
    if LM_HEAD not in weights.names:
        return
    check_dtype(weights, LM_HEAD)
    head, table = weights.read(LM_HEAD), weights.read(embedding)
    if head.shape != table.shape or not np.array_equal(head, table):
        raise ConversionError(
            f"{weights.file_of(LM_HEAD)}: the config ties the embeddings, but '{LM_HEAD}' {head.shape} differs from "
            f"'{embedding}' {table.shape}; set tie_embeddings false (tie_word_embeddings in transformers) if untied"
        )


def plan_source(source: Source, weights: Weights, config: MambaConfig, param_dtype) -> list[Step]:
    """``plan`` for a source directory, including the tied-head check."""
    targets = abstract_params(config, param_dtype)
    steps = plan(weights, source.dialect, targets, config.tie_embeddings)
    if config.tie_embeddings:
        embedding = keymap.to_transformers_name(EMBEDDING) if source.dialect == TRANSFORMERS else EMBEDDING
        check_tied_head(weights, embedding)
    return steps


def convert_tensors(weights: Weights, steps: list[Step]) -> Iterator[tuple[ParamPath, np.ndarray]]:
    """(path, array in our layout and dtype) for each step, reading one source tensor at a time."""
    for step in steps:
        array = step.hook.to_ours(weights.read(step.source))
        yield step.path, np.ascontiguousarray(array.astype(step.dtype, copy=False))


def set_path(tree: dict, path: ParamPath, value) -> None:
    """tree[p0][p1]...[pn] = value, creating the inner dicts (the nested form of ``nnx.to_pure_dict``)."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
