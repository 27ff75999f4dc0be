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

Mesh axes: ``data`` (batch only), ``fsdp`` (batch and parameters), ``tensor`` (model width).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec

MeshAxes = str | tuple[str, ...] | None

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
