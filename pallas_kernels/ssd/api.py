"""``mamba_chunk_scan``: the Mamba-2 SSD op, with the argument layout of mamba_ssm's ``mamba_chunk_scan_combined``.

This file checks the arguments, applies what every implementation shares (dt bias / softplus / clamp before the scan,
the D skip and the z gate after it, sequence resets from ``seq_idx``) and dispatches on ``implementation=``.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import dt_limit_pair, python_bool, python_int
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported
from pallas_kernels.ssd.pallas import ssd_pallas
from pallas_kernels.ssd.reference import ssd_reference
from pallas_kernels.ssd.xla import ssd_chunked

IMPLEMENTATIONS = ("reference", "chunked", "pallas")


def mamba_chunk_scan(
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    chunk_size: int,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    initial_states: jax.Array | None = None,
    seq_idx: jax.Array | None = None,
    return_final_states: bool = False,
    *,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """The SSD (Mamba-2) selective scan over a whole sequence.

    Per head h, with group g(h) = h // (h_total / g_total) and everything computed in float32::

        dt      = clip(softplus(dt + dt_bias), *dt_limit)       # bias and softplus optional; the clip always applies
        state_t = exp(dt_t A_h) state_{t-1} + dt_t outer(x_t, B_t[g(h)])     # state (p, n), state_{-1} = initial
        y_t     = state_t C_t[g(h)] + D_h x_t
        out_t   = y_t * silu(z_t)                                              # if z is given

    The clip applies even at the default ``dt_limit`` (it maps a negative dt to 0), as in mamba_ssm.

    Packed sequences (``seq_idx``): the state is reset to zero before every position whose index differs from the
    previous position's, and the position before the first counts as index 0. So ``initial_states`` feeds only the
    leading sequence, and only if its index is 0; with indices numbered 0, 1, 2, ... that is the first sequence, as
    in mamba_ssm. (mamba_ssm matches tokens of equal index inside a chunk instead of detecting changes; the two agree
    for non-decreasing ``seq_idx``, the only form it is used with.)

    Args:
      x: (b, l, h, p), any float dtype; l need not be a multiple of ``chunk_size``.
      dt: (b, l, h).
      A: (h,), normally negative (-exp(A_log)).
      B, C: (b, l, g, n), h divisible by g.
      chunk_size: c >= 1, static. Only the "chunked" implementation uses it (256 in Mamba-2).
      D: (h,) or (h, p), optional skip connection.
      z: (b, l, h, p), optional gate.
      dt_bias: (h,), optional.
      dt_softplus: static.
      dt_limit: (low, high) static floats, low <= high.
      initial_states: (b, h, p, n), optional; used in float32.
      seq_idx: (b, l) integer, optional.
      return_final_states: static; also return the state after the last position.
      implementation: "reference" (sequential lax.scan), "chunked" (matrix form in XLA) or "pallas" (Pallas GPU
        kernels, pallas.py; Pallas's interpreter where no supported GPU is present: slow, for tests). None picks
        "pallas" on a supported GPU and "chunked" elsewhere, and "chunked" for packed sequences (``seq_idx``), which
        the kernels do not handle ("pallas" with ``seq_idx`` is a ValueError).

    Returns:
      out (b, l, h, p) in x's dtype; with ``return_final_states`` the tuple (out, final_states), final_states
      (b, h, p, n) float32 (mamba_ssm returns them in C's dtype).

    Jit-able with the arguments marked static above; differentiable (reverse mode: ``jax.grad`` / ``jax.vjp``; the
    Pallas path is a ``custom_vjp``, so no ``jax.jvp`` through it) in x, dt, A, B, C, D, z, dt_bias and
    initial_states. "chunked" keeps a few (b, l / c, c, c, h) float32 intermediates (b l c h elements each: linear in
    l); the sequential "reference" stores every (b, h, p, n) state for its backward pass.
    """
    if implementation is None:
        implementation = "pallas" if pallas_supported() and seq_idx is None else "chunked"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
    if implementation == "pallas" and seq_idx is not None:
        raise ValueError("implementation='pallas' does not take seq_idx (packed sequences): use 'chunked' or None")
    if implementation == "pallas" and pallas_supported():
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    chunk_size = python_int("chunk_size", chunk_size)
    dt_limit = dt_limit_pair("dt_limit", dt_limit)
    dt_softplus = python_bool("dt_softplus", dt_softplus)
    return_final_states = python_bool("return_final_states", return_final_states)
    x, dt, A, B, C = (jnp.asarray(a) for a in (x, dt, A, B, C))
    D, z, dt_bias, initial_states, seq_idx = (
        None if a is None else jnp.asarray(a) for a in (D, z, dt_bias, initial_states, seq_idx)
    )
    _check_arguments(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    out, final_states = _mamba_chunk_scan(
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        initial_states,
        seq_idx,
        chunk_size=chunk_size,
        dt_softplus=dt_softplus,
        dt_limit=dt_limit,
        implementation=implementation,
    )
    return (out, final_states) if return_final_states else out


@functools.partial(jax.jit, static_argnames=("chunk_size", "dt_softplus", "dt_limit", "implementation"))
def _mamba_chunk_scan(
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, *, chunk_size, dt_softplus, dt_limit, implementation
):
    """The shared prologue and epilogue around one implementation; arguments already checked."""
    f32 = jnp.float32
    batch, _, heads, headdim = x.shape
    d_state = B.shape[3]

    dt = dt.astype(f32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(f32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    dt = jnp.clip(dt, dt_limit[0], dt_limit[1])

    if initial_states is None:
        initial_states = jnp.zeros((batch, heads, headdim, d_state), f32)
    # A reset wherever seq_idx changes, with index 0 before the first position (the initial state's sequence).
    if seq_idx is None:
        resets = jnp.zeros(x.shape[:2], bool)
    else:
        previous = jnp.pad(seq_idx[:, :-1], ((0, 0), (1, 0)))
        resets = seq_idx != previous

    skip = None if D is None else (D.astype(f32) if D.ndim == 2 else D.astype(f32)[:, None])  # (h, p) or (h, 1)
    if implementation == "pallas":  # adds the skip itself; rounds y to x's dtype unless the gate follows
        out_dtype = f32 if z is not None else x.dtype
        y, final_states = ssd_pallas(
            x, dt, A, B, C, skip, initial_states, out_dtype=out_dtype, interpret=not pallas_supported()
        )
    else:
        if implementation == "reference":
            y, final_states = ssd_reference(x, dt, A, B, C, initial_states.astype(f32), resets)
        else:
            y, final_states = ssd_chunked(x, dt, A, B, C, initial_states.astype(f32), resets, chunk_size)
        if skip is not None:
            y = y + skip * x.astype(f32)
    if z is not None:
        y = y * jax.nn.silu(z.astype(f32))
    return y.astype(x.dtype), final_states


def _check_float(name: str, a: jax.Array) -> None:
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")


def _check_shape(name: str, a: jax.Array | None, *expected: tuple[int, ...]) -> None:
    if a is None:
        return
    _check_float(name, a)
    if a.shape not in expected:
        wanted = " or ".join(str(s) for s in expected)
        raise ValueError(f"{name} must have shape {wanted}, got {a.shape}")


def _check_arguments(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must have shape (batch, seqlen, nheads, headdim), got {x.shape}")
    _check_float("x", x)
    batch, length, heads, headdim = x.shape
    if length < 1:
        raise ValueError(f"x must have seqlen >= 1, got shape {x.shape}")
    if B.ndim != 4 or B.shape[:2] != (batch, length):
        raise ValueError(f"B must have shape ({batch}, {length}, ngroups, dstate), got {B.shape}")
    groups, d_state = B.shape[2:]
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"nheads ({heads}) must be divisible by ngroups ({groups}, from B of shape {B.shape})")
    _check_float("B", B)
    _check_shape("C", C, B.shape)
    _check_shape("dt", dt, (batch, length, heads))
    _check_shape("A", A, (heads,))
    _check_shape("D", D, (heads,), (heads, headdim))
    _check_shape("z", z, x.shape)
    _check_shape("dt_bias", dt_bias, (heads,))
    _check_shape("initial_states", initial_states, (batch, heads, headdim, d_state))
    if seq_idx is not None:
        if not jnp.issubdtype(seq_idx.dtype, jnp.integer):
            raise ValueError(f"seq_idx must have an integer dtype, got {seq_idx.dtype}")
        if seq_idx.shape != (batch, length):
            raise ValueError(f"seq_idx must have shape {(batch, length)}, got {seq_idx.shape}")
