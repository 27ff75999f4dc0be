"""Generation speed: prompt 128 + 128 new tokens, greedy, random weights, Mamba-1 and Mamba-2 presets.

    PYTHONPATH=. python3 benchmarks/generation.py --out benchmarks/results/generation_h100.json
    PYTHONPATH=. python3 benchmarks/generation.py --models mamba-130m,mamba2-130m --batches 1 --dtypes float16

Per (model, dtype, batch), all through ``mamba_jax.generate`` (one compiled prefill + decode loop):

- total: median wall time of a whole call (prefill, 128 tokens, host overhead), after a warm-up that compiles it;
  tokens/s = batch * 128 / total, the ANCHORS.md measure (mamba_ssm with CUDA graphs, fp16: ``anchor`` column).
- prefill: median time of the same compiled call when every row stops after its first token. All rows get the same
  prompt, so they all pick the same first token, which is then passed as ``eos_token_id``: the loop exits at once.
  (Equal rows cost what distinct rows cost.)
- decode ms/token = (total - prefill) / 127: one step of the loop (model step + sampling).
- weight floor = weight bytes / 3.0 TB/s (every step reads every weight); ratio = decode / weight floor.
  state floor adds the decode state read and written each step (at batch 64 it dominates for Mamba-2).

Each configuration compiles once (``compile s``: the first call, compilation included); the table is printed last,
and ``--out`` JSON is rewritten after every row, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import environment, time_ms
from mamba_jax import PRESETS, MambaConfig, MambaLMHeadModel, generate

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


def random_model(config: MambaConfig, dtype) -> MambaLMHeadModel:
    """The model with random weights of roughly its init's scale, drawn leaf by leaf on the device: the layers share
    a handful of shapes, so this compiles a few tiny programs instead of the whole initialiser."""
    model = nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
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


def nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(model, preset: str, dtype_name: str, batch: int, prompt_len: int, new_tokens: int, reps: int) -> dict:
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prompt_len)).astype(np.int32)
    ids = np.repeat(prompt, batch, axis=0)

    start = time.perf_counter()
    first = int(np.asarray(generate(model, ids, max_new_tokens=new_tokens))[0, 0])  # compiles
    compile_s = time.perf_counter() - start
    stop_at_once = lambda: generate(model, ids, max_new_tokens=new_tokens, eos_token_id=first)  # noqa: E731
    if stop_at_once().shape[1] != 1:
        raise RuntimeError("equal prompts gave different first tokens: cannot time the prefill this way")
    total = time_ms(lambda: generate(model, ids, max_new_tokens=new_tokens), reps=reps, warmup=1)
    prefill = time_ms(stop_at_once, reps=reps, warmup=1)

    weight_bytes = nbytes(nnx.state(model, nnx.Param))
    state_bytes = nbytes(jax.eval_shape(lambda: model.init_cache(batch, prompt_len + new_tokens)))
    decode_ms = (total["median_ms"] - prefill["median_ms"]) / (new_tokens - 1)
    weight_floor_ms = 1e3 * weight_bytes / BANDWIDTH
    tokens_per_s = batch * new_tokens / (total["median_ms"] / 1e3)
    anchor = ANCHOR_TOKENS_PER_S.get((preset, batch))
    return {
        "model": preset,
        "dtype": dtype_name,
        "batch": batch,
        "compile_s": compile_s,
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
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'model':<12} {'dtype':<9} {'batch':>5} {'tok/s':>9} {'anchor':>7} {'x anchor':>8} {'total ms':>9} "
        f"{'prefill ms':>10} {'decode ms/tok':>13} {'floor ms':>8} {'x floor':>7} {'+state ms':>9} {'compile s':>9}"
    )
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['model']:<12} {r['dtype']:<9} {r['batch']:>5} ERROR {r['error']}")
            continue
        anchor = f"{r['anchor_tokens_per_s']:>7}" if r["anchor_tokens_per_s"] else f"{'-':>7}"
        ratio = f"{r['tokens_per_s_over_anchor']:>8.2f}" if r["tokens_per_s_over_anchor"] else f"{'-':>8}"
        print(
            f"{r['model']:<12} {r['dtype']:<9} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {anchor} {ratio} "
            f"{r['total_ms']:>9.1f} {r['prefill_ms']:>10.2f} {r['decode_ms_per_token']:>13.3f} "
            f"{r['weight_floor_ms']:>8.3f} {r['decode_over_weight_floor']:>7.2f} {r['state_floor_ms']:>9.3f} "
            f"{r['compile_s']:>9.1f}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated presets (default: {MODELS})")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--dtypes", default="bfloat16,float16", help=f"comma-separated, of {sorted(DTYPES)}")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the environment and rows as JSON here")
    parser.add_argument("--compilation-cache", default=None, help="persistent XLA cache directory (faster reruns)")
    args = parser.parse_args()
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    models, dtypes = args.models.split(","), args.dtypes.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    unknown = [m for m in models if m not in PRESETS] + [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown models or dtypes: {unknown} (models: MambaConfig presets; dtypes: {sorted(DTYPES)})")
    if args.new_tokens < 2 or args.prompt_len < 1 or min(batches) < 1:
        parser.error("need --new-tokens >= 2, --prompt-len >= 1 and batches >= 1")

    result = {"environment": environment(), "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": []}
    started = time.perf_counter()
    for preset in models:
        for dtype_name in dtypes:
            model = random_model(MambaConfig.preset(preset), DTYPES[dtype_name])
            for batch in batches:
                try:
                    row = measure(model, preset, dtype_name, batch, args.prompt_len, args.new_tokens, args.reps)
                except Exception as e:  # e.g. out of memory: keep the other rows
                    traceback.print_exc()
                    row = {"model": preset, "dtype": dtype_name, "batch": batch, "error": str(e).splitlines()[0]}
                result["rows"].append(row)
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:6.0f} s] {preset} {dtype_name} batch {batch}: {row.get('tokens_per_s', 'error')}")
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=2)
            del model
    print(f"Generation, prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, on {environment()['device']}")
    print_table(result["rows"])


if __name__ == "__main__":
    main()
