"""One training step (forward + backward + AdamW) of a Mamba language model on one device: tokens/s, MFU, memory.

Usage (GPU machine, repository root):
    PYTHONPATH=. python3 benchmarks/train_step.py --models mamba-370m,mamba2-370m --batch 8 --seqlen 2048
Float32 parameters, bf16 compute, AdamW (optax), random tokens. Anchors (ANCHORS.md, mamba_ssm with bf16 autocast and
fused AdamW on an H100, batch 8 x 2048): see ANCHOR below.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.timing import environment, time_ms
from mamba_jax import MambaConfig, MambaLMHeadModel

# step ms, tokens/s, peak GiB of mamba_ssm at batch 8 x 2048 on an H100 (ANCHORS.md)
ANCHOR = {
    "mamba-130m": (115.8, 141_494, 17.8),
    "mamba-370m": (261.5, 62_656, 29.6),
    "mamba2-130m": (189.6, 86_427, 17.8),
    "mamba2-370m": (302.5, 54_156, 29.7),
}
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM


def train_step_fn(graphdef, optimizer):
    def loss_fn(params, rest, tokens):
        model = nnx.merge(graphdef, params, rest)
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def step(params, rest, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 2))


def bench(name: str, batch: int, seqlen: int, scan_implementation: str | None, reps: int) -> dict:
    config = MambaConfig.preset(name)
    model = nnx.jit(
        lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, scan_implementation=scan_implementation)
    )()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = optax.adamw(1e-4, weight_decay=0.1)
    opt_state = optimizer.init(params)
    step = train_step_fn(graphdef, optimizer)
    tokens = jax.random.randint(jax.random.key(1), (batch, seqlen + 1), 0, config.vocab_size, jnp.int32)

    state = {"params": params, "opt": opt_state}

    def run(tokens):
        state["params"], state["opt"], loss = step(state["params"], rest, state["opt"], tokens)
        return loss

    timing = time_ms(run, tokens, reps=reps, warmup=2)
    stats = jax.devices()[0].memory_stats() or {}
    tokens_per_s = batch * seqlen / (timing["median_ms"] / 1e3)
    anchor_ms, anchor_tps, anchor_gib = ANCHOR.get(name, (float("nan"),) * 3)

    return {
        "model": name,
        "scan_implementation": scan_implementation or "default",
        "params": n_params,
        **timing,
        "tokens_per_s": tokens_per_s,
        "mfu": 6 * n_params * tokens_per_s / H100_BF16_PEAK,
        "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30,
        "anchor_tokens_per_s": anchor_tps,
        "anchor_step_ms": anchor_ms,
        "ratio_vs_anchor": tokens_per_s / anchor_tps,
        "anchor_peak_gib": anchor_gib,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mamba-370m,mamba2-370m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--scan-implementations", default="default", help="comma list for Mamba-1, e.g. pallas,chunked")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        impls = args.scan_implementations.split(",") if name.startswith("mamba-") else ["default"]
        for impl in impls:
            row = bench(name, args.batch, args.seqlen, None if impl == "default" else impl, args.reps)
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"environment": environment(), "batch": args.batch, "seqlen": args.seqlen, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(f"train step, batch {args.batch} x {args.seqlen}, on {result['environment']['device']}")
    print(f"{'model':<13} {'scan':<9} {'step ms':>8} {'tok/s':>9} {'x mamba_ssm':>11} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['model']:<13} {r['scan_implementation']:<9} {r['median_ms']:>8.1f} {r['tokens_per_s']:>9.0f} "
            f"{r['ratio_vs_anchor']:>11.2f} {r['mfu']:>6.1%} {r['peak_gib']:>9.1f}"
        )


if __name__ == "__main__":
    main()
