"""``load_pretrained``: a ready ``MambaLMHeadModel`` from a checkpoint converted by ``python -m convert``, or straight
from a published one (converted in memory).

Parameters are placed as they are read: the model is built abstractly, each parameter's sharding comes from its
logical axes (``mamba_jax.sharding``), and Orbax restores every array directly into that sharding. Arrays are stored
in chunks of at most 8 MiB (``convert.writer``), and each device reads the chunks that overlap its shards (along the
arrays' largest dimension: an FSDP shard of d_model can span them all).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from convert.errors import ConversionError, first_line
from convert.formats import CONFIG_FILE, inspect_source
from convert.hub import resolve_source
from convert.pipeline import ParamPath, abstract_model, convert_tensors, model_config, plan_source, set_path
from convert.readers import Weights
from convert.writer import PARAMS_DIR, is_converted
from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import LOGICAL_AXIS_RULES, MeshAxes, state_shardings
from pallas_kernels.mamba_step.api import IMPLEMENTATIONS as STEP_IMPLEMENTATIONS
from pallas_kernels.selective_scan.api import IMPLEMENTATIONS as SCAN_IMPLEMENTATIONS
from pallas_kernels.ssd.api import IMPLEMENTATIONS as SSD_IMPLEMENTATIONS

EMBEDDING_PATH = "backbone.embedding.embedding"


def read_config(directory: Path) -> MambaConfig:
    """The MambaConfig of one of our converted checkpoints."""
    try:
        return MambaConfig.from_json(directory / CONFIG_FILE)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{directory / CONFIG_FILE}: {e}") from None


def check_array_stores(params_dir: Path) -> None:
    """ConversionError naming the first array whose zarr store, or a chunk of it, is missing from an Orbax checkpoint
    written one store per array (as ``convert.writer`` does; a partial copy loses files). Orbax's own reads, when a
    store or chunk is missing, fail part-way and leave tensorstore callbacks behind that fire on a closed event loop
    (hundreds of lines after the error); this check runs before any of them."""
    try:
        index = json.loads((params_dir / "_METADATA").read_text())
        tree, ocdbt = index["tree_metadata"], index.get("use_ocdbt", False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(
            f"{params_dir}: incomplete Orbax checkpoint (cannot read _METADATA: {first_line(e)})"
        ) from None
    if ocdbt:  # one database for all arrays: nothing per array to look for
        return
    for entry in tree.values():
        name = ".".join(str(k["key"]) for k in entry["key_metadata"])
        store = params_dir / name
        if not ((store / ".zarray").is_file() or (store / "zarr.json").is_file()):
            raise ConversionError(f"{params_dir}: incomplete Orbax checkpoint (array {name} missing)")
        if (store / ".zarray").is_file() and (chunk := missing_chunk(store)) is not None:
            raise ConversionError(f"{params_dir}: incomplete Orbax checkpoint (array {name}: chunk {chunk} missing)")


def missing_chunk(store: Path) -> str | None:
    """The key of the first chunk file that a zarr v2 array store lacks (Orbax writes every chunk), or None."""
    try:
        meta = json.loads((store / ".zarray").read_text())
        shape, chunks = meta["shape"], meta["chunks"]
        separator = meta.get("dimension_separator") or "."
        counts = [math.ceil(size / chunk) for size, chunk in zip(shape, chunks, strict=True)]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{store / '.zarray'}: unreadable zarr metadata ({first_line(e)})") from None
    for index in itertools.product(*(range(count) for count in counts)):
        key = separator.join(map(str, index)) if index else "0"
        if not (store / key).is_file():
            return key
    return None


def stored_params(directory: Path) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every array of a converted checkpoint, by dotted path (read from Orbax metadata)."""
    check_array_stores(directory / PARAMS_DIR)
    checkpointer = ocp.StandardCheckpointer()
    try:
        metadata = checkpointer.metadata((directory / PARAMS_DIR).absolute()).item_metadata
    except (OSError, ValueError) as e:
        raise ConversionError(f"{directory}: cannot read the checkpoint's metadata ({first_line(e)})") from None
    finally:
        checkpointer.close()
    if metadata is None:  # Orbax returns None when an array's metadata is missing
        raise ConversionError(f"{directory / PARAMS_DIR}: incomplete Orbax checkpoint (array metadata missing)")
    tree = metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        ".".join(str(getattr(k, "key", k)) for k in path): jax.ShapeDtypeStruct(tuple(m.shape), m.dtype)
        for path, m in flat
    }


