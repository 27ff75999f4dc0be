"""Benchmark the Mamba-1 selective scan: every implementation side by side, forward and forward+backward.

    PYTHONPATH=. python3 -m benchmarks.selective_scan --out "$OUT"            # the two benchmark shapes
    PYTHONPATH=. python3 -m benchmarks.selective_scan --check --sweep ...      # + correctness on the GPU, block sizes

Inputs as in Mamba: bfloat16 u, delta, z, B, C; float32 A, D, delta_bias; softplus on delta. Each time is the median
over ``--reps`` groups of 10 back-to-back calls (one device sync per group, so launch latency is hidden as in a
model), after a warm-up. Peak memory is XLA's estimate for the compiled call: temporaries + outputs. The floors are
those of /work/shared/ANCHORS.md: the bytes the forward must move (u, delta, z, B, C read once, out written once) at
3.0 TB/s, and one exp2 per (step, channel, state) on the H100's special-function units (132 SMs x 16 a clock at
1.755 GHz); the backward needs at least the same again. Results go to ``--out`` as JSON and markdown; the table is
printed last.
"""

import argparse
import datetime
import functools
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.selective_scan import mosaic_bwd, mosaic_fwd, pallas, pallas_bwd, pallas_fwd
from pallas_kernels.selective_scan.pallas import selective_scan_pallas
from pallas_kernels.selective_scan.pallas_config import ScanBlocks
from pallas_kernels.selective_scan.reference import selective_scan_reference
from pallas_kernels.selective_scan.xla import selective_scan_associative, selective_scan_chunked
from tests.tolerances import tolerance

SHAPES = [(8, 2048, 1536, 16), (4, 4096, 4096, 16)]  # (batch, seqlen, d_inner, d_state)
REFERENCE_SHAPE = (1, 2048, 1536, 16)  # lax.scan is slow: timed at batch 1 only
# mamba_ssm's CUDA kernel on an H100 (ANCHORS.md): forward, forward+backward in ms.
CUDA_ANCHORS = {(8, 2048, 1536, 16): (0.435, 2.40), (4, 4096, 4096, 16): (1.125, 6.28)}
BANDWIDTH = 3.0e12  # bytes/s, device-to-device copy on the H100
EXP2_RATE = 132 * 16 * 1.755e9  # exp2 per second on the H100's special-function units
CALLS_PER_GROUP = 10
# (shape, groups, dtype) of the GPU correctness checks: 50 channels a group (a masked block), a tile tail; bf16.
CHECKS = [((2, 1000, 200, 16), 4, jnp.float32), ((2, 2048, 256, 16), 1, jnp.bfloat16)]
SMOKE_CHECKS = [((1, 8, 40, 2), 2, jnp.float32)]
# Variants timed against the default at the first shape (--sweep): other tiles and B/C distances, B/C as float32
# scalars instead of packed words, the backward on tiles of 4 steps (half the checkpoint bytes, more registers).
TRITON_FORWARD = ScanBlocks(forward_backend="triton")
SWEEP = [
    ScanBlocks(steps=8, lookahead=2),
    ScanBlocks(steps=8, lookahead=4),
    ScanBlocks(steps=4, lookahead=4),
    ScanBlocks(pack_bc=False),
    ScanBlocks(backward_steps=4),
]


def make_inputs(shape, key=0, dtype=jnp.bfloat16, groups=1):
    """Mamba-like inputs: decays exp(delta A) in about (0.01, 1)."""
    batch, seqlen, dim, d_state = shape
    keys = iter(jax.random.split(jax.random.key(key), 10))

    def normal(shape, scale=1.0):
        return (scale * jax.random.normal(next(keys), shape)).astype(dtype)

    return {
        "u": normal((batch, seqlen, dim)),
        "delta": normal((batch, seqlen, dim), 0.5) - 1.0,
        "A": -jnp.exp(jax.random.uniform(next(keys), (dim, d_state), minval=-2.0, maxval=1.5)),
        "B": normal((batch, seqlen, groups, d_state)),
        "C": normal((batch, seqlen, groups, d_state)),
        "D": jax.random.normal(next(keys), (dim,)),
        "z": normal((batch, seqlen, dim)),
        "delta_bias": jax.random.uniform(next(keys), (dim,), minval=-1.5, maxval=0.5),
        "initial_state": None,
    }


