"""Forward Pallas kernel of the selective scan for Mosaic GPU (``plgpu.kernel``), the Hopper backend.

The same two launches as the Triton forward (``pallas_fwd.py``), measured 12-16% faster on an H100
(benchmarks/RESULTS.md): a first launch scans every chunk but the last from a zero state and writes its end state and
sum of dt; a second folds those into each chunk's start state (the "stitch"), scans its chunk and writes the gated
output. The same kernel also stores the backward's checkpoints (``scan_checkpoints``). A program is one warpgroup:
128 threads, one channel each, the state h as n (128,) float32 register rows. The chunk's rows of u, delta, z and
its B/C words reach shared memory through the copy engine, STAGES tiles of STEPS steps in flight
(``plgpu.emit_pipeline``); each step reads one row per input and n words shared by the warpgroup; outputs go from
registers to global memory. Arithmetic goes through Mosaic GPU's approximate math (``approx_math``: ex2.approx,
lg2.approx).

Scope (``supports``): channels per group a multiple of 128, seqlen a multiple of 16. B and C come as
``pallas._kernel_inputs`` gives them: bfloat16 packed (one uint32 per (t, k)), or float32 B and C, which reach the
kernel side by side in one (b, l, g, 2n) array (``with_words``). ``pallas.py`` sends everything else to the Triton
forward; the backward's adjoint and reverse launches run on the forward's backend (``mosaic_bwd.py`` here). Inputs and
outputs are those of ``pallas_fwd.scan_forward`` in modes "out" and "checkpoints".
"""

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.selective_scan.kernel_math import KernelMath
from pallas_kernels.selective_scan.pallas_fwd import unpack_BC

WIDTH = 128  # channels per program: one warpgroup, one channel per thread
STEPS = 16  # time steps per staged tile (measured: 8 as fast, 32 slower)
STAGES = 2  # tiles in flight (measured: 3 no faster)


def available() -> bool:
    """True when this jax has the Mosaic GPU API the kernel is written against (jax >= 0.11)."""
    return hasattr(plgpu, "InterpretGPUParams") and hasattr(plgpu, "LoweringSemantics")


def device_supported() -> bool:
    """True on an NVIDIA GPU of compute capability 9.0 or newer (the copy engine's bulk tensor copies) with
    ``available()``."""
    device = jax.devices()[0]
    major = str(getattr(device, "compute_capability", "")).split(".")[0]
    return device.platform == "gpu" and major.isdigit() and int(major) >= 9 and available()


def supports(seqlen: int, group_dim: int) -> bool:
    """Whether the kernel covers a sequence of ``seqlen`` steps with ``group_dim`` channels per B/C group."""
    return group_dim % WIDTH == 0 and seqlen % STEPS == 0


def chunk_length(seqlen: int, wanted: int) -> int:
    """The largest power-of-two multiple of STEPS that divides ``seqlen`` and is at most ``wanted`` (at least
    STEPS): every chunk is then full, and the backward can use the same chunks."""
    length = STEPS
    while length * 2 <= wanted and seqlen % (length * 2) == 0:
        length *= 2
    return length


def row_layout():
    return plgpu.Layout.WG_STRIDED((WIDTH,), 1)


def load_row(ref) -> jax.Array:
    """A (WIDTH,) row of a shared- or global-memory ref as float32, one element per thread."""
    return plgpu.load(ref, layout=row_layout()).astype(jnp.float32)


# The Triton kernels' arithmetic as plain jnp operations; ``approx_math`` makes each exp2 / log2 one instruction.
OPS = KernelMath(interpret=True)


