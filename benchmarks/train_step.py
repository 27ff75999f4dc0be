"""One training step (forward + backward + clipping + AdamW) of a Mamba language model on one device, per
rematerialisation policy: tokens/s, MFU, peak memory, and XLA's compiled memory plan.

Usage (GPU machine, repository root):
    PYTHONPATH=. python3 benchmarks/train_step.py --models mamba2-370m,mamba-370m --remat none,dots,block \
        --scan-implementations pallas --out train_step.json
``--loss-chunk N`` computes the LM head and loss N positions at a time (``next_token_loss``) in every row.
``--grad-accum 1,2`` adds rows whose step takes the same batch as that many micro-batches (the loop's gradient
accumulation: the same update, the activations of one micro-batch at a time).
``--profile DIR`` traces three steps of each row after its timing and adds where a step's GPU time goes: by kind of
kernel (``KINDS``) and the slowest kernels by name, in ms per step.
Every row (model, scan implementation, remat policy) runs in a fresh process, so its peak memory is its own; rows
stop being started when ``--time-budget`` seconds would be passed, and the JSON is rewritten after each row.

Without a GPU, ``--compile-only`` compiles each row for abstract inputs (nothing is allocated) and reports XLA's
memory plan: argument + output + temporary bytes, less what donated arguments alias. On the CPU that plan is only an
estimate of the GPU's (other fusions, the XLA scan paths instead of Pallas kernels, 16-bit ops widened to float32).

The step is the training loop's own (``mamba_jax.train.loop.make_train_step``): float32 parameters, bf16 compute,
global-norm clipping and AdamW, random tokens. Anchors: mamba_ssm at batch 8 x 2048 on an H100 (ANCHOR below).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

# step ms, tokens/s, peak GiB of mamba_ssm at batch 8 x 2048 on an H100 (ANCHORS.md)
ANCHOR = {
    "mamba-130m": (115.8, 141_494, 17.8),
    "mamba-370m": (261.5, 62_656, 29.6),
    "mamba2-130m": (189.6, 86_427, 17.8),
    "mamba2-370m": (302.5, 54_156, 29.7),
}
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM
GIB = 2**30
# Kinds of GPU kernel by name, first match wins: what a profiled step's time is spent on.
KINDS = [
    ("Pallas scan", r"selective_scan|mosaic"),
    ("Pallas SSD", r"ssd_"),
    ("matmul", r"gemm|cublas|cutlass|xmma|nvjet|dot|matmul"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter"),
    ("copy", r"memcpy|memset|copy"),
    ("reduction", r"reduce"),
    ("other fusion", r""),
]


def step_profile(trace_dir: str, steps: int) -> dict:
    """ms per step by kind of kernel (KINDS), the 25 slowest kernels by name, and the fraction of the traced span in
    which some kernel ran, from the trace of ``steps`` steps."""
    from benchmarks.timing import busy_fraction, gpu_kernels, time_by_name

    kernels = gpu_kernels(trace_dir)
    by_name = time_by_name(kernels, 1e3 * steps)
    by_kind = collections.Counter()
    for name, ms in by_name.items():
        by_kind[next(kind for kind, pattern in KINDS if re.search(pattern, name, re.IGNORECASE))] += ms
    busy, span = busy_fraction(kernels)
    return {
        "busy_fraction": busy,
        "span_ms_per_step": span / 1e3 / steps,
        "ms_per_step_by_kind": dict(by_kind.most_common()),
        "slowest_kernels_ms_per_step": dict(by_name.most_common(25)),
    }


def memory_plan(compiled) -> dict[str, float]:
    """XLA's memory plan of a compiled step in GiB: arguments, outputs, temporaries, donated aliasing, and the total
    argument + output + temp - alias (what the step needs at its peak, parameters and optimizer state included)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {}
    plan = {
        "argument_gib": stats.argument_size_in_bytes / GIB,
        "output_gib": stats.output_size_in_bytes / GIB,
        "temp_gib": stats.temp_size_in_bytes / GIB,
        "alias_gib": stats.alias_size_in_bytes / GIB,
    }
    plan["plan_gib"] = plan["argument_gib"] + plan["output_gib"] + plan["temp_gib"] - plan["alias_gib"]
    return plan


