"""``mamba2_step``: one decode step of a whole Mamba-2 mixer (in_proj, conv, state update, gated norm, out_proj),
checked and dispatched to ``reference`` (XLA, ``reference.py``) or ``pallas`` (GPU kernels, ``pallas.py``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import dt_limit_pair, python_int
from pallas_kernels.mamba2_step.reference import (
    DEFAULT_OPTIONS,
    Mamba2StepOptions,
    Mamba2StepWeights,
    mamba2_step_reference,
)
from pallas_kernels.mamba_step.api import check_prenorm, check_state_dtype
from pallas_kernels.mamba_step.reference import PreNorm

IMPLEMENTATIONS = ("pallas", "reference")


@functools.cache
def _implementation(name: str):
    """The jitted implementation ``name`` with the arguments of ``mamba2_step_reference``."""
    if name == "reference":
        return jax.jit(mamba2_step_reference, static_argnames=("dtype", "options"))
    from pallas_kernels.mamba2_step.pallas import mamba2_step_pallas  # GPU-only dependencies: import on use

    return jax.jit(mamba2_step_pallas, static_argnames=("dtype", "options"))


def default_implementation(batch: int, weights: Mamba2StepWeights, ssm_state_shape, options: Mamba2StepOptions) -> str:
    """What ``implementation=None`` runs: the kernels on a GPU Pallas compiles for where ``pallas.supports`` takes
    the mixer; else XLA. Past one row with a float32 state "the kernels" are a conv kernel and a gate-and-norm kernel
    around XLA's state update (``mamba2_step_pallas``'s ``xla_state``).

    Measured on an H100 (benchmarks/RESULTS.md, "A fused Mamba-2 decode step", "Past one row, Mamba-2", "A 16-bit
    SSM state" and "Mamba-2 past one row: the conv alone a kernel"): at batch 1 the kernels take 38%, 40% and 9%
    less time per layer than XLA at d_model 768, 2048 and 2560 (Mamba-2 130m, 1.3b, 2.7b); with an fp16 state,
    generation at batch 64 was 5-6% faster with them (1.3b and 2.7b); at batch 64 with a float32 state the two
    kernels around XLA's state update take 3-7% less time per layer than XLA's whole step (the fused state kernel
    was 1-4% slower: XLA's state update already runs at the bandwidth)."""
    from pallas_kernels.mamba2_step.pallas import supports
    from pallas_kernels.selective_scan.pallas import pallas_supported

    if not pallas_supported():
        return "reference"
    return "pallas" if supports(batch, weights, ssm_state_shape, options) else "reference"


def mamba2_step(
    u: jax.Array,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: Mamba2StepWeights,
    *,
    dtype,
    options: Mamba2StepOptions = DEFAULT_OPTIONS,
    implementation: str | None = None,
    prenorm: PreNorm | None = None,
) -> tuple[jax.Array, ...]:
    """One token through a Mamba-2 mixer: (out, new conv_state, new ssm_state); the caller's arrays are left as they
    were (inside a decode loop XLA may reuse the carried cache's buffers). With ``prenorm`` (``PreNorm``: the block's
    residual add + RMSNorm, which the kernels compute themselves: in their first launch, or in a launch of its own
    before XLA's in_proj) u is the block's hidden and the new float32 residual comes fourth.

    Shapes: u (b, d); conv_state (b, w, d_ssm + 2gn) the last w conv inputs, oldest first; ssm_state (b, h, p, n)
    float32 (or 16-bit: read and written in its dtype); ``weights`` a ``Mamba2StepWeights`` (shapes there);
    ``options`` the mixer's ngroups, dt_limit and norm settings. ``dtype`` is the compute dtype of the projections and
    the conv (``Mamba2``'s ``dtype``, or its inputs' and parameters' promoted dtype); the state update and the norm run
    in float32.

    implementation: "reference" (XLA, op by op), "pallas" (three kernel launches and a sum, or past one row with a
      float32 state two kernels around XLA's state update; without a supported GPU Pallas's interpreter, slowly),
      or None: ``default_implementation`` (the kernels on a GPU where ``pallas.supports`` takes the mixer; else
      "reference"). Both are differentiable, the kernels by running the reference under jax.grad or jax.jvp.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(options, Mamba2StepOptions):
        raise ValueError(f"mamba2_step: options must be a Mamba2StepOptions, got {type(options).__name__}")
    options = options._replace(
        ngroups=python_int("mamba2_step: options.ngroups", options.ngroups),
        dt_limit=dt_limit_pair("mamba2_step: options.dt_limit", options.dt_limit),
    )
    _check(u, conv_state, ssm_state, weights, options)
    check_prenorm("mamba2_step", u, prenorm)
    if implementation is None:
        implementation = default_implementation(u.shape[0], weights, ssm_state.shape, options)
    run = _implementation(implementation)
    return run(u, conv_state, ssm_state, weights, dtype=jnp.dtype(dtype), options=options, prenorm=prenorm)


def _check(u, conv_state, ssm_state, weights: Mamba2StepWeights, options: Mamba2StepOptions) -> None:
    """ValueError naming the first argument whose shape does not fit the others."""
    if u.ndim != 2:
        raise ValueError(f"mamba2_step: u must have shape (batch, d_model), got {u.shape}")
    batch, d_model = u.shape
    if ssm_state.ndim != 4 or ssm_state.shape[0] != batch:
        raise ValueError(
            f"mamba2_step: ssm_state must have shape ({batch}, nheads, headdim, d_state), got {ssm_state.shape}"
        )
    check_state_dtype("mamba2_step", ssm_state)
    _, heads, headdim, d_state = ssm_state.shape
    groups = options.ngroups
    if heads % groups:
        raise ValueError(f"mamba2_step: options.ngroups must be a positive divisor of nheads {heads}, got {groups!r}")
    d_ssm, width = heads * headdim, weights.conv.shape[0]
    d_inner = weights.out_proj.shape[0]
    conv_dim = d_ssm + 2 * groups * d_state
    d_in_proj = 2 * d_inner + 2 * groups * d_state + heads
    expected = {
        "conv_state": (conv_state, (batch, width, conv_dim)),
        "in_proj": (weights.in_proj, (d_model, d_in_proj)),
        "in_proj_bias": (weights.in_proj_bias, (d_in_proj,)),
        "conv": (weights.conv, (width, conv_dim)),
        "conv_bias": (weights.conv_bias, (conv_dim,)),
        "dt_bias": (weights.dt_bias, (heads,)),
        "A_log": (weights.A_log, (heads,)),
        "D": (weights.D, (d_ssm,) if weights.D.shape == (d_ssm,) else (heads,)),
        "norm": (weights.norm, (d_ssm,)),
        "out_proj": (weights.out_proj, (d_inner, d_model)),
        "out_proj_bias": (weights.out_proj_bias, (d_model,)),
    }
    for name, (array, shape) in expected.items():
        if array is not None and array.shape != shape:
            raise ValueError(f"mamba2_step: {name} must have shape {shape}, got {array.shape}")
    if d_inner < d_ssm:
        raise ValueError(f"mamba2_step: out_proj must have at least nheads * headdim = {d_ssm} rows, got {d_inner}")
