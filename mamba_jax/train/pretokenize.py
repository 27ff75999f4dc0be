"""Tokenize a folder of text files into one binary token shard (headerless uint16/uint32, see ``data``).

python -m mamba_jax.train.pretokenize texts/ data/train.bin --glob '**/*.txt' --tokenizer EleutherAI/gpt-neox-20b
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from mamba_jax.train.data import get_tokenizer, tokenize_files, write_shard


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mamba_jax.train.pretokenize", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a folder of text files (or one file)")
    parser.add_argument("out", help="the shard to write, e.g. data/train.bin")
    parser.add_argument("--glob", default="**/*.txt", help="which files under source (default: **/*.txt)")
    parser.add_argument("--tokenizer", default="byte", help="'byte' or a transformers tokenizer name")
    args = parser.parse_args(argv)
    source = Path(args.source)
    paths = [source] if source.is_file() else sorted(p for p in source.glob(args.glob) if p.is_file())
    if not paths:
        raise SystemExit(f"no files matching {args.glob!r} under {args.source}")
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first (not overwriting)")
    tokens = tokenize_files(paths, get_tokenizer(args.tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_shard(out, tokens)
    print(f"{len(paths)} files -> {tokens.size} tokens ({tokens.dtype}) in {out}")


if __name__ == "__main__":
    main()