def bench(
    name: str,
    batch: int,
    seqlen: int,
    scan_implementation: str | None,
    remat: str,
    reps: int,
    compile_only: bool,
    loss_chunk: int = 0,
    profile: str | None = None,
    grad_accum: int = 1,
) -> dict:
    """One row: compile the step of ``name`` with ``remat``, ``loss_chunk`` (``next_token_loss``) and the batch in
    ``grad_accum`` micro-batches; unless ``compile_only``, time it and read the peak, then trace three steps into
    ``profile`` if given."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.timing import environment, time_ms
    from mamba_jax import MambaConfig, MambaLMHeadModel
    from mamba_jax.sharding import make_mesh, shard_model, state_shardings
    from mamba_jax.train import TrainConfig
    from mamba_jax.train.loop import make_train_step
    from mamba_jax.train.optim import make_optimizer
    from mamba_jax.train.remat import apply_remat

    config = MambaConfig.preset(name)

    # The model's scan: Mamba-1's selective scan or Mamba-2's SSD.
    scan = {("ssd_implementation" if config.ssm_layer == "Mamba2" else "scan_implementation"): scan_implementation}

    def model_fn():
        model = MambaLMHeadModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **scan)
        return apply_remat(model, remat)

    mesh = make_mesh(devices=jax.devices()[:1])
    if compile_only:
        graphdef, state = nnx.split(nnx.eval_shape(model_fn))
    else:
        graphdef, state = nnx.split(shard_model(model_fn, mesh))
    params = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    tx = make_optimizer(TrainConfig(seq_len=seqlen, batch_size=batch, steps=1000), params)
    if batch % grad_accum:
        raise ValueError(f"--grad-accum {grad_accum} must divide --batch {batch}")
    shape = (grad_accum, batch // grad_accum, seqlen + 1)  # (accum, micro batch, l + 1)
    if compile_only:
        opt_state = jax.eval_shape(tx.init, params)
        tokens = jax.ShapeDtypeStruct(shape, jnp.int32)
    else:
        opt_state = jax.jit(tx.init)(params)
        tokens = jax.random.randint(jax.random.key(1), shape, 0, config.vocab_size, jnp.int32)
    start = time.perf_counter()
    step = jax.jit(make_train_step(graphdef, tx, shardings, jnp.bfloat16, loss_chunk), donate_argnums=(0, 1))
    compiled = step.lower(params, opt_state, tokens).compile()
    row = {
        "model": name,
        "scan_implementation": scan_implementation or "default",
        "remat": remat,
        "loss_chunk": loss_chunk,
        "grad_accum": grad_accum,
        **environment(),
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "compile_s": time.perf_counter() - start,
        **memory_plan(compiled),
    }
    if compile_only:
        return row

    state = {"params": params, "opt": opt_state}

    def run(tokens):
        state["params"], state["opt"], metrics = compiled(state["params"], state["opt"], tokens)
        return metrics["loss"]

    timing = time_ms(run, tokens, reps=reps, warmup=2)
    peak_gib = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", float("nan")) / GIB
    if profile:
        trace_dir = os.path.join(profile, f"{name}-{scan_implementation or 'default'}-{remat}")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(3):
                jax.block_until_ready(run(tokens))
        try:
            timing["profile"] = step_profile(trace_dir, 3)
        except ValueError as e:  # no GPU kernels in the trace (a CPU run): keep the row
            timing["profile"] = {"error": str(e)}
    tokens_per_s = batch * seqlen / (timing["median_ms"] / 1e3)
    anchor_ms, anchor_tps, anchor_gib = ANCHOR.get(name, (float("nan"),) * 3)
    return {
        **row,
        **timing,
        "tokens_per_s": tokens_per_s,
        "mfu": 6 * row["params"] * tokens_per_s / H100_BF16_PEAK,
        "peak_gib": peak_gib,
        "anchor_tokens_per_s": anchor_tps,
        "anchor_step_ms": anchor_ms,
        "ratio_vs_anchor": tokens_per_s / anchor_tps,
        "anchor_peak_gib": anchor_gib,
    }


def run_rows(jobs: list[tuple[str, list[str]]], deadline: float, env: dict | None = None) -> list[dict]:
    """Run ``python3 <this script> *argv`` for each (label, argv) in ``jobs``, one process at a time, until
    ``deadline`` (time.time()); each process prints JSON rows, one per line, prefixed "ROW ". Returns the rows, with
    an {"label", "error"} row for a process that failed or ran out of time."""
    rows = []
    for label, argv in jobs:
        left = deadline - time.time()
        if left < 30:
            rows.append({"label": label, "error": "not started: time budget spent"})
            continue
        try:
            done = subprocess.run(
                [sys.executable, *argv], capture_output=True, text=True, timeout=left, env=env or os.environ.copy()
            )
            found = [json.loads(line[4:]) for line in done.stdout.splitlines() if line.startswith("ROW ")]
            rows.extend(found)
            if done.returncode != 0 or not found:
                rows.append({"label": label, "error": f"exit {done.returncode}: {done.stderr[-2000:]}"})
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
            rows.extend(json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW "))
            rows.append({"label": label, "error": "killed: time budget spent"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mamba2-370m,mamba-370m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument(
        "--scan-implementations",
        default="default",
        help="comma list: the selective scan's (Mamba-1) or the SSD's (Mamba-2), e.g. pallas,chunked",
    )
    parser.add_argument("--remat", default="none", help="comma list of remat policies: none, block, dots, ...")
    parser.add_argument("--loss-chunk", type=int, default=0, help="LM-head positions per loss chunk (0: all)")
    parser.add_argument("--grad-accum", default="1", help="comma list: micro-batches the batch is taken in")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--compile-only", action="store_true", help="XLA's memory plan only (runs on a CPU)")
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--profile", default=None, help="trace 3 steps of each row here; adds where the time goes")
    parser.add_argument("--out", default=None)
    parser.add_argument("--row", action="store_true", help="internal: run one row in this process")
    args = parser.parse_args()
    if args.row:
        row = bench(
            args.models,
            args.batch,
            args.seqlen,
            None if args.scan_implementations == "default" else args.scan_implementations,
            args.remat,
            args.reps,
            args.compile_only,
            args.loss_chunk,
            args.profile,
            int(args.grad_accum),
        )
        print("ROW " + json.dumps(row), flush=True)
        return

    deadline = time.time() + args.time_budget
    common = ["--batch", str(args.batch), "--seqlen", str(args.seqlen), "--reps", str(args.reps)]
    common += ["--loss-chunk", str(args.loss_chunk)]
    common += ["--compile-only"] if args.compile_only else []
    common += ["--profile", args.profile] if args.profile else []
    jobs = []
    for name in args.models.split(","):
        impls = args.scan_implementations.split(",")
        for impl in impls:
            for remat in args.remat.split(","):
                for accum in args.grad_accum.split(","):
                    argv = [__file__, "--row", "--models", name, "--scan-implementations", impl, "--remat", remat]
                    jobs.append((f"{name} {impl} {remat} accum {accum}", [*argv, "--grad-accum", accum, *common]))
    # A compile-only run is a CPU estimate: XLA:CPU's default scheduler favours concurrency over memory, so its plan
    # would overstate the peak further (the flag is ignored on a GPU).
    env = os.environ | {
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    }
    rows = []
    for label, argv in jobs:
        rows += run_rows([(label, argv)], deadline, env if args.compile_only else None)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"batch": args.batch, "seqlen": args.seqlen, "rows": rows}, f, indent=2)
    print_table(rows, args)


def print_table(rows: list[dict], args) -> None:
    ok = [r for r in rows if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    print(f"train step, batch {args.batch} x {args.seqlen}, on {device}")
    print(
        f"{'model':<13} {'scan':<9} {'remat':<6} {'accum':>5} {'step ms':>8} {'tok/s':>9} {'x anchor':>8} {'MFU':>6} "
        f"{'peak GiB':>8} {'plan GiB':>8} {'temp GiB':>8}"
    )
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['label']}: {r['error'].splitlines()[-1] if r['error'] else ''}")
            continue
        print(
            f"{r['model']:<13} {r['scan_implementation']:<9} {r['remat']:<6} {r.get('grad_accum', 1):>5} "
            f"{r.get('median_ms', nan):>8.1f} "
            f"{r.get('tokens_per_s', nan):>9.0f} {r.get('ratio_vs_anchor', nan):>8.2f} {r.get('mfu', nan):>6.1%} "
            f"{r.get('peak_gib', nan):>8.1f} {r.get('plan_gib', nan):>8.1f} {r.get('temp_gib', nan):>8.1f}"
        )


if __name__ == "__main__":
    main()
