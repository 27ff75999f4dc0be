"""``selective_state_update``: one decode step for both state layouts, as mamba_ssm's op of the same name.

This file checks the arguments, brings both layouts to the general head layout of ``reference.py`` and dispatches
to an implementation: ``reference`` (XLA, ``reference.py``) or ``pallas`` (one GPU kernel, ``pallas.py``). Mamba-1's
groups become heads, each of its di / g channels a row of p (h = g, p = di / g; the reshapes are free), so the
kernel's programs own many channels. Mamba-2's per-head dt, A, dt_bias and D stay size 1 along p (and A along n) and
broadcast.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.arguments import python_bool
from pallas_kernels.state_update.reference import state_update_reference

IMPLEMENTATIONS = ("pallas", "reference")


@functools.cache
def _implementation(name: str):
    """The jitted implementation ``name`` with the arguments of ``state_update_reference``."""
    if name == "reference":
        return jax.jit(state_update_reference, static_argnames=("dt_softplus",))
    from pallas_kernels.state_update.pallas import state_update_pallas  # GPU-only dependencies: import on use

    return jax.jit(state_update_pallas, static_argnames=("dt_softplus",))


def selective_state_update(
    state: jax.Array,
    x: jax.Array,
    dt: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    dt_bias: jax.Array | None = None,
    dt_softplus: bool = False,
    *,
    implementation: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Advance the SSM state by one token: returns (out, new_state); the caller's state array is left as it was.

    In float32, per channel (Mamba-1) or per head (Mamba-2) with its group of B and C::

        dt        = softplus(dt + dt_bias)               # bias and softplus optional; no dt_limit clamp
        new_state = exp(dt A) state + dt outer(x, B)
        out       = (new_state C + D x) * silu(z)        # D and z optional

    Unlike ``mamba_chunk_scan`` no ``dt_limit`` clamp is applied: mamba_ssm's decode step does not apply it either
    (a quirk of Mamba-2's ``step``); clamp dt before the call if the model was trained with a limit.

    Mamba-1 layout (state has 3 dimensions), channel d reading group d // (di / g):
      state (b, di, n); x, dt, z (b, di); A (di, n); B, C (b, n) or (b, g, n); D, dt_bias (di,).
    Mamba-2 layout (state has 4 dimensions), head h reading group h // (h_total / g):
      state (b, h, p, n); x, z (b, h, p); dt (b, h) or (b, h, p); A (h,) or (h, p, n); B, C (b, g, n) or (b, n);
      D (h,) or (h, p); dt_bias (h,) or (h, p). The per-head forms are Mamba-2's own parameters; the expanded forms
      are what mamba_ssm's Mamba-2 passes to its kernel (dt, A, dt_bias repeated over p, "tie_hdim").

    implementation: "reference" (XLA; also what None picks) or "pallas" (one kernel launch that reads and writes the
      state once; without a supported GPU it runs in Pallas's interpreter, slowly). The kernel is 13-17% faster than
      XLA per call for Mamba-1 states and level for Mamba-2's, but in whole-model generation on an H100 it gained
      nothing (benchmarks/RESULTS.md, "A Pallas state update"), so it is opt-in. It writes a float32 state's new value
      into the old one's buffer when XLA can give it up: in a decode loop (lax.while_loop, lax.scan) the carried
      cache is updated in place. Both are differentiable, the Pallas path by running the reference under jax.grad or
      jax.jvp.

    Returns:
      out in x's dtype, shaped like x; new_state float32, shaped like state (whatever state's float dtype was).
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    dt_softplus = python_bool("dt_softplus", dt_softplus)
    state, x, dt, A, B, C = (jnp.asarray(a) for a in (state, x, dt, A, B, C))
    D, z, dt_bias = (None if a is None else jnp.asarray(a) for a in (D, z, dt_bias))
    if state.ndim not in (3, 4):
        raise ValueError(
            "state must have shape (batch, dim, dstate) (Mamba-1) or (batch, nheads, headdim, dstate) (Mamba-2), "
            f"got {state.shape}"
        )
    mamba1 = state.ndim == 3
    if mamba1:
        _check_mamba1(state, x, dt, A, B, C, D, z, dt_bias)
        batch, dim, d_state = state.shape
        heads = B.shape[1] if B.ndim == 3 else 1
        state, A = state.reshape(batch, heads, -1, d_state), A.reshape(heads, -1, d_state)
        x, dt, z = (None if a is None else a.reshape(batch, heads, -1) for a in (x, dt, z))
        D, dt_bias = (None if a is None else a.reshape(heads, -1) for a in (D, dt_bias))
    else:
        _check_mamba2(state, x, dt, A, B, C, D, z, dt_bias)
        if dt.ndim == 2:
            dt = dt[..., None]
        if A.ndim == 1:
            A = A[:, None, None]
        if D is not None and D.ndim == 1:
            D = D[:, None]
        if dt_bias is not None and dt_bias.ndim == 1:
            dt_bias = dt_bias[:, None]
    if B.ndim == 2:
        B, C = B[:, None, :], C[:, None, :]
    update = _implementation(implementation or "reference")
    out, new_state = update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=dt_softplus)
    if mamba1:
        return out.reshape(batch, dim), new_state.reshape(batch, dim, d_state)
    return out, new_state


def _check(name: str, a: jax.Array | None, *expected: tuple[int, ...]) -> None:
    """ValueError unless ``a`` is None or a float array of one of the ``expected`` shapes."""
    if a is None:
        return
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")
    if a.shape not in expected:
        wanted = " or ".join(str(s) for s in expected)
        raise ValueError(f"{name} must have shape {wanted}, got {a.shape}")


def _check_B_C(B, C, batch: int, channels: int, d_state: int, what: str) -> None:
    """B and C: (b, n) or (b, g, n), float, with ``channels`` (dim or nheads) divisible by g."""
    groups = B.shape[1] if B.ndim == 3 else 1
    _check("B", B, (batch, d_state), (batch, groups, d_state))
    _check("C", C, B.shape)
    if groups < 1 or channels % groups != 0:
        raise ValueError(f"{what} ({channels}) must be divisible by ngroups ({groups}, from B of shape {B.shape})")


def _check_mamba1(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    _check("state", state, state.shape)
    batch, dim, d_state = state.shape
    _check("x", x, (batch, dim))
    _check("dt", dt, (batch, dim))
    _check("A", A, (dim, d_state))
    _check_B_C(B, C, batch, dim, d_state, "dim")
    _check("D", D, (dim,))
    _check("z", z, (batch, dim))
    _check("dt_bias", dt_bias, (dim,))


def _check_mamba2(state, x, dt, A, B, C, D, z, dt_bias) -> None:
    _check("state", state, state.shape)
    batch, heads, headdim, d_state = state.shape
    _check("x", x, (batch, heads, headdim))
    _check("dt", dt, (batch, heads), (batch, heads, headdim))
    _check("A", A, (heads,), (heads, headdim, d_state))
    _check_B_C(B, C, batch, heads, d_state, "nheads")
    _check("D", D, (heads,), (heads, headdim))
    _check("z", z, (batch, heads, headdim))
    _check("dt_bias", dt_bias, (heads,), (heads, headdim))