def placements(params: nnx.State, mesh: Mesh | None, rules: Mapping[str, MeshAxes] | None) -> dict[ParamPath, Sharding]:
    """Where each parameter goes: its NamedSharding on ``mesh`` from its logical axes, or the first device."""
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return {path: device for path, _ in nnx.to_flat_state(params)}
    return dict(nnx.to_flat_state(state_shardings(params, mesh, LOGICAL_AXIS_RULES if rules is None else rules)))


def restore_params(directory: Path, params: nnx.State, placement: dict[ParamPath, Sharding]) -> dict:
    """Restore a converted checkpoint into the abstract parameter state ``params`` (its shapes and dtypes), each
    array straight into its ``placement``; the checkpoint's names and shapes are checked first. Returns the nested
    pure dict of arrays (the ``nnx.to_pure_dict`` form)."""
    stored = stored_params(directory)
    expected = {".".join(map(str, path)): var.get_value() for path, var in nnx.to_flat_state(params)}
    if set(stored) != set(expected):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise ConversionError(
            f"{directory}: the checkpoint's parameters do not fit its config: missing {missing[:3]}, extra {extra[:3]}"
        )
    for name, want in expected.items():
        if stored[name].shape != want.shape:
            raise ConversionError(
                f"{directory}: parameter {name} has shape {stored[name].shape}, the config needs {want.shape}"
            )
    target: dict = {}
    for path, var in nnx.to_flat_state(params):
        value = var.get_value()
        set_path(target, path, jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=placement[path]))
    checkpointer = ocp.StandardCheckpointer()
    try:
        return checkpointer.restore((directory / PARAMS_DIR).absolute(), target)
    except Exception as e:  # Orbax raises bare Exceptions for missing or corrupt array files
        raise ConversionError(f"{directory}: cannot read the parameters ({first_line(e)})") from None
    finally:
        checkpointer.close()


def _floating_dtype(name: str, dtype):
    """None, or ``dtype`` as a floating jnp.dtype; ValueError naming the argument otherwise."""
    if dtype is None:
        return None
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"load_pretrained: {name} must be a floating dtype, found {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"load_pretrained: {name} must be a floating dtype, found {dtype}")
    return dtype


def _compute_dtype(compute_dtype, param_dtype):
    """The explicit compute dtype, else the parameter dtype when it is 16-bit, else None (float32 activations)."""
    if compute_dtype is not None:
        return compute_dtype
    return param_dtype if jnp.dtype(param_dtype).itemsize == 2 else None


def placed_model(config: MambaConfig, dtype, compute_dtype, mesh, rules, implementations: dict):
    """(graphdef, abstract parameter state, placement) of the model to load. Where the placement splits a parameter
    over devices and no decode step was asked for, the step is XLA's ("reference"): the fused step's kernels take
    whole weights, so every device would gather every layer's weights at every token, where XLA partitions its
    products over the shards."""
    model = abstract_model(config, dtype, compute_dtype, **implementations)
    graphdef, params = nnx.split(model, nnx.Param)
    placement = placements(params, mesh, rules)
    split = any(not sharding.is_fully_replicated for sharding in placement.values())
    if split and implementations["step_implementation"] is None:
        model = abstract_model(config, dtype, compute_dtype, **(implementations | {"step_implementation": "reference"}))
        graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, placement


