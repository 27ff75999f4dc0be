"""``selective_scan``: validate, normalise, dispatch to one implementation.

Normalised internal interface, the same for every implementation (``reference``, ``associative``, ``chunked``,
``pallas``)::

    impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state) -> (out, last_state)

    u, delta     (b, l, di) floating
    A            (di, n) float32
    B, C         (b, l, g, n) floating, always grouped (g = 1 when the caller passed (b, l, n)); g divides di and
                 channel d reads group d // (di / g)
    D            (di,) floating or None
    z            (b, l, di) floating or None
    delta_bias   (di,) floating or None
    delta_softplus  Python bool
    initial_state   (b, di, n) float32 or None (None: zeros)
    out          (b, l, di) in u's dtype
    last_state   (b, di, n) float32, always returned (the api drops it unless asked)

Shapes and dtypes are checked here, so implementations may rely on them. Math (mamba_ssm's ``selective_scan_ref``,
float32 inside whatever the input dtype): delta = softplus(delta + delta_bias), each step optional;
h_t = exp(delta_t A) h_{t-1} + delta_t u_t B_t with h_0 = initial_state; y_t = <h_t, C_t> over n;
out = (y + D u) silu(z). Every implementation is jit-able and reverse-mode differentiable in all float arguments.
"""

import functools
import logging

import jax
import jax.numpy as jnp
from jax.extend import backend as jax_backend

from pallas_kernels.arguments import python_bool
from pallas_kernels.selective_scan.reference import selective_scan_reference
from pallas_kernels.selective_scan.xla import selective_scan_associative, selective_scan_chunked

logger = logging.getLogger("pallas_kernels")

IMPLEMENTATIONS = ("reference", "associative", "chunked", "pallas")
# The Pallas forward's results its backward uses, named (jax.ad_checkpoint.checkpoint_name) for rematerialisation
# policies: the output (b, l, di) and the chunk start states float32 (b, K, n, di). A policy that saves both, and the
# scan's inputs, never runs the forward launch again in the backward (mamba_jax.train.remat's "dots_scan").
SAVEABLE_NAMES = ("selective_scan_output", "selective_scan_chunk_states")


def _pallas_usable() -> bool:
    """True on an NVIDIA GPU backend when the Pallas kernel module imports and says it supports the device."""
    if jax.default_backend() != "gpu" or "cuda" not in jax_backend.get_backend().platform_version.lower():
        return False
    try:
        from pallas_kernels.selective_scan.pallas import pallas_supported
    except ImportError as error:
        logger.debug("selective_scan: the Pallas kernel does not import (%s)", error)
        return False
    return pallas_supported()


@functools.cache
def default_implementation() -> str:
    """``"pallas"`` where ``_pallas_usable()``, else ``"chunked"``; decided (and logged) once per process."""
    name = "pallas" if _pallas_usable() else "chunked"
    logger.debug("selective_scan: implementation=None -> %r (backend %r)", name, jax.default_backend())
    return name


@functools.cache
def _implementation(name: str):
    """The implementation ``name`` under ``jax.jit`` (``delta_softplus`` static). Inside a model's jit every layer
    then calls one traced and lowered function instead of tracing and lowering the scan (and its kernels) again: on
    an H100 lowering the Pallas scan's forward and backward took 2-5 s per layer, 3-4 minutes of a 48-layer training
    step's compile (benchmarks/RESULTS.md, "Compile time")."""
    if name == "reference":
        fn = selective_scan_reference
    elif name == "associative":
        fn = selective_scan_associative
    elif name == "chunked":
        fn = selective_scan_chunked
    else:
        from pallas_kernels.selective_scan.pallas import selective_scan_pallas  # GPU-only dependencies: import on use

        fn = selective_scan_pallas
    return jax.jit(fn, static_argnums=8)


def _check_array(name: str, x, shape: tuple[int, ...], shape_text: str, float32: bool = False) -> jax.Array:
    """``x`` as an array of ``shape`` with a floating dtype (float32 if asked), else a ValueError naming it."""
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape_text} = {shape}, found {x.shape}")
    if float32 and x.dtype != jnp.float32:
        raise ValueError(f"{name} must be float32, found {x.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, found {x.dtype}")
    return x


