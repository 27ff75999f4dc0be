"""One decode step of a whole Mamba-1 mixer, in XLA: what ``Mamba.step`` computes, written on plain arrays.

Shapes: b batch, d d_model, di d_inner, n d_state, r dt_rank, w d_conv. Every projection and the conv run in the
compute dtype ``dtype`` (their inputs and weights cast to it, as ``nnx.Linear`` and ``CausalConv1d`` do), the state
update in float32 (``selective_state_update``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.state_update.reference import state_update_reference


class MambaStepWeights(NamedTuple):
    """A Mamba-1 mixer's parameters, as stored (any float dtype; cast on use). Names follow ``Mamba``'s.

    in_proj (d, 2di) and in_proj_bias (2di,) or None; conv (w, di) and conv_bias (di,) or None; x_proj (di, r + 2n);
    dt_proj (r, di) and dt_bias (di,); A_log (di, n); D (di,); out_proj (di, d) and out_proj_bias (d,) or None.
    """

    in_proj: jax.Array
    in_proj_bias: jax.Array | None
    conv: jax.Array
    conv_bias: jax.Array | None
    x_proj: jax.Array
    dt_proj: jax.Array
    dt_bias: jax.Array
    A_log: jax.Array
    D: jax.Array
    out_proj: jax.Array
    out_proj_bias: jax.Array | None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PartialSums:
    """A projection's output (b, d) not summed yet: float32 partial sums (parts, b, d) over parts of its contracted
    dimension, the output being their sum rounded to ``dtype`` (``total``), as a product in ``dtype`` rounds it.

    A decode step past one row returns out_proj's output so (``mamba_step(..., partial_out=True)``) and the next
    block's step adds the parts in the launch that norms its input, which saves the reduction launch of XLA's split-K
    product. ``shape`` and ``dtype`` are the output's, as an array's; ``dtype`` is static.
    """

    sums: jax.Array
    dtype: Any = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        return self.sums.shape[1:]

    @property
    def ndim(self) -> int:
        return self.sums.ndim - 1

    def total(self) -> jax.Array:
        """The output (b, d) in ``dtype``."""
        return self.sums.sum(axis=0).astype(self.dtype)


def settled(x: jax.Array | PartialSums) -> jax.Array:
    """x itself, or the output a ``PartialSums`` stands for."""
    return x.total() if isinstance(x, PartialSums) else x


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PreNorm:
    """A block's residual add + RMSNorm in front of its mixer, taken into the mixer's decode step: the step's input
    is then the block's hidden (b, d), and the mixer sees s / sqrt(mean(s^2) + eps) * weight rounded to ``dtype``,
    with s = float32(hidden) + residual, which the step also returns (the next block's residual).

    residual (b, d) float32, or None in the first block (s = float32(hidden)); weight (d,); eps; dtype: the norm's
    output dtype (``RMSNorm.dtype``, float32 where it has none). eps and dtype are static (part of the tree's
    structure, not traced).
    """

    residual: jax.Array | None
    weight: jax.Array
    eps: float = dataclasses.field(metadata=dict(static=True))
    dtype: Any = dataclasses.field(metadata=dict(static=True))


def prenormed(hidden: jax.Array | PartialSums, prenorm: PreNorm | None) -> tuple[jax.Array, jax.Array | None]:
    """hidden (b, d) (or its ``PartialSums``) -> (the normed input in prenorm.dtype, s float32 (b, d)), as ``Block``
    computes them; without a prenorm (hidden, None)."""
    hidden = settled(hidden)
    if prenorm is None:
        return hidden, None
    s = hidden.astype(jnp.float32)
    if prenorm.residual is not None:
        s = s + prenorm.residual.astype(jnp.float32)
    normed = s * jax.lax.rsqrt(jnp.mean(s * s, axis=-1, keepdims=True) + prenorm.eps)
    return (normed * prenorm.weight.astype(jnp.float32)).astype(prenorm.dtype), s


def with_residual(result: tuple, residual: jax.Array | None) -> tuple:
    """A step's (out, conv_state, ssm_state), with the prenorm's residual fourth where there is one."""
    return result if residual is None else (*result, residual)


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
    """x @ kernel (+ bias), inputs cast to ``dtype`` and the result in it, as ``nnx.Linear``."""
    y = x.astype(dtype) @ kernel.astype(dtype)
    return y if bias is None else y + bias.astype(dtype)


def conv_step(
    x: jax.Array, conv_state: jax.Array, kernel: jax.Array, bias: jax.Array | None, dtype
) -> tuple[jax.Array, jax.Array]:
    """One step of the depthwise causal conv on its cached window: x (b, c), conv_state (b, w, c) the last w inputs,
    oldest first, kernel (w, c), bias (c,) or None -> (y (b, c) in ``dtype``, the new window in conv_state's dtype).

    The products are summed oldest tap first, as ``CausalConv1d`` sums them, so a step reproduces the full-sequence
    conv to the bit in float32.
    """
    window = jnp.concatenate([conv_state[:, 1:], x[:, None].astype(conv_state.dtype)], axis=1)  # (b, w, c)
    taps, kernel = window.astype(dtype), kernel.astype(dtype)
    y = sum(taps[:, k] * kernel[k] for k in range(kernel.shape[0]))
    if bias is not None:
        y = y + bias.astype(dtype)
    return y, window


def mamba_step_reference(
    u: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: MambaStepWeights,
    dtype,
    prenorm: PreNorm | None = None,
) -> tuple[jax.Array, ...]:
    """u (b, d), conv_state (b, w, di), ssm_state (b, di, n) -> (out (b, d) in ``dtype``, the new conv_state in
    conv_state's dtype, the new ssm_state in ssm_state's dtype (updated in float32, then rounded to it)), and with
    ``prenorm`` the new residual s (b, d) float32 last (u is then the block's hidden, normed first: ``PreNorm``).

    [x, z] = in_proj(u); x = silu(conv over [conv_state[:, 1:], x]); [dt, B, C] = x_proj(x); dt = dt @ dt_proj;
    y = selective_state_update(ssm_state, x, dt, A = -exp(A_log), B, C, D, z, dt_bias, softplus); out = out_proj(y).
    """
    u, residual = prenormed(u, prenorm)
    w = weights
    rank = w.dt_proj.shape[0]
    d_state = w.A_log.shape[1]
    x, z = jnp.split(linear(u, w.in_proj, w.in_proj_bias, dtype), 2, axis=-1)  # (b, di) each
    x, window = conv_step(x, conv_state, w.conv, w.conv_bias, dtype)
    x = jax.nn.silu(x)
    dt, B, C = jnp.split(linear(x, w.x_proj, None, dtype), [rank, rank + d_state], axis=-1)
    dt = linear(dt, w.dt_proj, None, dtype)
    f32 = jnp.float32
    y, new_state = state_update_reference(
        ssm_state[:, None],
        x[:, None],
        dt[:, None],
        -jnp.exp(w.A_log.astype(f32))[None],
        B[:, None],
        C[:, None],
        w.D.astype(f32)[None],
        z[:, None],
        w.dt_bias.astype(f32)[None],
        dt_softplus=True,
    )
    new_state = new_state[:, 0].astype(ssm_state.dtype)
    return with_residual((linear(y[:, 0], w.out_proj, w.out_proj_bias, dtype), window, new_state), residual)
