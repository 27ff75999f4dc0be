"""Host time around one generate call, batch 1: what the plain function, a ``Generator`` and the bare compiled
program cost per call on the same model, prompt and executable.

    PYTHONPATH=. python3 benchmarks/generate_overhead.py --models mamba-130m,mamba-1.4b --out overhead.json

Per model (random fp16 weights, a 128-token prompt, 128 new tokens, greedy), medians of ``--reps`` calls:

- flatten ms: ``jax.tree.flatten(model)`` alone, the walk of the NNX module that every ``generate`` call makes;
- for "prefill" (every row stops after its first token: the prompt's first token passed as EOS) and "total"
  (all 128 tokens): ``generate(model, ...)``; ``Generator(model)(...)``; and the program ``Generator`` calls, run
  with device arrays made once (no walk, no argument checks, no transfers: the floor of what a call can cost).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.generation import random_model
from benchmarks.timing import environment, time_ms
from mamba_jax import Generator, MambaConfig, generate
from mamba_jax.generation.loop import _arguments
from mamba_jax.generation.sampling import SamplingConfig

NEW_TOKENS = 128


def measure(preset: str, reps: int) -> dict:
    config = MambaConfig.preset(preset)
    model = random_model(config, jnp.float16)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (1, 128)).astype(np.int32)
    generator = Generator(model)
    first = int(np.asarray(generator(ids, max_new_tokens=NEW_TOKENS))[0, 0])
    start = time.perf_counter()
    for _ in range(20):
        jax.tree.flatten(model)
    row = {"model": preset, "leaves": len(jax.tree.leaves(model)), "flatten_ms": (time.perf_counter() - start) * 50}
    for name, eos in (("prefill", first), ("total", None)):
        args, static = _arguments(
            generator.params(),
            config.vocab_size,
            ids,
            max_new_tokens=NEW_TOKENS,
            sampling=SamplingConfig(),
            eos_token_id=eos,
            pad_token_id=None,
            prompt_lengths=None,
            rng=None,
            return_scores=False,
            callback=None,
            state_dtype=jnp.float32,
        )
        on_device = {field: jnp.asarray(getattr(args, field)) for field in ("ids", "lengths", "eos", "fill")}
        resident = args._replace(**on_device)
        calls = {
            "generate": lambda eos=eos: generate(model, ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos),
            "Generator": lambda eos=eos: generator(ids, max_new_tokens=NEW_TOKENS, eos_token_id=eos),
            "program": lambda resident=resident, static=static: generator._program(*resident, **static),
        }
        for call, fn in calls.items():
            row[f"{name}_{call}_ms"] = time_ms(fn, reps=reps if name == "prefill" else max(3, reps // 3))["median_ms"]
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mamba-130m,mamba-1.4b")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for preset in args.models.split(","):
        rows.append(measure(preset, args.reps))
        print(json.dumps(rows[-1]), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"environment": environment(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
