"""One decode step of a whole Mamba-1 mixer, in XLA: what ``Mamba.step`` computes, written on plain arrays.

Shapes: b batch, d d_model, di d_inner, n d_state, r dt_rank, w d_conv. Every projection and the conv run in the
compute dtype ``dtype`` (their inputs and weights cast to it, as ``nnx.Linear`` and ``CausalConv1d`` do), the state
update in float32 (``selective_state_update``).
"""

from __future__ import annotations

from typing import NamedTuple

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
    u: jax.Array, conv_state: jax.Array, ssm_state: jax.Array, weights: MambaStepWeights, dtype
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """u (b, d), conv_state (b, w, di), ssm_state (b, di, n) float32 -> (out (b, d) in ``dtype``, the new conv_state
    in conv_state's dtype, the new ssm_state float32).

    [x, z] = in_proj(u); x = silu(conv over [conv_state[:, 1:], x]); [dt, B, C] = x_proj(x); dt = dt @ dt_proj;
    y = selective_state_update(ssm_state, x, dt, A = -exp(A_log), B, C, D, z, dt_bias, softplus); out = out_proj(y).
    """
    w = weights
    rank = w.dt_proj.shape[0]
    d_state = w.A_log.shape[1]
    x, z = jnp.split(linear(u, w.in_proj, w.in_proj_bias, dtype), 2, axis=-1)  # (b, di) each
    x, window = conv_step(x, conv_state, w.conv, w.conv_bias, dtype)
    x = jax.nn.silu(x)
    dt, B, C = jnp.split(linear(x, w.x_proj, None, dtype), [rank, rank + d_state], axis=-1)
    dt = linear(dt, w.dt_proj, None, dtype)
    f32 = jnp.float32
    y, ssm_state = state_update_reference(
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
    return linear(y[:, 0], w.out_proj, w.out_proj_bias, dtype), window, ssm_state[:, 0]
