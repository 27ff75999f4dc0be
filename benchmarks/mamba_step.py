"""The Mamba-1 decode step of one mixer (``pallas_kernels.mamba_step``): XLA op by op against the fused Pallas kernels
and their block-size variants, at the published models' sizes.

    PYTHONPATH=. python3 benchmarks/mamba_step.py --out benchmarks/results/mamba_step_h100.json
    PYTHONPATH=. python3 benchmarks/mamba_step.py --tiny          # a small shape in the interpreter, for a CPU check

Each timing runs ``--layers`` mixers with their own random weights (so that the weights come from memory, not L2,
as in a model) one after another, ``--iters`` times in one compiled ``lax.fori_loop``, each layer's output feeding
the next and the caches carried, as the generate loop runs them; us per layer = median loop time / (iters * layers).
bytes floor = (weights + conv and SSM states read and written) / 3.0 TB/s per layer. Every variant is
checked first against the float32 computation on random caches, as tests/test_mamba_step.py checks the kernels.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from benchmarks.generation import BANDWIDTH, nbytes
from benchmarks.timing import busy_fraction, environment, gpu_kernels, time_by_name, time_ms
from pallas_kernels.mamba_step import MambaStepWeights
from pallas_kernels.mamba_step.pallas import mamba_step_pallas
from pallas_kernels.mamba_step.reference import mamba_step_reference

# (name, batch, d_model): d_inner 2 d_model, d_state 16, dt_rank d_model / 16, d_conv 4, as the published models.
SHAPES = [("mamba-1.4b", 1, 2048), ("mamba-2.8b", 1, 2560), ("mamba-130m", 1, 768), ("mamba-1.4b", 16, 2048)]
SHAPES += [("mamba-1.4b", 64, 2048), ("mamba-130m", 64, 768), ("mamba-2.8b", 64, 2560)]
# Options of the kernels (keyword arguments of pallas.mamba_step_pallas; absent: its default); the first is the
# default.
VARIANTS = [
    {},
    dict(xla_in_proj=False, xla_out_proj=False),  # in_proj by the first kernel at every size
    dict(xla_in_proj=True, xla_out_proj=False),  # in_proj by XLA's product at every size
    dict(prefetch=2),
    dict(columns=1024),
    dict(xla_in_proj=False, splits=4, xla_out_proj=False),  # in_proj's grid in 4.8 waves of 132 SMs at 2.8b
    dict(xla_out_proj=True),  # out_proj by XLA, the state updated in place
    dict(xla_in_proj=True, xla_out_proj=True),  # both projections by XLA
    dict(channels=32, xla_out_proj=True, num_warps=8),  # twice the programs in the conv and state kernels
    dict(channels=32, xla_out_proj=True, num_warps=4),
    dict(channels=16, xla_in_proj=True, xla_out_proj=True, num_warps=4),  # batch > 1: state tiles 16 x 16 x n
    # past one row (benchmarks/RESULTS.md, 2026-11-24): the default before in_proj's kernel held 64 rows and x_proj
    # was XLA's, then each of the new defaults undone or varied
    dict(xla_in_proj=True, xla_x_proj=False),
    dict(xla_in_proj=True),
    dict(xla_x_proj=False),
    dict(splits=1),
    dict(splits=2),
    dict(num_stages=3),
    dict(conv_in_proj=False),  # past one row: the conv in a launch of its own (splits for BATCHED_PROJ_PROGRAMS)
    dict(conv_in_proj=False, splits=1),
    dict(conv_in_proj=True, proj_columns=32),  # 130m: 96 programs of 32 columns, the conv in the same kernel
    dict(channels=32),  # past one row: state tiles 16 rows x 32 channels x n
    dict(channels=32, num_warps=8),
    dict(depth=256),  # one row: in_proj's tiles 256 rows deep
    dict(depth=256, prefetch=0),
    dict(depth=256, prefetch=2),
    dict(depth=256, splits=4),
    dict(depth=256, num_stages=4),
]


def random_layer(key, d_model: int, dtype) -> MambaStepWeights:
    d_inner, d_state, rank = 2 * d_model, 16, math.ceil(d_model / 16)
    keys = iter(jax.random.split(key, 8))

    def normal(*shape, scale):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return MambaStepWeights(
        in_proj=normal(d_model, 2 * d_inner, scale=d_model**-0.5),
        in_proj_bias=None,
        conv=normal(4, d_inner, scale=0.5),
        conv_bias=normal(d_inner, scale=0.5),
        x_proj=normal(d_inner, rank + 2 * d_state, scale=d_inner**-0.5),
        dt_proj=normal(rank, d_inner, scale=rank**-0.5),
        dt_bias=jnp.full((d_inner,), -4.0, dtype),
        A_log=jnp.log(jax.random.uniform(next(keys), (d_inner, d_state), jnp.float32, 1.0, 16.0)).astype(dtype),
        D=jnp.ones((d_inner,), dtype),
        out_proj=normal(d_inner, d_model, scale=d_inner**-0.5),
        out_proj_bias=None,
    )


def step_fn(variant: dict):
    """(u, conv_state, ssm_state, weights, dtype) -> (out, conv_state, ssm_state) for a variant of the kernels."""
    return functools.partial(mamba_step_pallas, **variant)


def loop(step, layers, iters: int, dtype):
    """A jitted function running ``iters`` passes over the layers; the layers' weights are its arguments."""

    @jax.jit
    def run(weights, u, caches):
        def body(_, carry):
            u, caches = carry
            new = []
            for w, (conv_state, ssm_state) in zip(weights, caches, strict=True):
                out, conv_state, ssm_state = step(u, conv_state, ssm_state, w, dtype)
                u = (u + out).astype(dtype)  # a residual stream keeps the values in range
                new.append((conv_state, ssm_state))
            return u, tuple(new)

        return jax.lax.fori_loop(0, iters, body, (u, caches))

    return run


