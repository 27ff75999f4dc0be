"""The Mamba-2 (SSD) mixer and its gated RMSNorm (mamba_ssm ``modules/mamba2.py``, ``ops/triton/layernorm_gated.py``).

Data flow of ``Mamba2`` (shape legend in docs/architecture.md; ``dm = d_inner - d_ssm`` is the optional gated-MLP
branch, usually 0):

    in_proj(u) -> [z0 (dm), x0 (dm), z (d_ssm), xBC (d_ssm + 2*g*n), dt (h)]
    xBC = silu(conv1d(xBC)) -> [x (h*p), B (g*n), C (g*n)]
    y = SSD(x, dt, A=-exp(A_log), B, C, D, dt_bias, softplus, dt_limit)       (b, l, h, p)
    y = norm(y, z) if rmsnorm else y * silu(z)                               (b, l, d_ssm)
    out = out_proj([silu(z0) * x0, y])                                       (b, l, d)
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.generation.cache import NormedStep, SSMCache, check_lengths, conv_prefill, mask_past_lengths
from mamba_jax.layers import (
    CausalConv1d,
    check_implementation,
    check_sequence_input,
    linear,
    param,
    positive_int,
    value_or_none,
    with_axes,
)
from pallas_kernels.mamba2_step import Mamba2StepOptions, Mamba2StepWeights, mamba2_step
from pallas_kernels.mamba2_step.api import IMPLEMENTATIONS as STEP_IMPLEMENTATIONS
from pallas_kernels.mamba_step import PreNorm, settled
from pallas_kernels.ssd import mamba_chunk_scan
from pallas_kernels.ssd.api import IMPLEMENTATIONS as SSD_IMPLEMENTATIONS


class RMSNormGated(nnx.Module):
    """RMSNorm over groups of ``group_size`` channels, gated by silu(z), computed in float32; weight (dim,).

    norm_before_gate=False: out = rmsnorm(x * silu(z)) * weight (what Mamba-2 uses).
    norm_before_gate=True:  out = rmsnorm(x) * weight * silu(z).
    Without z it is a plain (grouped) RMSNorm.
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        del rngs  # ones-initialised; accepted for a uniform constructor signature
        group_size = dim if group_size is None else group_size
        if group_size <= 0 or dim % group_size != 0:
            raise ValueError(f"RMSNormGated: group_size must be a positive divisor of dim={dim}, got {group_size}")
        self.weight = with_axes(nnx.Param(jnp.ones((dim,), param_dtype)), ("inner",))
        self.dim = dim
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate
        self.dtype = dtype

    def __call__(self, x: jax.Array, z: jax.Array | None = None) -> jax.Array:
        """x (..., dim), z like x or None -> (..., dim) in ``dtype`` (default: x's dtype)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RMSNormGated: x must have last dimension {self.dim}, got shape {x.shape}")
        if z is not None and z.shape != x.shape:
            raise ValueError(f"RMSNormGated: z must have x's shape {x.shape}, got {z.shape}")
        x32 = x.astype(jnp.float32)
        gate = None if z is None else jax.nn.silu(z.astype(jnp.float32))
        if gate is not None and not self.norm_before_gate:
            x32 = x32 * gate
        groups = x32.reshape(*x.shape[:-1], self.dim // self.group_size, self.group_size)
        groups = groups * jax.lax.rsqrt(jnp.mean(groups * groups, axis=-1, keepdims=True) + self.eps)
        y = groups.reshape(x.shape) * self.weight[...].astype(jnp.float32)
        if gate is not None and self.norm_before_gate:
            y = y * gate
        return y.astype(self.dtype or x.dtype)


def _dt_bias_init(dt_min: float, dt_max: float, dt_init_floor: float) -> nnx.Initializer:
    """softplus^-1(dt) with dt log-uniform in [dt_min, dt_max], floored at dt_init_floor, so that
    softplus(dt_bias) starts in that range."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        log_lo, log_hi = math.log(dt_min), math.log(dt_max)
        dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32) * (log_hi - log_lo) + log_lo)
        dt = jnp.maximum(dt, dt_init_floor)
        return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

    return init


def _a_log_init(a_min: float, a_max: float) -> nnx.Initializer:
    """log of A ~ U(a_min, a_max); the decay rate of a head is A = -exp(A_log)."""

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jnp.log(jax.random.uniform(key, shape, jnp.float32, a_min, a_max)).astype(dtype)

    return init


