"""Multi-GPU scaling of a training step with FSDP: 1, 2, ... devices of one host, fixed per-device batch.

Usage (a machine with several GPUs, repository root):
    PYTHONPATH=. python3 benchmarks/scaling.py --model mamba2-370m --per-device-batch 8 --seqlen 2048 --devices 1,2,4
Each device count runs the project's own training step (``mamba_jax.train.loop.make_train_step``: forward, backward,
AdamW with clipping) on a ``make_mesh(fsdp=n)`` mesh over the first n devices, the model created sharded with
``shard_model``, float32 parameters and bf16 compute, random tokens. Scaling efficiency = tokens/s(n) / (n *
tokens/s(1)).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.timing import environment, time_ms
from mamba_jax import MambaConfig, MambaLMHeadModel
from mamba_jax.sharding import make_mesh, named_sharding, shard_model, state_shardings
from mamba_jax.train import TrainConfig
from mamba_jax.train.loop import make_train_step
from mamba_jax.train.optim import make_optimizer, opt_state_shardings

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s per GPU (SXM)


def bench(config: MambaConfig, n: int, per_device_batch: int, seqlen: int, reps: int) -> dict:
    mesh = make_mesh(data=1, fsdp=n, tensor=1, devices=jax.devices()[:n])
    model = shard_model(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16), mesh)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    param_shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    cfg = TrainConfig(seq_len=seqlen, batch_size=per_device_batch * n, steps=1000)
    tx = make_optimizer(cfg, params)
    opt_state = jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, param_shardings, mesh))(params)
    shape = (1, per_device_batch * n, seqlen + 1)  # (accum, b, l + 1)
    tokens = jax.random.randint(jax.random.key(0), shape, 0, config.vocab_size, jnp.int32)
    tokens = jax.device_put(tokens, named_sharding((None, "batch", None), shape, mesh))
    step = jax.jit(make_train_step(graphdef, tx, param_shardings), donate_argnums=(0, 1))
    carry = {"params": params, "opt": opt_state}

    def run(tokens):
        carry["params"], carry["opt"], metrics = step(carry["params"], carry["opt"], tokens)
        return metrics["loss"]

    timing = time_ms(run, tokens, reps=reps, warmup=2)
    tokens_per_s = per_device_batch * n * seqlen / (timing["median_ms"] / 1e3)
    kind = jax.devices()[0].device_kind
    peak = next((v for k, v in PEAK_BF16.items() if k in kind), float("nan"))
    peak_gib = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in jax.devices()[:n]) / 2**30
    return {
        "devices": n,
        "params": n_params,
        **timing,
        "tokens_per_s": tokens_per_s,
        "mfu": 6 * n_params * tokens_per_s / (n * peak),
        "peak_gib_per_device_so_far": peak_gib,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mamba2-370m")
    parser.add_argument("--per-device-batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--devices", default="1,2,4")
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = MambaConfig.preset(args.model)
    rows = []
    for n in (int(x) for x in args.devices.split(",")):
        if n > jax.device_count():
            print(f"skipping {n} devices: only {jax.device_count()} present")
            continue
        rows.append(bench(config, n, args.per_device_batch, args.seqlen, args.reps))
        rows[-1]["efficiency"] = rows[-1]["tokens_per_s"] / (rows[-1]["devices"] * rows[0]["tokens_per_s"])
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"environment": environment(), "model": args.model, "rows": rows}, f, indent=2)
    print(f"{args.model}, FSDP, {args.per_device_batch} x {args.seqlen} per device, on {environment()['device']}")
    print(f"{'devices':>7} {'step ms':>8} {'tokens/s':>10} {'efficiency':>10} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        print(
            f"{r['devices']:>7} {r['median_ms']:>8.1f} {r['tokens_per_s']:>10.0f} {r['efficiency']:>10.1%} "
            f"{r['mfu']:>6.1%} {r['peak_gib_per_device_so_far']:>9.1f}"
        )


if __name__ == "__main__":
    main()
