"""Does programmatic dependent launch (PDL) let a decode step's next kernel start early on this stack?

At one row a layer is a chain of dependent launches; the idea is that a kernel could start, and read its weights,
while the one before it finishes. jax 0.11's Mosaic GPU has ``plgpu.griddepcontrol_wait`` (a kernel using it is
marked for PDL) and PTX's ``griddepcontrol.launch_dependents`` lets a primary kernel release its dependents early.
This probe times a chain of layers, each

- M: a Mosaic GPU matrix-vector product u (K,) @ W (K, N) -> float32 partials (4, N) (1.4b's in_proj shape), as
  "plain" (no PDL), "wait" (``griddepcontrol_wait`` first), "late_wait" (the wait after its reads: wrong results
  whenever it really starts before its predecessor ends, which is the test) or "prefetch" (the first tiles of W
  copied into shared memory before the wait);
- R: a kernel summing the partials into the next u (fp16), as "triton" (Pallas Triton), "triton_trigger" (the same
  with ``griddepcontrol.launch_dependents`` before its loads) or "mosaic_trigger" (Mosaic GPU, releasing its
  dependents first), optionally spinning ``--spin`` dependent float32 operations before its store, so that an early
  start would have something to overlap;

with different random W per layer (more bytes than the L2 holds). ``chain_diff`` is the largest difference of the
chain's result from the "plain" / "triton" chain's: 0 for every variant means no M ever started before its R ended.
``--uses-pdl`` also puts ``uses_pdl=True`` into the Mosaic GPU custom call's backend config (XLA's FFI custom calls
take PDL from that attribute when ``--xla_gpu_enable_pdl`` is on). GPU only (compute capability 9.0, jax >= 0.11).

    PYTHONPATH=. python3 benchmarks/pdl.py [--spin 2000] [--uses-pdl] [--out FILE]
    XLA_FLAGS=--xla_gpu_enable_pdl=true PYTHONPATH=. python3 benchmarks/pdl.py --spin 2000 --uses-pdl
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from benchmarks.gemv import mosaic_rows_product
from benchmarks.timing import environment
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION

K, N = 2048, 8192
COLUMNS, DEPTH, SPLITS, STAGES, PREFETCH = 128, 64, 4, 4, 4
LAYERS, ITERS, REPS = 8, 20, 12
M_MODES = ("plain", "wait", "late_wait", "prefetch")
R_MODES = ("triton", "triton_trigger", "mosaic_trigger")


def product(mode: str):
    """u (K,) fp16, W (K, N) fp16 -> (SPLITS, N) float32 partial sums, on Mosaic GPU, PDL as ``mode`` says."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows_per = K // SPLITS

    def body(u_ref, w_ref, out_ref, *scratch):
        j, s = lax.axis_index("j"), lax.axis_index("s")
        rows, cols = pl.ds(s * rows_per, rows_per), pl.ds(j * COLUMNS, COLUMNS)
        if mode == "prefetch":
            tiles, barrier = scratch
            for t in range(PREFETCH):
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(s * rows_per + t * DEPTH, DEPTH), cols], tiles.at[t], barrier)
        if mode in ("wait", "prefetch"):
            plgpu.griddepcontrol_wait()

        out_ref[s, cols] = mosaic_rows_product(u_ref.at[rows], w_ref.at[rows, cols], depth=DEPTH, stages=STAGES)
        if mode == "late_wait":
            plgpu.griddepcontrol_wait()
        if mode == "prefetch":
            plgpu.barrier_wait(barrier)

    scratch = []
    if mode == "prefetch":
        scratch = [plgpu.SMEM((PREFETCH, DEPTH, COLUMNS), jnp.float16), plgpu.Barrier(num_arrivals=PREFETCH)]
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((SPLITS, N), jnp.float32),
        grid=(N // COLUMNS, SPLITS),
        grid_names=("j", "s"),
        scratch_types=scratch,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )


def launch_dependents(x: jax.Array) -> jax.Array:
    """x (int32), after ``griddepcontrol.launch_dependents``: the asm is pure to Pallas, so its result feeds the
    caller's loads (which keeps it, and keeps it before them)."""
    [y] = plt.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
        args=[x],
        constraints="=r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)],
    )
    return y


def spun(total: jax.Array, spin: int) -> jax.Array:
    """total after ``spin`` dependent multiply-adds (a stand-in for a latency-bound kernel's work)."""
    return lax.fori_loop(0, spin, lambda i, x: x * 1.0000001 + 1e-30, total) if spin else total


