"""python -m convert: published PyTorch / Hugging Face Mamba checkpoints into our Orbax checkpoints, and back.

    python -m convert SRC DST [--dtype float32|bfloat16|float16] [--revision REV] [--verify] [--force]
    python -m convert --to hf SRC DST [--dtype ...] [--force]

Exit status 0 on success, 1 with a one-line ``error: ...`` on bad input, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from convert.errors import ConversionError
from convert.export_hf import export_to_transformers
from convert.to_orbax import DTYPES, convert_checkpoint
from convert.verify import REL_ERR_LIMIT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=(
            "Convert a Mamba / Mamba-2 checkpoint (state-spaces mamba_ssm original, or transformers MambaForCausalLM "
            "/ Mamba2ForCausalLM, incl. Codestral) into an Orbax checkpoint directory for mamba_jax; or, with --to hf, "
            "one of ours back into a transformers directory. .bin files are read without torch and without "
            "unpickling anything but tensors."
        ),
    )
    parser.add_argument("src", metavar="SRC", help="source: a local checkpoint directory or a Hugging Face Hub repo id")
    parser.add_argument("dst", metavar="DST", type=Path, help="destination directory (must not exist, see --force)")
    parser.add_argument(
        "--to",
        choices=("orbax", "hf"),
        default="orbax",
        help="orbax (default): SRC is a published checkpoint; hf: SRC is one of ours, written as transformers files",
    )
    parser.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default=None,
        help="parameter dtype (default: float32 for orbax; the stored dtypes for hf). A_log and D stay float32 in ours",
    )
    parser.add_argument("--revision", help="Hub revision (branch, tag or commit) of a repo id SRC")
    parser.add_argument(
        "--verify",
        action="store_true",
        help=f"run SRC in torch (transformers) and DST in JAX on a fixed prompt; fail above {REL_ERR_LIMIT:.0e} "
        "relative logits error",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing DST that is empty or a checkpoint this tool wrote, once the new one is complete",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.to == "hf" and (args.verify or args.revision):
        parser.error("--verify and --revision apply to conversions into orbax only")
    try:
        if args.to == "hf":
            dtype = None if args.dtype is None else np.dtype(DTYPES[args.dtype])
            export_to_transformers(Path(args.src), args.dst, dtype=dtype, force=args.force)
        else:
            error = convert_checkpoint(
                args.src,
                args.dst,
                dtype=args.dtype or "float32",
                revision=args.revision,
                verify_logits=args.verify,
                force=args.force,
            )
            if error is not None:
                print(f"verify: relative logits error {error:.3e} (limit {REL_ERR_LIMIT:.0e})")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