class Mamba2(NormedStep, nnx.Module):
    """The Mamba-2 mixer: x (b, l, d) -> (b, l, d). Arguments and parameter names are mamba_ssm's.

    Parameters: in_proj kernel (d, 2*di + 2*g*n + h); conv1d kernel (w, d_ssm + 2*g*n), bias; dt_bias (h,);
    A_log (h,) float32; D (h,) or (d_ssm,) if D_has_hdim, float32; norm.weight (d_ssm,) if rmsnorm;
    out_proj kernel (di, d). h = d_ssm / headdim.

    Torch-only arguments: ``use_mem_eff_path`` (a fused-kernel switch; XLA fuses on its own, the maths is the same),
    ``layer_idx`` and ``sequence_parallel`` are accepted and ignored; ``process_group`` and ``device`` must be None
    (parallelism and placement come from the logical-axis sharding rules in ``mamba_jax.sharding``).
    ``ssd_implementation`` is passed to ``mamba_chunk_scan(implementation=...)``, ``step_implementation`` (the decode
    step) to ``pallas_kernels.mamba2_step``; None picks the platform's best.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        use_mem_eff_path: bool = True,
        layer_idx: int | None = None,
        process_group=None,
        sequence_parallel: bool = True,
        device=None,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        ssd_implementation: str | None = None,
        step_implementation: str | None = None,
    ):
        del use_mem_eff_path, layer_idx, sequence_parallel  # see the class docstring
        if process_group is not None:
            raise ValueError(
                f"Mamba2: process_group must be None (use the mamba_jax.sharding rules), got {process_group!r}"
            )
        if device is not None:
            raise ValueError(f"Mamba2: device must be None (place arrays with jax sharding instead), got {device!r}")
        d_model = positive_int("Mamba2", "d_model", d_model)
        d_state = positive_int("Mamba2", "d_state", d_state)
        d_conv = positive_int("Mamba2", "d_conv", d_conv)
        headdim = positive_int("Mamba2", "headdim", headdim)
        ngroups = positive_int("Mamba2", "ngroups", ngroups)
        chunk_size = positive_int("Mamba2", "chunk_size", chunk_size)
        if isinstance(expand, bool) or not isinstance(expand, numbers.Real):
            raise ValueError(f"Mamba2: expand must be a number, got {expand!r}")
        d_inner = expand * d_model
        if d_inner != int(d_inner) or d_inner <= 0:
            raise ValueError(f"Mamba2: expand * d_model must be a positive integer, got {expand} * {d_model}")
        d_inner = int(d_inner)
        d_ssm = d_inner if d_ssm is None else positive_int("Mamba2", "d_ssm", d_ssm)
        if d_ssm > d_inner:
            raise ValueError(f"Mamba2: d_ssm must be an int in (0, d_inner={d_inner}], got {d_ssm!r}")
        if d_ssm % headdim != 0:
            raise ValueError(f"Mamba2: headdim={headdim} must divide d_ssm={d_ssm}")
        nheads = d_ssm // headdim
        if nheads % ngroups != 0:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide the number of heads d_ssm/headdim={nheads}")
        for name, pair in (("A_init_range", A_init_range), ("dt_limit", dt_limit)):
            _check_pair(name, pair)
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2: A_init_range must satisfy 0 < low <= high, got {tuple(A_init_range)}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"Mamba2: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        if not 0 <= dt_limit[0] <= dt_limit[1]:
            raise ValueError(f"Mamba2: dt_limit must satisfy 0 <= low <= high, got {tuple(dt_limit)}")
        check_implementation("Mamba2", "ssd_implementation", ssd_implementation, SSD_IMPLEMENTATIONS)
        check_implementation("Mamba2", "step_implementation", step_implementation, STEP_IMPLEMENTATIONS)

        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_inner
        self.d_ssm = d_ssm
        self.headdim = headdim
        self.nheads = nheads
        self.ngroups = ngroups
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.chunk_size = chunk_size
        self.ssd_implementation = ssd_implementation
        self.dtype = dtype
        self.step_implementation = step_implementation
        self.norm_before_gate = norm_before_gate

        conv_dim = d_ssm + 2 * ngroups * d_state
        d_in_proj = 2 * d_inner + 2 * ngroups * d_state + nheads
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = linear(d_model, d_in_proj, axes=("embed", "proj"), use_bias=bias, **common)
        # XLA's conv: it fuses with the slices of in_proj's output on either side. The Pallas conv kernels, which
        # need xBC whole and split afterwards, made a 370m training step 2.5% slower (benchmarks/RESULTS.md).
        self.conv1d = CausalConv1d(conv_dim, d_conv, use_bias=conv_bias, implementation="xla", **common)
        if conv_init is not None:
            self.conv1d.kernel[...] = jax.random.uniform(
                rngs.params(), (d_conv, conv_dim), param_dtype, -conv_init, conv_init
            )
        self.dt_bias = param(rngs, _dt_bias_init(dt_min, dt_max, dt_init_floor), (nheads,), param_dtype, ("heads",))
        # A_log and D stay float32 whatever param_dtype is (docs/architecture.md): a 16-bit A_log would quantise the
        # per-head decay rates exp(dt * A) that the whole state depends on.
        self.A_log = param(rngs, _a_log_init(*A_init_range), (nheads,), jnp.float32, ("heads",))
        d_shape, d_axes = ((d_ssm,), ("inner",)) if D_has_hdim else ((nheads,), ("heads",))
        self.D = with_axes(nnx.Param(jnp.ones(d_shape, jnp.float32)), d_axes)
        self.norm = (
            RMSNormGated(d_ssm, eps=1e-5, group_size=d_ssm // ngroups, norm_before_gate=norm_before_gate, **common)
            if rmsnorm
            else None
        )
        self.out_proj = linear(d_inner, d_model, axes=("inner", "embed"), use_bias=bias, **common)

    def __call__(self, u: jax.Array) -> jax.Array:
        """u (b, l, d) -> (b, l, d); b, l >= 1."""
        self._check_input(u, 3)
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state

        z0, x0, z, xbc, dt = self._split_projection(self.in_proj(u))
        xbc = self.conv1d(xbc, silu=True)
        x, B, C = jnp.split(xbc, [self.d_ssm, self.d_ssm + g * n], axis=-1)

        A = -jnp.exp(self.A_log[...].astype(jnp.float32))
        y = mamba_chunk_scan(
            x.reshape(b, l, h, p),
            dt,
            A,
            B.reshape(b, l, g, n),
            C.reshape(b, l, g, n),
            self.chunk_size,
            D=self._skip(),
            z=None if self.rmsnorm else z.reshape(b, l, h, p),  # without the norm the scan applies silu(z)
            dt_bias=self.dt_bias[...],
            dt_softplus=True,
            dt_limit=self.dt_limit,
            implementation=self.ssd_implementation,
        )
        return self._gate_and_project(y.reshape(b, l, self.d_ssm), z, z0, x0)

    # ---- decoding: a cache of the conv window and the SSM state (mamba_jax.generation.cache) ----

    def init_cache(
        self, batch: int, max_len: int | None = None, dtype=jnp.float32, state_dtype=jnp.float32
    ) -> SSMCache:
        """An empty cache: conv_state (b, w, d_ssm + 2*g*n) in ``dtype``, ssm_state (b, h, p, n) in ``state_dtype``
        (float32; a 16-bit state halves its bytes, updated in float32 and rounded at every token).
        ``max_len`` is unused (the state does not grow with the sequence); every mixer has the same signature."""
        del max_len
        width, conv_dim = self.conv1d.kernel.shape
        return SSMCache(
            conv_state=jnp.zeros((batch, width, conv_dim), dtype),
            ssm_state=jnp.zeros((batch, self.nheads, self.headdim, self.d_state), state_dtype),
        )

    def prefill(self, u: jax.Array, cache: SSMCache, lengths: jax.Array | None = None) -> tuple[jax.Array, SSMCache]:
        """Run a whole (right-padded) chunk of tokens from ``cache`` with the chunked scan.

        u (b, l, d); lengths int (b,) valid positions per row (default l) -> (out (b, l, d), the cache after each
        row's last valid position). Outputs past a row's length are not meaningful. From an empty cache ``out``
        equals ``self(u)``.
        """
        self._check_input(u, 3)
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        lengths = check_lengths(lengths, b, l)

        z0, x0, z, xbc, dt = self._split_projection(self.in_proj(u))
        xbc, conv_state = conv_prefill(self.conv1d, xbc, cache.conv_state, lengths, silu=True)
        x, B, C = jnp.split(xbc, [self.d_ssm, self.d_ssm + g * n], axis=-1)
        # dt as the scan would discretise it, then 0 past each row's length: such a step leaves the state unchanged.
        dt = mask_past_lengths(self._discretize_dt(dt), lengths, 0.0)
        y, ssm_state = mamba_chunk_scan(
            x.reshape(b, l, h, p),
            dt,
            -jnp.exp(self.A_log[...].astype(jnp.float32)),
            B.reshape(b, l, g, n),
            C.reshape(b, l, g, n),
            self.chunk_size,
            D=self._skip(),
            z=None if self.rmsnorm else z.reshape(b, l, h, p),
            initial_states=cache.ssm_state.astype(jnp.float32),
            return_final_states=True,
            implementation=self.ssd_implementation,
        )
        out = self._gate_and_project(y.reshape(b, l, self.d_ssm), z, z0, x0)
        return out, SSMCache(conv_state, ssm_state.astype(cache.ssm_state.dtype))

    def step(self, u: jax.Array, cache: SSMCache) -> tuple[jax.Array, SSMCache]:
        """One token per row: u (b, d) -> (out (b, d), the cache after it), in O(1) time and memory.

        The whole step is ``pallas_kernels.mamba2_step`` with ``step_implementation`` (None: the fused kernels on a
        GPU at batch 1, where they were measured faster, else XLA op by op). Unlike mamba_ssm's
        ``step`` this applies ``dt_limit``, as the full-sequence forward does, so decoding reproduces ``self(u)`` for
        every model (mamba_ssm's differs when a model sets a limit).
        """
        out, conv_state, ssm_state = self._step(u, cache, None)
        return out, SSMCache(conv_state, ssm_state)

    def _step(self, u, cache: SSMCache, prenorm: PreNorm | None, partial_out: bool = False) -> tuple[jax.Array, ...]:
        """``mamba2_step`` of this layer's weights: (out, conv_state, ssm_state[, residual]). u (b, d), or a previous
        Mamba-1 block's ``PartialSums``, which XLA adds first; ``partial_out`` is not used (out is always (b, d))."""
        del partial_out
        u = settled(u)
        self._check_input(u, 2)
        weights = Mamba2StepWeights(
            in_proj=self.in_proj.kernel[...],
            in_proj_bias=value_or_none(self.in_proj.bias),
            conv=self.conv1d.kernel[...],
            conv_bias=value_or_none(self.conv1d.bias),
            dt_bias=self.dt_bias[...],
            A_log=self.A_log[...],
            D=self.D[...],
            norm=None if self.norm is None else self.norm.weight[...],
            out_proj=self.out_proj.kernel[...],
            out_proj_bias=value_or_none(self.out_proj.bias),
        )
        options = Mamba2StepOptions(
            self.ngroups, self.dt_limit, self.norm_before_gate, 1e-5 if self.norm is None else self.norm.eps
        )
        dtype = self._step_dtype(u, prenorm, weights.in_proj)
        return mamba2_step(
            u,
            cache.conv_state,
            cache.ssm_state,
            weights,
            dtype=dtype,
            options=options,
            implementation=self.step_implementation,
            prenorm=prenorm,
        )

    # ---- pieces shared by the three paths ----

    def _check_input(self, u: jax.Array, ndim: int) -> None:
        """u must be (b, l, d) with b, l >= 1 (ndim 3) or (b, d) (ndim 2)."""
        if u.ndim != ndim or u.shape[-1] != self.d_model:
            shape = "(batch, seqlen, " if ndim == 3 else "(batch, "
            raise ValueError(f"Mamba2: input must have shape {shape}{self.d_model}), got {u.shape}")
        if ndim == 3:
            check_sequence_input("Mamba2", u)

    def _split_projection(self, zxbcdt: jax.Array) -> list[jax.Array]:
        """in_proj output (..., 2di + 2gn + h) -> [z0, x0 (..., di - d_ssm), z (..., d_ssm), xBC, dt (..., h)]."""
        d_mlp = self.d_inner - self.d_ssm
        sizes = [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state]
        return jnp.split(zxbcdt, np.cumsum(sizes).tolist(), axis=-1)

    def _skip(self) -> jax.Array:
        """D as the scans take it: (h,), or (h, p) when D_has_hdim."""
        return self.D[...].reshape(self.nheads, self.headdim) if self.D_has_hdim else self.D[...]

    def _discretize_dt(self, dt: jax.Array) -> jax.Array:
        """dt (..., h) -> float32 clip(softplus(dt + dt_bias), *dt_limit), as ``mamba_chunk_scan`` computes it."""
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))
        return jnp.clip(dt, *self.dt_limit)

    def _gate_and_project(self, y: jax.Array, z: jax.Array, z0: jax.Array, x0: jax.Array) -> jax.Array:
        """y, z (..., d_ssm), z0, x0 (..., di - d_ssm) -> out_proj([silu(z0) * x0, norm(y, z)]) (..., d)."""
        if self.norm is not None:
            y = self.norm(y, z)
        if self.d_inner > self.d_ssm:
            y = jnp.concatenate([jax.nn.silu(z0) * x0, y], axis=-1)
        return self.out_proj(y)


def _check_pair(name: str, value) -> None:
    """A ValueError naming ``name`` unless value is a pair (low, high) of real numbers (list or tuple)."""
    numbers_only = isinstance(value, list | tuple) and all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) for v in value
    )
    if not (numbers_only and len(value) == 2):
        raise ValueError(f"Mamba2: {name} must be a pair (low, high) of numbers, got {value!r}")
