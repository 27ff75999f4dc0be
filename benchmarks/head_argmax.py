"""Greedy decoding's LM head: XLA's float32 logits and their arg-max against ``pallas_kernels.head_argmax`` (one pass
over the head keeping each tile's largest logit), GPU time a call from a profiler trace.

    PYTHONPATH=. python3 benchmarks/head_argmax.py --out benchmarks/results/head_argmax_h100.json

Rows: Mamba-1 130m / 1.4b / 2.8b heads (d 768, 2048, 2560; a tied (50280, d) embedding, 50277 real tokens) at
batch 1 and 64, in ``--dtype``. A Pallas variant is (columns, depth, programs, warps, stages)
(``head_argmax_pallas``'s options). TB/s = the head's bytes / GPU time; ``same`` = rows whose token equals XLA's
(near-ties may differ in the float32 sums' last bits).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import environment, gpu_ms
from pallas_kernels.head_argmax.pallas import head_argmax_pallas
from pallas_kernels.head_argmax.reference import head_argmax_reference

VOCAB, VOCAB_SIZE = 50280, 50277
MODELS = {"130m": 768, "1.4b": 2048, "2.8b": 2560}
VARIANTS = [
    (128, 128, 132, 4, 4),
    (128, 128, 264, 4, 3),
    (128, 64, 132, 4, 5),
    (64, 128, 132, 4, 4),
    (64, 128, 264, 4, 3),
    (256, 64, 132, 8, 3),
    (128, 128, 66, 4, 4),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default="all", help="'all' or comma-separated indices into VARIANTS")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = jnp.dtype(args.dtype)
    variants = VARIANTS if args.variants == "all" else [VARIANTS[int(i)] for i in args.variants.split(",")]
    rows = []
    for model in args.models.split(","):
        d = MODELS[model]
        head = (jax.random.normal(jax.random.key(0), (VOCAB, d)) / np.sqrt(d)).astype(dtype)
        for batch in map(int, args.batches.split(",")):
            hidden = jax.random.normal(jax.random.key(batch), (batch, d)).astype(dtype)
            xla = jax.jit(lambda h, w: head_argmax_reference(h, w, VOCAB_SIZE, True))
            want = np.asarray(xla(hidden, head))
            timings = [("xla", xla)]
            for columns, depth, programs, warps, stages in variants:
                options = dict(columns=columns, depth=depth, programs=programs, num_warps=warps, num_stages=stages)
                fn = jax.jit(lambda h, w, o=options: head_argmax_pallas(h, w, VOCAB_SIZE, True, False, **o))
                timings.append((f"pallas {columns},{depth},{programs},{warps},{stages}", fn))
            for name, fn in timings:
                us = 1e3 * gpu_ms(fn, (hidden, head), args.reps)
                same = int(np.sum(np.asarray(fn(hidden, head)) == want))
                row = dict(
                    model=model,
                    batch=batch,
                    variant=name,
                    us=round(us, 2),
                    tb_s=round(head.nbytes / us / 1e6, 3),
                    same=f"{same}/{batch}",
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "dtype": args.dtype, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
