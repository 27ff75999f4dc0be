"""Training in one page: the moving parts of ``mamba_jax.train`` wired together by hand, to read and to change.

    python -m examples.train [--data DIR --glob '**/*.txt'] [--steps 200] [--out runs/example]

No resume, evaluation, SIGTERM handling or multi-process setup here: ``python -m mamba_jax.train`` has those.
By default it trains a small byte-level model on Python's standard-library sources.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import make_mesh, named_sharding, shard_model, state_shardings
from mamba_jax.train import TrainConfig
from mamba_jax.train.checkpoint import Checkpoints
from mamba_jax.train.data import ByteTokenizer, load_streams, make_splits
from mamba_jax.train.loop import device_batch, make_train_step
from mamba_jax.train.optim import make_optimizer, opt_state_shardings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=sysconfig.get_paths()["stdlib"], help="a folder of text files")
    parser.add_argument("--glob", default="*.py", help="which files under --data")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/example", help="checkpoint folder (must not exist)")
    args = parser.parse_args()
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists; pass a new --out")

    cfg = TrainConfig(data=args.data, text_glob=args.glob, seq_len=128, batch_size=16, steps=args.steps, lr=2e-3)
    model_config = MambaConfig(d_model=128, n_layer=3, vocab_size=ByteTokenizer.vocab_size)
    compute_dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32

    # 1. A mesh over every device: here all of them on the "fsdp" axis (data parallel with sharded parameters).
    mesh = make_mesh(data=1, fsdp=-1, tensor=1)

    # 2. The model, each parameter created directly in its sharding; float32 parameters, compute in compute_dtype.
    model = shard_model(lambda: MambaLMHeadModel(model_config, rngs=nnx.Rngs(0), dtype=compute_dtype), mesh)
    graphdef, state = nnx.split(model)  # the structure (static) and the arrays
    params = nnx.to_pure_dict(state)  # nested dict of arrays: what the optimizer and the checkpoint see
    param_shardings = nnx.to_pure_dict(state_shardings(state, mesh))

    # 3. AdamW (warmup + cosine, clipping, no decay on norms / biases / A_log / D); its moments shard like params.
    tx = make_optimizer(cfg, params)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)

    # 4. Data: the text, tokenized to bytes, cut into windows of seq_len + 1 tokens, batch b from (seed, step).
    streams, _ = load_streams(cfg.data, text_glob=cfg.text_glob, tokenizer="byte", token_dtype="uint16")
    train_split, _ = make_splits(
        streams, seq_len=cfg.seq_len, batch_size=cfg.batch_size, eval_batch_size=1, eval_fraction=0.0, seed=0
    )
    batch_shape = (1, cfg.batch_size, cfg.seq_len + 1)  # (accum, b, l + 1)
    batch_sharding = named_sharding((None, "batch", None), batch_shape, mesh)

    # 5. The step: forward, backward, clip, AdamW; parameters and optimizer state updated in place (donated).
    train_step = jax.jit(make_train_step(graphdef, tx, param_shardings, compute_dtype), donate_argnums=(0, 1))
    start = time.perf_counter()
    for step in range(cfg.steps):
        tokens = device_batch(train_split, step, batch_shape, batch_sharding, model_config.vocab_size)
        params, opt_state, metrics = train_step(params, opt_state, tokens)
        if (step + 1) % 20 == 0:
            print(f"step {step + 1}: loss {float(metrics['loss']):.3f} ({time.perf_counter() - start:.0f} s)")

    # 6. Save the parameters and optimizer state (Orbax; reload with mamba_jax.train.checkpoint.load_model).
    checkpoints = Checkpoints(Path(args.out) / "checkpoints")
    meta = {
        "step": cfg.steps,
        "train_config": cfg.to_dict(),
        "model_config": model_config.to_dict(),
        "tokenizer": "byte",  # saved with the model by mamba_jax.train.export, for generate
    }
    checkpoints.save(cfg.steps, params, opt_state, meta)
    checkpoints.wait()
    checkpoints.close()
    print(f"saved {args.out}/checkpoints/{cfg.steps}")


if __name__ == "__main__":
    main()
