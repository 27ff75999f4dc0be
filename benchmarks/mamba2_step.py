"""The Mamba-2 decode step of one mixer (``pallas_kernels.mamba2_step``): XLA op by op against the fused Pallas kernels
and their block-size variants, at the published models' sizes.

    PYTHONPATH=. python3 benchmarks/mamba2_step.py --out benchmarks/results/mamba2_step_h100.json
    PYTHONPATH=. python3 benchmarks/mamba2_step.py --tiny          # a small shape in the interpreter, for a CPU check

Timed as benchmarks/mamba_step.py times the Mamba-1 step (its ``loop``: ``--layers`` mixers with their own random
weights, ``--iters`` passes in one compiled loop, the caches carried); us per layer = median loop time / (iters *
layers); bytes floor = (weights + conv and SSM states read and written) / 3.0 TB/s per layer. The first variant of
every shape is checked against the float32 computation first, as tests/test_mamba2_step.py checks the kernels.
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp

from benchmarks.generation import BANDWIDTH, nbytes
from benchmarks.mamba_step import kernel_times, loop
from benchmarks.timing import environment, time_ms
from pallas_kernels.mamba2_step import Mamba2StepWeights
from pallas_kernels.mamba2_step.pallas import mamba2_step_pallas
from pallas_kernels.mamba2_step.reference import mamba2_step_reference

HEADDIM, D_STATE, WIDTH = 64, 128, 4  # the published Mamba-2 models' (expand 2, ngroups 1)
# (name, batch, d_model)
SHAPES = [("mamba2-1.3b", 1, 2048), ("mamba2-2.7b", 1, 2560), ("mamba2-130m", 1, 768), ("mamba2-1.3b", 16, 2048)]
# (depth, proj_columns, splits, columns, out_splits, parts, prefetch, num_warps, num_stages) of the kernels
# (pallas.mamba2_step_pallas; splits None: pallas.default_splits); the first is the default.
VARIANTS = [
    (128, 64, None, 64, None, 2, 1, 8, 3),
    (128, 64, None, 64, None, 1, 1, 8, 3),
    (128, 64, None, 64, None, 4, 1, 8, 3),
    (128, 64, None, 128, None, 2, 1, 8, 3),
    (128, 64, None, 64, None, 2, 2, 8, 3),
    (64, 64, None, 64, None, 2, 1, 4, 3),
]


def random_layer(key, d_model: int, dtype) -> Mamba2StepWeights:
    d_inner = 2 * d_model
    heads = d_inner // HEADDIM
    conv_dim = d_inner + 2 * D_STATE
    keys = iter(jax.random.split(key, 8))

    def normal(*shape, scale):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return Mamba2StepWeights(
        in_proj=normal(d_model, 2 * d_inner + 2 * D_STATE + heads, scale=d_model**-0.5),
        in_proj_bias=None,
        conv=normal(WIDTH, conv_dim, scale=0.5),
        conv_bias=normal(conv_dim, scale=0.5),
        dt_bias=normal(heads, scale=1.0) - 4.0,
        A_log=jnp.log(jax.random.uniform(next(keys), (heads,), jnp.float32, 1.0, 16.0)),
        D=jnp.ones((heads,), jnp.float32),
        norm=1.0 + normal(d_inner, scale=0.1),
        out_proj=normal(d_inner, d_model, scale=d_inner**-0.5),
        out_proj_bias=None,
    )


def step_fn(variant):
    """(u, conv_state, ssm_state, weights, dtype) -> (out, conv_state, ssm_state) for a variant."""
    if variant == "reference":
        return mamba2_step_reference
    depth, proj_columns, splits, columns, out_splits, parts, prefetch, num_warps, num_stages = variant
    return functools.partial(
        mamba2_step_pallas,
        depth=depth,
        proj_columns=proj_columns,
        splits=splits,
        columns=columns,
        out_splits=out_splits,
        parts=parts,
        prefetch=prefetch,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def check(step, u, cache, weights, dtype) -> dict:
    """Norm-wise errors of ``step``'s and the XLA reference's out and new SSM state against the float32 computation;
    AssertionError unless ours are within tests/tolerances.py's COMPOSED_ERROR_FACTOR of XLA's."""
    from tests.tolerances import as_float32, assert_no_worse

    exact = jax.jit(mamba2_step_reference, static_argnums=4)(*as_float32((u, *cache, weights)), jnp.float32)
    ours = jax.jit(step, static_argnums=4)(u, *cache, weights, dtype)
    theirs = jax.jit(mamba2_step_reference, static_argnums=4)(u, *cache, weights, dtype)
    return {
        name: assert_no_worse(ours[i], theirs[i], exact[i], name)
        for name, i in (("out", 0), ("conv_state", 1), ("ssm_state", 2))
    }


def measure(name: str, batch: int, d_model: int, variants, args, dtype) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), args.layers + 2)
    weights = tuple(random_layer(k, d_model, dtype) for k in keys[2:])
    u = jax.random.normal(keys[0], (batch, d_model), jnp.float32).astype(dtype)
    heads = 2 * d_model // HEADDIM
    conv_state = 0.5 * jax.random.normal(keys[1], (batch, WIDTH, 2 * d_model + 2 * D_STATE), jnp.float32)
    caches = tuple(
        (conv_state.astype(dtype), jnp.zeros((batch, heads, HEADDIM, D_STATE), jnp.float32)) for _ in range(args.layers)
    )
    layer_bytes = nbytes(weights[0]) + 2 * nbytes(caches[0])
    floor_us = 1e6 * layer_bytes / BANDWIDTH
    rows = []
    for variant in ["reference", *variants]:
        row = {"model": name, "batch": batch, "d_model": d_model, "variant": str(variant), "floor_us": floor_us}
        try:
            if variant == variants[0]:  # checked as tests/test_mamba2_step.py checks the kernels
                row["error_vs_float32"] = check(step_fn(variant), u, caches[0], weights[0], dtype)
            run = loop(step_fn(variant), weights, args.iters, dtype)
            timing = time_ms(run, weights, u, caches, reps=args.reps, warmup=2)
            row["us_per_layer"] = 1e3 * timing["median_ms"] / (args.iters * args.layers)
            row["over_floor"] = row["us_per_layer"] / floor_us
            if args.profile and variant in ("reference", variants[0]):
                trace_dir = os.path.join(args.profile, f"{name}-{batch}-{variant}".replace(" ", ""))
                with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                    for _ in range(3):
                        jax.block_until_ready(run(weights, u, caches))
                row["profile_per_layer"] = kernel_times(trace_dir, 3 * args.iters * args.layers)
                print(json.dumps(row["profile_per_layer"], indent=1), flush=True)
        except Exception as e:  # a variant Triton cannot compile: keep the others
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="one small shape, default kernels only (CPU check)")
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    parser.add_argument("--profile", default=None, help="trace the reference and first variant here; kernel times")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    shapes, variants = SHAPES, VARIANTS
    if args.shapes:
        shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    if args.variants:
        variants = [VARIANTS[int(i)] for i in args.variants.split(",")]
    if args.tiny:
        shapes, variants, args.layers, args.iters, args.reps = [("tiny", 1, 128)], VARIANTS[:1], 2, 2, 2
    rows = []
    for name, batch, d_model in shapes:
        rows += measure(name, batch, d_model, variants, args, dtype)
    result = {"environment": environment(), "dtype": args.dtype, "layers": args.layers, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{'model':<12} {'batch':>5} {'variant':<40} {'us/layer':>9} {'floor us':>9} {'x floor':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['batch']:>5} {r['variant']:<40} ERROR {r['error']}")
        else:
            print(
                f"{r['model']:<12} {r['batch']:>5} {r['variant']:<40} {r['us_per_layer']:>9.2f} "
                f"{r['floor_us']:>9.2f} {r['over_floor']:>8.2f}"
            )


if __name__ == "__main__":
    main()
