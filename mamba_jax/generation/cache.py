"""Decode caches: what each kind of layer keeps between tokens, and the short causal conv run on a cached window.

Layouts (channels-last, like the activations; legend in docs/architecture.md, plus ``s`` = cache capacity in tokens,
``a`` query heads, ``k`` key/value heads, ``e`` head_dim):

=============== ========================= ====================================================================
layer           field                     shape, dtype
=============== ========================= ====================================================================
Mamba-1         ``SSMCache.conv_state``   (b, w, di), activation dtype: the last w conv inputs, oldest first
                ``SSMCache.ssm_state``    (b, di, n) float32 (or 16-bit: ``init_cache``'s state_dtype)
Mamba-2         ``SSMCache.conv_state``   (b, w, d_ssm + 2*g*n): the last w inputs of the conv over [x, B, C]
                ``SSMCache.ssm_state``    (b, h, p, n) float32 (or 16-bit)
MHA             ``AttentionCache.key``    (b, s, k, e), ``value`` the same: position t of row r at [r, t]
                ``AttentionCache.length`` (b,) int32: how many positions of each row are filled
                ``AttentionCache.conv_state`` (b, w, (a + 2k) e) when the layer has a conv over qkv, else None
=============== ========================= ====================================================================

A model's cache is the tuple of its layers' caches. Caches are plain pytrees (NamedTuples of arrays), so they pass
through ``jit`` and ``lax.while_loop`` as they are; nothing is updated in place, every step returns a new cache.
The SSM state is float32 by default whatever the activation dtype (mamba_ssm keeps it in the model's dtype: its
fp16 models decode with an fp16 state); ``init_cache(..., state_dtype=jnp.bfloat16)`` (``generate``'s
``state_dtype``) stores it in 16 bits, half the bytes a step reads and writes, still updated in float32. The conv
window and key/value entries are stored in the cache's dtype and cast to the layer's compute dtype when read.

The conv window holds w inputs (the one just consumed and the w - 1 before it), as mamba_ssm's conv_state does: the
next step drops the oldest, appends the new input and takes the dot product with ``CausalConv1d.kernel`` (w, c),
whose row w - 1 multiplies the newest input.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.mamba_step.reference import conv_step as conv_window_step


class SSMCache(NamedTuple):
    """Decode state of a Mamba-1 or Mamba-2 layer (shapes in the module docstring)."""

    conv_state: jax.Array
    ssm_state: jax.Array


class NormedStep:
    """``normed_step`` for an SSM mixer whose ``_step(u, cache, prenorm)`` runs its fused decode step and returns
    (out, conv_state, ssm_state[, residual]) (Mamba, Mamba2)."""

    def normed_step(self, hidden, residual: jax.Array | None, norm, cache: SSMCache, partial_out: bool = False):
        """``step`` of ``norm``(float32(hidden) + residual), the add and the RMSNorm computed inside the step's
        kernels (``PreNorm``; ``Block.step`` calls this): hidden (b, d) or the previous block's ``PartialSums``,
        residual (b, d) float32 or None -> (out (b, d), the new residual (b, d) float32, the cache after it). With
        ``partial_out`` out may be a ``PartialSums`` (where the step's kernels leave out_proj's parts to the next
        block: ``pallas_kernels.mamba_step``)."""
        prenorm = norm.after_residual(residual)
        out, conv_state, ssm_state, residual = self._step(hidden, cache, prenorm, partial_out)
        return out, residual, SSMCache(conv_state, ssm_state)

    def _step_dtype(self, u: jax.Array, prenorm, in_proj: jax.Array):
        """The dtype ``_step`` computes in: the layer's ``dtype``, else that of what the mixer sees (u, or the
        norm's output under a ``PreNorm``) promoted with in_proj's."""
        return self.dtype or jnp.result_type(u.dtype if prenorm is None else prenorm.dtype, in_proj)


class AttentionCache(NamedTuple):
    """Key/value cache of an MHA layer, preallocated for ``s`` positions (shapes in the module docstring)."""

    key: jax.Array
    value: jax.Array
    length: jax.Array
    conv_state: jax.Array | None


def check_lengths(lengths: jax.Array | None, batch: int, seqlen: int) -> jax.Array | None:
    """int32 (b,) number of valid (leading) positions per row, or None: every row holds all ``seqlen`` positions.

    The prefills take None as its own case, not as a full array: nothing is then masked or gathered per row (at a
    Mamba-1 130m batch-64 prefill the dt mask alone was a pass over (b, l, di), 4% of the call)."""
    if lengths is None:
        return None
    lengths = jnp.asarray(lengths)
    if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be an integer array of shape ({batch},), found {lengths.shape} {lengths.dtype}")
    return lengths.astype(jnp.int32)


def mask_past_lengths(x: jax.Array, lengths: jax.Array | None, value) -> jax.Array:
    """x (b, l, ...) with ``value`` at the positions at or past each row's length; x itself where lengths is None."""
    if lengths is None:
        return x
    valid = jnp.arange(x.shape[1])[None, :] < lengths[:, None]  # (b, l)
    return jnp.where(valid.reshape(*valid.shape, *([1] * (x.ndim - 2))), x, jnp.asarray(value, x.dtype))


def take_last(x: jax.Array, lengths: jax.Array | None) -> jax.Array:
    """x (b, l, ...) at each row's last valid position ``lengths - 1`` (None: l - 1) -> (b, ...)."""
    if lengths is None:
        return x[:, -1]
    index = (lengths - 1).reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.take_along_axis(x, index, axis=1)[:, 0]


def conv_prefill(
    conv: nnx.Module, x: jax.Array, conv_state: jax.Array, lengths: jax.Array | None, silu: bool = False
) -> tuple[jax.Array, jax.Array]:
    """The causal conv over ``x`` continuing from the cached window, and the window after each row's last input.

    x (b, l, c); conv_state (b, w, c); lengths (b,) or None (every row full) -> (y (b, l, c) in the conv's dtype,
    then SiLU if ``silu``, as the conv applies it in the full-sequence forward; new conv_state (b, w, c)).
    The conv starts from the window's last w - 1 inputs (``CausalConv1d``'s ``initial_states``), so from a fresh
    (zero) cache it is exactly the full-sequence conv. Positions at or after a row's length (right padding) are
    computed but never enter that row's new window.
    """
    width = conv_state.shape[1]
    y = conv(x, silu=silu, initial_states=conv_state[:, 1:])
    extended = jnp.concatenate([conv_state, x.astype(conv_state.dtype)], axis=1)  # (b, w + l, c)
    if lengths is None:
        return y, extended[:, -width:]
    # The window ending at input lengths - 1 is [lengths - w, lengths) in x's time, i.e. [lengths, lengths + w) in
    # [cached window, x], which starts w positions earlier.
    index = lengths[:, None] + jnp.arange(width)[None, :]  # (b, w)
    return y, jnp.take_along_axis(extended, index[:, :, None], axis=1)


def conv_step(conv: nnx.Module, x: jax.Array, conv_state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One step of ``conv`` (a ``CausalConv1d``): x (b, c), conv_state (b, w, c) -> (y (b, c) in the conv's dtype,
    default x's; new conv_state (b, w, c)). ``pallas_kernels.mamba_step.reference.conv_step`` on its parameters."""
    bias = None if conv.bias is None else conv.bias[...]
    return conv_window_step(x, conv_state, conv.kernel[...], bias, conv.dtype or x.dtype)
