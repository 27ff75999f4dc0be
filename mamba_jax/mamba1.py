"""Mamba: the Mamba-1 selective SSM mixer (mamba_ssm ``modules/mamba_simple.py``): the full-sequence forward, and
the cached prefill and one-token step used for generation.

Shapes (docs/architecture.md): b batch, l seqlen, d d_model, di d_inner = int(expand * d), n d_state, r dt_rank,
w d_conv.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.generation.cache import NormedStep, SSMCache, check_lengths, conv_prefill, mask_past_lengths
from mamba_jax.layers import (
    CausalConv1d,
    check_implementation,
    check_sequence_input,
    linear,
    linear_parts,
    positive_int,
    value_or_none,
    with_axes,
)
from pallas_kernels.mamba_step import MambaStepWeights, PreNorm, mamba_step
from pallas_kernels.mamba_step.api import IMPLEMENTATIONS as STEP_IMPLEMENTATIONS
from pallas_kernels.selective_scan import IMPLEMENTATIONS as SCAN_IMPLEMENTATIONS
from pallas_kernels.selective_scan import selective_scan

# A pre-softplus dt for prefill positions past a row's length: softplus(-1e4 + dt_bias) underflows to exactly 0 in
# float32, and a step with dt = 0 leaves the state as it is. Finite, so every softplus formula stays NaN-free.
_MASKED_DT = -1e4


def dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float) -> nnx.Initializer:
    """softplus^-1(dt) with dt = exp(U(log dt_min, log dt_max)) clamped below at dt_init_floor, so that the initial
    step sizes softplus(dt_proj.bias) are log-uniform in [dt_min, dt_max]."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        # softplus^-1(dt) = log(exp(dt) - 1) = dt + log(1 - exp(-dt)), written with expm1 for small dt.
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def dt_weight_init(dt_rank: int, dt_scale: float, dt_init: str) -> nnx.Initializer:
    """dt_proj kernel: U(-s, s) ("random") or all s ("constant"), s = dt_rank**-0.5 * dt_scale."""
    std = dt_rank**-0.5 * dt_scale

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        if dt_init == "constant":
            return jnp.full(shape, std, dtype)
        return jax.random.uniform(key, shape, dtype, -std, std)

    return init


