"""Export a training run's parameters as a converted checkpoint (what ``python -m convert`` writes), so
``mamba_jax.load_pretrained(DST)`` and the converter's export to transformers can read a trained or fine-tuned model.

    python -m mamba_jax.train.export runs/ft exported/ft [--step 1000] [--force]

Single process: the parameters are gathered onto this host's first device, then written atomically.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from convert.formats import CONFIG_FILE
from convert.writer import save_params, staged_directory
from mamba_jax.train.checkpoint import load_model


def export_run(run_dir: str | Path, dst: str | Path, *, step: int | None = None, force: bool = False) -> Path:
    """Write ``dst/config.json`` and ``dst/params/`` from checkpoint ``step`` (default: newest) of ``run_dir``.
    An existing ``dst`` is replaced only with ``force``. Returns ``dst``."""
    model = load_model(run_dir, step=step)
    dst = Path(dst)
    with staged_directory(dst, force) as staging:
        model.config.to_json(staging / CONFIG_FILE)
        save_params(staging, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return dst


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mamba_jax.train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a training run directory (holding checkpoints/)")
    parser.add_argument("dst", help="the converted checkpoint directory to write")
    parser.add_argument("--step", type=int, default=None, help="which checkpoint (default: the newest)")
    parser.add_argument("--force", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(argv)
    print(f"wrote {export_run(args.run_dir, args.dst, step=args.step, force=args.force)}")


if __name__ == "__main__":
    main()
