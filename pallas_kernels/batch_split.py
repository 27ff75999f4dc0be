"""Run a kernel on each device's share of the batch inside a sharded jit.

A Pallas kernel is a custom call that XLA's partitioner cannot look into: left alone it gathers the kernel's operands
and every device runs the whole kernel. Where the rows of the batch are independent (the selective scan, its backward,
a decode step) that is wasted work and memory. ``over_batch`` wraps such a function in
``jax.experimental.custom_partitioning`` with one rule: the leading (batch) dimension of every batched operand and of
every result keeps the operands' split over the mesh; all other dimensions, and the operands without a batch
dimension (weights, per-channel parameters), are whole on every device. Each device then runs the function on its
rows, with no collective. In a process with one device the function runs as written (so jax.vmap over it works:
custom_partitioning has no batching rule); so does a function with side effects (Pallas's Mosaic GPU interpreter uses
callbacks), which custom_partitioning cannot take.

Where the channels are independent too (the selective scan's: tensor parallelism splits d_inner), a ``ChannelSplit``
names each operand's and result's channel dimension, and those keep the operands' split over other mesh axes as
well: each device runs the function on its rows and its channels. Per-channel weights are then split with them;
operands without channels (B and C) stay whole.

Under a mesh of Explicit axes (``jax.make_mesh``'s default, with ``jax.set_mesh``) the shardings are part of the
arrays' types and Pallas refuses sharded operands while tracing, before any partitioner runs. There the same split
is written out: the operands are resharded to the rule's shardings and the function runs under ``jax.shard_map``.

On Auto axes the split is known only once XLA partitions the program, and for every call site it asks
custom_partitioning's rule, JAX lowers the function again: twice a layer (forward, backward) in a training step, which
made a 48-layer Mamba-1 step compile 4x longer on 2 GPUs than on one. Whoever knows where the batch goes can say so
while tracing: inside ``split_over(mesh, batch=..., channels=...)`` the function runs under ``jax.shard_map`` on those
axes, lowered once with the rest of the program (``mamba_jax``'s training step enters it from its sharding rules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger("pallas_kernels")


@dataclasses.dataclass(frozen=True)
class MeshSplit:
    """Where a traced program's batch and channels are split on a mesh of Auto axes (``split_over``).

    mesh: the program's mesh. batch: the mesh axes splitting the batch (dimension 0 of every batched operand). channels:
      the mesh axes splitting the channels of a function given a ``ChannelSplit`` (tensor parallelism), else unused.
    """

    mesh: Mesh
    batch: tuple[str, ...]
    channels: tuple[str, ...] = ()


# A jit-cache-sensitive context (jax.make_user_context): a function traced inside split_over is traced again outside
# it, or inside another, instead of reusing a trace that put the kernels on another mesh or none.
_SPLIT = jax.make_user_context(None)


@contextlib.contextmanager
def split_over(mesh: Mesh, batch: Sequence[str] = (), channels: Sequence[str] = ()) -> Iterator[MeshSplit]:
    """While tracing inside this context, ``over_batch`` runs its function under ``jax.shard_map`` on ``mesh``: the
    batch split over the ``batch`` axes (those that divide it), the channels over ``channels``, instead of leaving
    the split to a custom_partitioning rule (lowered again at every call site when XLA partitions; see the module's
    docstring). Operands sharded otherwise are resharded to that split by XLA, so results never depend on it.
    Axes absent from ``mesh``, or named twice, are a ValueError. JAX's caches of traced and compiled functions tell
    the contexts apart (a function jitted inside and outside it is traced for each).
    """
    names = (*batch, *channels)
    unknown = [name for name in names if name not in mesh.shape]
    if unknown or len(set(names)) != len(names):
        raise ValueError(
            f"split_over: batch {tuple(batch)} and channels {tuple(channels)} must be distinct axes of the mesh "
            f"{dict(mesh.shape)}"
        )
    split = MeshSplit(mesh, tuple(batch), tuple(channels))
    with _SPLIT(split):
        yield split


def current_split() -> MeshSplit | None:
    """The innermost ``split_over`` in force, or None."""
    return _SPLIT.value


@dataclasses.dataclass(frozen=True)
class ChannelSplit:
    """Where a function's channels are, for ``over_batch`` to split them too (tensor parallelism).

    operands: per operand, the dimension holding its channels, or None (whole on every device). results: a function
      of the results' pytree of shapes returning the same tree of such dimensions (a channel dimension of a result may
      count blocks of channels rather than channels). unit: a device's share of the first channel operand's channels
      must be a multiple of it (the kernels' blocks of channels), and every channel dimension must divide evenly.
    """

    operands: Sequence[int | None]
    results: Callable[[Any], Any]
    unit: int = 1


def over_batch(
    fn: Callable[..., Any],
    args: Sequence[jax.Array],
    batched: Sequence[bool | int],
    channels: ChannelSplit | None = None,
) -> Any:
    """``fn(*args)``, partitioned over the batch dimension of the arrays marked in ``batched`` and dimension 0 of every
    result, and with ``channels`` also over their channel dimensions.

    fn: a function of arrays returning a pytree of arrays (a tuple, a dict), each with the batch as its leading
      dimension, whose rows depend only on the same rows of the batched operands (so it gives the same rows on any
      slice of the batch); with ``channels``, likewise each channel (or block of channels) of a result only on the
      same channels of the operands that have them.
    args: the arrays (no None); batched: one entry per array: True where its dimension 0 is the batch, an int where
      another dimension is (partial sums (parts, b, d)), False where it has none.
    """
    args = tuple(args)  # the partitioner reads them later: a caller's list may change
    if jax.device_count() == 1:
        # Nothing to split; and custom_partitioning has no batching or differentiation rule, which jax.vmap over
        # the caller, or a second derivative of it, needs.
        return fn(*args)
    if len(args) != len(batched) or (channels is not None and len(channels.operands) != len(args)):
        raise ValueError(f"over_batch: {len(args)} arrays but {len(batched)} batched flags or channel dimensions")
    # the batch dimension of each operand, or None
    batch_dims = tuple((0 if flag else None) if isinstance(flag, bool | np.bool_) else int(flag) for flag in batched)
    if all(dim is None for dim in batch_dims) or any(
        dim is not None and not 0 <= dim < arg.ndim for arg, dim in zip(args, batch_dims, strict=True)
    ):
        raise ValueError("over_batch: needs at least one batched operand, each with its batch dimension in range")
    first = next(i for i, dim in enumerate(batch_dims) if dim is not None)
    batch = args[first].shape[batch_dims[first]]
    # Traced without the operands' shardings: an explicitly sharded operand would fail in a Pallas kernel here.
    traced, out_shapes = jax.make_jaxpr(fn, return_shape=True)(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    if traced.effects:
        # Side effects (the Mosaic GPU interpreter's callbacks) cannot go through custom_partitioning: run unsplit.
        return fn(*args)
    out_leaves, out_tree = jax.tree.flatten(out_shapes)
    arg_channels = list(channels.operands) if channels else [None] * len(args)
    out_channels = out_tree.flatten_up_to(channels.results(out_shapes)) if channels else [None] * len(out_leaves)
    sizes = [a.shape[c] for a, c in zip(args, arg_channels, strict=True) if c is not None]
    sizes += [out.shape[c] for out, c in zip(out_leaves, out_channels, strict=True) if c is not None]
    # The channels as Shardy factors: c counts the smallest channel dimension's entries (blocks of channels, where a
    # result has such a dimension), a larger one is c times a factor mR of its R channels per block, so that
    # splitting c splits every channel dimension alike. With a single block nothing can split them.
    blocks = min(sizes, default=1)
    if blocks == 1 or any(size % blocks for size in sizes):
        arg_channels, out_channels, sizes = [None] * len(args), [None] * len(out_leaves), []
    per_block = {f"m{size // blocks}": size // blocks for size in sizes if size != blocks}
    # (shape, batch dimension or None, channel dimension) of every operand, then of every result
    tensors = [(a.shape, dim, c) for a, dim, c in zip(args, batch_dims, arg_channels, strict=True)]
    tensors += [(out.shape, 0, c) for out, c in zip(out_leaves, out_channels, strict=True)]
    # The operand whose split decides the channels' (the first batched one with channels), as args[first] the batch's.
    lead = next(
        (i for i, (dim, c) in enumerate(zip(batch_dims, arg_channels, strict=True)) if None not in (dim, c)), None
    )

    def split_channels(mesh, axes: tuple[str, ...], batch_axes: tuple[str, ...]) -> tuple[str, ...]:
        """``axes`` where they split every channel dimension evenly, the lead operand's in shares of whole units,
        and do not split the batch; else () (channels whole)."""
        count = math.prod(mesh.shape[axis] for axis in axes)
        if not axes or set(axes) & set(batch_axes) or any(size % count for size in sizes):
            return ()
        return axes if (args[lead].shape[arg_channels[lead]] // count) % channels.unit == 0 else ()

    def layout(batch_axes: tuple[str, ...], channel_axes: tuple[str, ...], wrap: Callable[[PartitionSpec], Any]):
        """(one spec per operand, the results' tree of specs): the batch dimensions split over ``batch_axes``, the
        channel dimensions over ``channel_axes``, all else whole; ``wrap`` turns a PartitionSpec into what the
        caller needs."""

        def spec(rank: int, batch_dim: int | None, channel: int | None):
            entries = [None] * rank
            if batch_dim is not None and batch_axes:
                entries[batch_dim] = batch_axes
            if channel is not None and channel_axes:
                entries[channel] = channel_axes
            return wrap(PartitionSpec(*entries))

        specs = [spec(len(shape), batch_dim, channel) for shape, batch_dim, channel in tensors]
        return tuple(specs[: len(args)]), out_tree.unflatten(specs[len(args) :])

    def under_shard_map(mesh, batch_axes: tuple[str, ...], channel_axes: tuple[str, ...], reshard: bool):
        """``fn`` under jax.shard_map with the rule's split, lowered once with the caller's program; ``reshard``
        first puts the operands in that split (Explicit axes, where the shardings are the arrays' types)."""
        in_specs, out_specs = layout(batch_axes, channel_axes, lambda spec: spec)
        operands = [jax.sharding.reshard(a, s) for a, s in zip(args, in_specs, strict=True)] if reshard else args
        logger.debug(
            "over_batch: %s under shard_map, the batch split over %s, the channels over %s",
            getattr(fn, "__name__", fn),
            batch_axes or "nothing",
            channel_axes or "nothing",
        )
        # check_vma=False: a pallas_call states no varying mesh axes for its outputs.
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*operands)

    explicit = _explicit_axes(args[first], batch, batch_dims[first])
    if explicit is not None:
        mesh, batch_axes = explicit
        lead_axes = None if lead is None else _explicit_axes(args[lead], None, arg_channels[lead])
        channel_axes = () if lead_axes is None else split_channels(mesh, lead_axes[1], batch_axes)
        return under_shard_map(mesh, batch_axes, channel_axes, reshard=True)
    split = current_split()
    if split is not None and split.mesh.size > 1:
        batch_axes = _dividing(split.batch, split.mesh, batch)
        channel_axes = () if lead is None else split_channels(split.mesh, split.channels, batch_axes)
        return under_shard_map(split.mesh, batch_axes, channel_axes, reshard=False)

    def factors(index: int, shape: tuple[int, ...], batch_dim: int | None, channel: int | None) -> str:
        """One tensor's Shardy factors: b for the batch, c or (c mR) for its channels, and one factor of its own for
        every other dimension."""
        names = [f"d{index}_{axis}" for axis in range(len(shape))]
        if batch_dim is not None:
            names[batch_dim] = "b"
        if channel is not None:
            names[channel] = "c" if shape[channel] == blocks else f"(c m{shape[channel] // blocks})"
        return " ".join(names)

    specs = [factors(i, *tensor) for i, tensor in enumerate(tensors)]
    operands, results = specs[: len(args)], specs[len(args) :]
    # every other factor, in the rule's order (Shardy wants them sorted so)
    names = [name.strip("()") for spec in specs for name in spec.split()]
    whole = [name for name in dict.fromkeys(names) if name not in ("b", "c")]

    def axes_of(mesh, arg_shapes):
        """(batch axes, channel axes) from the shardings of the first batched operand and of the lead one."""
        sharding = arg_shapes[first].sharding
        if not isinstance(sharding, NamedSharding):
            return (), ()
        batch_axes = _dividing(_axes_at(sharding.spec, batch_dims[first]), mesh, batch)
        if lead is None or not isinstance(arg_shapes[lead].sharding, NamedSharding):
            return batch_axes, ()
        channel_axes = _axes_at(arg_shapes[lead].sharding.spec, arg_channels[lead])
        return batch_axes, split_channels(mesh, channel_axes, batch_axes)

    def shardings(mesh, axes):
        return layout(*axes, lambda spec: NamedSharding(mesh, spec))

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, axes_of(mesh, arg_shapes))[1]

    def partition(mesh, arg_shapes, result_shape):
        axes = axes_of(mesh, arg_shapes)
        logger.debug(
            "over_batch: %s on each device's share, the batch split over %s, the channels over %s",
            getattr(fn, "__name__", fn),
            axes[0] or "nothing",
            axes[1] or "nothing",
        )
        arg_shardings, result_shardings = shardings(mesh, axes)
        return mesh, fn, result_shardings, arg_shardings

    wrapped = custom_partitioning(fn)
    wrapped.def_partition(
        partition,
        infer_sharding_from_operands=infer,
        sharding_rule=f"{', '.join(operands)} -> {', '.join(results)}",
        need_replication_factors=tuple(whole),
        **per_block,
    )
    return wrapped(*args)


def _axes_at(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    """The mesh axes of ``spec``'s dimension ``dim`` (none where it has no entry)."""
    entry = spec[dim] if len(spec) > dim else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _dividing(axes: tuple[str, ...], mesh, batch: int) -> tuple[str, ...]:
    """``axes`` if their sizes on ``mesh`` divide ``batch`` evenly, else () (the batch stays whole)."""
    return axes if batch % math.prod(mesh.shape[axis] for axis in axes) == 0 else ()


def _explicit_axes(x: jax.Array, size: int | None, dim: int):
    """(mesh, the Explicit mesh axes splitting x's dimension ``dim`` where they divide ``size``, or any split for
    None) where x's type carries an Explicit sharding, else None (Auto axes, one device, no mesh)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    explicit = [name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True) if kind == AxisType.Explicit]
    axes = tuple(axis for axis in _axes_at(sharding.spec, dim) if axis in explicit)
    return mesh, axes if size is None else _dividing(axes, mesh, size)
