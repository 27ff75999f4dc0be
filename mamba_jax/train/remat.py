"""Rematerialisation per block: the backward pass recomputes a block's forward from the block's inputs instead of
keeping its activations, so activation memory no longer grows with the depth times the mixer's width.

Policies (``TrainConfig.remat``):

- ``none``: keep every activation (fastest, most memory).
- ``block``: keep only each block's inputs; recompute everything inside it.
- ``dots``: keep the outputs of the block's matrix products (in_proj, x_proj, dt_proj, out_proj) and recompute the
  cheap elementwise work, the conv and the scan.
- ``dots_scan``: ``dots``, and keep the Pallas scans' outputs too (their ``SAVEABLE_NAMES``), so their forward
  launches run once, not again in the backward. Mamba-1: the selective scan's output and chunk start states,
  (b, l, d_inner) in the activation dtype plus (b, time chunks, d_state, d_inner) float32 more a layer (84 MB at
  370m, 8 x 2048). Mamba-2: the SSD's output, (b, l, heads, headdim) in the activation dtype (67 MB at 370m; float32,
  twice that, when the scan applies a gate z). With the XLA scans it is ``dots``.
"""

from __future__ import annotations

import jax
from flax import nnx

from mamba_jax.block import Block
from mamba_jax.model import MambaLMHeadModel
from pallas_kernels.selective_scan import SAVEABLE_NAMES as SCAN_NAMES
from pallas_kernels.ssd import SAVEABLE_NAMES as SSD_NAMES

POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_scan": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(*SCAN_NAMES, *SSD_NAMES),
    ),
}


class RematBlock(Block):
    """A Block whose forward runs under ``nnx.remat`` with policy ``POLICIES[policy]``.

    It holds the same submodules under the same names, so parameter paths (and checkpoints) are unchanged.
    """

    def __init__(self, block: Block, policy: str):
        super().__init__(block.mixer, block.norm, block.mlp, block.norm2, residual_in_fp32=block.residual_in_fp32)
        self.policy = policy

    def __call__(self, hidden: jax.Array, residual: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """hidden (b, l, d), residual (b, l, d) or None -> (hidden, residual), as ``Block``."""
        return nnx.remat(Block.__call__, policy=POLICIES[self.policy])(self, hidden, residual)


def apply_remat(model: MambaLMHeadModel, policy: str) -> MambaLMHeadModel:
    """``model`` with every block rematerialised under ``policy`` ("none" leaves it as it is). Modifies ``model``."""
    if policy == "none":
        return model
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be 'none' or one of {sorted(POLICIES)}, got {policy!r}")
    model.backbone.layers = nnx.List([RematBlock(block, policy) for block in model.backbone.layers])
    return model
