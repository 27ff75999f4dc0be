"""The mamba-jax demo: train a small byte-level Mamba language model on Python's own standard-library sources,
save it, load it back and let it write some Python. Offline; a few minutes on a laptop CPU, seconds on a GPU.

    python -m examples.demo [--steps 300] [--run-dir runs/demo-...]

What it shows: ``mamba_jax.train`` (sharded over whatever devices there are, AdamW with warmup and cosine decay,
deterministic data, Orbax checkpoints), ``load_model`` to reload the trained weights, and ``mamba_jax.generate``.
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.generation import generate
from mamba_jax.train import TrainConfig, train
from mamba_jax.train.checkpoint import load_model
from mamba_jax.train.data import ByteTokenizer

# Byte-level: 256 byte values and an end-of-document token. Sized for a CPU: about 0.3M parameters.
MODEL = MambaConfig(d_model=128, n_layer=3, vocab_size=ByteTokenizer.vocab_size, ssm_cfg={"d_state": 8})
PROMPT = "def "


def sample(model: nnx.Module, prompt: str, new_tokens: int, *, temperature: float = 0.7, seed: int = 0) -> str:
    """The prompt continued by ``new_tokens`` bytes sampled at ``temperature`` with ``mamba_jax.generate``: the
    prompt is prefilled with the parallel scan, then each byte is one O(1) recurrent step, all in one compiled loop.
    """
    tokenizer = ByteTokenizer()
    prompt_ids = jnp.asarray(tokenizer.encode(prompt).astype(np.int32))[None]  # (1, l)
    new = generate(model, prompt_ids, max_new_tokens=new_tokens, top_k=0, temperature=temperature, rng=seed)
    return tokenizer.decode(np.asarray(prompt_ids[0]).tolist() + np.asarray(new[0]).tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=250, help="optimizer steps (default: 250)")
    parser.add_argument("--run-dir", help="where checkpoints and metrics go (default: a new runs/demo-* folder)")
    args = parser.parse_args()

    stdlib = Path(sysconfig.get_paths()["stdlib"])  # present wherever Python is
    if args.run_dir is None:
        Path("runs").mkdir(exist_ok=True)
        run_dir = tempfile.mkdtemp(prefix="demo-", dir="runs")  # a fresh folder: nothing is overwritten
    elif Path(args.run_dir).exists() and any(Path(args.run_dir).iterdir()):
        raise SystemExit(f"{args.run_dir} is not empty; pick a new --run-dir (a demo never resumes or overwrites)")
    else:
        run_dir = args.run_dir
    on_gpu = jax.default_backend() == "gpu"
    cfg = TrainConfig(
        data=str(stdlib),
        text_glob="*.py",  # the top-level modules: a few MB of Python
        tokenizer="byte",
        seq_len=128,
        batch_size=16,
        steps=args.steps,
        lr=3e-3,
        warmup_steps=30,
        weight_decay=0.1,
        dtype="bfloat16" if on_gpu else "float32",  # XLA:CPU emulates bf16 slowly
        log_every=25,
        eval_every=max(args.steps // 2, 1),
        eval_batches=4,
        save_every=args.steps,
        run_dir=run_dir,
    )
    print(f"Training a byte-level Mamba ({MODEL.d_model} wide, {MODEL.n_layer} layers) on {stdlib}/*.py")
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; run directory: {run_dir}")
    start = time.perf_counter()
    records = train(cfg, MODEL)
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    print(
        f"trained in {time.perf_counter() - start:.0f} s: loss {losses[0]:.3f} -> {losses[-1]:.3f} nats/byte, "
        f"held-out perplexity {evals[-1]['eval_ppl']:.2f}"
    )

    model = load_model(run_dir)  # the newest checkpoint, back from disk
    print(f"reloaded step {cfg.steps} from {run_dir}/checkpoints; a sample (temperature 0.7):\n")
    print(sample(model, PROMPT, new_tokens=200))


if __name__ == "__main__":
    main()