def floors_ms(shape):
    """(forward, forward+backward) floors in ms: the larger of the byte and the exp2 times."""
    batch, seqlen, dim, d_state = shape
    activation = batch * seqlen * dim * 2  # one bf16 (b, l, di) tensor
    forward_bytes = 4 * activation + 2 * batch * seqlen * d_state * 2
    # backward: read u, delta, z, B, C, dout; write du, ddelta, dz, dB, dC
    backward_bytes = 7 * activation + 4 * batch * seqlen * d_state * 2
    exp_s = batch * seqlen * dim * d_state / EXP2_RATE
    forward = max(forward_bytes / BANDWIDTH, exp_s)
    both = max((forward_bytes + backward_bytes) / BANDWIDTH, 2 * exp_s)
    return 1e3 * forward, 1e3 * both


def scan_fn(implementation, interpret=False):
    """(arrays dict) -> (out, last_state) for one implementation name or a ScanBlocks for the Pallas kernel."""
    if isinstance(implementation, ScanBlocks):
        impl = functools.partial(selective_scan_pallas, blocks=implementation, interpret=interpret)
    else:
        impl = {
            "pallas": functools.partial(selective_scan_pallas, interpret=interpret),
            "chunked": selective_scan_chunked,
            "associative": selective_scan_associative,
            "reference": selective_scan_reference,
        }[implementation]

    def scan(arrays):
        return impl(**{"initial_state": None, **arrays}, delta_softplus=True)

    return scan


def forward_backward_fn(scan):
    def run(arrays, cotangent):
        (out, last), vjp = jax.vjp(scan, arrays)
        return out, vjp((cotangent, jnp.zeros_like(last)))[0]

    return run


def time_ms(fn, *args, reps):
    """(median, min) ms per call over ``reps`` groups of CALLS_PER_GROUP calls, one sync per group, and the first
    call's seconds (compilation). Slow implementations get fewer groups (at least 5), about 2 s of calls in all."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first_call = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one_call = time.perf_counter() - start
    reps = max(5, min(reps, int(2.0 / (one_call * CALLS_PER_GROUP))))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(CALLS_PER_GROUP):
            result = fn(*args)
        jax.block_until_ready(result)
        samples.append((time.perf_counter() - start) * 1e3 / CALLS_PER_GROUP)
    return statistics.median(samples), min(samples), first_call


def peak_mib(fn, *args):
    """XLA's memory estimate of the compiled call: temporaries + outputs, MiB."""
    stats = fn.lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def measure(name, implementation, shape, reps, interpret=False):
    arrays = {k: v for k, v in make_inputs(shape).items() if v is not None}
    scan = jax.jit(scan_fn(implementation, interpret))
    both = jax.jit(forward_backward_fn(scan_fn(implementation, interpret)))
    cotangent = jax.random.normal(jax.random.key(1), arrays["u"].shape).astype(arrays["u"].dtype)
    row = {"implementation": name, "shape": list(shape)}
    start = time.perf_counter()
    row["fwd_ms"], row["fwd_min_ms"], row["fwd_first_call_s"] = time_ms(scan, arrays, reps=reps)
    row["fwd_bwd_ms"], row["fwd_bwd_min_ms"], row["fwd_bwd_first_call_s"] = time_ms(both, arrays, cotangent, reps=reps)
    row["fwd_peak_mib"] = peak_mib(scan, arrays)
    row["fwd_bwd_peak_mib"] = peak_mib(both, arrays, cotangent)
    floor_fwd, floor_both = floors_ms(shape)
    row["fwd_floor_fraction"] = floor_fwd / row["fwd_ms"]
    row["fwd_bwd_floor_fraction"] = floor_both / row["fwd_bwd_ms"]
    if tuple(shape) in CUDA_ANCHORS:
        cuda_fwd, cuda_both = CUDA_ANCHORS[tuple(shape)]
        row["fwd_speedup_vs_cuda"] = cuda_fwd / row["fwd_ms"]
        row["fwd_bwd_speedup_vs_cuda"] = cuda_both / row["fwd_bwd_ms"]
    row["seconds"] = time.perf_counter() - start
    print(json.dumps(row), flush=True)
    return row