class Mamba(NormedStep, nnx.Module):
    """The Mamba-1 mixer: y = out_proj(selective_scan(silu(conv(x)), dt, A, B, C, D, z)) with [x, z] = in_proj(u).

    Parameters (mamba_ssm names, JAX layout): in_proj.kernel (d, 2di) [+ bias]; conv1d.kernel (w, di) [+ bias (di,)];
    x_proj.kernel (di, r + 2n); dt_proj.kernel (r, di), dt_proj.bias (di,); A_log (di, n) and D (di,) in float32
    whatever ``param_dtype``; out_proj.kernel (di, d) [+ bias]. ``dtype`` is the activation dtype (None: inferred
    from the input and parameters, flax's rule); the scan runs in float32 inside ``selective_scan``.
    ``scan_implementation`` is passed to ``selective_scan``, ``step_implementation`` (the decode step) to
    ``pallas_kernels.mamba_step`` (None: the best one for the platform and shape).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        scan_implementation: str | None = None,
        step_implementation: str | None = None,
    ):
        d_model = positive_int("Mamba", "d_model", d_model)
        d_state = positive_int("Mamba", "d_state", d_state)
        d_conv = positive_int("Mamba", "d_conv", d_conv)
        if isinstance(expand, bool) or not isinstance(expand, numbers.Real) or not 0 < expand < math.inf:
            raise ValueError(f"Mamba: expand must be a positive finite number, found {expand!r}")
        d_inner = int(expand * d_model)  # as mamba_ssm: a real expand is rounded down
        if d_inner < 1:
            raise ValueError(
                f"Mamba: d_inner = int(expand * d_model) must be >= 1, found int({expand} * {d_model}) = 0"
            )
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        dt_rank = positive_int("Mamba", "dt_rank (an int or 'auto')", dt_rank)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', found {dt_init!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba: need 0 < dt_min <= dt_max, found dt_min={dt_min}, dt_max={dt_max}")
        check_implementation("Mamba", "scan_implementation", scan_implementation, SCAN_IMPLEMENTATIONS)
        check_implementation("Mamba", "step_implementation", step_implementation, STEP_IMPLEMENTATIONS)
        self.d_model, self.d_inner, self.d_state, self.dt_rank = d_model, d_inner, d_state, dt_rank
        self.dtype = dtype
        self.scan_implementation = scan_implementation
        self.step_implementation = step_implementation

        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = linear(d_model, 2 * d_inner, axes=("embed", "proj"), use_bias=bias, **common)
        self.conv1d = CausalConv1d(d_inner, d_conv, use_bias=conv_bias, **common)
        self.x_proj = linear(d_inner, dt_rank + 2 * d_state, axes=("inner", None), use_bias=False, **common)
        self.dt_proj = linear(
            dt_rank,
            d_inner,
            axes=("dt_rank", "inner"),
            use_bias=True,
            kernel_init=dt_weight_init(dt_rank, dt_scale, dt_init),
            bias_init=dt_bias_init(dt_min, dt_max, dt_init_floor),
            **common,
        )
        # S4D-real: A[:, k] = -(k + 1) for every channel, stored as its log.
        a_log = jnp.log(jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state)))
        self.A_log = with_axes(nnx.Param(a_log), ("inner", "state"))
        self.D = with_axes(nnx.Param(jnp.ones((d_inner,), jnp.float32)), ("inner",))
        self.out_proj = linear(d_inner, d_model, axes=("inner", "embed"), use_bias=bias, **common)

    def _check_sequence(self, u: jax.Array) -> None:
        """u must be (b, l, d) with b, l >= 1 (``__call__`` and ``prefill``)."""
        if u.ndim != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: u must have shape (batch, seqlen, d_model={self.d_model}), found {u.shape}")
        check_sequence_input("Mamba", u)

    def __call__(self, u: jax.Array) -> jax.Array:
        """u (b, l, d) -> (b, l, d), in ``dtype`` (or the promoted input / parameter dtype); b, l >= 1."""
        self._check_sequence(u)
        # x and z as two products: 4-6% less time a training step than one product split (benchmarks/RESULTS.md).
        x, z = linear_parts(self.in_proj, u, [self.d_inner, self.d_inner])  # (b, l, di) each
        x = self.conv1d(x, silu=True)
        dt, B, C = self._dt_B_C(x)
        return self.out_proj(self._scan(x, dt, B, C, z))

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=jnp.float32, state_dtype=jnp.float32
    ) -> SSMCache:
        """An empty cache: conv_state (b, w, di) in ``dtype``, ssm_state (b, di, n) in ``state_dtype`` (float32; a
        16-bit state halves its bytes, updated in float32 and rounded at every token). ``max_len`` is unused (the
        state does not grow with the sequence); it is there so that every mixer has the same signature."""
        del max_len
        return SSMCache(
            conv_state=jnp.zeros((batch, self.conv1d.width, self.d_inner), dtype),
            ssm_state=jnp.zeros((batch, self.d_inner, self.d_state), state_dtype),
        )

    def prefill(self, u: jax.Array, cache: SSMCache, lengths: jax.Array | None = None) -> tuple[jax.Array, SSMCache]:
        """Run a whole (right-padded) chunk of tokens from ``cache`` with the parallel scan.

        u (b, l, d); lengths int (b,) valid positions per row (default l) -> (out (b, l, d), the cache after each
        row's last valid position). Outputs past a row's length are not meaningful. From an empty cache ``out``
        equals ``self(u)``.
        """
        self._check_sequence(u)
        lengths = check_lengths(lengths, u.shape[0], u.shape[1])
        # (b, l, di) each, as __call__; ordered: one merged product and two copies took 8% more time (130m, batch 64)
        x, z = linear_parts(self.in_proj, u, [self.d_inner, self.d_inner], ordered=True)
        x, conv_state = conv_prefill(self.conv1d, x, cache.conv_state, lengths, silu=True)
        dt, B, C = self._dt_B_C(x)
        dt = mask_past_lengths(dt, lengths, _MASKED_DT)
        state = cache.ssm_state.astype(jnp.float32)
        y, ssm_state = self._scan(x, dt, B, C, z, return_last_state=True, initial_state=state)
        return self.out_proj(y), SSMCache(conv_state, ssm_state.astype(cache.ssm_state.dtype))

    def step(self, u: jax.Array, cache: SSMCache) -> tuple[jax.Array, SSMCache]:
        """One token per row: u (b, d) -> (out (b, d), the cache after it), in O(1) time and memory.

        The whole step is ``pallas_kernels.mamba_step`` with ``step_implementation`` (None: the fused kernels on a
        GPU, where they take the shape; XLA op by op elsewhere)."""
        out, conv_state, ssm_state = self._step(u, cache, None)
        return out, SSMCache(conv_state, ssm_state)

    def _step(self, u, cache: SSMCache, prenorm: PreNorm | None, partial_out: bool = False) -> tuple[jax.Array, ...]:
        """``mamba_step`` of this layer's weights: (out, conv_state, ssm_state[, residual]); u (b, d) or a
        ``PartialSums``, out one where ``partial_out`` and the kernels leave out_proj's parts to the next block."""
        if u.ndim != 2 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: u must have shape (batch, d_model={self.d_model}), found {u.shape}")
        weights = MambaStepWeights(
            in_proj=self.in_proj.kernel[...],
            in_proj_bias=value_or_none(self.in_proj.bias),
            conv=self.conv1d.kernel[...],
            conv_bias=value_or_none(self.conv1d.bias),
            x_proj=self.x_proj.kernel[...],
            dt_proj=self.dt_proj.kernel[...],
            dt_bias=self.dt_proj.bias[...],
            A_log=self.A_log[...],
            D=self.D[...],
            out_proj=self.out_proj.kernel[...],
            out_proj_bias=value_or_none(self.out_proj.bias),
        )
        dtype = self._step_dtype(u, prenorm, weights.in_proj)
        return mamba_step(
            u,
            cache.conv_state,
            cache.ssm_state,
            weights,
            dtype=dtype,
            implementation=self.step_implementation,
            prenorm=prenorm,
            partial_out=partial_out,
        )

    def _scan(self, x: jax.Array, dt: jax.Array, B: jax.Array, C: jax.Array, z: jax.Array, **state_args):
        """The selective scan with this layer's A, D and dt bias (softplus on): x, dt, z (b, l, di), B, C (b, l, n)
        -> y (b, l, di), or (y, last state (b, di, n)) with ``return_last_state=True`` in ``state_args``."""
        return selective_scan(
            x,
            dt,
            self._A(),
            B,
            C,
            D=self.D[...].astype(jnp.float32),
            z=z,
            delta_bias=self.dt_proj.bias[...].astype(jnp.float32),
            delta_softplus=True,
            implementation=self.scan_implementation,
            **state_args,
        )

    def _dt_B_C(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x (..., di) -> dt (..., di) before its bias, B, C (..., n).

        dt_proj runs without its bias: the bias is added in float32 inside the scan, before the softplus."""
        dt, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        return dt @ self.dt_proj.kernel[...].astype(dt.dtype), B, C

    def _A(self) -> jax.Array:
        """A = -exp(A_log), float32 (di, n)."""
        return -jnp.exp(self.A_log[...].astype(jnp.float32))