def _check_grouped(name: str, x, batch: int, seqlen: int, d_state: int) -> jax.Array:
    """B or C given as (b, l, n) or (b, l, g, n) -> (b, l, g, n), else a ValueError naming it."""
    x = jnp.asarray(x)
    shape_text = "(batch, seqlen, d_state) or (batch, seqlen, ngroups, d_state)"
    if x.ndim not in (3, 4) or x.shape[:2] != (batch, seqlen) or x.shape[-1] != d_state or 0 in x.shape:
        raise ValueError(
            f"{name} must have shape {shape_text} with batch, seqlen, d_state = {batch}, {seqlen}, {d_state}, "
            f"found {x.shape}"
        )
    grouped = x[:, :, None, :] if x.ndim == 3 else x
    return _check_array(name, grouped, grouped.shape, shape_text)


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: jax.Array | None = None,
    *,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Mamba-1 selective scan, channels-last.

    Args:
        u, delta: (b, l, di), floating.
        A: (di, n) float32 (in Mamba, -exp(A_log)).
        B, C: (b, l, n), or grouped (b, l, g, n) where g divides di and channel d reads group d // (di / g).
        D: optional (di,) skip weight; z: optional (b, l, di) gate; delta_bias: optional (di,).
        delta_softplus: apply softplus to delta + delta_bias.
        return_last_state: also return the final state.
        initial_state: optional (b, di, n) float32 state before the first step (default zeros).
        implementation: "reference", "associative", "chunked", "pallas", or None for the best available
            ("pallas" on an NVIDIA GPU when the kernel supports it, else "chunked").

    Returns:
        out (b, l, di) in u's dtype, or (out, last_state (b, di, n) float32) with ``return_last_state``; "reference"
        scans in float64 (and returns that state) when an argument is float64 (under ``jax_enable_x64``).

    Reverse-mode differentiable (``jax.grad`` / ``jax.vjp``) in every floating argument; "chunked" and "pallas" are
    ``custom_vjp`` functions, so ``jax.jvp`` / ``jax.jacfwd`` / second derivatives need "reference" or "associative".
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, found {implementation!r}")
    delta_softplus = python_bool("delta_softplus", delta_softplus)
    return_last_state = python_bool("return_last_state", return_last_state)

    u = jnp.asarray(u)
    if u.ndim != 3 or 0 in u.shape:
        raise ValueError(f"u must have shape (batch, seqlen, dim) with every size positive, found {u.shape}")
    batch, seqlen, dim = u.shape
    u = _check_array("u", u, u.shape, "(batch, seqlen, dim)")
    delta = _check_array("delta", delta, u.shape, "u's shape (batch, seqlen, dim)")

    A = jnp.asarray(A)
    if A.ndim != 2 or A.shape[0] != dim or A.shape[1] == 0:
        raise ValueError(f"A must have shape (dim, d_state) = ({dim}, d_state) with d_state > 0, found {A.shape}")
    d_state = A.shape[1]
    A = _check_array("A", A, A.shape, "(dim, d_state)", float32=True)

    B = _check_grouped("B", B, batch, seqlen, d_state)
    C = _check_grouped("C", C, batch, seqlen, d_state)
    ngroups = B.shape[2]
    if C.shape[2] != ngroups:
        raise ValueError(f"C must have B's ngroups = {ngroups}, found ngroups = {C.shape[2]}")
    if dim % ngroups:
        raise ValueError(f"ngroups of B and C must divide dim = {dim}, found ngroups = {ngroups}")

    if D is not None:
        D = _check_array("D", D, (dim,), "(dim,)")
    if z is not None:
        z = _check_array("z", z, u.shape, "u's shape (batch, seqlen, dim)")
    if delta_bias is not None:
        delta_bias = _check_array("delta_bias", delta_bias, (dim,), "(dim,)")
    if initial_state is not None:
        initial_state = _check_array(
            "initial_state", initial_state, (batch, dim, d_state), "(batch, dim, d_state)", float32=True
        )

    impl = _implementation(implementation or default_implementation())
    out, last_state = impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return (out, last_state) if return_last_state else out