def breakdown(shape, blocks, reps, interpret=False):
    """Time each launch of the Pallas forward+backward alone (ms): the Mosaic GPU forward (both its launches),
    checkpoints, adjoints and reverse scan where they apply (on the Mosaic chunks); the Triton chunk ends, the Triton
    forward (which stitches the chunk ends into its start states), the checkpoints, the adjoints, the reverse scan on
    Triton's own chunks; and the XLA stitching of the adjoints."""
    arrays = {k: v for k, v in make_inputs(shape).items() if v is not None}
    inputs = pallas._kernel_inputs(**{"D": None, "z": None, "delta_bias": None, "initial_state": None, **arrays})
    options = {"delta_softplus": True, "blocks": blocks, "interpret": interpret}
    row = {"breakdown": list(shape), "blocks": str(blocks), "chunks": list(pallas.chunks_of(inputs, blocks))}
    stages = {}
    planned = pallas.plan_forward(blocks, shape[:3], arrays["B"].shape[2], interpret)
    mosaic = planned.forward_backend == "mosaic"
    if mosaic:
        stages[f"fwd Mosaic GPU, both launches (chunk {planned.chunk})"] = (
            lambda x: mosaic_fwd.scan_forward(x, delta_softplus=True, chunk=planned.chunk, interpret=False),
            inputs,
        )
    ends = None
    if pallas.chunks_of(inputs, blocks).count > 1:
        stages["fwd chunk_ends"] = (lambda x: pallas_fwd.scan_forward(x, mode="chunk_ends", **options), inputs)
        ends = jax.jit(stages["fwd chunk_ends"][0])(inputs)
        inputs = {**inputs, "ends": ends["h_end"], "dtsum": ends["dtsum"]}
    stages["fwd out"] = (lambda x: pallas_fwd.scan_forward(x, **options), inputs)
    h_end = jax.jit(stages["fwd out"][0])(inputs)["h_end"]
    start = {k: v for k, v in inputs.items() if k not in ("ends", "dtsum")}
    start["h_start"] = pallas.chunk_start_states(h_end, None)
    stages["bwd checkpoints"] = (lambda x: pallas_fwd.scan_forward(x, mode="checkpoints", **options), start)
    if mosaic:
        mosaic_forward = mosaic_fwd.scan_forward(inputs, delta_softplus=True, chunk=planned.chunk, interpret=False)
        mosaic_start = {**start, "h_start": pallas.chunk_start_states(mosaic_forward["h_end"], None)}
        every = blocks.backward_steps
        stages[f"bwd checkpoints Mosaic GPU (chunk {planned.chunk})"] = (
            lambda x: mosaic_fwd.scan_checkpoints(
                x, delta_softplus=True, chunk=planned.chunk, every=every, interpret=False
            ),
            mosaic_start,
        )
    checkpoints = jax.jit(stages["bwd checkpoints"][0])(start)["checkpoints"]
    back = {k: v for k, v in start.items() if k != "h_start"}
    back.update(dout=arrays["u"], checkpoints=checkpoints)
    dlast = jnp.zeros(checkpoints.shape[:1] + checkpoints.shape[2:], jnp.float32)
    if ends is not None:
        stages["bwd adjoints"] = (lambda x: pallas_bwd.scan_adjoints(x, **options), back)
        local = jax.jit(stages["bwd adjoints"][0])(back)
        back["lam_in"] = pallas.chunk_entering_adjoints(local, inputs["A2"], dlast)
        stages["stitch adjoints (XLA)"] = (lambda x: pallas.chunk_entering_adjoints(x, inputs["A2"], dlast), local)
    else:
        back["lam_in"] = dlast[:, None]
    stages["bwd reverse"] = (lambda x: pallas_bwd.scan_backward(x, **options), back)
    if mosaic:
        # The Mosaic GPU backward launches on the Mosaic chunks (the Triton rows above use the Triton chunks).
        on_chunks = {
            **back,
            "checkpoints": jax.jit(stages[f"bwd checkpoints Mosaic GPU (chunk {planned.chunk})"][0])(mosaic_start)[
                "checkpoints"
            ],
        }
        chunk = planned.chunk
        count = shape[1] // chunk
        on_chunks["lam_in"] = jnp.zeros((shape[0], count, shape[3], shape[2]), jnp.float32)
        if count > 1:
            stages[f"bwd adjoints Mosaic GPU (chunk {chunk})"] = (
                lambda x: mosaic_bwd.scan_adjoints(x, delta_softplus=True, chunk=chunk, interpret=False),
                on_chunks,
            )
        stages[f"bwd reverse Mosaic GPU (chunk {chunk})"] = (
            lambda x: mosaic_bwd.scan_backward(
                x, delta_softplus=True, chunk=chunk, every=blocks.backward_steps, interpret=False
            ),
            on_chunks,
        )
    for name, (fn, argument) in stages.items():
        row[name] = time_ms(jax.jit(fn), argument, reps=reps)[0]
    print(json.dumps(row), flush=True)
    return row


