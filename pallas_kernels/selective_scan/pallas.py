"""The selective scan as Pallas GPU kernels, with a Pallas backward through ``jax.custom_vjp``.

``selective_scan_pallas`` takes the normalised arguments of ``api.py``. The forward reads u, delta, z, B and C once and
writes the gated output once, with the state in registers: on Mosaic GPU (``mosaic_fwd.py``) where that backend is
supported and covers the call, else on Triton (``pallas_fwd.py``). The backward runs on the forward's backend
(``mosaic_fwd.py`` and ``mosaic_bwd.py``, or ``pallas_fwd.py`` and ``pallas_bwd.py``): it first re-runs the forward
to store the state every ``blocks.backward_steps`` steps, then scans in reverse. Both split time into the same chunks,
scanned in parallel: the forward stitches them inside its output launch, the backward with the small XLA chain
below. Without a supported GPU the same kernels run in Pallas's interpreters (slow; for tests).
docs/kernels.md has the design and the measurements.
"""

import dataclasses
import functools
import logging
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.batch_split import ChannelSplit, over_batch
from pallas_kernels.selective_scan import mosaic_bwd, mosaic_fwd
from pallas_kernels.selective_scan.api import SAVEABLE_NAMES
from pallas_kernels.selective_scan.kernel_math import LOG2_E
from pallas_kernels.selective_scan.pallas_bwd import scan_adjoints, scan_backward, unpack_lane_sums
from pallas_kernels.selective_scan.pallas_config import DEFAULT_BLOCKS, ScanBlocks
from pallas_kernels.selective_scan.pallas_fwd import chunks_for, chunks_of, groups_of, scan_forward

# jax 0.11 warns at every lowering of a Triton-backend pallas_call. The lowering happens when the enclosing jit
# compiles, after our call returned, so a warnings.catch_warnings around the call cannot reach it (only eager calls).
# This filter matches that message and category alone.
TRITON_DEPRECATION = r"The Pallas Triton backend is deprecated and will be removed in a future JAX version"
logger = logging.getLogger("pallas_kernels")
PER_CHANNEL = ("A2", "D", "delta_bias")  # the kernel inputs without a batch dimension


def pallas_supported() -> bool:
    """True on an NVIDIA GPU of compute capability 8.0 or newer, the GPUs Pallas's Triton backend compiles for."""
    device = jax.devices()[0]
    if device.platform != "gpu":
        return False
    capability = str(getattr(device, "compute_capability", ""))
    return capability.split(".")[0].isdigit() and int(capability.split(".")[0]) >= 8


