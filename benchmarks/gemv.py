"""The decode step's projections y (M, N) = u (M, K) @ W (K, N), as XLA runs them and as Pallas tilings (Triton, and
Mosaic GPU at one row) of the kind ``pallas_kernels/mamba_step`` uses: which reads W nearest the memory bandwidth.
At one row (the default) they are matrix-vector products: the fused step's in_proj kernel reads at ~2.3 TB/s (1.4b)
of the H100's ~3.0 (benchmarks/RESULTS.md). ``--rows 64`` times the batch-64 step's products (W still read once).

    PYTHONPATH=. python3 benchmarks/gemv.py --out benchmarks/results/gemv_h100.json
    PYTHONPATH=. python3 benchmarks/gemv.py --backends triton,mosaic --out benchmarks/results/gemv_mosaic_h100.json
    PYTHONPATH=. python3 benchmarks/gemv.py --backends blocked,triton --shapes 0,1,2,4   # W's layout
    PYTHONPATH=. python3 benchmarks/gemv.py --rows 64 --variants skinny --out benchmarks/results/gemm_b64_h100.json
    PYTHONPATH=. python3 benchmarks/gemv.py --tiny        # a small shape in the interpreter, for a CPU check

A Pallas variant is (columns, depth, splits, warps, stages): program (j, s) of the grid (N / columns, splits) reads
rows s K / splits ... (s + 1) K / splits of the ``columns`` columns j columns ... in tiles of (depth, columns), keeps
the (depth, columns) float32 products and sums them after its loop; with splits > 1 XLA sums the (splits, M, N)
float32 partials; past one row each tile is a tensor-core product (``jnp.dot`` accumulating in float32) of u's
(M, depth) and W's (depth, columns) tiles. A Mosaic GPU variant ("mosaic", columns, depth, splits, stages) has the
same grid, one warpgroup a program (128 threads, columns / 128 columns each): the copy engine stages (depth,
columns) tiles of W and depth elements of u in shared memory, ``stages`` tiles in flight (``plgpu.emit_pipeline``),
and each thread adds u[r] times its columns of row r into float32 registers (jax >= 0.11, compute capability 9.0+;
u's tile must be a multiple of 128 bytes: depth >= 64 in 16 bits).

Each timing runs the product for ``--matrices`` different random W (more bytes than the L2 holds) ``--iters`` times
in one compiled loop; us per product = median loop time / (iters * matrices); TB/s = bytes of W / that time. Every
variant's result is first compared with the float32 product (``max_rel_err``; XLA's row is rounded to W's dtype).
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
from pallas_kernels.selective_scan import mosaic_fwd
from pallas_kernels.selective_scan.pallas import TRITON_DEPRECATION, pallas_supported

# (name, K, N): the Mamba-1 decode step's two large projections.
SHAPES = [
    ("1.4b in_proj", 2048, 8192),
    ("2.8b in_proj", 2560, 10240),
    ("1.4b out_proj", 4096, 2048),
    ("130m in_proj", 768, 3072),
    ("2.8b out_proj", 5120, 2560),
    ("130m out_proj", 1536, 768),
]
# (columns, depth, splits, warps, stages)
VARIANTS = [
    (64, 128, 1, 8, 3),
    (128, 64, 1, 8, 3),
    (128, 128, 1, 8, 3),
    (256, 32, 1, 8, 3),
    (256, 64, 1, 8, 3),
    (512, 16, 1, 8, 3),
    (512, 32, 1, 8, 3),
    (128, 64, 2, 4, 3),
    (128, 64, 2, 8, 3),
    (256, 32, 2, 8, 3),
    (256, 64, 2, 8, 3),
    (256, 64, 4, 8, 3),
    (512, 32, 2, 8, 3),
    (512, 32, 4, 8, 3),
    (512, 16, 4, 4, 3),
    (1024, 16, 4, 8, 3),
    (1024, 16, 8, 8, 3),
    (256, 64, 2, 8, 4),
    (256, 64, 2, 8, 2),
    (128, 128, 4, 8, 3),
    (64, 128, 2, 8, 3),  # in_proj's default tiling in the fused step (1.4b)
    (64, 256, 2, 8, 3),
]
# Past one row (``--variants skinny``): few columns a program so that W's read spreads over every multiprocessor.
SKINNY_VARIANTS = [
    (32, 128, 1, 4, 4),
    (64, 64, 1, 4, 4),
    (64, 128, 1, 4, 3),
    (64, 128, 1, 4, 4),
    (64, 256, 1, 4, 3),
    (64, 64, 2, 4, 4),
    (64, 128, 2, 4, 4),
    (128, 64, 1, 4, 4),
    (128, 64, 1, 8, 4),
    (128, 128, 1, 8, 3),
    (128, 64, 2, 4, 4),
    (128, 128, 2, 8, 3),
    (128, 64, 4, 4, 4),
    (256, 64, 1, 8, 3),
    (256, 64, 2, 8, 3),
]
# ("blocked", columns, depth, splits, warps, stages): a Triton tiling as above, on W stored as (N / columns, K,
# columns), each program's columns one contiguous block (does the strided (K, N) read cost bandwidth? it did not:
# benchmarks/RESULTS.md, twenty-fourth session)
BLOCKED_VARIANTS = [
    ("blocked", 64, 128, 2, 8, 3),
    ("blocked", 128, 128, 4, 8, 3),
    ("blocked", 64, 128, 1, 8, 3),
    ("blocked", 64, 256, 2, 8, 3),
]
# ("mosaic", columns, depth, splits, stages)
MOSAIC_VARIANTS = [
    ("mosaic", 128, 64, 4, 4),
    ("mosaic", 128, 64, 2, 4),
    ("mosaic", 128, 64, 8, 4),
    ("mosaic", 128, 64, 16, 4),
    ("mosaic", 128, 64, 4, 6),
    ("mosaic", 128, 128, 4, 3),
    ("mosaic", 128, 128, 2, 3),
    ("mosaic", 256, 64, 8, 4),
    ("mosaic", 256, 64, 2, 4),
    ("mosaic", 128, 256, 2, 2),
]


def _gemv_kernel(u_ref, w_ref, out_ref, *, depth: int):
    """u_ref (M, rows), w_ref (rows, columns): out_ref (M, columns) = u @ w in float32. One row: products summed
    over rows at the end; more: a tensor-core product a tile."""
    m, rows = u_ref.shape
    columns = w_ref.shape[1]

    def body(i, acc):
        start = pl.multiple_of(i * depth, depth)
        w = w_ref[pl.ds(start, depth), :]
        if m > 1:
            return acc + jnp.dot(u_ref[:, pl.ds(start, depth)], w, preferred_element_type=jnp.float32)
        u = u_ref[0, pl.ds(start, depth)].astype(jnp.float32)
        return acc + u[:, None] * w.astype(jnp.float32)

    acc = lax.fori_loop(0, rows // depth, body, jnp.zeros((m if m > 1 else depth, columns), jnp.float32))
    out_ref[...] = acc if m > 1 else jnp.sum(acc, axis=0, keepdims=True)


def pallas_gemv(variant, interpret: bool):
    """u (M, K), W (K, N) -> y (M, N) float32 with the tiling ``variant``; a "blocked" variant takes W as
    (N / columns, K, columns) (``blocked``)."""
    is_blocked = variant[0] == "blocked"
    columns, depth, splits, warps, stages = variant[1:] if is_blocked else variant

    def gemv(u, w):
        (m, k), n = u.shape, w.shape[0] * w.shape[2] if is_blocked else w.shape[1]
        rows = k // splits
        if is_blocked:
            w_spec = pl.BlockSpec((None, rows, columns), lambda j, s: (j, s, 0))
        else:
            w_spec = pl.BlockSpec((rows, columns), lambda j, s: (s, j))
        partial = pl.pallas_call(
            functools.partial(_gemv_kernel, depth=depth),
            out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
            grid=(n // columns, splits),
            in_specs=[pl.BlockSpec((m, rows), lambda j, s: (0, s)), w_spec],
            out_specs=pl.BlockSpec((None, m, columns), lambda j, s: (s, 0, j)),
            compiler_params=plt.CompilerParams(num_warps=warps, num_stages=stages),
            interpret=interpret,
        )(u, w)
        return partial.sum(axis=0)

    return gemv


def mosaic_rows_product(u_rows, w_rows, *, depth: int, stages: int) -> jax.Array:
    """Inside a Mosaic GPU kernel (one warpgroup): u_rows (R,) @ w_rows (R, columns), refs in global memory, as
    (columns,) float32 in a WG_STRIDED layout. The copy engine stages (depth, columns) tiles of W and depth elements of
    u in shared memory, ``stages`` in flight; each thread adds u[r] times its columns of row r into registers."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    rows, columns = w_rows.shape
    layout = plgpu.Layout.WG_STRIDED((columns,), columns // 128)

    def tile(_, u_tile, w_tile, acc):
        for r in range(depth):
            u = jnp.broadcast_to(u_tile[r].astype(jnp.float32), (columns,))
            acc = acc + u * plgpu.load(w_tile.at[r], layout=layout).astype(jnp.float32)
        return acc

    return plgpu.emit_pipeline(
        tile,
        grid=(rows // depth,),
        in_specs=[plgpu.BlockSpec((depth,), lambda i: (i,)), plgpu.BlockSpec((depth, columns), lambda i: (i, 0))],
        max_concurrent_steps=stages,
        init_carry=plgpu.layout_cast(jnp.zeros((columns,), jnp.float32), layout),
    )(u_rows, w_rows)


def mosaic_gemv(variant, interpret: bool):
    """u (1, K), W (K, N) -> y (1, N) float32 by the Mosaic GPU kernel ``variant``."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    _, columns, depth, splits, stages = variant

    def body(u_ref, w_ref, out_ref):
        j, s = lax.axis_index("j"), lax.axis_index("s")
        rows, cols = pl.ds(s * (u_ref.shape[0] // splits), u_ref.shape[0] // splits), pl.ds(j * columns, columns)
        out_ref[s, cols] = mosaic_rows_product(u_ref.at[rows], w_ref.at[rows, cols], depth=depth, stages=stages)

    def gemv(u, w):
        n = w.shape[1]
        partial = plgpu.kernel(
            body,
            out_type=jax.ShapeDtypeStruct((splits, n), jnp.float32),
            grid=(n // columns, splits),
            grid_names=("j", "s"),
            compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
            interpret=plgpu.InterpretGPUParams() if interpret else False,
        )(u[0], w)
        return partial.sum(axis=0, keepdims=True)

    return gemv


def blocked(w: jax.Array, columns: int) -> jax.Array:
    """W (K, N) as (N / columns, K, columns): block j holds columns j columns ... contiguously."""
    k, n = w.shape
    return w.reshape(k, n // columns, columns).transpose(1, 0, 2)


def xla_gemv(u, w):
    """XLA's product as the decode step asks for it: in W's dtype (float32 accumulation inside). Asked for a float32
    result instead, XLA picks another kernel, 2-8 us slower at the in_proj shapes (benchmarks/RESULTS.md)."""
    return u @ w


def loop(gemv, iters: int):
    """A jitted loop: ``iters`` passes of y = gemv(u, W) over the matrices, u nudged by each y's sum (a dependency
    chain, as layers make)."""

    @jax.jit
    def run(matrices, u):
        def body(_, u):
            for w in matrices:
                y = gemv(u, w)
                u = u + (1e-3 * jnp.sum(y)).astype(u.dtype)
            return u

        return lax.fori_loop(0, iters, body, u)

    return run


def measure(name, k, n, variants, args, interpret) -> list[dict]:
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), args.matrices + 1)
    matrices = tuple(jax.random.normal(key, (k, n), jnp.float32).astype(dtype) / k**0.5 for key in keys[1:])
    u = jax.random.normal(keys[0], (args.rows, k), jnp.float32).astype(dtype)
    exact = jnp.dot(u.astype(jnp.float32), matrices[0].astype(jnp.float32), precision=lax.Precision.HIGHEST)
    nbytes = k * n * dtype.itemsize
    rows = []
    for variant in ["xla", *variants]:
        row = {"shape": name, "K": k, "N": n, "variant": str(variant)}
        operands = matrices
        try:
            if variant == "xla":
                gemv = xla_gemv
            else:
                mosaic = variant[0] == "mosaic"
                columns, depth, splits = variant[1:4] if isinstance(variant[0], str) else variant[:3]
                if n % columns or k % (depth * splits):
                    raise ValueError("the tiling does not divide the shape")
                if mosaic and args.rows > 1:
                    raise ValueError("the Mosaic GPU variants take one row")
                gemv = mosaic_gemv(variant, interpret) if mosaic else pallas_gemv(variant, interpret)
                if variant[0] == "blocked":
                    operands = tuple(blocked(w, columns) for w in matrices)
            got = jax.jit(gemv)(u, operands[0])
            row["max_rel_err"] = float(jnp.max(jnp.abs(got - exact)) / jnp.max(jnp.abs(exact)))
            timing = time_ms(loop(gemv, args.iters), operands, u, reps=args.reps, warmup=2)
            row["us"] = 1e3 * timing["median_ms"] / (args.iters * args.matrices)
            row["TB_per_s"] = nbytes / row["us"] / 1e6
        except Exception as e:  # a tiling Triton cannot compile: keep the others
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--matrices", type=int, default=8)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="one small shape, two or three tilings, interpreted")
    parser.add_argument("--rows", type=int, default=1, help="M, the rows of u (the decode batch)")
    parser.add_argument("--variants", default="gemv", choices=("gemv", "skinny"), help="the Triton tilings to time")
    parser.add_argument(
        "--backends", default="triton", help="comma-separated, of triton, blocked (W's blocked layout) and mosaic"
    )
    parser.add_argument("--shapes", default=None, help="comma-separated indices into SHAPES (default: all)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    interpret = not pallas_supported()
    if not interpret:
        warnings.filterwarnings("ignore", message=TRITON_DEPRECATION, category=DeprecationWarning)
    backends = args.backends.split(",")
    if not set(backends) <= {"triton", "blocked", "mosaic"}:
        parser.error(f"--backends: comma-separated, of triton, blocked and mosaic, got {args.backends!r}")
    if "mosaic" in backends and not mosaic_fwd.available():
        parser.error(f"--backends mosaic: needs jax >= 0.11's Mosaic GPU API, this is jax {jax.__version__}")
    indices = args.shapes.split(",") if args.shapes else [str(i) for i in range(len(SHAPES))]
    if not all(i.isdigit() and int(i) < len(SHAPES) for i in indices):
        parser.error(f"--shapes: comma-separated indices from 0 to {len(SHAPES) - 1}, got {args.shapes!r}")
    shapes = [SHAPES[int(i)] for i in indices]
    triton_variants = SKINNY_VARIANTS if args.variants == "skinny" else VARIANTS
    variants = (triton_variants if "triton" in backends else []) + (BLOCKED_VARIANTS if "blocked" in backends else [])
    variants += MOSAIC_VARIANTS if "mosaic" in backends else []
    if args.tiny:
        shapes, variants = [("tiny", 64, 256)], [(64, 16, 1, 4, 3), (32, 16, 2, 4, 3)]
        if args.rows > 1:
            variants = [(64, 16, 1, 4, 3), (32, 32, 2, 4, 3)]
        variants += [("blocked", 32, 16, 2, 4, 3)] if "blocked" in backends else []
        variants += [("mosaic", 128, 64, 1, 2)] if "mosaic" in backends else []
        args.matrices, args.iters, args.reps = 2, 2, 2
    rows = []
    for name, k, n in shapes:
        rows += measure(name, k, n, variants, args, interpret)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "dtype": args.dtype, "M": args.rows, "rows": rows}, f, indent=2)
    for r in rows:
        result = r.get("error") or f"{r['us']:8.2f} us {r['TB_per_s']:5.2f} TB/s err {r['max_rel_err']:.1e}"
        print(f"{r['shape']:<14} {r['variant']:<22} {result}")


if __name__ == "__main__":
    main()