def kernel_times(trace_dir: str, loops: int) -> dict:
    """GPU kernels in the profiler's trace: total us per loop by kernel name, and the fraction of the traced span in
    which some kernel ran (the rest: gaps between launches)."""
    try:
        kernels = gpu_kernels(trace_dir)
    except ValueError as e:  # keep the row's timings
        return {"error": str(e)}
    busy, span = busy_fraction(kernels)
    top = dict(time_by_name(kernels, loops).most_common(12))
    return {"busy_fraction": busy, "span_us_per_loop": span / loops, "kernels_us_per_loop": top}


class Mixer(NamedTuple):
    """What the decode-step benchmarks need of one kind of mixer (this file's Mamba-1, mamba2_step.py's Mamba-2)."""

    random_layer: Callable  # (key, d_model, dtype) -> weights
    empty_cache: Callable  # (batch, d_model, dtype) -> (conv_state, ssm_state)
    step_fn: Callable  # variant -> (u, conv_state, ssm_state, weights, dtype) -> (out, conv_state, ssm_state)
    reference: Callable  # the XLA step, with step_fn's signature
    shapes: list  # (name, batch, d_model)
    variants: list  # the kernels' options; the first is the default
    tiny_d_model: int  # --tiny's shape


def check(mixer: Mixer, step, u, cache, weights, dtype) -> dict:
    """Norm-wise errors of ``step``'s and the XLA reference's results against the float32 computation;
    AssertionError unless ours are within tests/tolerances.py's COMPOSED_ERROR_FACTOR of XLA's."""
    from tests.tolerances import as_float32, assert_no_worse

    reference = jax.jit(mixer.reference, static_argnums=4)
    exact = reference(*as_float32((u, *cache, weights)), jnp.float32)
    ours = jax.jit(step, static_argnums=4)(u, *cache, weights, dtype)
    theirs = reference(u, *cache, weights, dtype)
    names = ("out", "conv_state", "ssm_state")
    return {name: assert_no_worse(ours[i], theirs[i], exact[i], name) for i, name in enumerate(names)}


