"""Training data: token streams cut into fixed-length windows and served in an order fixed by (seed, step).

Sources: binary token shards (``*.bin``: headerless little-endian uint16 or uint32, read through ``np.memmap``), or
a folder of text files tokenized at start-up (documents joined with an end-of-document token). Packing: each stream
is cut into windows of ``seq_len + 1`` tokens at stride ``seq_len`` (a window's inputs are its first ``seq_len``
tokens, its targets the last ``seq_len``); documents run across window boundaries, separated by EOS, as in GPT-style
pretraining. The last ``eval_fraction`` of the windows is held out. Training windows are visited in a fresh random
permutation each epoch, drawn from ``(seed, epoch)``: the rows of any step can be recomputed from the step number
alone, so a resumed run reads exactly the batches an uninterrupted one would have.

Pre-tokenize text into shards with ``python -m mamba_jax.train.pretokenize SRC_DIR OUT.bin --tokenizer NAME``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mamba_jax.train.config import TrainError

# Written by ``python -m mamba_jax.train.export`` next to an exported model whose tokenizer has no files of its own
# (the byte-level one): {"tokenizer": "byte"}. ``python -m mamba_jax.generate`` reads it.
TOKENIZER_FILE = "mamba_jax_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and an end-of-document id 256: no files, no downloads."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer by name or local path (imported lazily: only text data needs it). ``name`` is the
    Hub name, or the local directory's absolute path (so an export run from elsewhere finds it again)."""

    def __init__(self, name: str):
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as e:  # not found, or not in the cache when offline
            raise TrainError(f"cannot load the tokenizer {name!r}: {str(e).strip().splitlines()[0]}") from None
        if self.tokenizer.eos_token_id is None:
            raise TrainError(f"tokenizer {name!r} has no EOS token to separate documents")
        self.name = str(Path(name).absolute()) if Path(name).is_dir() else name
        self.vocab_size = len(self.tokenizer)
        self.eos_id = self.tokenizer.eos_token_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False), np.uint32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])


def get_tokenizer(name: str) -> ByteTokenizer | HFTokenizer:
    return ByteTokenizer() if name == "byte" else HFTokenizer(name)


def save_tokenizer(name: str, directory: Path) -> None:
    """Save tokenizer ``name`` into ``directory`` for inference: a transformers tokenizer's own files, or for the
    byte-level one (which has none) ``TOKENIZER_FILE`` naming it."""
    if name == "byte":
        (directory / TOKENIZER_FILE).write_text(json.dumps({"tokenizer": "byte"}) + "\n")
    else:
        HFTokenizer(name).tokenizer.save_pretrained(directory)


def saved_tokenizer(directory: Path) -> str | None:
    """The tokenizer named by ``directory``'s ``TOKENIZER_FILE`` (as ``save_tokenizer`` writes it), or None when it
    has none; OSError naming the file when it is not {"tokenizer": NAME}."""
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    try:
        name = json.loads(path.read_text())["tokenizer"]
    except (ValueError, KeyError, TypeError) as e:
        raise OSError(f'{path}: expected {{"tokenizer": NAME}} ({type(e).__name__}: {e})') from None
    if not isinstance(name, str):
        raise OSError(f'{path}: expected {{"tokenizer": NAME}} with a string NAME, found {name!r}')
    return name


