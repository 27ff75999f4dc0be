"""The selective-scan forward written for Mosaic GPU (``plgpu.kernel``), to choose the Pallas backend by measurement.

docs/kernels.md ("Backend") says why this exists: jax 0.11 deprecates the Triton lowering our kernels use, and Mosaic
GPU is the supported Hopper path. This is the forward only, the same two launches as the Triton forward
(``pallas_fwd.py``): a first launch scans every chunk but the last from a zero state and writes its end state and sum
of dt; a second stitches those into each chunk's start state, scans its chunk and writes the gated output. What
differs is the backend's shape of a program: one warpgroup (128 threads, one channel each) instead of one warp, and
the chunk's rows of u, delta, z and B/C staged through shared memory by the copy engine (``plgpu.emit_pipeline``)
instead of register prefetches. Its scope is the benchmark's case: bf16 B/C packed (``pack_bc``) in one group,
d_inner a multiple of 128, seqlen a multiple of the chunk. ``python -m benchmarks.mosaic_scan`` checks it against the
reference and times it against the Triton forward in the same run.
"""

import argparse
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from benchmarks.selective_scan import SHAPES, make_inputs, time_ms
from benchmarks.timing import environment
from pallas_kernels.selective_scan import pallas
from pallas_kernels.selective_scan.kernel_math import LN_2, LOG2_E
from pallas_kernels.selective_scan.reference import selective_scan_reference

WIDTH = 128  # channels per program: one warpgroup, one channel per thread


def _row_layout():
    return plgpu.Layout.WG_STRIDED((WIDTH,), 1)


def _load_row(ref) -> jax.Array:
    """A (WIDTH,) row of a shared- or global-memory ref as float32, one element per thread."""
    return plgpu.load(ref, layout=_row_layout()).astype(jnp.float32)


def _softplus(x):
    return jnp.maximum(x, 0.0) + LN_2 * jnp.log2(1.0 + jnp.exp2(jnp.abs(x) * -LOG2_E))