def measure(mixer: Mixer, name: str, batch: int, d_model: int, variants, args, dtype) -> list[dict]:
    keys = jax.random.split(jax.random.key(0), args.layers + 1)
    weights = tuple(mixer.random_layer(k, d_model, dtype) for k in keys[1:])
    u = jax.random.normal(keys[0], (batch, d_model), jnp.float32).astype(dtype)
    caches = tuple(mixer.empty_cache(batch, d_model, dtype) for _ in range(args.layers))
    layer_bytes = nbytes(weights[0]) + 2 * nbytes(caches[0])
    floor_us = 1e6 * layer_bytes / BANDWIDTH
    # the check's caches are random: a kernel that reads a tap of the window after shifting it differs only there
    check_cache = tuple(
        jax.random.normal(k, c.shape, jnp.float32).astype(c.dtype)
        for k, c in zip(jax.random.split(keys[0], 2), caches[0], strict=True)
    )
    rows = []
    for variant in ["reference", *variants]:
        row = {"model": name, "batch": batch, "d_model": d_model, "variant": str(variant), "floor_us": floor_us}
        step = mixer.reference if variant == "reference" else mixer.step_fn(variant)
        try:
            if variant != "reference":  # checked as the tests check the kernels
                row["error_vs_float32"] = check(mixer, step, u, check_cache, weights[0], dtype)
            run = loop(step, weights, args.iters, dtype)
            timing = time_ms(run, weights, u, caches, reps=args.reps, warmup=2)
            row["us_per_layer"] = 1e3 * timing["median_ms"] / (args.iters * args.layers)
            row["over_floor"] = row["us_per_layer"] / floor_us
            if args.profile and variant in ("reference", variants[0]):
                trace_dir = os.path.join(args.profile, f"{name}-{batch}-{variant}".replace(" ", ""))
                with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                    for _ in range(3):
                        jax.block_until_ready(run(weights, u, caches))
                # per loop -> per layer: the trace holds 3 loops of iters * layers steps
                profile = kernel_times(trace_dir, 3 * args.iters * args.layers)
                row["profile_per_layer"] = profile
                print(json.dumps(profile, indent=1), flush=True)
        except Exception as e:  # a variant Triton cannot compile: keep the others
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main(mixer: Mixer, description: str):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    shapes, variants = mixer.shapes, mixer.variants
    if args.shapes:
        shapes = [mixer.shapes[int(i)] for i in args.shapes.split(",")]
    if args.variants:
        variants = [mixer.variants[int(i)] for i in args.variants.split(",")]
    if args.tiny:
        shapes, variants = [("tiny", 1, mixer.tiny_d_model)], variants[:1]
        args.layers, args.iters, args.reps = 2, 2, 2
    rows = []
    for name, batch, d_model in shapes:
        rows += measure(mixer, name, batch, d_model, variants, args, dtype)
    result = {"environment": environment(), "dtype": args.dtype, "layers": args.layers, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    width = max(len(r["variant"]) for r in rows)
    print(f"{'model':<12} {'batch':>5} {'variant':<{width}} {'us/layer':>9} {'floor us':>9} {'x floor':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['batch']:>5} {r['variant']:<{width}} ERROR {r['error']}")
        else:
            print(
                f"{r['model']:<12} {r['batch']:>5} {r['variant']:<{width}} {r['us_per_layer']:>9.2f} "
                f"{r['floor_us']:>9.2f} {r['over_floor']:>8.2f}"
            )


def empty_cache(batch: int, d_model: int, dtype):
    return jnp.zeros((batch, 4, 2 * d_model), dtype), jnp.zeros((batch, 2 * d_model, 16), jnp.float32)


MAMBA1 = Mixer(random_layer, empty_cache, step_fn, mamba_step_reference, SHAPES, VARIANTS, tiny_d_model=64)

if __name__ == "__main__":
    main(MAMBA1, __doc__)
