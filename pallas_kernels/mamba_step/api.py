"""``mamba_step``: one decode step of a whole Mamba-1 mixer (in_proj, conv, x_proj, dt_proj, state update, gate,
out_proj), checked and dispatched to ``reference`` (XLA, ``reference.py``) or ``pallas`` (three GPU kernels,
``pallas.py``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.mamba_step.reference import MambaStepWeights, PartialSums, PreNorm, mamba_step_reference

IMPLEMENTATIONS = ("pallas", "reference")


@functools.cache
def _implementation(name: str):
    """The jitted implementation ``name`` with the arguments of ``mamba_step_reference``."""
    if name == "reference":
        return jax.jit(mamba_step_reference, static_argnames=("dtype",))
    from pallas_kernels.mamba_step.pallas import mamba_step_pallas  # GPU-only dependencies: import on use

    return jax.jit(mamba_step_pallas, static_argnames=("dtype", "partial_out"))


def default_implementation(batch: int, d_model: int, d_inner: int) -> str:
    """What ``implementation=None`` runs: the kernels on a GPU Pallas compiles for, else XLA.

    Measured per layer on an H100, fp16 (benchmarks/RESULTS.md, "Mamba-1 2.8b: out_proj by XLA" and "Past one row:
    in_proj's kernel with every row"): at batch 1 the kernels take 39% and 43% less time than XLA at d_model 768
    and 2048 (Mamba-1 130m, 1.4b), and 8-12% less at 2560 (2.8b), where both projections are XLA's own products
    (``XLA_IN_PROJ_FROM``, ``XLA_OUT_PROJ_FROM``); at batch 64 18%, 20% and 9% less at the three sizes, and 16% at
    1.4b's at batch 16."""
    from pallas_kernels.mamba_step.pallas import supports
    from pallas_kernels.selective_scan.pallas import pallas_supported

    if pallas_supported() and supports(batch, d_model, d_inner):
        return "pallas"
    return "reference"


def mamba_step(
    u: jax.Array | PartialSums,
    conv_state: jax.Array,
    ssm_state: jax.Array,
    weights: MambaStepWeights,
    *,
    dtype,
    implementation: str | None = None,
    prenorm: PreNorm | None = None,
    partial_out: bool = False,
) -> tuple[jax.Array | PartialSums, ...]:
    """One token through a Mamba-1 mixer: (out, new conv_state, new ssm_state); the caller's arrays are left as they
    were (inside a decode loop XLA may reuse the carried cache's buffers). With ``prenorm`` (``PreNorm``: the block's
    residual add + RMSNorm, which the kernels compute themselves: in their first launch, or in a launch of its own
    before XLA's in_proj) u is the block's hidden and the new float32 residual comes fourth.

    Shapes: u (b, d); conv_state (b, w, di) the last w conv inputs, oldest first; ssm_state (b, di, n) float32 (or
    16-bit: read and written in its dtype); ``weights`` a ``MambaStepWeights`` (shapes there). ``dtype`` is the
    compute dtype of the projections and the conv (``Mamba``'s ``dtype``, or its inputs' and parameters' promoted
    dtype); the state update runs in float32.

    implementation: "reference" (XLA, op by op), "pallas" (three kernels and two XLA sums, or two kernels between
      XLA's own projections; without a supported GPU Pallas's interpreter, slowly), or None:
      ``default_implementation`` (the kernels on a GPU where they were measured faster, else "reference"). Both
      are differentiable, the kernels by running the reference under jax.grad or jax.jvp.
    partial_out: let the kernels return out as a ``PartialSums`` where XLA's out_proj runs past one row (and has no
      bias), for the next block's step to add in its norm launch: one launch less a layer. u may be a previous step's
      ``PartialSums`` (with or without ``prenorm``); every implementation takes it.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    _check(u, conv_state, ssm_state, weights)
    check_prenorm("mamba_step", u, prenorm)
    batch, d_model = u.shape
    if implementation is None:
        implementation = default_implementation(batch, d_model, conv_state.shape[2])
    run = _implementation(implementation)
    options = {"partial_out": True} if partial_out and implementation == "pallas" else {}
    return run(u, conv_state, ssm_state, weights, dtype=jnp.dtype(dtype), prenorm=prenorm, **options)


def check_prenorm(caller: str, u: jax.Array, prenorm: PreNorm | None) -> None:
    """ValueError unless ``prenorm`` is None or a ``PreNorm`` whose residual and weight fit u (b, d)."""
    if prenorm is None:
        return
    if not isinstance(prenorm, PreNorm):
        raise ValueError(f"{caller}: prenorm must be a PreNorm or None, got {type(prenorm).__name__}")
    if prenorm.residual is not None and prenorm.residual.shape != u.shape:
        raise ValueError(f"{caller}: prenorm.residual must have u's shape {u.shape}, got {prenorm.residual.shape}")
    if prenorm.weight.shape != u.shape[1:]:
        raise ValueError(f"{caller}: prenorm.weight must have shape {u.shape[1:]}, got {prenorm.weight.shape}")


def check_partial_sums(caller: str, u) -> None:
    """ValueError unless u is an array or a ``PartialSums`` of float32 sums (parts, b, d)."""
    if isinstance(u, PartialSums) and (u.sums.ndim != 3 or u.sums.dtype != jnp.float32):
        raise ValueError(
            f"{caller}: u as PartialSums needs float32 sums (parts, batch, d_model), got {u.sums.dtype} {u.sums.shape}"
        )


def check_state_dtype(caller: str, ssm_state: jax.Array) -> None:
    """ValueError unless the SSM state is floating (float32, or 16-bit: the steps read and write it in its dtype)."""
    if not jnp.issubdtype(ssm_state.dtype, jnp.floating):
        raise ValueError(f"{caller}: ssm_state must be floating (float32, bfloat16, float16), got {ssm_state.dtype}")


def _check(u, conv_state, ssm_state, weights: MambaStepWeights) -> None:
    """ValueError naming the first argument whose shape does not fit the others."""
    check_partial_sums("mamba_step", u)
    if u.ndim != 2:
        raise ValueError(f"mamba_step: u must have shape (batch, d_model), got {u.shape}")
    batch, d_model = u.shape
    if ssm_state.ndim != 3 or ssm_state.shape[0] != batch:
        raise ValueError(f"mamba_step: ssm_state must have shape ({batch}, d_inner, d_state), got {ssm_state.shape}")
    check_state_dtype("mamba_step", ssm_state)
    _, d_inner, d_state = ssm_state.shape
    width = weights.conv.shape[0]
    rank = weights.dt_proj.shape[0]
    expected = {
        "conv_state": (conv_state, (batch, width, d_inner)),
        "in_proj": (weights.in_proj, (d_model, 2 * d_inner)),
        "in_proj_bias": (weights.in_proj_bias, (2 * d_inner,)),
        "conv": (weights.conv, (width, d_inner)),
        "conv_bias": (weights.conv_bias, (d_inner,)),
        "x_proj": (weights.x_proj, (d_inner, rank + 2 * d_state)),
        "dt_proj": (weights.dt_proj, (rank, d_inner)),
        "dt_bias": (weights.dt_bias, (d_inner,)),
        "A_log": (weights.A_log, (d_inner, d_state)),
        "D": (weights.D, (d_inner,)),
        "out_proj": (weights.out_proj, (d_inner, d_model)),
        "out_proj_bias": (weights.out_proj_bias, (d_model,)),
    }
    for name, (array, shape) in expected.items():
        if array is not None and array.shape != shape:
            raise ValueError(f"mamba_step: {name} must have shape {shape}, got {array.shape}")