def check(shape, groups, dtype, interpret=False):
    """Pallas vs the reference on the GPU: relative norm error of out, last state and every gradient."""
    inputs = make_inputs(shape, key=7, dtype=dtype, groups=groups)
    inputs["initial_state"] = jax.random.normal(jax.random.key(3), (shape[0], shape[2], shape[3]))
    arrays = {k: v for k, v in inputs.items() if v is not None}
    cotangent = jax.random.normal(jax.random.key(1), arrays["u"].shape).astype(dtype)

    def grads(implementation):
        scan = scan_fn(implementation, interpret)

        def run(arrays):
            (out, last), vjp = jax.vjp(scan, arrays)
            return out, last, vjp((cotangent, jnp.ones_like(last)))[0]

        return jax.jit(run)(arrays)

    out, last, grad = grads("pallas")
    ref_out, ref_last, ref_grad = grads("reference")

    def rel(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    def violations(a, b):
        """Elements outside tests/tolerances.py's band for a's dtype."""
        rtol, atol = tolerance(a.dtype)
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return int(np.sum(np.abs(a - b) > atol + rtol * np.abs(b)))

    pairs = {"out": (out, ref_out), "last_state": (last, ref_last)}
    pairs.update({f"d{name}": (grad[name], ref_grad[name]) for name in ref_grad})
    row = {
        "check": list(shape),
        "dtype": jnp.dtype(dtype).name,
        "groups": groups,
        "rel_err": {name: rel(a, b) for name, (a, b) in pairs.items()},
        "outside_tolerance": {name: violations(a, b) for name, (a, b) in pairs.items()},
    }
    print(json.dumps(row), flush=True)
    return row


def markdown(rows, checks, header):
    lines = [header, ""]
    if checks:
        lines += [
            "| check (b, l, di, n), dtype, groups | worst rel. error (name) | elements outside tests/tolerances.py |",
            "|---|---|---|",
        ]
        for c in checks:
            worst = max(c["rel_err"], key=c["rel_err"].get)
            case = f"{tuple(c['check'])}, {c['dtype']}, {c['groups']}"
            outside = sum(c["outside_tolerance"].values())
            lines.append(f"| {case} | {c['rel_err'][worst]:.1e} ({worst}) | {outside} |")
        lines.append("")
    lines += [
        "| implementation | shape (b, l, di, n) | fwd ms | fwd+bwd ms | fwd floor frac. | fwd+bwd floor frac. "
        "| vs CUDA fwd | vs CUDA fwd+bwd | peak MiB fwd / fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = (
            f"{r['fwd_speedup_vs_cuda']:.2f}x | {r['fwd_bwd_speedup_vs_cuda']:.2f}x"
            if "fwd_speedup_vs_cuda" in r
            else "- | -"
        )
        lines.append(
            f"| {r['implementation']} | {tuple(r['shape'])} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
            f"| {r['fwd_floor_fraction']:.2f} | {r['fwd_bwd_floor_fraction']:.2f} | {speed} "
            f"| {r['fwd_peak_mib']:.0f} / {r['fwd_bwd_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmark_results", help="folder for selective_scan.{json,md}")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--check", action="store_true", help="compare Pallas with the reference on the GPU first")
    parser.add_argument("--sweep", action="store_true", help="also time other block sizes at the first shape")
    parser.add_argument("--skip-xla", action="store_true", help="time the Pallas kernel only")
    parser.add_argument("--breakdown", action="store_true", help="time each Pallas launch alone (first shape)")
    parser.add_argument("--budget-s", type=float, default=420, help="stop starting new measurements after this")
    parser.add_argument("--smoke", action="store_true", help="a CPU dry run of this script: tiny shapes, interpreter")
    args = parser.parse_args()
    if args.smoke:
        global SHAPES, REFERENCE_SHAPE
        SHAPES, REFERENCE_SHAPE = [(1, 8, 32, 2), (1, 5, 40, 2)], (1, 8, 32, 2)
    start = time.perf_counter()
    device = jax.devices()[0]
    header = (
        f"selective scan, {device.device_kind}, {datetime.date.today()}, jax {jax.__version__}, "
        f"python {platform.python_version()}, bf16 inputs with z, D, delta_bias, softplus"
    )
    print(header, flush=True)
    plan = [("pallas", "pallas", SHAPES[0])]
    if args.check:
        plan += [("check", check_args, None) for check_args in (SMOKE_CHECKS if args.smoke else CHECKS)]
    plan.append(("pallas", "pallas", SHAPES[1]))
    # The Triton forward beside the default (Mosaic GPU where it applies): the backend choice, measured in each run.
    plan += [("pallas (Triton forward)", TRITON_FORWARD, shape) for shape in SHAPES]
    if not args.skip_xla:
        plan += [("chunked", "chunked", shape) for shape in SHAPES]
        # associative materialises several float32 (b, l, di, n) tensors: first shape only
        plan += [("associative", "associative", SHAPES[0]), ("reference", "reference", REFERENCE_SHAPE)]
    if args.breakdown:
        plan.append(("breakdown", ScanBlocks(), SHAPES[0]))
    if args.sweep:
        plan += [(f"pallas {blocks}", blocks, SHAPES[0]) for blocks in SWEEP]
    checks, rows, breakdowns = [], [], []
    for name, implementation, shape in plan:
        if time.perf_counter() - start > args.budget_s:
            print(f"skipped (time budget): {name} {shape or implementation}", flush=True)
            continue
        try:
            if name == "check":
                checks.append(check(*implementation, args.smoke))
            elif name == "breakdown":
                breakdowns.append(breakdown(shape, implementation, args.reps, args.smoke))
            else:
                rows.append(measure(name, implementation, shape, args.reps, args.smoke))
        except Exception as error:  # a failed variant must not lose the others' numbers
            print(f"FAILED {name} {shape}: {type(error).__name__}: {str(error)[:2000]}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "selective_scan.json").write_text(
        json.dumps({"header": header, "checks": checks, "rows": rows, "breakdowns": breakdowns}, indent=1)
    )
    table = markdown(rows, checks, header)
    (out / "selective_scan.md").write_text(table + "\n")
    print(f"total {time.perf_counter() - start:.0f} s, floors (ms) {[floors_ms(s) for s in SHAPES]}")
    print(table)


if __name__ == "__main__":
    main()
