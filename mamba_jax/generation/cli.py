"""The command line behind ``python -m mamba_jax.generate``: load a checkpoint and a tokenizer, stream a continuation
of the prompt, report the speed.

    python -m mamba_jax.generate --model state-spaces/mamba-130m --prompt "Mamba is" --max-new-tokens 64

The model comes from ``mamba_jax.load_pretrained`` (a directory written by ``python -m convert``, a mamba_ssm or
transformers checkpoint directory, or a Hub repo id). The tokenizer is ``--tokenizer`` if given ("byte": the
training CLI's byte-level one), else the checkpoint's own (its transformers tokenizer files, or the
``mamba_jax_tokenizer.json`` that ``python -m mamba_jax.train.export`` writes for a byte-level run), else
EleutherAI/gpt-neox-20b (the state-spaces models' tokenizer). With HF_HUB_OFFLINE=1 every name must already be in
the Hugging Face cache.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from convert.errors import ConversionError
from convert.formats import TOKENIZER_FILES
from convert.hub import resolve_source
from mamba_jax.generation.loop import generate
from mamba_jax.generation.sampling import SamplingConfig
from mamba_jax.pretrained import load_pretrained
from mamba_jax.train.data import ByteTokenizer, saved_tokenizer

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mamba_jax.generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="converted checkpoint directory, source directory or Hub id")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=1, help="1: greedy (the default); 0: no top-k filter")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=1, help="decode this many copies of the prompt (throughput)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="parameter dtype (default: stored)")
    parser.add_argument(
        "--step-implementation",
        choices=["pallas", "reference"],
        default=None,
        help="the decode step's (default: the platform's best; see pallas_kernels.mamba_step / mamba2_step)",
    )
    parser.add_argument(
        "--state-dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="the SSM states' dtype between tokens (16 bits: half their bytes, as mamba_ssm keeps them)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer", default=None, help='transformers tokenizer name or directory, or "byte" (byte-level)'
    )
    return parser


def checkpoint_directory(model: str) -> Path:
    """A local directory holding the checkpoint: ``model`` itself, or its Hub snapshot (config, tokenizer, weights)."""
    path = Path(model).expanduser()
    return path if path.is_dir() else resolve_source(model)


class ByteTextTokenizer:
    """The training CLI's byte-level tokenizer (``mamba_jax.train.data.ByteTokenizer``) in the parts of the
    transformers tokenizer interface this CLI uses."""

    def __init__(self):
        self.bytes = ByteTokenizer()
        self.eos_token_id = self.bytes.eos_id

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.bytes.encode(text).tolist()}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.bytes.decode(ids)  # the EOS id is never text


def load_tokenizer(name: str | None, directory: Path):
    """``name`` if given, else the checkpoint directory's tokenizer, else DEFAULT_TOKENIZER; OSError if it fails."""
    if name is None:
        has_files = any((directory / file).is_file() for file in TOKENIZER_FILES)
        name = str(directory) if has_files else saved_tokenizer(directory) or DEFAULT_TOKENIZER
    if name == "byte":
        return ByteTextTokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise OSError(
            f"cannot load the tokenizer {name!r} ({str(e).splitlines()[0]}). Pass --tokenizer with a local "
            "directory or a transformers tokenizer name; offline (HF_HUB_OFFLINE=1) it must be in the Hugging Face "
            "cache already."
        ) from None


