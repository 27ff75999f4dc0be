"""Compile time of the Mamba-1 scan in a model: its forward + backward over N layers, traced + lowered, then compiled
by XLA.

    PYTHONPATH=. python3 benchmarks/compile_time.py --out benchmarks/results/compile_time_h100.json

Backends: ``api`` calls ``selective_scan(..., implementation="pallas")`` in each layer, the api's jitted
implementation, as a model does now; ``auto``, ``triton`` and ``mosaic`` call ``selective_scan_pallas`` directly
with that forward backend, un-jitted, so that every layer traces and lowers the kernels again (as a model did before
the api jitted its implementations). lower s = tracing + lowering to StableHLO (Python); compile s = XLA's compile of
the lowered module (the Triton and Mosaic GPU kernels included); first run s = the first call after it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from benchmarks.timing import environment
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.selective_scan.pallas import selective_scan_pallas
from pallas_kernels.selective_scan.pallas_config import ScanBlocks


def layer_fn(backend: str):
    """(x, delta, A, B, C) -> the scan's output (z = x, softplus on delta)."""
    if backend == "api":
        return lambda x, dl, A, B, C: selective_scan(x, dl, A, B, C, z=x, delta_softplus=True, implementation="pallas")
    blocks = ScanBlocks(forward_backend=backend)
    return lambda x, dl, A, B, C: selective_scan_pallas(x, dl, A, B, C, None, x, None, True, None, blocks=blocks)[0]


def measure(layers: int, backend: str, remat: bool, shape) -> dict:
    batch, seqlen, dim, d_state = shape
    layer = jax.checkpoint(layer_fn(backend)) if remat else layer_fn(backend)

    def loss(params, u):
        for A, B, C, delta in params:
            u = layer(u, delta, A, B, C)
        return jnp.sum(u.astype(jnp.float32) ** 2)

    grouped = (batch, seqlen, 1, d_state)
    params = [
        (
            -jnp.ones((dim, d_state)) * (i + 1),
            jnp.ones(grouped, jnp.bfloat16),
            jnp.full(grouped, 0.5, jnp.bfloat16),
            jnp.full((batch, seqlen, dim), 0.1, jnp.bfloat16),
        )
        for i in range(layers)
    ]
    u = jnp.full((batch, seqlen, dim), 0.01, jnp.bfloat16)
    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params, u)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    jax.block_until_ready(compiled(params, u))
    return {
        "layers": layers,
        "backend": backend,
        "remat": remat,
        "lower_s": lowered_at - start,
        "compile_s": compiled_at - lowered_at,
        "first_run_s": time.perf_counter() - compiled_at,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,4,8")
    parser.add_argument("--backends", default="api,auto,triton", help="comma list of api, auto, triton, mosaic")
    parser.add_argument("--shape", default="2,2048,1024,16", help="batch, seqlen, d_inner, d_state")
    parser.add_argument("--remat", action="store_true", help="also each layer count under jax.checkpoint")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    rows = []
    for backend in args.backends.split(","):
        for layers in (int(n) for n in args.layers.split(",")):
            for remat in (False, True) if args.remat else (False,):
                row = measure(layers, backend, remat, shape)
                print(json.dumps(row), flush=True)
                rows.append(row)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump({"environment": environment(), "shape": shape, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
