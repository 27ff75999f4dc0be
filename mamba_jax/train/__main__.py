"""``python -m mamba_jax.train``: train or fine-tune from the command line.

Every TrainConfig field is a flag (``--batch-size 16``); the model is a preset name or a config.json, with overrides:

    python -m mamba_jax.train --data data/ --model mamba-130m --steps 10000 --run-dir runs/130m
    python -m mamba_jax.train --data texts/ --model mamba-130m --set d_model=256 n_layer=4 vocab_size=257
    python -m mamba_jax.train --data data/ --init-from converted/mamba-370m --lr 1e-5 --run-dir runs/ft

A run dir holding a checkpoint is resumed, with the checkpoint's model: leave out --model/--set, or give the same.
Bad arguments end in one ``error: ...`` line and exit status 2; a run stopped by SIGTERM (after saving) exits 143.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from mamba_jax.config import PRESETS, MambaConfig
from mamba_jax.train.config import TrainConfig, TrainError
from mamba_jax.train.distributed import agree_to_start, initialize_distributed
from mamba_jax.train.loop import run_prepared
from mamba_jax.train.prepare import prepare_run

_TYPES = {"int": int, "float": float, "str": str}
USAGE_ERROR = 2  # as argparse's
SIGTERM_EXIT = 128 + 15  # the status of a process killed by SIGTERM, which the run was, after saving


def model_config(name: str | None, overrides: Sequence[str]) -> MambaConfig | None:
    """A preset or config.json, then ``KEY=VALUE`` overrides (values parsed as JSON, else kept as strings)."""
    if name is None:
        if overrides:
            raise ValueError("--set needs --model (the config the overrides apply to)")
        return None
    if Path(name).is_file():
        config = MambaConfig.from_json(name)
    else:
        try:
            config = MambaConfig.preset(name)
        except ValueError as e:
            raise ValueError(f"--model {name} is not a config file, and {e}") from None
    values = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return MambaConfig.from_dict({**config.to_dict(), **values})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mamba_jax.train",
        description="Train a Mamba language model (see mamba_jax/train/config.py for every field).",
    )
    p.add_argument("--model", help=f"a preset ({', '.join(sorted(PRESETS))}) or a config.json path")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override model config fields")
    for field in dataclasses.fields(TrainConfig):
        kind = _TYPES[field.type.replace(" | None", "")]
        p.add_argument(
            f"--{field.name.replace('_', '-')}", type=kind, default=field.default, help="(default: %(default)s)"
        )
    return p


def error(e: Exception) -> int:
    print(f"error: {e}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status."""
    args = vars(parser().parse_args(argv))
    name, overrides = args.pop("model"), args.pop("set")
    # Start-up checks the arguments, the run dir and the data: a ValueError or OSError here is the user's input.
    try:
        cfg = TrainConfig(**args)
        try:
            config = model_config(name, overrides)
            if not cfg.data:
                raise TrainError("--data is required: a folder of *.bin token shards or of text files")
        except (ValueError, OSError) as e:
            # Possibly this process's alone (its --model file): it joins the run and takes part in prepare_run's
            # agreement (the first collective), so that the other processes stop too instead of waiting for it.
            initialize_distributed(cfg)
            agree_to_start(0, cfg.run_dir, e)
        run = prepare_run(cfg, config)
    except (ValueError, OSError) as e:
        return error(e)
    # Training: only TrainError (e.g. a token id too large in a shard) is the input's; anything else is a bug.
    try:
        _, preempted = run_prepared(run)
    except TrainError as e:
        return error(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + 2
    return SIGTERM_EXIT if preempted else 0


if __name__ == "__main__":
    sys.exit(main())