def _scan_kernel(*refs, mode: str, chunk: int, steps: int, stages: int):
    """One program: WIDTH channels of one batch row over one chunk. mode "ends": refs are u, delta, BC, A2, D, bias
    inputs and h_end (b, K - 1, n, di), dtsum (b, K - 1, di) outputs; mode "out": u, delta, z, BC, A2, D, bias, ends,
    dtsum inputs and out (b, l, di), h_end (b, K, n, di) outputs."""
    if mode == "ends":
        u_g, delta_g, bc_g, a2_g, d_g, bias_g, h_end_g, dtsum_out_g = refs
        z_g = None
    else:
        u_g, delta_g, z_g, bc_g, a2_g, d_g, bias_g, ends_g, dtsum_g, out_g, h_end_g = refs
    batch, block, chunk_index = lax.axis_index("b"), lax.axis_index("c"), lax.axis_index("j")
    cols = pl.ds(block * WIDTH, WIDTH)
    d_state = a2_g.shape[0]
    A2 = [_load_row(a2_g.at[k, cols]) for k in range(d_state)]
    D = _load_row(d_g.at[cols])
    bias = _load_row(bias_g.at[cols])
    zeros = plgpu.layout_cast(jnp.zeros((WIDTH,), jnp.float32), _row_layout())
    h = [zeros] * d_state
    if mode == "out":

        def stitch(j, h):
            decay = _load_row(dtsum_g.at[batch, j, cols])
            return [jnp.exp2(decay * A2[k]) * h[k] + _load_row(ends_g.at[batch, j, k, cols]) for k in range(d_state)]

        h = lax.fori_loop(0, chunk_index, stitch, h)

    def tile(indices, *tile_refs_and_carry):
        *tile_refs, carry = tile_refs_and_carry
        h, dtsum = list(carry[0]), carry[1]
        if mode == "ends":
            u_s, delta_s, bc_s = tile_refs
        else:
            u_s, delta_s, z_s, bc_s = tile_refs
        t0 = chunk_index * chunk + indices[0] * steps
        for s in range(steps):
            u = _load_row(u_s.at[s])
            dt = _softplus(_load_row(delta_s.at[s]) + bias)
            dtsum = dtsum + dt
            dtu = dt * u
            # Each word is splat over the warpgroup before it is split: Mosaic GPU lowers no scalar bitcast.
            words = [jnp.broadcast_to(bc_s[s, k], (WIDTH,)) for k in range(d_state)]
            for k in range(d_state):
                b_k = lax.bitcast_convert_type(words[k] << 16, jnp.float32)
                h[k] = jnp.exp2(dt * A2[k]) * h[k] + dtu * b_k
            if mode == "out":
                y = D * u
                for k in range(d_state):
                    y = y + h[k] * lax.bitcast_convert_type(words[k] & jnp.uint32(0xFFFF0000), jnp.float32)
                z = _load_row(z_s.at[s])
                y = y * z / (1.0 + jnp.exp2(z * -LOG2_E))
                out_g[batch, t0 + s, cols] = y.astype(out_g.dtype)
        return h, dtsum

    rows = plgpu.BlockSpec((steps, WIDTH), lambda i: (i, 0))
    scalars = plgpu.BlockSpec((steps, d_state), lambda i: (i, 0))
    times = pl.ds(chunk_index * chunk, chunk)
    row_inputs = [u_g, delta_g] + ([] if z_g is None else [z_g])
    pipeline = plgpu.emit_pipeline(
        tile,
        grid=(chunk // steps,),
        in_specs=[rows] * len(row_inputs) + [scalars],
        max_concurrent_steps=stages,
        init_carry=(h, zeros),
    )
    h, dtsum = pipeline(*[ref.at[batch, times, cols] for ref in row_inputs], bc_g.at[batch, times])
    for k in range(d_state):
        h_end_g[batch, chunk_index, k, cols] = h[k]
    if mode == "ends":
        dtsum_out_g[batch, chunk_index, cols] = dtsum


def mosaic_forward(inputs, *, chunk=128, steps=16, stages=2, interpret=False):
    """Forward of the selective scan with delta_softplus and z (out (b, l, di), last state float32 (b, n, di)).

    inputs: ``pallas._kernel_inputs`` of bf16 arrays with B/C packed in one group; d_inner a multiple of 128, seqlen
    a multiple of ``chunk``, ``chunk`` of ``steps``."""
    u = inputs["u"]
    batch, seqlen, dim = u.shape
    d_state = inputs["A2"].shape[0]
    if "BC" not in inputs or inputs["BC"].shape[2] != 1 or dim % WIDTH or seqlen % chunk or chunk % steps:
        raise ValueError(
            f"mosaic_forward covers packed bf16 B/C in one group, d_inner % {WIDTH} == 0 and seqlen % chunk == 0 "
            f"(chunk % steps == 0); got BC {inputs.get('BC', inputs.get('B')).shape}, u {u.shape}, chunk {chunk}, "
            f"steps {steps}"
        )
    count = seqlen // chunk
    bc = inputs["BC"][:, :, 0]
    common = (inputs["A2"], inputs["D"], inputs["delta_bias"])
    f32 = jnp.float32

    def launch(mode, programs, out_type, *args):
        return plgpu.kernel(
            functools.partial(_scan_kernel, mode=mode, chunk=chunk, steps=steps, stages=stages),
            out_type=out_type,
            grid=(batch, dim // WIDTH, programs),
            grid_names=("b", "c", "j"),
            compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
            interpret=plgpu.InterpretGPUParams() if interpret else False,
        )(*args)

    if count > 1:
        ends, dtsum = launch(
            "ends",
            count - 1,
            (
                jax.ShapeDtypeStruct((batch, count - 1, d_state, dim), f32),
                jax.ShapeDtypeStruct((batch, count - 1, dim), f32),
            ),
            u,
            inputs["delta"],
            bc,
            *common,
        )
    else:  # never read: the only program stitches nothing
        ends, dtsum = jnp.zeros((batch, 1, d_state, dim), f32), jnp.zeros((batch, 1, dim), f32)
    out, h_end = launch(
        "out",
        count,
        (jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((batch, count, d_state, dim), f32)),
        u,
        inputs["delta"],
        inputs["z"],
        bc,
        *common,
        ends,
        dtsum,
    )
    return out, h_end[:, -1]


def triton_forward(inputs):
    """Our Triton forward on the same normalised inputs: (out, last state float32 (b, n, di))."""
    out, last, _ = pallas._forward(dict(inputs), True, pallas.DEFAULT_BLOCKS, False)
    return out, last


# (chunk, steps, stages) timed at each shape: the chunk sets the grid (programs = b x di / 128 x l / chunk), steps
# the rows staged per copy, stages the copies in flight.
VARIANTS = [(128, 16, 2), (64, 16, 2), (256, 16, 2), (128, 8, 2), (128, 32, 2), (128, 16, 3)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmark_results", help="folder for mosaic_scan.json")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--budget-s", type=float, default=300, help="stop starting new variants after this")
    parser.add_argument("--smoke", action="store_true", help="a CPU dry run: a tiny shape, both interpreters")
    args = parser.parse_args()
    shapes = [(1, 64, 256, 4)] if args.smoke else SHAPES
    variants = [(32, 8, 2)] if args.smoke else VARIANTS
    start = time.perf_counter()
    rows = []
    for shape in shapes:
        arrays = make_inputs(shape)
        inputs = pallas._kernel_inputs(**arrays)
        expected, _ = jax.jit(functools.partial(selective_scan_reference, delta_softplus=True))(**arrays)
        expected = expected.astype(jnp.float32)

        def error(out, expected=expected):
            return float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected)))

        if args.smoke:
            triton = jax.jit(lambda x: pallas._forward(dict(x), True, pallas.DEFAULT_BLOCKS, True)[:2])
        else:
            triton = jax.jit(triton_forward)
        row = {"backend": "triton", "shape": list(shape), "max_abs_error": error(triton(inputs)[0])}
        row["fwd_ms"], row["fwd_min_ms"], row["first_call_s"] = time_ms(triton, inputs, reps=args.reps)
        print(json.dumps(row), flush=True)
        rows.append(row)
        for chunk, steps, stages in variants:
            if time.perf_counter() - start > args.budget_s:
                print(f"skipped (time budget): mosaic {shape} {(chunk, steps, stages)}", flush=True)
                continue
            mosaic = jax.jit(
                functools.partial(mosaic_forward, chunk=chunk, steps=steps, stages=stages, interpret=args.smoke)
            )
            row = {"backend": "mosaic", "shape": list(shape), "chunk": chunk, "steps": steps, "stages": stages}
            try:
                row["max_abs_error"] = error(mosaic(inputs)[0])
                row["fwd_ms"], row["fwd_min_ms"], row["first_call_s"] = time_ms(mosaic, inputs, reps=args.reps)
            except Exception as failure:  # a variant that does not compile must not lose the others' numbers
                row["failed"] = f"{type(failure).__name__}: {str(failure)[:1500]}"
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mosaic_scan.json").write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
