"""Multi-GPU scaling of the training step: 1, 2, 4 ... devices of one host, fixed per-device batch, FSDP against
pure data parallel, under a few XLA flag sets; and, without a GPU, the collectives XLA puts in the step.

Measure (a machine with several GPUs, repository root; one process per flag set, as XLA reads flags at start-up):
    PYTHONPATH=. python3 benchmarks/scaling.py --devices 1,2,4 --strategies fsdp,dp --flag-sets default,lhs \
        --time-budget 540 --out scaling.json
List the collectives of the compiled step (CPU, fake devices; no GPU needed):
    PYTHONPATH=. python3 benchmarks/scaling.py --collectives --devices 4 --strategies fsdp,dp --seqlen 256

Strategies: ``fsdp`` is ``make_mesh(fsdp=n)`` (parameters, gradients and optimizer state split over the n devices,
weights all-gathered for use, gradients reduce-scattered); ``dp`` is ``make_mesh(data=n)`` (everything replicated,
gradients all-reduced); ``tp`` is ``make_mesh(tensor=n)`` (in_proj column-parallel and out_proj row-parallel over
d_inner or heads, every device on the whole batch: the same global batch of per-device-batch x n sequences). On one
device all are the same program, measured once. The step is the training loop's
own (``mamba_jax.train.loop.make_train_step``: forward, backward, clipping, AdamW), the model created sharded,
float32 parameters, bf16 compute, random tokens. Scaling efficiency = tokens/s(n) / (n * tokens/s(1)), against the
one-device run of the same flag set (else of the first flag set). Work is done in priority order (first flag set:
1 device, then 4, then 2; later ones: 4 devices first) and stops being started when ``--time-budget`` would be
passed; the JSON is rewritten after every row.

Collectives are read from the HLO right after XLA's SPMD partitioning (what is communicated, in which dtype) and
from the CPU's optimized HLO (``compiled.as_text()``). The CPU pipeline widens bf16 collectives to float32 and has
no reduce-scatter creator, so there a gradient reduce-scatter shows as an all-reduce of the whole gradient followed
by a slice; the GPU pipeline turns that pattern into a reduce-scatter.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import tempfile
import time

from benchmarks.train_step import GIB, memory_plan, run_rows

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s per GPU (SXM)

# XLA flag sets (names checked against openxla/xla's debug_options_flags.cc). The latency-hiding scheduler overlaps
# the asynchronous all-gathers / reduce-scatters with compute; the combine thresholds merge per-layer collectives
# into fewer, larger ones; the pipelining flags only act on collectives inside loops (a scanned model, or gradient
# accumulation), so they are last.
LHS = "--xla_gpu_enable_latency_hiding_scheduler=true"
FLAG_SETS = {
    "default": "",
    "lhs": LHS,
    "lhs-combine": LHS
    + " --xla_gpu_all_gather_combine_threshold_bytes=268435456"
    + " --xla_gpu_reduce_scatter_combine_threshold_bytes=268435456"
    + " --xla_gpu_all_reduce_combine_threshold_bytes=268435456",
    "lhs-pipelined": LHS
    + " --xla_gpu_enable_pipelined_all_gather=true --xla_gpu_enable_pipelined_reduce_scatter=true"
    + " --xla_gpu_enable_pipelined_all_reduce=true --xla_gpu_enable_while_loop_double_buffering=true",
}

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4}
DTYPE_BYTES |= {"f64": 8, "s64": 8, "u64": 8}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")


def collectives(hlo_text: str) -> list[dict]:
    """Every collective instruction of an HLO module's text: {"op", "shapes" (its result arrays, e.g.
    "bf16[1024,4384]"), "bytes" (their total size)}. An asynchronous ``-start`` counts once, by its result."""
    found = []
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        result_type, op, started = match.groups()
        arrays = [(dtype, dims) for dtype, dims in _ARRAY.findall(result_type) if dtype in DTYPE_BYTES]
        if started and op != "all-reduce" and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2 :]  # a -start's result is (operands, results)
        sizes = [DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in arrays]
        found.append({"op": op, "shapes": " ".join(f"{d}[{s}]" for d, s in arrays), "bytes": sum(sizes)})
    return found


def collective_table(found: list[dict]) -> list[dict]:
    """``collectives`` grouped by (op, shapes): {"op", "shapes", "count", "bytes" (all of them)}, largest first."""
    groups = collections.defaultdict(lambda: [0, 0])
    for c in found:
        groups[c["op"], c["shapes"]][0] += 1
        groups[c["op"], c["shapes"]][1] += c["bytes"]
    rows = [{"op": op, "shapes": shapes, "count": n, "bytes": b} for (op, shapes), (n, b) in groups.items()]
    return sorted(rows, key=lambda r: -r["bytes"])


def build_step(model: str, n: int, strategy: str, per_device_batch: int, seqlen: int, abstract: bool):
    """(compiled step, its arguments, parameter count) for ``model`` on the first ``n`` devices with ``strategy``;
    ``abstract`` arguments are shapes only (for compiling without allocating)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mamba_jax import MambaConfig, MambaLMHeadModel
    from mamba_jax.sharding import make_mesh, named_sharding, shard_model, state_shardings
    from mamba_jax.train import TrainConfig
    from mamba_jax.train.loop import make_train_step
    from mamba_jax.train.optim import make_optimizer, opt_state_shardings

    config = MambaConfig.preset(model)
    sizes = {
        "fsdp": dict(data=1, fsdp=n, tensor=1),
        "dp": dict(data=n, fsdp=1, tensor=1),
        "tp": dict(data=1, fsdp=1, tensor=n),
    }[strategy]
    mesh = make_mesh(**sizes, devices=jax.devices()[:n])

    def model_fn():
        return MambaLMHeadModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)

    graphdef, state = nnx.split(nnx.eval_shape(model_fn) if abstract else shard_model(model_fn, mesh))
    params = nnx.to_pure_dict(state)
    param_shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    tx = make_optimizer(TrainConfig(seq_len=seqlen, batch_size=per_device_batch * n, steps=1000), params)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    shape = (1, per_device_batch * n, seqlen + 1)  # (accum, b, l + 1)
    token_sharding = named_sharding((None, "batch", None), shape, mesh)
    if abstract:
        params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, param_shardings)
        opt_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(tx.init, params),
            opt_shardings,
        )
        tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=token_sharding)
    else:
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        tokens = jax.random.randint(jax.random.key(0), shape, 0, config.vocab_size, jnp.int32)
        tokens = jax.device_put(tokens, token_sharding)
    step = jax.jit(
        make_train_step(graphdef, tx, param_shardings, jnp.bfloat16),
        donate_argnums=(0, 1),
        out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())),
    )
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return step.lower(params, opt_state, tokens).compile(), (params, opt_state, tokens), n_params


