"""Benchmark the causal conv + SiLU of a Mamba layer: XLA's fusion of the reference against the Pallas kernels,
forward and forward+backward, with the bytes each moves at its time.

    PYTHONPATH=. python3 -m benchmarks.causal_conv --out "$OUT"

bf16 x (b, l, c), a width-4 kernel and a bias; the loss is sum(y * dy) so the backward sees a dense cotangent. The
forward must read x and write y (2 x b l c x 2 bytes); the backward reads x and dy and writes dx (3 x b l c x 2).
Refuses to run without a GPU (the interpreter would take hours at these shapes).
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

from benchmarks.timing import environment, time_ms
from pallas_kernels.causal_conv import causal_conv1d

# (batch, seqlen, channels): Mamba-1 370m's d_inner, Mamba-2 370m's conv channels (d_inner + 2 n)
SHAPES = [(8, 2048, 2048), (8, 2048, 2304)]
WIDTH = 4


def measure(shape, implementation, reps):
    batch, seqlen, channels = shape
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape, jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (WIDTH, channels), jnp.bfloat16)
    bias = jax.random.normal(keys[2], (channels,), jnp.bfloat16)
    dy = jax.random.normal(keys[3], shape, jnp.bfloat16)

    def forward(x, kernel, bias):
        return causal_conv1d(x, kernel, bias, silu=True, implementation=implementation)

    def loss(x, kernel, bias):
        return jnp.sum(forward(x, kernel, bias).astype(jnp.float32) * dy.astype(jnp.float32))

    fwd = time_ms(jax.jit(forward), x, kernel, bias, reps=reps)["median_ms"]
    fwd_bwd = time_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), x, kernel, bias, reps=reps)["median_ms"]
    elements = batch * seqlen * channels
    return {
        "implementation": implementation,
        "shape": shape,
        "fwd_ms": fwd,
        "fwd_bwd_ms": fwd_bwd,
        "fwd_TBps": 2 * elements * 2 / fwd / 1e9,
        "bwd_TBps": 3 * elements * 2 / max(fwd_bwd - fwd, 1e-9) / 1e9,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None, help="folder for causal_conv.json")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("benchmarks.causal_conv: needs a GPU (the Pallas kernels would run in the interpreter)")
    rows = [measure(shape, impl, args.reps) for shape in SHAPES for impl in ("xla", "pallas")]
    print("| implementation | shape (b, l, c) | fwd ms | fwd+bwd ms | fwd TB/s | bwd TB/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['implementation']} | {r['shape']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['fwd_TBps']:.2f} | {r['bwd_TBps']:.2f} |"
        )
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "causal_conv.json").write_text(json.dumps({**environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