def _scan_kernel(ins, outs, *, chunk: int, group_dim: int, delta_softplus: bool, every: int):
    """One program: WIDTH channels of one batch row over one chunk. Grid (b, di / WIDTH, chunks), named b, c, j.

    ins: u, delta (b, l, di) [z (b, l, di)]; BC (b, l, g, n) uint32 (packed bfloat16 pairs) or (b, l, g, 2n)
    float32 (B, then C); A2 float32 (n, di); D, delta_bias float32 (di,);
    the start state: [h0 float32 (b, n, di), the first chunk's] [ends float32 (b, K - 1, n, di), dtsum float32
    (b, K - 1, di): the first launch's results, stitched here] or [h_start float32 (b, K, n, di), each chunk's].
    outs, one of: out (b, l, di) and h_end float32 (b, K, n, di); h_end and dtsum float32 (b, K - 1, di) (the first
    launch); checkpoints float32 (b, l / every + 1, n, di), the state before steps 0, every, 2 every, ... and after
    the last (for the backward, as ``pallas_fwd``'s "checkpoints" mode)."""
    batch, block, chunk_index = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("j")
    cols = pl.ds(block * WIDTH, WIDTH)
    group = block * WIDTH // group_dim
    d_state = ins["A2"].shape[0]
    with_output = "out" in outs
    A2 = [load_row(ins["A2"].at[k, cols]) for k in range(d_state)]
    D = load_row(ins["D"].at[cols])
    bias = load_row(ins["delta_bias"].at[cols])
    zeros = plgpu.layout_cast(jnp.zeros((WIDTH,), jnp.float32), row_layout())
    h = [zeros] * d_state
    if "h0" in ins:
        h = [load_row(ins["h0"].at[batch, k, cols]) for k in range(d_state)]
    if "h_start" in ins:
        h = [load_row(ins["h_start"].at[batch, chunk_index, k, cols]) for k in range(d_state)]
    if "ends" in ins:
        # start_{j+1} = exp(A sum dt_j) start_j + end_j over the chunks before this one
        def stitch(j, h):
            decay = load_row(ins["dtsum"].at[batch, j, cols])
            return [
                OPS.fma(OPS.exp2(decay * A2[k]), h[k], load_row(ins["ends"].at[batch, j, k, cols]))
                for k in range(d_state)
            ]

        h = lax.fori_loop(0, chunk_index, stitch, h)
    row_names = ["u", "delta"] + (["z"] if with_output and "z" in ins else [])
    if "checkpoints" in outs:

        @pl.when(chunk_index == 0)
        def _():
            for k in range(d_state):
                outs["checkpoints"][batch, 0, k, cols] = h[k]

    def tile(indices, *refs_and_carry):
        *refs, (h, dtsum) = refs_and_carry
        rows, words_ref = dict(zip(row_names, refs[:-1], strict=True)), refs[-1]
        packed = words_ref.dtype == jnp.uint32
        count = d_state if packed or not with_output else 2 * d_state  # float32: B's n words, then C's
        h = list(h)
        t0 = chunk_index * chunk + indices[0] * STEPS
        for s in range(STEPS):
            u = load_row(rows["u"].at[s])
            dt = load_row(rows["delta"].at[s]) + bias
            if delta_softplus:
                dt = OPS.softplus(dt)
            dtsum = dtsum + dt
            dtu = dt * u
            # Each word is splat over the warpgroup before it is split: Mosaic GPU lowers no scalar bitcast.
            words = [jnp.broadcast_to(words_ref[s, k], (WIDTH,)) for k in range(count)]
            scalars = unpack_BC(words, ("B", "C") if with_output else ("B",))
            for k in range(d_state):
                h[k] = OPS.fma(OPS.exp2(dt * A2[k]), h[k], dtu * scalars["B"][k])
            if "checkpoints" in outs and (s + 1) % every == 0:
                index = chunk_index * (chunk // every) + indices[0] * (STEPS // every) + (s + 1) // every
                for k in range(d_state):
                    outs["checkpoints"][batch, index, k, cols] = h[k]
            if with_output:
                y = D * u
                for k in range(d_state):
                    y = y + h[k] * scalars["C"][k]
                if "z" in rows:
                    z = load_row(rows["z"].at[s])
                    y = y * (z * OPS.sigmoid(z))
                outs["out"][batch, t0 + s, cols] = y.astype(outs["out"].dtype)
        return h, dtsum

    times = pl.ds(chunk_index * chunk, chunk)
    pipeline = plgpu.emit_pipeline(
        tile,
        grid=(chunk // STEPS,),
        in_specs=[plgpu.BlockSpec((STEPS, WIDTH), lambda i: (i, 0))] * len(row_names)
        + [plgpu.BlockSpec((STEPS, ins["BC"].shape[3]), lambda i: (i, 0))],
        max_concurrent_steps=STAGES,
        init_carry=(h, zeros),
    )
    h, dtsum = pipeline(*[ins[name].at[batch, times, cols] for name in row_names], ins["BC"].at[batch, times, group])
    if "h_end" in outs:
        for k in range(d_state):
            outs["h_end"][batch, chunk_index, k, cols] = h[k]
    if "dtsum" in outs:
        outs["dtsum"][batch, chunk_index, cols] = dtsum


def launch(kernel, ins: dict, out_type: dict, programs: int, *, interpret: bool, **options) -> dict:
    """``plgpu.kernel`` of ``kernel(ins, outs, **options)`` (refs by name) over the grid (b, di / WIDTH, programs),
    named b, c, j, with b and di from ``ins["delta"]``: {name: array} of ``out_type``'s names."""
    batch, _, dim = ins["delta"].shape
    names = list(ins) + list(out_type)

    def body(*refs):
        refs = dict(zip(names, refs, strict=True))
        kernel({name: refs[name] for name in ins}, {name: refs[name] for name in out_type}, **options)

    results = plgpu.kernel(
        body,
        out_type=tuple(out_type.values()),
        grid=(batch, dim // WIDTH, programs),
        grid_names=("b", "c", "j"),
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        interpret=plgpu.InterpretGPUParams() if interpret else False,
    )(*ins.values())
    return dict(zip(out_type, results, strict=True))


def with_words(inputs: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """``inputs`` with float32 B and C (b, l, g, n) as one BC (b, l, g, 2n), B's n values then C's for each (t, g):
    one copy a tile stages in shared memory, as the packed words are."""
    if "BC" in inputs:
        return inputs
    words = jnp.concatenate([inputs["B"], inputs["C"]], axis=-1)
    return {name: value for name, value in inputs.items() if name not in ("B", "C")} | {"BC": words}


def scan_forward(inputs: dict[str, jax.Array], *, delta_softplus: bool, chunk: int, interpret: bool):
    """The forward over chunks of ``chunk`` steps (a multiple of STEPS dividing seqlen): {out (b, l, di) in u's
    dtype, h_end float32 (b, K, n, di), each chunk's end state}. inputs: ``pallas._kernel_inputs`` that ``supports``
    accepts."""
    inputs = with_words(inputs)
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    d_state = inputs["A2"].shape[0]
    count = seqlen // chunk
    f32 = jnp.float32
    group_dim = dim // inputs["BC"].shape[2]
    options = {
        "chunk": chunk,
        "group_dim": group_dim,
        "delta_softplus": delta_softplus,
        "every": 1,
        "interpret": interpret,
    }
    first = {name: value for name, value in inputs.items() if name not in ("z", "h0")}
    second = dict(inputs)
    if count > 1:
        ends = {
            "h_end": jax.ShapeDtypeStruct((batch, count - 1, d_state, dim), f32),
            "dtsum": jax.ShapeDtypeStruct((batch, count - 1, dim), f32),
        }
        ends = launch(_scan_kernel, first, ends, count - 1, **options)
        second["ends"], second["dtsum"] = ends["h_end"], ends["dtsum"]
    results = {
        "out": jax.ShapeDtypeStruct(u.shape, u.dtype),
        "h_end": jax.ShapeDtypeStruct((batch, count, d_state, dim), f32),
    }
    return launch(_scan_kernel, second, results, count, **options)


def scan_checkpoints(inputs: dict[str, jax.Array], *, delta_softplus: bool, chunk: int, every: int, interpret: bool):
    """{checkpoints float32 (b, l / every + 1, n, di)}: the state before steps 0, every, 2 every, ... and after the
    last, each chunk starting from inputs' h_start (b, K, n, di) (zeros when absent). ``every`` divides STEPS."""
    if STEPS % every:
        raise ValueError(f"mosaic_fwd.scan_checkpoints: every={every} must divide STEPS={STEPS}")
    inputs = with_words(inputs)
    batch, seqlen, dim = inputs["u"].shape
    d_state = inputs["A2"].shape[0]
    ins = {name: value for name, value in inputs.items() if name not in ("z", "h0")}
    checkpoints = jax.ShapeDtypeStruct((batch, seqlen // every + 1, d_state, dim), jnp.float32)
    group_dim = dim // inputs["BC"].shape[2]
    options = {
        "chunk": chunk,
        "group_dim": group_dim,
        "delta_softplus": delta_softplus,
        "every": every,
        "interpret": interpret,
    }
    return launch(_scan_kernel, ins, {"checkpoints": checkpoints}, seqlen // chunk, **options)