def measure(args, flag_set: str, combos: list[tuple[int, str]], deadline: float) -> None:
    """Child process: time each (devices, strategy) of ``combos`` under the flags this process started with."""
    import jax

    from benchmarks.timing import environment, time_ms

    durations = []  # seconds each combination took (compile + timing), to judge whether the next one fits
    for n, strategy in combos:
        if n > jax.device_count():
            continue
        if deadline - time.time() < 1.2 * max(durations, default=60.0):
            print(f"skipping {n} x {strategy} under {flag_set}: time budget", flush=True)
            continue
        start = time.time()
        compile_start = time.perf_counter()
        compiled, (params, opt_state, tokens), n_params = build_step(
            args.model, n, strategy, args.per_device_batch, args.seqlen, abstract=False
        )
        compile_s = time.perf_counter() - compile_start
        carry = {"params": params, "opt": opt_state}

        def run(tokens, carry=carry, compiled=compiled):
            carry["params"], carry["opt"], metrics = compiled(carry["params"], carry["opt"], tokens)
            return metrics["loss"]

        timing = time_ms(run, tokens, reps=args.reps, warmup=2)
        tokens_per_s = args.per_device_batch * n * args.seqlen / (timing["median_ms"] / 1e3)
        kind = jax.devices()[0].device_kind
        peak = next((v for k, v in PEAK_BF16.items() if k in kind), float("nan"))
        stats = [d.memory_stats() or {} for d in jax.devices()[:n]]
        row = {
            "flag_set": flag_set,
            "xla_flags": FLAG_SETS[flag_set],
            "strategy": strategy if n > 1 else "one",
            "devices": n,
            **environment(),
            "params": n_params,
            "compile_s": compile_s,
            **timing,
            "tokens_per_s": tokens_per_s,
            "mfu": 6 * n_params * tokens_per_s / (n * peak),
            "peak_gib_per_device_so_far": max(s.get("peak_bytes_in_use", 0) for s in stats) / GIB,
            **memory_plan(compiled),
        }
        print("ROW " + json.dumps(row), flush=True)
        del carry, compiled, params, opt_state, tokens
        jax.clear_caches()
        durations.append(time.time() - start)


