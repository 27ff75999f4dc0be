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
    w, o = weights, options
    b = zxbcdt.shape[0]
    _, h, p, n = ssm_state.shape
    d_ssm, g = h * p, o.ngroups
    d_mlp = w.out_proj.shape[0] - d_ssm
    f32 = jnp.float32
    z0, x0, z, _, dt = jnp.split(zxbcdt, [d_mlp, 2 * d_mlp, 2 * d_mlp + d_ssm, 2 * d_mlp + 2 * d_ssm + 2 * g * n], -1)
    x, B, C = jnp.split(xbc, [d_ssm, d_ssm + g * n], axis=-1)
    dt = jnp.clip(jax.nn.softplus(dt.astype(f32) + w.dt_bias.astype(f32)), *o.dt_limit)
    D = w.D.astype(f32).reshape(h, p) if w.D.shape[0] == d_ssm else w.D.astype(f32)[:, None]
    y, new_state = state_update_reference(
        ssm_state,
        x.reshape(b, h, p),
        dt[:, :, None],
        -jnp.exp(w.A_log.astype(f32))[:, None, None],
        B.reshape(b, g, n),
        C.reshape(b, g, n),
        D,
        None if w.norm is not None else z.reshape(b, h, p),
        None,
        dt_softplus=False,
    )
    y = y.reshape(b, d_ssm)
    if w.norm is not None:
        y = gated_rmsnorm(y, z, w.norm, g, o.norm_before_gate, o.eps).astype(dtype)
    if d_mlp:
        y = jnp.concatenate([jax.nn.silu(z0) * x0, y], axis=-1)
    return linear(y, w.out_proj, w.out_proj_bias, dtype), new_state.astype(ssm_state.dtype)