def mosaic_reduction(spin: int):
    """``reduction`` on Mosaic GPU, releasing its dependents (``griddepcontrol_launch_dependents``) first."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layout = plgpu.Layout.WG_STRIDED((128,), 1)

    def body(p_ref, o_ref, parts, barrier):
        plgpu.griddepcontrol_launch_dependents()
        cols = pl.ds(lax.axis_index("j") * 128, 128)
        plgpu.copy_gmem_to_smem(p_ref.at[:, cols], parts, barrier)
        plgpu.barrier_wait(barrier)
        total = plgpu.load(parts.at[0], layout=layout)
        for i in range(1, SPLITS):
            total = total + plgpu.load(parts.at[i], layout=layout)
        o_ref[cols] = spun(total, spin).astype(o_ref.dtype)

    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((K,), jnp.float16),
        grid=(K // 128,),
        grid_names=("j",),
        scratch_types=[plgpu.SMEM((SPLITS, 128), jnp.float32), plgpu.Barrier(num_arrivals=1)],
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )


def reduction(mode: str, spin: int):
    """partials (SPLITS, N) float32 -> u (K,) fp16: the sum of the first K columns, ``spin`` operations later."""
    if mode == "mosaic_trigger":
        return mosaic_reduction(spin)
    block = 256

    def kernel(p_ref, o_ref):
        if mode == "triton_trigger":
            kept = launch_dependents(lax.iota(jnp.int32, block)) >= 0
            p = plt.load(p_ref, mask=jnp.broadcast_to(kept[None, :], (SPLITS, block)), other=0.0)
        else:
            p = p_ref[...]
        o_ref[...] = spun(p.sum(axis=0), spin).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((K,), jnp.float16),
        grid=(K // block,),
        in_specs=[pl.BlockSpec((SPLITS, block), lambda i: (0, i))],
        out_specs=pl.BlockSpec((block,), lambda i: (i,)),
        compiler_params=plt.CompilerParams(num_warps=4),
    )


def chain(m, r):
    @jax.jit
    def run(matrices, u):
        def body(_, u):
            for w in matrices:
                u = r(m(u, w)) * jnp.float16(0.5)
            return u

        return lax.fori_loop(0, ITERS, body, u)

    return run


def mark_uses_pdl() -> None:
    """Add ``uses_pdl=True`` to every Mosaic GPU custom call's backend config (jax 0.11 marks PDL only inside the
    kernel's module)."""
    from jax._src.interpreters import mlir
    from jax._src.lib.mlir import ir

    original = mlir.custom_call

    def custom_call(*args, **kwargs):
        if kwargs.get("call_target_name") == "mosaic_gpu_v2" and isinstance(kwargs.get("backend_config"), dict):
            kwargs["backend_config"] = {**kwargs["backend_config"], "uses_pdl": ir.BoolAttr.get(True)}
        return original(*args, **kwargs)

    mlir.custom_call = custom_call


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spin", type=int, default=0, help="dependent operations in R before its store")
    parser.add_argument("--uses-pdl", action="store_true", help="mark the Mosaic GPU custom calls uses_pdl")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the variants (alternating)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    if args.uses_pdl:
        mark_uses_pdl()
    keys = jax.random.split(jax.random.key(0), LAYERS + 1)
    matrices = tuple(jax.random.normal(k, (K, N), jnp.float32).astype(jnp.float16) / K**0.5 for k in keys[1:])
    u = jax.random.normal(keys[0], (K,), jnp.float32).astype(jnp.float16)
    reference, rows = None, []
    for rnd in range(args.rounds):
        for r_mode in R_MODES:
            for m_mode in M_MODES:
                row = {"M": m_mode, "R": r_mode, "round": rnd, "spin": args.spin}
                run = chain(product(m_mode), reduction(r_mode, args.spin))
                out = jax.block_until_ready(run(matrices, u)).astype(jnp.float32)
                reference = out if reference is None else reference
                row["chain_diff"] = float(jnp.max(jnp.abs(out - reference)))
                samples = []
                for _ in range(REPS):
                    start = time.perf_counter()
                    jax.block_until_ready(run(matrices, u))
                    samples.append(time.perf_counter() - start)
                row["us_per_layer"] = 1e6 * sorted(samples)[REPS // 2] / (ITERS * LAYERS)
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        config = {"spin": args.spin, "uses_pdl": args.uses_pdl, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "config": config, "rows": rows}, f, indent=2)
    for row in rows:
        print(f"{row['M']:<10} {row['R']:<15} {row['us_per_layer']:7.2f} us a layer  chain_diff {row['chain_diff']}")


if __name__ == "__main__":
    main()