def _convert_in_memory(source_arg: str, dtype, compute_dtype, mesh, rules, implementations) -> MambaLMHeadModel:
    """Convert a source (directory or Hub repo id) tensor by tensor, placing each on its devices as it comes."""
    source = inspect_source(resolve_source(source_arg))
    config = model_config(source)
    graphdef, params, placement = placed_model(
        config, dtype, _compute_dtype(compute_dtype, dtype), mesh, rules, implementations
    )
    arrays: dict = {}
    with Weights([source.weights]) as weights:
        for path, array in convert_tensors(weights, plan_source(source, weights, config, dtype)):
            set_path(arrays, path, jax.device_put(array, placement[path]))
    nnx.replace_by_pure_dict(params, arrays)
    return nnx.merge(graphdef, params)


def load_pretrained(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype=None,
    compute_dtype=None,
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] | None = None,
    scan_implementation: str | None = None,
    ssd_implementation: str | None = None,
    step_implementation: str | None = None,
) -> MambaLMHeadModel:
    """A ready ``MambaLMHeadModel`` with pretrained weights.

    path_or_repo_id: a directory written by ``python -m convert``; or anything that command accepts as a source (a
      mamba_ssm or transformers checkpoint directory, or a Hugging Face Hub repo id), converted in memory.
    dtype: the parameter dtype (A_log and D stay float32, as in mamba_ssm). None: the converted checkpoint's dtype,
      or float32 for an in-memory conversion.
    compute_dtype: the activations' dtype (``MambaLMHeadModel(dtype=...)``). None: the parameter dtype when that is
      16-bit (a bf16 / fp16 checkpoint runs in bf16 / fp16, as in mamba_ssm), else float32.
    mesh, rules: place every parameter by its logical axes on ``mesh`` with ``rules`` (default
      ``mamba_jax.sharding.LOGICAL_AXIS_RULES``); each device reads the chunks overlapping its shards. No mesh:
      the first device.
    scan_implementation, ssd_implementation, step_implementation: as ``MambaLMHeadModel``'s (the Mamba-1 scan's, the
      Mamba-2 SSD's, and the decode step's: ``pallas_kernels.mamba_step`` / ``mamba2_step``); None: the platform's
      best, but the decode step XLA's where ``mesh`` splits parameters over devices (``placed_model``).
    """
    dtype = _floating_dtype("dtype", dtype)
    compute_dtype = _floating_dtype("compute_dtype", compute_dtype)
    if mesh is not None and not isinstance(mesh, Mesh):
        raise ValueError(f"load_pretrained: mesh must be a jax.sharding.Mesh, found {type(mesh).__name__}")
    implementations = {
        "scan_implementation": scan_implementation,
        "ssd_implementation": ssd_implementation,
        "step_implementation": step_implementation,
    }
    for name, value, allowed in (
        ("scan_implementation", scan_implementation, SCAN_IMPLEMENTATIONS),
        ("ssd_implementation", ssd_implementation, SSD_IMPLEMENTATIONS),
        ("step_implementation", step_implementation, STEP_IMPLEMENTATIONS),
    ):
        if value is not None and value not in allowed:
            raise ValueError(f"load_pretrained: {name} must be None or one of {allowed}, found {value!r}")
    directory = Path(path_or_repo_id).expanduser()
    if not is_converted(directory):
        dtype = jnp.dtype(jnp.float32) if dtype is None else dtype
        return _convert_in_memory(os.fspath(path_or_repo_id), dtype, compute_dtype, mesh, rules, implementations)
    config = read_config(directory)
    if dtype is None:
        stored = stored_params(directory)
        dtype = stored[EMBEDDING_PATH].dtype if EMBEDDING_PATH in stored else jnp.float32
    graphdef, params, placement = placed_model(
        config, dtype, _compute_dtype(compute_dtype, dtype), mesh, rules, implementations
    )
    restored = restore_params(directory, params, placement)
    nnx.replace_by_pure_dict(params, restored)
    return nnx.merge(graphdef, params)