def selective_scan_pallas(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None,
    z: jax.Array | None,
    delta_bias: jax.Array | None,
    delta_softplus: bool,
    initial_state: jax.Array | None,
    *,
    blocks: ScanBlocks = DEFAULT_BLOCKS,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Selective scan with Pallas kernels; arguments and results as ``selective_scan_reference``.

    u, delta, z (b, l, di) floating (float32, bfloat16, float16); A float32 (di, n); B, C (b, l, g, n); D,
    delta_bias (di,) or None; initial_state float32 (b, di, n) or None. Returns out (b, l, di) in u's dtype and the
    last state float32 (b, di, n). Differentiable in every array argument. ``interpret`` None runs the compiled
    kernels where ``pallas_supported()``, else Pallas's interpreter.
    """
    _check_arguments(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if interpret is None:
        interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    blocks = plan_forward(blocks, u.shape, B.shape[2], interpret)
    return _scan(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), blocks, interpret)


def plan_forward(blocks: ScanBlocks, shape: tuple[int, int, int], groups: int, interpret: bool):
    """``blocks`` with ``forward_backend`` resolved to "triton" or "mosaic" for u of ``shape`` (b, l, di) and B, C
    of ``groups`` groups, and the chunk length, which the backward then shares: for Mosaic GPU its own (the
    backward's checkpoints start from the forward's chunk start states, and Mosaic GPU stores them too), for Triton
    what ``chunks_for`` gives the whole call. "auto" picks Mosaic GPU on a supported GPU (never in the interpreter) when
    ``mosaic_fwd.supports`` the call and ``blocks.steps`` divides its tiles."""
    _, seqlen, dim = shape
    # The backward runs Triton's tiles on the Mosaic chunks: blocks.steps (and backward_steps) must divide them.
    covered = mosaic_fwd.supports(seqlen, dim // groups) and mosaic_fwd.STEPS % blocks.steps == 0
    backend = blocks.forward_backend
    if backend == "auto":
        backend = "mosaic" if covered and not interpret and mosaic_fwd.device_supported() else "triton"
    logger.debug(
        "selective_scan_pallas: forward on %s for u %s, %d groups (asked: %r)",
        backend,
        shape,
        groups,
        blocks.forward_backend,
    )
    if backend == "triton":
        # The chunk length is fixed here, from the whole call's shape: inside a sharded jit each device runs the
        # kernels on its rows of the batch (over_batch), and a length chosen there from fewer rows would give other
        # chunk counts, and results of other shapes, than the call's.
        return dataclasses.replace(blocks, forward_backend="triton", chunk=chunks_for(blocks, shape, groups).length)
    if not covered or not mosaic_fwd.available():
        raise ValueError(
            "selective_scan_pallas: forward_backend='mosaic' needs jax >= 0.11 with Mosaic GPU, channels per group "
            f"a multiple of {mosaic_fwd.WIDTH} and seqlen a multiple of {mosaic_fwd.STEPS}, ScanBlocks.steps "
            f"dividing {mosaic_fwd.STEPS}; got u {shape}, {groups} groups"
        )
    wanted = chunks_for(blocks, shape, groups).length
    return dataclasses.replace(blocks, forward_backend="mosaic", chunk=mosaic_fwd.chunk_length(seqlen, wanted))


def _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, pack_bc=True) -> dict[str, jax.Array]:
    """The kernels' shared inputs: the state laid out (n, di), A scaled by log2(e), absent D / delta_bias as 0, and B,
    C as the kernels read them (``pallas_fwd.load_BC``): bfloat16 pairs packed in one uint32 each (``pack_bc``), or
    float32."""
    dim = u.shape[2]
    inputs = {
        "u": u,
        "delta": delta,
        "A2": (A.astype(jnp.float32) * LOG2_E).T,
        "D": jnp.zeros((dim,), jnp.float32) if D is None else D.astype(jnp.float32),
        "delta_bias": jnp.zeros((dim,), jnp.float32) if delta_bias is None else delta_bias.astype(jnp.float32),
    }
    # B_t, C_t are per-step scalars in the kernels, each a load instruction per step. bfloat16 B and C travel as one
    # 32-bit word per (t, k) (B the low half): half the loads and half the registers of the loads kept in flight.
    # Other dtypes go as float32 (a tiny (b, l, g, n) cast that saves a conversion per scalar per step).
    if pack_bc and B.dtype == C.dtype == jnp.bfloat16:
        inputs["BC"] = lax.bitcast_convert_type(jnp.stack([B, C], axis=-1), jnp.uint32)
    else:
        inputs["B"], inputs["C"] = B.astype(jnp.float32), C.astype(jnp.float32)
    if z is not None:
        inputs["z"] = z
    if initial_state is not None:
        inputs["h0"] = jnp.swapaxes(initial_state.astype(jnp.float32), 1, 2)
    return inputs


def chunk_start_states(h_end: jax.Array, h0: jax.Array | None) -> jax.Array:
    """Each chunk's start state (b, K, n, di) from the output launch's chunk end states h_end (b, K, n, di): chunk j
    starts where chunk j - 1 ended, chunk 0 from h0 (b, n, di) or zeros."""
    first = jnp.zeros_like(h_end[:, :1]) if h0 is None else h0[:, None]
    return jnp.concatenate([first, h_end[:, :-1]], axis=1)


def chunk_entering_adjoints(local: dict[str, jax.Array], A2: jax.Array, dlast: jax.Array) -> jax.Array:
    """The state cotangent entering each chunk from its right.

    local: {lam (b, K - 1, n, di): what chunk j + 1 passes on when entered with zero, dtsum (b, K - 1, di): its sum of
    dt}; dlast (b, n, di), the last state's cotangent. Returns (b, K, n, di): in_{K-1} = dlast,
    in_j = lam_{j+1} + exp2(A2 dtsum_{j+1}) in_{j+1}."""
    lam, dtsum = local["lam"], local["dtsum"]
    entering = [dlast]
    for j in reversed(range(lam.shape[1])):
        entering.append(lam[:, j] + jnp.exp2(A2 * dtsum[:, j, None, :]) * entering[-1])
    return jnp.stack(entering[::-1], axis=1)


def _forward(inputs, delta_softplus, blocks, interpret):
    """(out (b, l, di), last state float32 (b, n, di), chunk start states float32 (b, K, n, di) or None when K = 1
    and there is no initial state). In a sharded jit each device scans its own rows of the batch."""

    def kernels(inputs):
        if blocks.forward_backend == "mosaic":
            result = mosaic_fwd.scan_forward(
                inputs, delta_softplus=delta_softplus, chunk=blocks.chunk, interpret=interpret
            )
        else:
            result = _triton_forward(inputs, delta_softplus, blocks, interpret)
        return result["out"], result["h_end"]

    out, h_end = _rows_apart(kernels, inputs, blocks)
    h0 = inputs.get("h0")
    h_start = chunk_start_states(h_end, h0) if h_end.shape[1] > 1 or h0 is not None else None
    return out, h_end[:, -1], h_start


def _rows_apart(fn, inputs: dict[str, jax.Array], blocks: ScanBlocks):
    """``fn(inputs)`` (a pytree of batch-leading arrays) run by ``over_batch``: every input is batch-leading except
    the per-channel ones; with one group of B and C the channels split too (each device its rows and its channels,
    in whole programs' worth: ``blocks.channels``, or Mosaic GPU's WIDTH)."""
    names = sorted(inputs)
    channels = None
    if groups_of(inputs) == 1:
        unit = mosaic_fwd.WIDTH if blocks.forward_backend == "mosaic" else blocks.channels
        operands = [None if name in ("B", "C", "BC") else inputs[name].ndim - 1 for name in names]
        channels = ChannelSplit(operands, _channel_dims, unit)
    return over_batch(
        lambda *arrays: fn(dict(zip(names, arrays, strict=True))),
        [inputs[name] for name in names],
        [name not in PER_CHANNEL for name in names],
        channels,
    )


def _channel_dims(results):
    """The channel dimension of each of the kernels' results: the last, except dBC's (b, l, g, blocks, R, C), whose
    blocks of channels are dimension 3."""
    if isinstance(results, dict):
        return {name: 3 if name == "dBC" else value.ndim - 1 for name, value in results.items()}
    return tuple(value.ndim - 1 for value in results)


def _triton_forward(inputs, delta_softplus, blocks, interpret):
    """{out (b, l, di), h_end float32 (b, K, n, di)} from the Triton launches: the chunk ends, then the output."""
    if chunks_of(inputs, blocks).count > 1:
        from_zero = {name: value for name, value in inputs.items() if name != "h0"}
        ends = scan_forward(
            from_zero, delta_softplus=delta_softplus, blocks=blocks, interpret=interpret, mode="chunk_ends"
        )
        inputs = {**inputs, "ends": ends["h_end"], "dtsum": ends["dtsum"]}
    return scan_forward(inputs, delta_softplus=delta_softplus, blocks=blocks, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _scan(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, blocks, interpret):
    inputs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, blocks.pack_bc)
    out, last_state, _ = _forward(inputs, delta_softplus, blocks, interpret)
    return out, jnp.swapaxes(last_state, 1, 2)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, blocks, interpret):
    inputs = _kernel_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state, blocks.pack_bc)
    out, last_state, h_start = _forward(inputs, delta_softplus, blocks, interpret)
    out = checkpoint_name(out, SAVEABLE_NAMES[0])
    h_start = None if h_start is None else checkpoint_name(h_start, SAVEABLE_NAMES[1])
    residuals = (u, delta, A, B, C, D, z, delta_bias, initial_state, h_start)
    return (out, jnp.swapaxes(last_state, 1, 2)), residuals


def _scan_bwd(delta_softplus, blocks, interpret, residuals, cotangents):
    *arguments, h_start = residuals
    _, _, A, B, C, D, _, delta_bias, initial_state = arguments
    dout, dlast = cotangents
    inputs = _kernel_inputs(*arguments, blocks.pack_bc)
    inputs.pop("h0", None)
    if h_start is not None:
        inputs["h_start"] = h_start
    inputs.update(dout=dout, dlast=jnp.swapaxes(dlast.astype(jnp.float32), 1, 2))
    grads = _rows_apart(lambda inputs: _backward(inputs, delta_softplus, blocks, interpret), inputs, blocks)

    def cast(value, like):
        return None if like is None else value.astype(like.dtype)

    d_state = A.shape[1]
    # (b, l, g, blocks, R, C) -> (b, l, g, 2n). The barrier keeps the sum over blocks a reduction of its own: fused
    # into x_proj's cotangent (a concatenate), XLA summed 64 strided values per element, 6.1 ms of a Mamba-1 370m
    # training step on the H100, against 2.3 ms as a reduction (benchmarks/RESULTS.md).
    dBC = unpack_lane_sums(lax.optimization_barrier(grads["dBC"].sum(axis=3)), 2 * d_state)
    dB, dC = dBC[..., :d_state], dBC[..., d_state:]
    return (
        grads["du"],
        grads["ddelta"],
        cast(grads["dA"].sum(axis=(0, 1)).T, A),
        cast(dB, B),
        cast(dC, C),
        cast(grads["dD"].sum(axis=(0, 1)), D),
        grads.get("dz"),
        cast(grads["ddelta_bias"].sum(axis=(0, 1)), delta_bias),
        cast(jnp.swapaxes(grads["lam_out"][:, 0], 1, 2), initial_state),
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


def _backward(inputs, delta_softplus, blocks, interpret) -> dict[str, jax.Array]:
    """The backward's launches on ``inputs`` (the kernel inputs, the cotangents dout (b, l, di) and dlast (b, n, di),
    the chunk start states h_start when the forward had them): the state checkpoints, the chunks' entering adjoints,
    then the reverse scan's per-row gradients (all batch-leading; the batch sums are the caller's), each on the
    forward's backend."""
    dout, dlast = inputs["dout"], inputs["dlast"]
    inputs = {name: value for name, value in inputs.items() if name not in ("dout", "dlast")}
    if blocks.forward_backend == "mosaic":
        options = {"delta_softplus": delta_softplus, "chunk": blocks.chunk, "interpret": interpret}
        every = blocks.backward_steps
        checkpoints = functools.partial(mosaic_fwd.scan_checkpoints, every=every, **options)
        adjoints = functools.partial(mosaic_bwd.scan_adjoints, **options)
        reverse = functools.partial(mosaic_bwd.scan_backward, every=every, **options)
    else:
        options = {"delta_softplus": delta_softplus, "blocks": blocks, "interpret": interpret}
        checkpoints = functools.partial(scan_forward, mode="checkpoints", **options)
        adjoints = functools.partial(scan_adjoints, **options)
        reverse = functools.partial(scan_backward, **options)
    inputs["checkpoints"] = checkpoints(inputs)["checkpoints"]
    inputs.pop("h_start", None)
    inputs["dout"] = dout
    if chunks_of(inputs, blocks).count > 1:
        inputs["lam_in"] = chunk_entering_adjoints(adjoints(inputs), inputs["A2"], dlast)
    else:
        inputs["lam_in"] = dlast[:, None]
    return reverse(inputs)


