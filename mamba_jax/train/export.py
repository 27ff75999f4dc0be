"""Export a training run's parameters as a converted checkpoint (what ``python -m convert`` writes), so
``mamba_jax.load_pretrained(DST)`` and the converter's export to transformers can read a trained or fine-tuned model.

    python -m mamba_jax.train.export runs/ft exported/ft [--step 1000] [--force]

The run's tokenizer goes with it, for ``python -m mamba_jax.generate --model DST``: a transformers tokenizer's files,
or ``mamba_jax.train.data.TOKENIZER_FILE`` for the byte-level one. A run trained on token shards does not know its
tokenizer; its export has none.

Single process: the parameters are gathered onto this host's first device, then written atomically.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from convert.errors import ConversionError
from convert.formats import CONFIG_FILE
from convert.writer import check_not_overlapping, save_params, staged_directory
from mamba_jax.train.checkpoint import load_model, run_meta
from mamba_jax.train.config import TrainError
from mamba_jax.train.data import save_tokenizer


def export_run(run_dir: str | Path, dst: str | Path, *, step: int | None = None, force: bool = False) -> str | None:
    """Write ``dst/config.json``, ``dst/params/`` and the run's tokenizer from checkpoint ``step`` (default: newest)
    of ``run_dir``. An existing ``dst`` is replaced only with ``force``, and never when it is, holds or lies inside
    ``run_dir``. Returns the name of the tokenizer written (None: the run's is unknown, none written)."""
    dst = Path(dst)
    check_not_overlapping(Path(run_dir), dst)
    model = load_model(run_dir, step=step)
    tokenizer = run_meta(run_dir, step).get("tokenizer")  # absent from checkpoints of older versions: unknown
    with staged_directory(dst, force) as staging:
        model.config.to_json(staging / CONFIG_FILE)
        save_params(staging, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging)
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mamba_jax.train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run directory (holding checkpoints/)")
    parser.add_argument("dst", help="the converted checkpoint directory to write")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    parser.add_argument("--force", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(argv)
    try:
        tokenizer = export_run(args.run_dir, args.dst, step=args.step, force=args.force)
    except (ConversionError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        print(
            f"wrote {args.dst} without a tokenizer: the run's is unknown (it trained on token shards); pass "
            "--tokenizer to python -m mamba_jax.generate, or copy the tokenizer's files into it"
        )
    else:
        print(f"wrote {args.dst} with the tokenizer {tokenizer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
