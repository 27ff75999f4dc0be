"""One decode step of a whole Mamba-2 mixer, in XLA: what ``Mamba2.step`` computes, written on plain arrays.

Shapes: b batch, d d_model, di d_inner, h heads, p headdim, g groups, n d_state, w d_conv; d_ssm = h p,
dm = di - d_ssm (the optional gated-MLP branch), conv_dim = d_ssm + 2 g n. in_proj's columns are
[z0 (dm), x0 (dm), z (d_ssm), xBC (conv_dim), dt (h)]. The projections and the conv run in the compute dtype
``dtype`` (inputs and weights cast to it, as ``nnx.Linear`` and ``CausalConv1d`` do); the state update and the
gated norm in float32, the norm's result rounded to ``dtype``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.mamba_step.reference import PreNorm, conv_step, linear, prenormed, with_residual
from pallas_kernels.state_update.reference import state_update_reference


class Mamba2StepWeights(NamedTuple):
    """A Mamba-2 mixer's parameters, as stored (any float dtype; cast on use). Names follow ``Mamba2``'s.

    in_proj (d, 2di + 2gn + h) and in_proj_bias or None; conv (w, conv_dim) and conv_bias (conv_dim,) or None;
    dt_bias (h,); A_log (h,); D (h,) or (d_ssm,) (``D_has_hdim``); norm (d_ssm,), the gated RMSNorm's weight, or
    None for a mixer without the norm (``rmsnorm=False``: y * silu(z) instead); out_proj (di, d) and
    out_proj_bias or None.
    """

    in_proj: jax.Array
    in_proj_bias: jax.Array | None
    conv: jax.Array
    conv_bias: jax.Array | None
    dt_bias: jax.Array
    A_log: jax.Array
    D: jax.Array
    norm: jax.Array | None
    out_proj: jax.Array
    out_proj_bias: jax.Array | None


class Mamba2StepOptions(NamedTuple):
    """The static settings of a Mamba-2 mixer that its weights' shapes do not carry (``Mamba2``'s arguments).

    ngroups: groups of heads sharing B and C. dt_limit: dt is clipped to [low, high] after softplus.
    norm_before_gate: the gated norm's order (False: rmsnorm(y * silu(z)), what Mamba-2 uses). eps: the norm's.
    """

    ngroups: int = 1
    dt_limit: tuple[float, float] = (0.0, float("inf"))
    norm_before_gate: bool = False
    eps: float = 1e-5


DEFAULT_OPTIONS = Mamba2StepOptions()


def gated_rmsnorm(y: jax.Array, z: jax.Array, weight: jax.Array, groups: int, before_gate: bool, eps: float):
    """``RMSNormGated`` on plain arrays: y, z (b, c), weight (c,) -> float32 (b, c); groups of c / groups channels."""
    y, gate = y.astype(jnp.float32), jax.nn.silu(z.astype(jnp.float32))
    if not before_gate:
        y = y * gate
    parts = y.reshape(y.shape[0], groups, -1)
    parts = parts * jax.lax.rsqrt(jnp.mean(parts * parts, axis=-1, keepdims=True) + eps)
    y = parts.reshape(y.shape) * weight.astype(jnp.float32)
    return y * gate if before_gate else y


def mamba2_step_reference(
    u: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: Mamba2StepWeights,
    dtype,
    options: Mamba2StepOptions = DEFAULT_OPTIONS,
    prenorm: PreNorm | None = None,
) -> tuple[jax.Array, ...]:
    """u (b, d), conv_state (b, w, conv_dim), ssm_state (b, h, p, n) -> (out (b, d) in ``dtype``, the new conv_state
    in conv_state's dtype, the new ssm_state in ssm_state's dtype (updated in float32, then rounded to it)), and with
    ``prenorm`` the new residual s (b, d) float32 last (u is then the block's hidden, normed first: ``PreNorm``).

    [z0, x0, z, xBC, dt] = in_proj(u); [x, B, C] = silu(conv over [conv_state[:, 1:], xBC]);
    dt = clip(softplus(dt + dt_bias), dt_limit); y = selective_state_update(ssm_state, x, dt, A = -exp(A_log), B, C,
    D); y = norm(y, z) (or y * silu(z)); out = out_proj([silu(z0) * x0, y]).
    """
    u, residual = prenormed(u, prenorm)
    w = weights
    zxbcdt = linear(u, w.in_proj, w.in_proj_bias, dtype)
    d_ssm = ssm_state.shape[1] * ssm_state.shape[2]
    start = 2 * (w.out_proj.shape[0] - d_ssm) + d_ssm  # xBC's first column: after z0, x0 and z
    xbc, window = conv_step(zxbcdt[:, start : start + conv_state.shape[2]], conv_state, w.conv, w.conv_bias, dtype)
    out, new_state = state_and_out(zxbcdt, jax.nn.silu(xbc), ssm_state, weights, dtype, options)
    return with_residual((out, window, new_state), residual)


def state_and_out(
    zxbcdt: jax.Array,
    xbc: jax.Array,
    ssm_state: jax.Array,
    weights: Mamba2StepWeights,
    dtype,
    options: Mamba2StepOptions = DEFAULT_OPTIONS,
) -> tuple[jax.Array, jax.Array]:
    """The step from the conv on: zxbcdt (b, 2di + 2gn + h) in_proj's output (its bias added) in ``dtype``, xbc
    (b, conv_dim) silu(conv) of its xBC columns in ``dtype`` -> (out (b, d) in ``dtype``, the new ssm_state in
    ssm_state's dtype)."""
    w = weights
    d_ssm = ssm_state.shape[1] * ssm_state.shape[2]
    d_mlp = w.out_proj.shape[0] - d_ssm
    readout, new_state = state_readout(zxbcdt, xbc, ssm_state, weights, options)
    z = zxbcdt[:, 2 * d_mlp : 2 * d_mlp + d_ssm]
    y = gated(readout, xbc[:, :d_ssm], z, weights, options, dtype)
    if d_mlp:
        y = jnp.concatenate([jax.nn.silu(zxbcdt[:, :d_mlp]) * zxbcdt[:, d_mlp : 2 * d_mlp], y], axis=-1)
    return linear(y, w.out_proj, w.out_proj_bias, dtype), new_state.astype(ssm_state.dtype)


def state_readout(
    zxbcdt: jax.Array, xbc: jax.Array, ssm_state: jax.Array, weights: Mamba2StepWeights, options: Mamba2StepOptions
) -> tuple[jax.Array, jax.Array]:
    """(<new state, C> (b, h, p) float32, before the skip D x; the new state (b, h, p, n) float32), arguments as
    ``state_and_out``'s: dt = clip(softplus(dt + dt_bias), dt_limit), A = -exp(A_log)."""
    w, f32 = weights, jnp.float32
    b, h, p, n = ssm_state.shape
    d_ssm, g = h * p, options.ngroups
    x, B, C = jnp.split(xbc, [d_ssm, d_ssm + g * n], axis=-1)
    dt = jnp.clip(jax.nn.softplus(zxbcdt[:, -h:].astype(f32) + w.dt_bias.astype(f32)), *options.dt_limit)
    return state_update_reference(
        ssm_state,
        x.astype(f32).reshape(b, h, p),  # float32 x: the readout comes back unrounded
        dt[:, :, None],
        -jnp.exp(w.A_log.astype(f32))[:, None, None],
        B.reshape(b, g, n),
        C.reshape(b, g, n),
        None,
        None,
        None,
        dt_softplus=False,
    )


def gated(readout: jax.Array, x: jax.Array, z: jax.Array, weights: Mamba2StepWeights, options, dtype) -> jax.Array:
    """y = readout + D x, then the gated RMSNorm of y rounded to ``dtype`` and z (``RMSNormGated``), or without the
    norm y silu(z), in ``dtype``: readout (b, h, p) float32, x and z (b, h p) in ``dtype``."""
    f32 = jnp.float32
    b, h, p = readout.shape
    D = weights.D.astype(f32).reshape(h, p) if weights.D.shape[0] == h * p else weights.D.astype(f32)[:, None]
    y = (readout + D * x.astype(f32).reshape(b, h, p)).reshape(b, h * p)
    if weights.norm is None:
        return (y * jax.nn.silu(z.astype(f32))).astype(dtype)
    norm = gated_rmsnorm(y.astype(dtype), z, weights.norm, options.ngroups, options.norm_before_gate, options.eps)
    return norm.astype(dtype)