def _check_arguments(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Raise ValueError naming the first argument whose shape or dtype breaks the contract of ``api.py``."""

    def fail(name, expected, found):
        raise ValueError(f"selective_scan_pallas: {name} must be {expected}, got {found}")

    if u.ndim != 3:
        fail("u", "(batch, seqlen, d_inner)", f"shape {u.shape}")
    batch, seqlen, dim = u.shape
    if A.ndim != 2 or A.shape[0] != dim:
        fail("A", f"(d_inner={dim}, d_state)", f"shape {A.shape}")
    d_state = A.shape[1]
    if B.ndim != 4 or B.shape[:2] != (batch, seqlen) or B.shape[3] != d_state:
        fail("B", f"({batch}, {seqlen}, groups, {d_state})", f"shape {B.shape}")
    groups = B.shape[2]
    if groups < 1 or dim % groups:
        fail("B", f"a number of groups dividing d_inner={dim}", f"{groups} groups")
    expected = {
        "delta": (delta, u.shape),
        "C": (C, B.shape),
        "z": (z, u.shape),
        "D": (D, (dim,)),
        "delta_bias": (delta_bias, (dim,)),
        "initial_state": (initial_state, (batch, dim, d_state)),
    }
    for name, (value, shape) in expected.items():
        if value is not None and value.shape != shape:
            fail(name, f"of shape {shape}", f"shape {value.shape}")
    for name, value in {"u": u, "delta": delta, "z": z, "B": B, "C": C}.items():
        if value is not None and not jnp.issubdtype(value.dtype, jnp.floating):
            fail(name, "a floating dtype", f"dtype {value.dtype}")
