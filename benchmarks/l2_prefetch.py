"""Can a short, latency-bound kernel read the next matrix into the GPU's L2 cache, and is the next product faster?

A decode step at one row alternates bandwidth-bound products (in_proj, out_proj) with small kernels that keep the
memory idle (the conv, the state update, sums). This probe times, per matrix of a chain of random matrices:

- ``none``: a stand-in small kernel (one program, ``--work`` dependent float32 operations), then XLA's y = v @ W;
- ``prefetch P``: the same kernel with P more programs that read W (as a flat (K N / 1024, 1024) view, tiles of
  ``--tile`` rows, ``evict_last``) and store one sum each, so that the loads are kept; then the same product;
- ``alone P``: that prefetch kernel without the product (what reading W this way costs on its own).

If ``prefetch`` beats ``none``, the product ran from L2 and the reads hid behind the small kernel.

    PYTHONPATH=. python3 benchmarks/l2_prefetch.py [--work 0,600] [--programs 132,264,528]
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from benchmarks.timing import environment, time_ms

SHAPES = {"1.4b out_proj": (4096, 2048), "2.8b out_proj": (5120, 2560)}
LANES = 1024


def _kernel(u_ref, w_ref, v_ref, sink_ref, *, work: int, tile: int, per_program: int):
    """Program 0: v = u after ``work`` dependent steps. Programs 1...: tiles of W's flat view, summed."""
    pid = pl.program_id(0)

    @pl.when(pid == 0)
    def _():
        for chunk in range(u_ref.shape[1] // LANES):  # u (1, K), K a multiple of LANES
            lanes = pl.ds(chunk * LANES, LANES)
            v = lax.fori_loop(0, work, lambda _, v: v * 0.999 + 0.001, u_ref[:, lanes].astype(jnp.float32))
            v_ref[:, lanes] = v.astype(v_ref.dtype)

    @pl.when(pid > 0)
    def _():
        start = (pid - 1) * per_program

        def body(i, acc):
            rows = pl.ds(pl.multiple_of(start + i * tile, tile), tile)
            return acc + plt.load(w_ref.at[rows, :], eviction_policy="evict_last").astype(jnp.float32)

        acc = lax.fori_loop(0, per_program // tile, body, jnp.zeros((tile, LANES), jnp.float32))
        sink_ref[pl.ds(pid - 1, 1), :] = jnp.full((1, 16), jnp.sum(acc))


def small_kernel(u, w, *, work: int, programs: int, tile: int, interpret: bool = False):
    """(v, sink): the stand-in kernel, with ``programs`` reading W (0: none)."""
    flat = w.reshape(-1, LANES)
    per_program = flat.shape[0] // max(programs, 1)
    return pl.pallas_call(
        functools.partial(_kernel, work=work, tile=tile, per_program=per_program),
        out_shape=(jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct((max(programs, 1), 16), jnp.float32)),
        grid=(1 + programs,),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
        name="small_with_prefetch",
        interpret=interpret,
    )(u, flat)


def chain(mode: str, work: int, programs: int, tile: int, iters: int):
    @jax.jit
    def run(matrices, u):
        def body(_, u):
            for w in matrices:
                v, _ = small_kernel(u, w, work=work, programs=programs if mode != "none" else 0, tile=tile)
                if mode == "alone":
                    u = v
                    continue
                y = v @ w
                u = u + (1e-3 * jnp.sum(y[:, : u.shape[1]])).astype(u.dtype)
            return u

        return lax.fori_loop(0, iters, body, u)

    return run


def divisor_near(n: int, target: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - target))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="0,600")
    parser.add_argument("--programs", default="132,264,528")
    parser.add_argument("--tile", type=int, default=8)
    parser.add_argument("--matrices", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    rows = []
    for name, (k, n) in SHAPES.items():
        keys = jax.random.split(jax.random.key(0), args.matrices + 1)
        matrices = tuple(jax.random.normal(key, (k, n), jnp.float16) for key in keys[1:])
        u = jax.random.normal(keys[0], (1, k), jnp.float16)
        tiles = k * n // LANES // args.tile
        for work in map(int, args.work.split(",")):
            modes = [("none", 0)]
            for target in map(int, args.programs.split(",")):
                p = divisor_near(tiles, target)
                modes += [("prefetch", p), ("alone", p)]
            for mode, p in modes:
                timing = time_ms(chain(mode, work, p, args.tile, args.iters), matrices, u, reps=args.reps, warmup=2)
                us = 1e3 * timing["median_ms"] / (args.iters * args.matrices)
                row = {"shape": name, "K": k, "N": n, "work": work, "mode": mode, "programs": p, "us": round(us, 2)}
                row["TB_per_s_of_W"] = round(k * n * 2 / us / 1e6, 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