def tokenize_files(paths: Sequence[Path], tokenizer) -> np.ndarray:
    """One stream: each file's tokens followed by EOS. uint16 when the vocab fits, else uint32. Shape (tokens,)."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    parts = []
    for path in paths:
        parts.append(tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace")).astype(dtype))
        parts.append(np.asarray([tokenizer.eos_id], dtype))
    return np.concatenate(parts) if parts else np.zeros((0,), dtype)


def read_shard(path: Path, token_dtype: str) -> np.memmap:
    """A ``*.bin`` shard, memory-mapped as little-endian ``token_dtype``: (tokens,). TrainError naming the file and
    --token-dtype when its size is not a whole number of tokens."""
    dtype = np.dtype(token_dtype).newbyteorder("<")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise TrainError(
            f"token shard {path} has {size} bytes, not a multiple of {dtype.itemsize} (--token-dtype {token_dtype}): "
            "a truncated file, or shards of another token dtype"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def load_streams(
    path: str, *, text_glob: str, tokenizer: str, token_dtype: str
) -> tuple[list[np.ndarray], ByteTokenizer | HFTokenizer | None]:
    """(the token streams under ``path``, the tokenizer that made them). The streams are the ``*.bin`` shards if
    there are any (memory-mapped; empty ones skipped; their tokenizer is unknown: None), else the text files matching
    ``text_glob``, tokenized by ``tokenizer``.

    Each stream has shape (tokens,). Raises a TrainError naming ``path`` when nothing usable is there.
    """
    root = Path(path)
    if not root.exists():
        raise TrainError(f"data path {path!r} does not exist")
    shards = [root] if root.is_file() and root.suffix == ".bin" else sorted(root.glob("*.bin")) if root.is_dir() else []
    if shards:
        streams = [read_shard(shard, token_dtype) for shard in shards if shard.stat().st_size]
        if not streams:
            raise TrainError(f"data path {path!r}: every *.bin token shard is empty ({len(shards)} of them)")
        return streams, None
    texts = [root] if root.is_file() else sorted(p for p in root.glob(text_glob) if p.is_file())
    if not texts:
        raise TrainError(f"data path {path!r} holds no *.bin token shards and no text files matching {text_glob!r}")
    text_tokenizer = get_tokenizer(tokenizer)
    return [tokenize_files(texts, text_tokenizer)], text_tokenizer


class Windows:
    """Fixed-length token windows over several streams. Window i is ``stream[s*seq_len : s*seq_len + seq_len + 1]``
    of the stream holding it (windows never cross streams)."""

    def __init__(self, streams: Sequence[np.ndarray], seq_len: int):
        self.streams = list(streams)
        self.seq_len = seq_len
        counts = [max(len(s) - 1, 0) // seq_len for s in self.streams]
        self.first = np.cumsum([0, *counts])  # window index where each stream begins
        if self.first[-1] == 0:
            sizes = [len(s) for s in self.streams]
            raise TrainError(f"no window of seq_len + 1 = {seq_len + 1} tokens fits in streams of sizes {sizes}")

    def __len__(self) -> int:
        return int(self.first[-1])

    def take(self, indices: np.ndarray) -> np.ndarray:
        """Windows ``indices`` (k,) -> tokens (k, seq_len + 1) int32."""
        out = np.empty((len(indices), self.seq_len + 1), np.int32)
        stream_of = np.searchsorted(self.first, indices, side="right") - 1
        for row, (index, s) in enumerate(zip(indices, stream_of, strict=True)):
            start = (index - self.first[s]) * self.seq_len
            out[row] = self.streams[s][start : start + self.seq_len + 1]
        return out


class Split:
    """Batches of ``batch_size`` rows from a set of windows; ``rows(step, rows)`` reads any rows of any step.

    Shuffled (training): sample ``step * batch_size + row`` is window ``perm_epoch[sample % n]`` with a permutation
    drawn from ``(seed, epoch)``. Not shuffled (evaluation): the windows in order, cycling.
    """

    def __init__(self, windows: Windows, indices: np.ndarray, batch_size: int, *, seed: int, shuffle: bool):
        if len(indices) == 0:
            raise TrainError("a data split has no windows: use more data, a shorter seq_len or another eval_fraction")
        self.windows = windows
        self.indices = indices
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.indices
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a step spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = self.indices[np.random.default_rng((self.seed, epoch)).permutation(len(self.indices))]
        return self._perms[epoch]

    def rows(self, step: int, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Rows ``rows`` of batch ``step`` -> tokens (len(rows), seq_len + 1) int32."""
        samples = step * self.batch_size + np.asarray(rows, np.int64)
        n = len(self.indices)
        chosen = np.empty(len(samples), np.int64)
        for epoch in np.unique(samples // n):
            here = samples // n == epoch
            chosen[here] = self._order(int(epoch))[samples[here] % n]
        return self.windows.take(chosen)

    def batch(self, step: int) -> np.ndarray:
        """The whole batch ``step``: (batch_size, seq_len + 1) int32."""
        return self.rows(step, np.arange(self.batch_size))


def make_splits(
    streams: Sequence[np.ndarray],
    *,
    seq_len: int,
    batch_size: int,
    eval_batch_size: int,
    eval_fraction: float,
    seed: int,
) -> tuple[Split, Split | None]:
    """(train, eval) splits; the eval split is the last ``eval_fraction`` of the windows (None when 0)."""
    windows = Windows(streams, seq_len)
    n_eval = math.ceil(len(windows) * eval_fraction)
    if n_eval >= len(windows):
        raise TrainError(f"eval_fraction {eval_fraction} leaves no training windows out of {len(windows)}")
    everything = np.arange(len(windows))
    train = Split(windows, everything[: len(windows) - n_eval], batch_size, seed=seed, shuffle=True)
    held_out = everything[len(windows) - n_eval :]
    evaluation = Split(windows, held_out, eval_batch_size, seed=seed, shuffle=False) if n_eval else None
    return train, evaluation


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    """Write tokens (n,) as a headerless little-endian shard (uint16 or uint32, kept from ``tokens``' dtype)."""
    if tokens.dtype not in (np.uint16, np.uint32):
        raise ValueError(f"write_shard: tokens must be uint16 or uint32, got {tokens.dtype}")
    tokens.astype(tokens.dtype.newbyteorder("<")).tofile(path)
