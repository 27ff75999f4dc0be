"""Logical axis names on parameters, and the one table that maps them to mesh axes.

Every parameter is created with a ``logical_axes`` metadata tuple (one name per array dimension, ``None`` for
"never sharded"). Which mesh axis a logical axis lands on is decided here and only here, so data parallel, FSDP and
tensor parallel are a change of rules, not of model code.

Logical axes used by the modules:

=========== ========================================================================
vocab        embedding rows, lm_head outputs
embed        d_model
inner        d_inner / d_ssm channels (conv channels, A_log rows, D, gated norm weight)
heads        Mamba-2 SSM heads (A_log, D, dt_bias)
proj         the concatenated in_proj output of a mixer ([x, z] or [z, x, B, C, dt])
state        d_state
dt_rank      Mamba-1 dt low-rank dimension
conv         conv kernel width
mlp          GatedMLP hidden width
qkv          attention in_proj output (q, k, v heads concatenated)
norm         norm weights over d_model (replicated: tiny)
=========== ========================================================================

Mesh axes (``make_mesh``) and what the rules put on them:

- ``data``: the batch only. Parameters are replicated over it (data parallel).
- ``fsdp``: the batch, and the ``embed`` dimension of every matrix (FSDP / ZeRO-3): parameters, gradients and the
  optimizer moments (which inherit the parameters' shardings) are split; XLA gathers a weight where it is used.
- ``tensor``: model width (tensor parallel). A mixer's in_proj is column-parallel (its ``proj`` output is split),
  its out_proj row-parallel (its ``inner`` input is split), and the per-channel or per-head parameters in between
  (conv, A_log, D, dt_bias, x_proj/dt_proj rows) follow ``inner`` / ``heads``; the vocab is split too.

One table serves all three strategies: a mesh axis of size 1 shards nothing, so DP, FSDP, TP and their products are
chosen by the mesh shape alone. A different ``rules`` mapping can be passed wherever this table is the default.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial

import jax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pallas_kernels.batch_split import split_over

MeshAxes = str | tuple[str, ...] | None

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes). Axes absent from the table are never sharded.
LOGICAL_AXIS_RULES: Mapping[str, MeshAxes] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "inner": "tensor",
    "heads": "tensor",
    "proj": "tensor",
    "mlp": "tensor",
    "qkv": "tensor",
}


def logical_to_spec(
    logical_axes: Sequence[str | None] | None, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> PartitionSpec:
    """PartitionSpec for one array from its logical axis names (None -> replicated)."""
    if logical_axes is None:
        return PartitionSpec()
    return PartitionSpec(*(rules.get(name) if name is not None else None for name in logical_axes))


def logical_axes_of(state: nnx.State) -> nnx.State:
    """The ``logical_axes`` metadata of every variable in ``state`` (None where a variable has none)."""
    return jax.tree.map(
        lambda v: v.get_metadata().get("logical_axes"),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def partition_specs(state: nnx.State, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> nnx.State:
    """A PartitionSpec for every variable in ``state``, from its logical axes and ``rules``."""
    return jax.tree.map(
        lambda v: logical_to_spec(v.get_metadata().get("logical_axes"), rules),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices of all processes).

    One size may be -1: it takes whatever the other two leave. The product must equal the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or (size < 1 and size != -1):
            raise ValueError(f"make_mesh: {name} must be a positive int or -1, got {size!r}")
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"make_mesh: at most one axis may be -1, got {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(
                f"make_mesh: {len(devices)} devices cannot be split into {sizes}: "
                f"the fixed axes' product {fixed} does not divide {len(devices)}"
            )
        sizes[free[0]] = len(devices) // fixed
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(f"make_mesh: {sizes} needs {math.prod(sizes.values())} devices, but there are {len(devices)}")
    shape = tuple(sizes[name] for name in MESH_AXES)
    return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """``spec`` with the mesh axes dropped that cannot apply to an array of ``shape``.

    A dimension that its mesh axes do not divide evenly stays replicated (costs memory, never correctness), and a
    mesh axis already used by an earlier dimension is not used again. Unknown mesh axis names are an error.
    """
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than the array's shape {tuple(shape)}")
    used: set[str] = set()
    fitted = []
    for dim, entry in zip(shape, spec, strict=False):
        names = _mesh_axes(entry)
        unknown = [name for name in names if name not in mesh.shape]
        if unknown:
            raise ValueError(f"partition spec {spec} names mesh axes {unknown} absent from the mesh {dict(mesh.shape)}")
        names = tuple(name for name in names if name not in used)
        if dim % math.prod(mesh.shape[name] for name in names):
            names = ()
        used.update(names)
        fitted.append(names[0] if len(names) == 1 else names or None)
    return PartitionSpec(*fitted)


def named_sharding(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
) -> NamedSharding:
    """The NamedSharding of an array of ``shape`` with ``logical_axes``, fitted to ``mesh`` (see ``fit_spec``)."""
    return NamedSharding(mesh, fit_spec(logical_to_spec(logical_axes, rules), shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> nnx.State:
    """A NamedSharding for every variable in ``state`` (concrete or abstract), from its logical axes and shape."""
    return jax.tree.map(
        lambda v: named_sharding(v.get_metadata().get("logical_axes"), v.get_value().shape, mesh, rules),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(
    model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES
) -> nnx.Module:
    """Build ``model_fn()`` with every parameter created directly in its sharding on ``mesh``.

    The model is first traced abstractly (no memory), its variables' shardings are read from their logical axes,
    and a jitted init writes each shard on its device: a model larger than one device never exists whole.
    ``model_fn`` is called twice (abstractly, then under jit), so it must build the model from scratch.
    """
    abstract = nnx.eval_shape(model_fn)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    @partial(jax.jit, out_shardings=shardings)
    def init() -> nnx.State:
        return nnx.split(model_fn())[1]

    return nnx.merge(graphdef, init())


def drop_mesh_axis(sharding: NamedSharding, axis: str) -> NamedSharding:
    """``sharding`` with the mesh axis ``axis`` taken out of its spec (the dimensions it split become whole).

    With ``axis="fsdp"`` this is where an FSDP-sharded parameter lives while a layer uses it: gathered over the fsdp
    devices, still split over ``tensor``.
    """
    entries = (tuple(name for name in _mesh_axes(entry) if name != axis) for entry in sharding.spec)
    spec = PartitionSpec(*(names[0] if len(names) == 1 else names or None for names in entries))
    return NamedSharding(sharding.mesh, spec)


def batch_axis_size(mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> int:
    """How many ways the batch dimension is split on ``mesh`` (the product of the "batch" rule's mesh axes)."""
    return math.prod(mesh.shape[name] for name in _mesh_axes(rules.get("batch")))


def check_batch_size(batch_size: int, mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES) -> None:
    """Raise a ValueError unless ``batch_size`` splits evenly over the batch mesh axes."""
    ways = batch_axis_size(mesh, rules)
    if batch_size % ways:
        axes = {name: mesh.shape[name] for name in _mesh_axes(rules.get("batch"))}
        raise ValueError(f"batch size {batch_size} is not divisible by the batch mesh axes {axes} (product {ways})")


def constrain(
    x: jax.Array,
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES,
) -> jax.Array:
    """``x`` constrained (inside jit) to the sharding of its logical axes, e.g. ("batch", None, None) for (b, l, d)."""
    return jax.lax.with_sharding_constraint(x, named_sharding(logical_axes, x.shape, mesh, rules))


def kernel_split(mesh: Mesh, rules: Mapping[str, MeshAxes] = LOGICAL_AXIS_RULES):
    """A context for tracing a program on ``mesh`` in which the Pallas kernels run on each device's share under
    ``shard_map`` (``pallas_kernels.batch_split.split_over``): rows over the "batch" rule's mesh axes, channels over
    the "inner" rule's. Without it they still run split, through a custom_partitioning rule that JAX lowers again at
    every call site (a sharded 48-layer Mamba-1 step compiled 4x longer than one device's). The training and
    evaluation steps enter it; enter it inside your own jitted function, around the gradient too (a kernel's
    backward is traced when the gradient is taken)::

        @jax.jit
        def loss_and_grads(params, tokens):
            with kernel_split(mesh):
                return jax.value_and_grad(loss)(params, tokens)
    """
    batch = [name for name in _mesh_axes(rules.get("batch")) if name in mesh.axis_names]
    channels = [name for name in _mesh_axes(rules.get("inner")) if name in mesh.axis_names and name not in batch]
    return split_over(mesh, batch=batch, channels=channels)


def _mesh_axes(entry: MeshAxes) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
