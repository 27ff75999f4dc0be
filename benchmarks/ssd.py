"""Mamba-2 SSD (``mamba_chunk_scan``) timings: forward and forward+backward, bf16 inputs, per implementation.

Usage (on a GPU machine, from the repository root):
    PYTHONPATH=. python3 benchmarks/ssd.py [--shape 8,2048,24,64,128] [--chunk 256] [--out results.json]
        [--kernels TRACE_DIR]
``--kernels`` traces 5 calls of each row after its timing and adds the GPU time per call of each kernel by name
(the Pallas launches are named ssd_forward, ssd_states, ssd_adjoints, ssd_backward, ssd_backward_bc).
The anchor (ANCHORS.md, mamba_ssm's Triton mamba_chunk_scan_combined on an H100) is 0.517 ms fwd, 4.24 ms fwd+bwd.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.timing import compiled_memory_gib, environment, gpu_kernels, time_by_name, time_ms
from pallas_kernels import mamba_chunk_scan

ANCHOR_MS = {"fwd": 0.517, "fwd+bwd": 4.24}


def make_inputs(key, batch, seqlen, nheads, headdim, d_state, ngroups=1, dtype=jnp.bfloat16):
    ks = jax.random.split(key, 6)
    x = jax.random.normal(ks[0], (batch, seqlen, nheads, headdim), dtype)
    dt = jax.random.normal(ks[1], (batch, seqlen, nheads), dtype) - 2.0
    A = -jnp.exp(jax.random.uniform(ks[2], (nheads,), jnp.float32, 0.0, 2.7))
    B = jax.random.normal(ks[3], (batch, seqlen, ngroups, d_state), dtype)
    C = jax.random.normal(ks[4], (batch, seqlen, ngroups, d_state), dtype)
    D = jnp.ones((nheads,), jnp.float32)
    dt_bias = jax.random.uniform(ks[5], (nheads,), jnp.float32, -4.0, -2.0)
    return x, dt, A, B, C, D, dt_bias


def kernel_times(fn, inputs, trace_dir: str, calls: int = 5) -> dict[str, float]:
    """ms per call of each GPU kernel (by name, slowest first) over ``calls`` traced calls of ``fn(*inputs)``."""
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(calls):
            jax.block_until_ready(fn(*inputs))
    per_name = time_by_name(gpu_kernels(trace_dir), 1e3 * calls)
    return {name: round(ms, 4) for name, ms in per_name.most_common()}


def run(shape, chunk, implementations, reps, kernels_dir=None):
    inputs = make_inputs(jax.random.key(0), *shape)

    def forward(impl):
        def f(x, dt, A, B, C, D, dt_bias):
            return mamba_chunk_scan(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True, implementation=impl)

        return jax.jit(f)

    def forward_backward(impl):
        f = forward(impl)

        def loss(*args):
            return jnp.sum(f(*args).astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4, 5, 6)))

    rows = []
    for impl in implementations:
        for mode, build in (("fwd", forward), ("fwd+bwd", forward_backward)):
            fn = build(impl)
            timing = time_ms(fn, *inputs, reps=reps)
            rows.append(
                {
                    "implementation": impl,
                    "mode": mode,
                    **timing,
                    "anchor_ms": ANCHOR_MS[mode],
                    "speedup_vs_anchor": ANCHOR_MS[mode] / timing["median_ms"],
                    "compiled_memory_gib": compiled_memory_gib(fn, *inputs),
                }
            )
            if kernels_dir:
                trace_dir = os.path.join(kernels_dir, f"{impl}-{mode.replace('+', '_')}")
                rows[-1]["kernels_ms_per_call"] = kernel_times(fn, inputs, trace_dir)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,2048,24,64,128", help="batch,seqlen,nheads,headdim,d_state")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--implementations", default="chunked")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--kernels", default=None, help="trace each row here and add its GPU time per kernel")
    args = parser.parse_args()
    if args.kernels and jax.devices()[0].platform != "gpu":
        parser.error(f"--kernels reads GPU kernel times from a trace: needs a GPU, found {jax.devices()[0].platform}")
    shape = tuple(int(s) for s in args.shape.split(","))
    rows = run(shape, args.chunk, args.implementations.split(","), args.reps, args.kernels)
    result = {"environment": environment(), "shape": shape, "chunk": args.chunk, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"SSD {shape} chunk {args.chunk} on {result['environment']['device']}")
    print(f"{'impl':<10} {'mode':<8} {'median ms':>10} {'anchor ms':>10} {'x anchor':>9} {'mem GiB':>8}")
    for r in rows:
        print(
            f"{r['implementation']:<10} {r['mode']:<8} {r['median_ms']:>10.3f} {r['anchor_ms']:>10.3f} "
            f"{r['speedup_vs_anchor']:>9.2f} {r['compiled_memory_gib']:>8.2f}"
        )
    for r in rows:
        for name, ms in list(r.get("kernels_ms_per_call", {}).items())[:8]:
            print(f"  {r['implementation']} {r['mode']}: {name} {ms:.3f} ms")


if __name__ == "__main__":
    main()