class Streamer:
    """The generate() callback: prints row 0's text as it grows and records when each position arrived.

    Each step decodes only a window of the latest ids (from ``start``; a few printed ids stay in it as context, the
    prompt's last ``context`` ids at first, so that tokenizers which decode a token differently at the start of a
    text, such as SentencePiece's, do not drop its leading space), and prints what that window's text adds to what
    was printed of it. Text that ends inside a multi-byte character, or
    whose tail the decoding rewrote, waits for the next id; ``finish`` prints whatever is left."""

    WINDOW = 64  # ids decoded at most before the window moves on
    CONTEXT = 8  # printed ids kept at the window's start

    def __init__(self, tokenizer, eos_token_id: int | None, context: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self.ids: list[int] = list(context)[-self.CONTEXT :]
        self.start = 0  # the window: ids[start:]
        self.printed = self._window_text()  # the text of the window printed so far (the context: by the caller)
        self.finished = False
        self.times: list[float] = []

    def __call__(self, tokens: np.ndarray) -> None:
        self.times.append(time.perf_counter())
        if self.finished:
            return
        token = int(tokens[0])
        if token == self.eos_token_id:
            self.finish()
            return
        self.ids.append(token)
        text = self._window_text()
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            self._print(text)
            if len(self.ids) - self.start > self.WINDOW:
                self.start = len(self.ids) - self.CONTEXT
                self.printed = self._window_text()

    def finish(self) -> None:
        """Print the rest of the window's text (a dangling partial character as the tokenizer renders it)."""
        if not self.finished:
            self.finished = True
            self._print(self._window_text())

    def _window_text(self) -> str:
        return self.tokenizer.decode(self.ids[self.start :], skip_special_tokens=True)

    def _print(self, text: str) -> None:
        if text.startswith(self.printed) and len(text) > len(self.printed):
            print(text[len(self.printed) :], end="", flush=True)
        self.printed = text


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:  # the cheap checks first, before loading anything
        SamplingConfig(args.temperature, args.top_k, args.top_p, args.min_p, args.repetition_penalty)
    except ValueError as e:
        parser.error(str(e))
    if args.max_new_tokens < 1 or args.batch < 1:
        parser.error(f"--max-new-tokens and --batch must be >= 1, found {args.max_new_tokens} and {args.batch}")
    try:
        directory = checkpoint_directory(args.model)
        tokenizer = load_tokenizer(args.tokenizer, directory)
        model = load_pretrained(directory, dtype=DTYPES.get(args.dtype), step_implementation=args.step_implementation)
    except (ConversionError, OSError, ValueError) as e:
        parser.error(str(e))
    prompt_ids = tokenizer(args.prompt)["input_ids"]
    if not prompt_ids:
        parser.error(f"the prompt {args.prompt!r} encodes to no tokens")
    eos = tokenizer.eos_token_id
    eos = eos if eos is not None and eos < model.config.vocab_size else None

    streamer = Streamer(tokenizer, eos, context=prompt_ids)
    print(args.prompt, end="", flush=True)
    start = time.perf_counter()
    try:
        tokens = generate(
            model,
            np.tile(np.asarray(prompt_ids, np.int32), (args.batch, 1)),
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            eos_token_id=eos,
            rng=args.seed,
            callback=streamer,
            state_dtype=args.state_dtype,
        )
    except ValueError as e:
        parser.error(str(e))
    jax.block_until_ready(tokens)
    jax.effects_barrier()
    end = time.perf_counter()
    streamer.finish()
    print()
    for row in range(1, args.batch):
        text = tokenizer.decode([*prompt_ids, *np.asarray(tokens[row]).tolist()], skip_special_tokens=True)
        print(f"--- row {row} ---\n{text}")
    report(streamer.times, start, end, len(prompt_ids), args.batch)


def report(times: list[float], start: float, end: float, prompt_tokens: int, batch: int) -> None:
    """Print the timing on stderr: time to the first token (compilation and prefill), then the decode rate."""
    positions = len(times)
    lines = [f"prompt {prompt_tokens} tokens, generated {positions} x {batch} rows in {end - start:.2f} s"]
    lines.append(f"first token after {times[0] - start:.2f} s (compilation + prefill)")
    if positions > 1:
        decode = times[-1] - times[0]
        rate = batch * (positions - 1) / decode
        lines.append(f"decode: {rate:.1f} tokens/s ({1e3 * decode / (positions - 1):.2f} ms per step)")
    sys.stdout.flush()  # the text first, then the numbers
    print("\n".join(lines), file=sys.stderr)