def list_collectives(args, n: int, strategy: str, dump_dir: str) -> None:
    """Child process (CPU, fake devices): compile the step and print its collectives' table at both stages."""
    compiled, _, _ = build_step(args.model, n, strategy, args.per_device_batch, args.seqlen, abstract=True)
    dumped = sorted(glob.glob(os.path.join(dump_dir, "*jit_step*after_spmd-partitioning*")))
    stages = {"optimized (CPU)": compiled.as_text()}
    if dumped:
        with open(dumped[-1]) as f:
            stages = {"partitioned": f.read(), **stages}
    for stage, text in stages.items():
        for row in collective_table(collectives(text)):
            print("ROW " + json.dumps({"strategy": strategy, "devices": n, "stage": stage, **row}), flush=True)


def jobs_in_priority(args) -> list[tuple[str, list[tuple[int, str]]]]:
    """(flag set, [(devices, strategy), ...]) in the order they are run."""
    counts = [int(x) for x in args.devices.split(",")]
    strategies = args.strategies.split(",")
    multi = sorted((n for n in counts if n > 1), reverse=True)  # the most devices first: the goal is at 4
    most = [(n, s) for n in multi[:1] for s in strategies]
    rest = [(n, s) for n in multi[1:] for s in strategies]
    one = [(1, strategies[0])] if 1 in counts else []
    flag_sets = args.flag_sets.split(",")
    return [(flag_sets[0], one + most + rest)] + [(name, most + one + rest) for name in flag_sets[1:]]


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Each measured row with "efficiency" against the one-device row of its flag set (else of the first)."""
    ok = [r for r in rows if "error" not in r and "tokens_per_s" in r]
    ones = {r["flag_set"]: r["tokens_per_s"] for r in ok if r["devices"] == 1}
    fallback = next(iter(ones.values()), None)
    for r in ok:
        base = ones.get(r["flag_set"], fallback)
        r["efficiency"] = r["tokens_per_s"] / (r["devices"] * base) if base else float("nan")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mamba2-370m")
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--strategies", default="fsdp,dp", help="comma list of fsdp, dp, tp")
    parser.add_argument("--flag-sets", default="default,lhs,lhs-combine", help=f"comma list of {sorted(FLAG_SETS)}")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole run")
    parser.add_argument("--collectives", action="store_true", help="list the step's collectives (CPU, fake devices)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help="internal: the work of one child process, as JSON")
    args = parser.parse_args()
    for name in args.flag_sets.split(","):
        if name not in FLAG_SETS:
            parser.error(f"--flag-sets: unknown flag set {name!r}, known: {sorted(FLAG_SETS)}")
    for name in args.strategies.split(","):
        if name not in ("fsdp", "dp", "tp"):
            parser.error(f"--strategies: unknown strategy {name!r}, known: fsdp, dp, tp")

    if args.child:
        work = json.loads(args.child)
        if args.collectives:
            list_collectives(args, work["devices"], work["strategy"], work["dump_dir"])
        else:
            measure(args, work["flag_set"], [tuple(c) for c in work["combos"]], work["deadline"])
        return

    deadline = time.time() + args.time_budget
    rows = []
    base_argv = [__file__, *sys.argv[1:]]  # the children take the same options (only this process writes --out)
    if args.collectives:
        for strategy in args.strategies.split(","):
            for n in (int(x) for x in args.devices.split(",")):
                with tempfile.TemporaryDirectory() as dump_dir:
                    env = os.environ | {
                        "JAX_PLATFORMS": "cpu",
                        "XLA_FLAGS": f"--xla_force_host_platform_device_count={n} --xla_dump_to={dump_dir} "
                        "--xla_dump_hlo_pass_re=spmd-partitioning",
                    }
                    work = {"devices": n, "strategy": strategy, "dump_dir": dump_dir}
                    rows += run_rows([(f"{strategy} {n}", [*base_argv, "--child", json.dumps(work)])], deadline, env)
                write(args, rows)
        print_collectives(rows)
        return
    for flag_set, combos in jobs_in_priority(args):
        env = os.environ | {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + FLAG_SETS[flag_set]).strip()}
        work = {"flag_set": flag_set, "combos": combos, "deadline": deadline - 10}
        rows += run_rows([(flag_set, [*base_argv, "--child", json.dumps(work)])], deadline, env)
        write(args, with_efficiency(rows))
    print_measurements(args, with_efficiency(rows))


def write(args, rows: list[dict]) -> None:
    """Rewrite ``--out`` with the rows so far. (This process never initialises JAX: on a GPU machine it would take
    the memory its children need; the device is in each row.)"""
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"date": time.strftime("%Y-%m-%d"), "args": vars(args), "rows": rows}, f, indent=2)


def print_collectives(rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['label']}: {r['error']}")
    keys = sorted({(r["strategy"], r["devices"], r["stage"]) for r in rows if "error" not in r}, reverse=True)
    for strategy, n, stage in keys:
        group = [
            r for r in rows if "error" not in r and (r["strategy"], r["devices"], r["stage"]) == (strategy, n, stage)
        ]
        total = collections.Counter()
        print(f"\n{strategy}, {n} devices, {stage} HLO")
        print(f"{'op':<16} {'count':>5} {'MiB (all)':>10}  result shapes")
        for r in group:
            total[r["op"]] += r["bytes"]
            print(f"{r['op']:<16} {r['count']:>5} {r['bytes'] / 2**20:>10.1f}  {r['shapes'][:110]}")
        print("total MiB: " + ", ".join(f"{op} {b / 2**20:.1f}" for op, b in sorted(total.items())))


def print_measurements(args, rows: list[dict]) -> None:
    for r in rows:
        if "error" in r:
            print(f"{r['label']}: {r['error'][-600:]}")
    ok = [r for r in rows if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    print(f"\n{args.model}, {args.per_device_batch} x {args.seqlen} per device, on {device}")
    print(
        f"{'flags':<14} {'strategy':<8} {'devices':>7} {'step ms':>8} {'tokens/s':>10} {'efficiency':>10} {'MFU':>6} "
        f"{'plan GiB':>8} {'peak GiB':>8} {'compile s':>9}"
    )
    for r in ok:
        print(
            f"{r['flag_set']:<14} {r['strategy']:<8} {r['devices']:>7} {r['median_ms']:>8.1f} "
            f"{r['tokens_per_s']:>10.0f} {r['efficiency']:>10.1%} {r['mfu']:>6.1%} {r.get('plan_gib', 0):>8.1f} "
            f"{r['peak_gib_per_device_so_far']:>8.1f} {r['compile_s']:>9.0f}"
        )


if __name__ == "__main__":
    main()
