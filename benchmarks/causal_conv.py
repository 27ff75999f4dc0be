"""Benchmark the causal conv + SiLU of a Mamba layer: XLA's ops (float32 reference, and in the input's dtype) against
the Pallas kernels with several tilings, forward and gradient, as GPU time a call.

    PYTHONPATH=. python3 -m benchmarks.causal_conv --out "$OUT"

bf16 x (b, l, c), a width-4 kernel and a bias; the loss is sum(y * dy) so the backward sees a dense cotangent. Each
function runs ``--reps`` times inside a profiler trace and its time is the GPU kernels' total a call (no host
dispatch). The forward must read x and write y (2 x b l c x 2 bytes). The gradient program (jax.grad of the loss)
must read x and dy and write dx (3 x b l c x 2): XLA drops the forward's launch there, whose output nothing uses.
Refuses to run without a GPU (the interpreter would take hours at these shapes).
"""

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp

from benchmarks.timing import environment, gpu_ms
from pallas_kernels.causal_conv import causal_conv1d
from pallas_kernels.causal_conv.pallas import ConvTiles, causal_conv1d_pallas

# (batch, seqlen, channels): Mamba-1 370m's d_inner, Mamba-2 370m's conv channels (d_inner + 2 n)
SHAPES = [(8, 2048, 2048), (8, 2048, 2304)]
WIDTH = 4
# (channels, steps, tile, warps) of the kernels; the first is ConvTiles' default
TILES = [(512, 64, 8, 4), (512, 64, 16, 4), (256, 64, 8, 2), (256, 128, 16, 4), (512, 128, 8, 4), (1024, 64, 8, 8)]


def measure(shape, name, conv, reps):
    batch, seqlen, channels = shape
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape, jnp.bfloat16)
    kernel = jax.random.normal(keys[1], (WIDTH, channels), jnp.bfloat16)
    bias = jax.random.normal(keys[2], (channels,), jnp.bfloat16)
    dy = jax.random.normal(keys[3], shape, jnp.bfloat16)

    def loss(x, kernel, bias):
        return jnp.sum(conv(x, kernel, bias).astype(jnp.float32) * dy.astype(jnp.float32))

    fwd = gpu_ms(jax.jit(conv), (x, kernel, bias), reps)
    grad = gpu_ms(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), (x, kernel, bias), reps)
    elements = batch * seqlen * channels
    return {
        "implementation": name,
        "shape": shape,
        "fwd_ms": fwd,
        "grad_ms": grad,
        "fwd_TBps": 2 * elements * 2 / fwd / 1e9,
        "grad_TBps": 3 * elements * 2 / grad / 1e9,
    }


def implementations(tiles):
    rows = {
        name: lambda x, k, b, name=name: causal_conv1d(x, k, b, silu=True, implementation=name)
        for name in ("reference", "xla")
    }
    for t in tiles:
        config = ConvTiles(*t)
        rows[f"pallas {t}"] = lambda x, k, b, config=config: causal_conv1d_pallas(x, k, b, True, False, config)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tiles", type=int, default=len(TILES), help="how many of TILES to run (the first n)")
    parser.add_argument("--out", default=None, help="folder for causal_conv.json")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("benchmarks.causal_conv: needs a GPU (the Pallas kernels would run in the interpreter)")
    rows = []
    print("| implementation | shape (b, l, c) | fwd ms | grad ms | fwd TB/s | grad TB/s |\n|---|---|---|---|---|---|")
    for shape in SHAPES:
        for name, conv in implementations(TILES[: args.tiles]).items():
            r = measure(shape, name, conv, args.reps)
            rows.append(r)
            print(
                f"| {name} | {shape} | {r['fwd_ms']:.3f} | {r['grad_ms']:.3f} | {r['fwd_TBps']:.2f} | "
                f"{r['grad_TBps']:.2f} |",
                flush=True,
            )
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "causal_conv.json").write_text(json.dumps({**environment(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
