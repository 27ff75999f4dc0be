"""Run the Pallas selective scan's forward and forward+backward a few times, for a profiler to watch.

    ncu --clock-control none --set full -k regex:selective_scan -o "$OUT/scan" \
        python3 -m benchmarks.scan_profile --shape 8,2048,1536,16

Nothing is timed here (benchmarks/selective_scan.py does that); under Nsight Compute each kernel is replayed to read
its counters, so one call of each launch is enough.
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.selective_scan import forward_backward_fn, make_inputs, scan_fn
from pallas_kernels.selective_scan.pallas_config import ScanBlocks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,2048,1536,16", help="batch,seqlen,dim,d_state")
    parser.add_argument("--calls", type=int, default=1)
    parser.add_argument("--chunk", type=int, default=None, help="ScanBlocks.chunk (default: automatic)")
    args = parser.parse_args()
    shape = tuple(int(x) for x in args.shape.split(","))
    arrays = {k: v for k, v in make_inputs(shape).items() if v is not None}
    cotangent = jax.random.normal(jax.random.key(1), arrays["u"].shape).astype(arrays["u"].dtype)
    blocks = ScanBlocks(chunk=args.chunk)
    both = jax.jit(forward_backward_fn(scan_fn(blocks)))
    for _ in range(args.calls):
        jax.block_until_ready(both(arrays, cotangent))
    print("ran", shape, blocks, jnp.zeros(()).devices())


if __name__ == "__main__":
    main()
