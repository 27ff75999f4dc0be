"""Generation speed: prompt 128 + 128 new tokens, greedy, random weights, Mamba-1 and Mamba-2 presets.

    PYTHONPATH=. python3 benchmarks/generation.py --out benchmarks/results/generation_h100.json --time-budget 480
    PYTHONPATH=. python3 benchmarks/generation.py --models mamba-130m,mamba2-130m --batches 1 --dtypes float16
    PYTHONPATH=. python3 benchmarks/generation.py --models mamba-1.4b --dtypes float16 --xla-variants all
    PYTHONPATH=. python3 benchmarks/generation.py --models mamba-1.4b --batches 1 --step-implementations pallas,default

Per (model, dtype, batch), all through ``mamba_jax.Generator`` (generate's program: one compiled prefill + decode
loop, built ahead of time with ``lower_generate`` so that tracing + lowering and XLA compilation are timed apart;
``generate`` itself adds the walk of the model to each call: ~1-5 ms of host time):

- total: median wall time of a whole call (prefill, 128 tokens, host overhead), after a warm-up;
  tokens/s = batch * 128 / total, the ANCHORS.md measure (mamba_ssm with CUDA graphs, fp16: ``anchor`` column).
  ``generate() tok/s``: the same through the plain ``generate(model, ...)``. ``--state-dtype`` keeps the SSM states
  in 16 bits between tokens, as mamba_ssm does in a 16-bit model (default float32).
- prefill: median time of generate's program with an EOS id when every row stops after its first token. All rows
  get the same prompt, so they all pick the same first token, which is then passed as the EOS id: the loop exits at
  once. (Equal rows cost what distinct rows cost.) Without an EOS id the decode loop is one of a fixed count, with
  one a while loop: two programs, the same prefill.
- decode ms/token = (total - prefill) / 127: one step of the loop (model step + sampling).
- weight floor = weight bytes / 3.0 TB/s (every step reads every weight); ratio = decode / weight floor.
  state floor adds the decode state read and written each step (at batch 64 it dominates for Mamba-2).

Keeping the whole matrix inside one device command:

- each (model, dtype) builds its random weights once and compiles its batch sizes concurrently
  (``--compile-workers``; XLA compiles outside the GIL), then measures them one by one, never while compiling;
- repetitions shrink to fit ``--run-seconds`` per row (at least 2);
- ``--time-budget`` stops before a row that would not fit (estimated from the last compile) and records it as skipped;
- ``--compilation-cache DIR`` keeps executables for reruns on the same machine.

``--xla-variants`` runs the same rows once per XLA flag set, each in a subprocess (XLA_FLAGS must be set before jax
starts), to measure whether command buffers (CUDA graphs) around the decode loop cut its per-step overhead. The
flag names were checked against XLA's ``debug_options_flags.cc`` of the jax 0.11 line; a flag the installed XLA does
not know makes that subprocess fail, which is recorded as the variant's error.

``--out`` JSON is rewritten after every row, so an interrupted run keeps what it measured; the table is printed last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import environment, time_ms
from mamba_jax import PRESETS, MambaConfig, MambaLMHeadModel
from mamba_jax.generation import Generator, generate, lower_generate

MODELS = ("mamba-130m", "mamba-1.4b", "mamba-2.8b", "mamba2-130m", "mamba2-1.3b", "mamba2-2.7b")
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16}
BANDWIDTH = 3.0e12  # bytes/s, ANCHORS.md (device-to-device copy on the H100)
# ANCHORS.md: mamba_ssm generate (cg=True, fp16) tokens/s on an H100, keyed by (preset, batch).
ANCHOR_TOKENS_PER_S = {
    ("mamba-130m", 1): 1170,
    ("mamba-130m", 64): 63080,
    ("mamba-1.4b", 1): 323,
    ("mamba-1.4b", 64): 12504,
    ("mamba-2.8b", 1): 244,
    ("mamba-2.8b", 64): 10169,
    ("mamba2-130m", 1): 788,
    ("mamba2-130m", 64): 29246,
    ("mamba2-1.3b", 1): 285,
    ("mamba2-1.3b", 64): 7672,
    ("mamba2-2.7b", 1): 188,
    ("mamba2-2.7b", 64): 4754,
}
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GRAPH_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"  # XLA's default command-buffer types
XLA_VARIANTS = {
    "default": "",
    # no command buffers at all: every kernel launched by the host (how much do the default graphs help?)
    "no-graphs": "--xla_gpu_enable_command_buffer=",
    # the default types, but graphs of any size (default minimum: 5 commands)
    "graphs-min1": "--xla_gpu_graph_min_graph_size=1",
    # the while loop and conditionals inside the graphs too: the whole decode loop can become one CUDA graph
    "graphs-while": f"--xla_gpu_enable_command_buffer={_GRAPH_TYPES},CONDITIONAL,WHILE "
    "--xla_gpu_graph_min_graph_size=1",
}


def random_model(config: MambaConfig, dtype, step_implementation: str | None = None) -> MambaLMHeadModel:
    """The model with random weights of roughly its init's scale, drawn leaf by leaf on the device: the layers share
    a handful of shapes, so this compiles a few tiny programs instead of the whole initialiser."""
    model = abstract_model(config, dtype, step_implementation)
    key = jax.random.key(0)
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        key, subkey = jax.random.split(key)
        shape, leaf_dtype = variable.get_value().shape, variable.get_value().dtype
        name = str(path[-2]) + "." + str(path[-1]) if len(path) > 1 else str(path[-1])
        if name.endswith("A_log"):
            value = jnp.log(jax.random.uniform(subkey, shape, leaf_dtype, 1.0, 16.0))
        elif name.endswith(("bias", "weight", ".D")):  # biases, norm weights, D: near their init
            value = jnp.ones(shape, leaf_dtype) if not name.endswith("bias") else jnp.full(shape, -4.0, leaf_dtype)
        else:  # kernels and the embedding
            scale = 0.02 if name.endswith("embedding") else 1.0 / math.sqrt(shape[0])
            value = scale * jax.random.normal(subkey, shape, leaf_dtype)
        variable.set_value(value)
    return model


def abstract_model(config: MambaConfig, dtype, step_implementation: str | None = None) -> MambaLMHeadModel:
    """Shapes only (``nnx.eval_shape``): enough to lower and compile the generate program. ``step_implementation``:
    the decode steps' (``pallas_kernels.mamba_step`` and ``mamba2_step``; None: the platform's default)."""
    return nnx.eval_shape(
        lambda: MambaLMHeadModel(
            config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype, step_implementation=step_implementation
        )
    )


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def prompts(config: MambaConfig, batch: int, prompt_len: int) -> np.ndarray:
    """int32 (batch, prompt_len): one random prompt repeated (see the module docstring, "prefill")."""
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (1, prompt_len)).astype(np.int32)
    return np.repeat(prompt, batch, axis=0)


def lower(abstract, batch: int, prompt_len: int, new_tokens: int, state_dtype: str = "float32"):
    """-> (lowered program, its arguments, seconds spent tracing + lowering)."""
    start = time.perf_counter()
    ids = prompts(abstract.config, batch, prompt_len)
    lowered, args = lower_generate(abstract, ids, max_new_tokens=new_tokens, state_dtype=state_dtype)
    return lowered, args, time.perf_counter() - start


def compile_timed(lowered):
    """-> (compiled program, seconds XLA spent compiling it)."""
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def measure(model, ids, preset: str, new_tokens: int, reps: int, run_s: float, state_dtype: str = "float32"):
    """Time ``Generator(model)`` on the prompts ``ids`` (see the module docstring)."""
    generator = Generator(model)
    options = dict(max_new_tokens=new_tokens, state_dtype=state_dtype)

    def run(eos):
        return generator(ids, eos_token_id=eos, **options)

    start = time.perf_counter()
    tokens = jax.block_until_ready(run(None))
    first_call_s = time.perf_counter() - start
    first = int(np.asarray(tokens)[0, 0])
    if run(first).shape[1] != 1:
        raise RuntimeError("equal prompts gave different first tokens: cannot time the prefill this way")
    reps = max(2, min(reps, int(run_s / max(first_call_s, 1e-3))))
    total = time_ms(lambda: run(None), reps=reps, warmup=1)
    prefill = time_ms(lambda: run(first), reps=reps, warmup=1)
    # The plain function, which walks the model at every call (the same program otherwise).
    generate_total = time_ms(lambda: generate(model, ids, **options), reps=reps, warmup=1)

    batch, prompt_len = ids.shape
    weight_bytes = nbytes(nnx.state(model, nnx.Param))
    cache = jax.eval_shape(lambda: model.init_cache(batch, prompt_len + new_tokens, state_dtype=state_dtype))
    state_bytes = nbytes(cache)
    decode_ms = (total["median_ms"] - prefill["median_ms"]) / (new_tokens - 1)
    weight_floor_ms = 1e3 * weight_bytes / BANDWIDTH
    tokens_per_s = batch * new_tokens / (total["median_ms"] / 1e3)
    anchor = ANCHOR_TOKENS_PER_S.get((preset, batch))
    return {
        "first_call_s": first_call_s,
        "reps": reps,
        "total_ms": total["median_ms"],
        "total_p10_ms": total["p10_ms"],
        "total_p90_ms": total["p90_ms"],
        "tokens_per_s": tokens_per_s,
        "prefill_ms": prefill["median_ms"],
        "decode_ms_per_token": decode_ms,
        "weight_bytes": weight_bytes,
        "weight_floor_ms": weight_floor_ms,
        "decode_over_weight_floor": decode_ms / weight_floor_ms,
        "state_bytes": state_bytes,
        "state_floor_ms": 1e3 * (weight_bytes + 2 * state_bytes) / BANDWIDTH,
        "anchor_tokens_per_s": anchor,
        "tokens_per_s_over_anchor": tokens_per_s / anchor if anchor else None,
        "generate_total_ms": generate_total["median_ms"],
        "generate_tokens_per_s": batch * new_tokens / (generate_total["median_ms"] / 1e3),
    }


def run_group(preset, dtype_name, step, batches, args, budget_end, last_compile_s, record):
    """Compile every batch of one (model, dtype, step implementation) concurrently, then measure them one after the
    other."""
    config = MambaConfig.preset(preset)
    row = {"model": preset, "dtype": dtype_name, "step": step, "state_dtype": args.state_dtype}
    rows = {batch: dict(row, batch=batch) for batch in batches}
    step_implementation = None if step == "default" else step
    # A row costs its compile (estimated from the last group's) and up to about two --run-seconds of timing.
    if time.perf_counter() + last_compile_s + 2 * args.run_seconds * len(batches) > budget_end:
        for row in rows.values():
            record(dict(row, skipped=f"time budget ({args.time_budget:.0f} s) reached"))
        return last_compile_s
    abstract = abstract_model(config, DTYPES[dtype_name], step_implementation)
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.compile_workers) as pool:
        pending = {}
        for batch in batches:
            try:
                lowered, call_args, lower_s = lower(abstract, batch, args.prompt_len, args.new_tokens, args.state_dtype)
                rows[batch]["lower_s"] = lower_s
                pending[batch] = (pool.submit(compile_timed, lowered), call_args)
            except Exception as e:
                traceback.print_exc()
                rows[batch]["error"] = f"lowering: {str(e).splitlines()[0]}"
        model = random_model(config, DTYPES[dtype_name], step_implementation)  # drawn while XLA compiles
        compiled = {}
        for batch, (future, call_args) in pending.items():
            try:
                # jit finds this executable again: the Generator's first call in ``measure`` does not compile
                # (its first_call_s).
                program, rows[batch]["compile_s"] = future.result()
                compiled[batch] = (program, call_args.ids)
                last_compile_s = rows[batch]["compile_s"]
            except Exception as e:
                traceback.print_exc()
                rows[batch]["error"] = f"compiling: {str(e).splitlines()[0]}"
    for batch in batches:
        if batch in compiled:
            try:
                ids = compiled[batch][1]
                measured = measure(model, ids, preset, args.new_tokens, args.reps, args.run_seconds, args.state_dtype)
                rows[batch].update(measured)
            except Exception as e:  # e.g. out of memory: keep the other rows
                traceback.print_exc()
                rows[batch]["error"] = str(e).splitlines()[0]
        record(rows[batch])
    del model, compiled
    return last_compile_s


def run_variants(args, argv: list[str]) -> list[dict]:
    """Run this script once per XLA flag set in a subprocess; rows gain a ``variant`` field."""
    names = list(XLA_VARIANTS) if args.xla_variants == "all" else args.xla_variants.split(",")
    rows, start = [], time.perf_counter()
    for position, name in enumerate(names):
        left = args.time_budget - (time.perf_counter() - start)
        share = left / (len(names) - position)  # each remaining variant gets an equal part of what is left
        flags = XLA_VARIANTS[name]
        with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
            command = [sys.executable, os.path.abspath(__file__), *argv, "--out", out.name, "--time-budget", str(share)]
            env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
            print(f"[variant {name}] XLA_FLAGS={env['XLA_FLAGS']!r}, {share:.0f} s", flush=True)
            error = None
            try:
                done = subprocess.run(command, env=env, timeout=share + 60, check=False)
                if done.returncode:
                    error = f"exit status {done.returncode}"
            except subprocess.TimeoutExpired:
                error = "timed out"
            try:
                child = json.load(out)["rows"]
            except (json.JSONDecodeError, KeyError):
                child = []
        rows += [dict(row, variant=name, xla_flags=flags) for row in child]
        if error:
            rows.append({"model": "-", "dtype": "-", "batch": 0, "variant": name, "xla_flags": flags, "error": error})
    return rows


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'variant':<12} {'model':<12} {'dtype':<9} {'batch':>5} {'tok/s':>9} {'anchor':>7} {'x anchor':>8} "
        f"{'total ms':>9} {'prefill ms':>10} {'decode ms/tok':>13} {'floor ms':>8} {'x floor':>7} {'+state ms':>9} "
        f"{'lower s':>7} {'compile s':>9} {'generate() tok/s':>16}"
    )
    print(header)
    for r in rows:
        lead = f"{r.get('variant', r.get('step', '-')):<12} {r['model']:<12} {r['dtype']:<9} {r['batch']:>5}"
        if "error" in r or "skipped" in r:
            print(f"{lead} {'ERROR ' + r['error'] if 'error' in r else 'SKIPPED ' + r['skipped']}")
            continue
        anchor = f"{r['anchor_tokens_per_s']:>7}" if r["anchor_tokens_per_s"] else f"{'-':>7}"
        ratio = f"{r['tokens_per_s_over_anchor']:>8.2f}" if r["tokens_per_s_over_anchor"] else f"{'-':>8}"
        print(
            f"{lead} {r['tokens_per_s']:>9.0f} {anchor} {ratio} "
            f"{r['total_ms']:>9.1f} {r['prefill_ms']:>10.2f} {r['decode_ms_per_token']:>13.3f} "
            f"{r['weight_floor_ms']:>8.3f} {r['decode_over_weight_floor']:>7.2f} {r['state_floor_ms']:>9.3f} "
            f"{r['lower_s']:>7.1f} {r['compile_s']:>9.1f} {r['generate_tokens_per_s']:>16.0f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated presets (default: {MODELS})")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--dtypes", default="bfloat16,float16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument(
        "--state-dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="the SSM states' dtype between tokens (generate's state_dtype; mamba_ssm's is the model's dtype)",
    )
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5, help="most repetitions per timing (fewer: see --run-seconds)")
    parser.add_argument("--run-seconds", type=float, default=5.0, help="time per row's timings, >= 2 reps each")
    parser.add_argument("--time-budget", type=float, default=480.0, help="seconds; later rows are skipped")
    parser.add_argument("--compile-workers", type=int, default=2, help="concurrent compiles of one (model, dtype)")
    parser.add_argument(
        "--xla-variants",
        default=None,
        help=f"'all' or comma-separated of {list(XLA_VARIANTS)}: each in a subprocess with its XLA_FLAGS",
    )
    parser.add_argument(
        "--step-implementations",
        default="default",
        help="comma-separated decode steps, of 'default' (the platform's), 'pallas', 'reference': each row once per "
        "step (pallas_kernels.mamba_step for Mamba-1 layers, mamba2_step for Mamba-2 layers)",
    )
    parser.add_argument("--out", default=None, help="write the environment and rows as JSON here")
    parser.add_argument("--compilation-cache", default=None, help="persistent XLA cache directory (faster reruns)")
    args = parser.parse_args()
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    variants = [] if args.xla_variants in (None, "all") else args.xla_variants.split(",")
    unknown = [m for m in models if m not in PRESETS] + [d for d in dtypes if d not in DTYPES]
    unknown += [v for v in variants if v not in XLA_VARIANTS]
    steps = args.step_implementations.split(",")
    unknown += [s for s in steps if s not in ("default", "pallas", "reference")]
    if unknown:
        parser.error(
            f"unknown models, dtypes, variants or steps: {unknown} (models: MambaConfig presets; dtypes: "
            f"{sorted(DTYPES)}; variants: {list(XLA_VARIANTS)}; steps: default, pallas, reference)"
        )
    if args.new_tokens < 2 or args.prompt_len < 1 or min(batches) < 1 or args.compile_workers < 1:
        parser.error("need --new-tokens >= 2, --prompt-len >= 1, batches >= 1 and --compile-workers >= 1")

    result = {"environment": environment(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": []}
    result["xla_flags"] = os.environ.get("XLA_FLAGS", "")

    def save():
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)

    if args.xla_variants:
        argv = _drop_options(sys.argv[1:], ("--xla-variants", "--out", "--time-budget"))
        result["rows"] = run_variants(args, argv)
        save()
    else:
        if args.compilation_cache:
            jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        started = time.perf_counter()
        budget_end = started + args.time_budget

        def record(row):
            result["rows"].append(row)
            status = row.get("tokens_per_s", row.get("error", row.get("skipped")))
            lead = f"{row['model']} {row['dtype']} {row['step']} {row['batch']}"
            print(f"[{time.perf_counter() - started:6.0f} s] {lead}: {status}")
            save()

        last_compile_s = 0.0
        for preset in models:
            for dtype_name in dtypes:
                for step in steps:
                    last_compile_s = run_group(
                        preset, dtype_name, step, batches, args, budget_end, last_compile_s, record
                    )
    setting = f"prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, {args.state_dtype} state"
    print(f"Generation, {setting}, on {environment()['device']}")
    print_table(result["rows"])


def _drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """argv without ``--name value`` / ``--name=value`` for each of ``names``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not arg.startswith(tuple(f"{name}=" for name in names)):
            kept.append(arg)
    return kept


if __name__ == "__main__":
    main()
