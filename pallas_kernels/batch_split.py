"""Run a kernel on each device's share of the batch inside a sharded jit.

A Pallas kernel is a custom call that XLA's partitioner cannot look into: left alone it gathers the kernel's operands
and every device runs the whole kernel. Where the rows of the batch are independent (the selective scan, its backward,
a decode step) that is wasted work and memory. ``over_batch`` wraps such a function in
``jax.experimental.custom_partitioning`` with one rule: the leading (batch) dimension of every batched operand and of
every result keeps the operands' split over the mesh; all other dimensions, and the operands without a batch
dimension (weights, per-channel parameters), are whole on every device. Each device then runs the function on its
rows, with no collective. On one device, or outside jit, the function runs as written; so does a function with side
effects (Pallas's Mosaic GPU interpreter uses callbacks), which custom_partitioning cannot take.

Under a mesh of Explicit axes (``jax.make_mesh``'s default, with ``jax.set_mesh``) the shardings are part of the
arrays' types and Pallas refuses sharded operands while tracing, before any partitioner runs. There the same split
is written out: the operands are resharded to the rule's shardings and the function runs under ``jax.shard_map``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

logger = logging.getLogger("pallas_kernels")


def over_batch(fn: Callable[..., Any], args: Sequence[jax.Array], batched: Sequence[bool]) -> Any:
    """``fn(*args)``, partitioned over dimension 0 of the arrays marked in ``batched`` and of every result.

    fn: a function of arrays returning a pytree of arrays (a tuple, a dict), each with the batch as its leading
      dimension, whose rows depend only on the same rows of the batched operands (so it gives the same rows on any
      slice of the batch).
    args: the arrays (no None); batched: one bool per array, True where its dimension 0 is the batch.
    """
    if len(args) != len(batched):
        raise ValueError(f"over_batch: {len(args)} arrays but {len(batched)} batched flags")
    ranks = [arg.ndim for arg in args]
    if not any(batched) or any(rank == 0 for rank, flag in zip(ranks, batched, strict=True) if flag):
        raise ValueError("over_batch: needs at least one batched operand, each with a leading batch dimension")
    batch = args[batched.index(True)].shape[0]
    # Traced without the operands' shardings: an explicitly sharded operand would fail in a Pallas kernel here.
    traced, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    if traced.effects:
        # Side effects (the Mosaic GPU interpreter's callbacks) cannot go through custom_partitioning: run unsplit.
        return fn(*args)
    out_leaves, out_tree = jax.tree.flatten(out_shapes)
    out_ranks = [out.ndim for out in out_leaves]

    def layout(axes: tuple[str, ...], wrap: Callable[[PartitionSpec], Any]):
        """(one spec per operand, the results' tree of specs): dimension 0 split over ``axes`` where batched, all
        else whole; ``wrap`` turns a PartitionSpec into what the caller needs."""
        split, whole = wrap(PartitionSpec(axes or None)), wrap(PartitionSpec())
        return tuple(split if flag else whole for flag in batched), out_tree.unflatten([split] * len(out_ranks))

    explicit = _explicit_batch_axes(args[batched.index(True)], batch)
    if explicit is not None:
        mesh, axes = explicit
        in_specs, out_specs = layout(axes, lambda spec: spec)
        args = [jax.sharding.reshard(arg, spec) for arg, spec in zip(args, in_specs, strict=True)]
        # check_vma=False: a pallas_call states no varying mesh axes for its outputs.
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)

    def factors(index: int, rank: int, leading_batch: bool) -> str:
        names = [f"d{index}_{axis}" for axis in range(rank)]
        if leading_batch:
            names[0] = "b"
        return " ".join(names)

    operands = [factors(i, rank, flag) for i, (rank, flag) in enumerate(zip(ranks, batched, strict=True))]
    results = [factors(len(ranks) + i, rank, True) for i, rank in enumerate(out_ranks)]
    others = [name for spec in operands + results for name in spec.split() if name != "b"]

    def batch_axes(mesh, arg_shapes) -> tuple[str, ...]:
        """The mesh axes that split the batch of the first batched operand, if they divide it evenly."""
        sharding = arg_shapes[batched.index(True)].sharding
        if not isinstance(sharding, NamedSharding):
            return ()
        return _dividing(_leading_axes(sharding.spec), mesh, batch)

    def shardings(mesh, axes):
        return layout(axes, lambda spec: NamedSharding(mesh, spec))

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, batch_axes(mesh, arg_shapes))[1]

    def partition(mesh, arg_shapes, result_shape):
        axes = batch_axes(mesh, arg_shapes)
        logger.debug(
            "over_batch: %s on each device's rows, the batch split over %s",
            getattr(fn, "__name__", fn),
            axes or "nothing",
        )
        arg_shardings, result_shardings = shardings(mesh, axes)
        return mesh, fn, result_shardings, arg_shardings

    wrapped = custom_partitioning(fn)
    wrapped.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=f"{', '.join(operands)} -> {', '.join(results)}",
        need_replication_factors=tuple(others),
    )
    return wrapped(*args)


def _leading_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """The mesh axes of ``spec``'s dimension 0 (none where it has no entry)."""
    entry = spec[0] if len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _dividing(axes: tuple[str, ...], mesh, batch: int) -> tuple[str, ...]:
    """``axes`` if their sizes on ``mesh`` divide ``batch`` evenly, else () (the batch stays whole)."""
    return axes if batch % math.prod(mesh.shape[axis] for axis in axes) == 0 else ()


def _explicit_batch_axes(x: jax.Array, batch: int):
    """(mesh, the Explicit mesh axes splitting x's dimension 0 where they divide ``batch``) where x's type carries an
    Explicit sharding, else None (Auto axes, one device, no mesh)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    explicit = [name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True) if kind == AxisType.Explicit]
    axes = tuple(axis for axis in _leading_axes(sharding.spec) if axis in explicit)
    return mesh, _dividing(axes, mesh, batch)
