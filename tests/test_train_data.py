"""mamba_jax.train.data: tokenizers, packing into windows, deterministic batches, splits, shards, errors."""

import json

import numpy as np
import pytest

from mamba_jax.train import pretokenize
from mamba_jax.train.config import TrainError
from mamba_jax.train.data import (
    TOKENIZER_FILE,
    ByteTokenizer,
    Split,
    Windows,
    load_streams,
    make_splits,
    save_tokenizer,
    tokenize_files,
    write_shard,
)


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert tokenizer.decode([*ids.tolist(), tokenizer.eos_id]) == text


def test_tokenize_files_separates_documents_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("ab")
    (tmp_path / "b.txt").write_text("c")
    tokens = tokenize_files([tmp_path / "a.txt", tmp_path / "b.txt"], ByteTokenizer())
    np.testing.assert_array_equal(tokens, [97, 98, 256, 99, 256])


def test_windows_pack_streams_without_crossing_them():
    streams = [np.arange(0, 11, dtype=np.uint16), np.arange(100, 107, dtype=np.uint16)]
    windows = Windows(streams, seq_len=3)
    assert len(windows) == 3 + 2  # (11 - 1) // 3 and (7 - 1) // 3
    out = windows.take(np.arange(5))
    assert out.dtype == np.int32 and out.shape == (5, 4)
    # Stride seq_len, length seq_len + 1: consecutive windows share one token, so every token is a target once.
    np.testing.assert_array_equal(out[:3], [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]])
    np.testing.assert_array_equal(out[3:], [[100, 101, 102, 103], [103, 104, 105, 106]])


def test_windows_error_when_nothing_fits():
    with pytest.raises(ValueError, match=r"no window of seq_len \+ 1 = 9 tokens fits in streams of sizes \[5\]"):
        Windows([np.zeros(5, np.uint16)], seq_len=8)


def make_split(n_windows=10, batch_size=4, seed=0, shuffle=True) -> Split:
    stream = np.arange(n_windows * 2 + 1, dtype=np.uint16)
    windows = Windows([stream], seq_len=2)
    return Split(windows, np.arange(len(windows)), batch_size, seed=seed, shuffle=shuffle)


def test_batches_are_a_function_of_seed_and_step():
    split, again = make_split(), make_split()
    for step in (0, 1, 7, 2, 0):  # any order: nothing depends on what was read before
        np.testing.assert_array_equal(split.batch(step), again.batch(step))
    # Any subset of rows (what one device or process reads) equals those rows of the whole batch.
    np.testing.assert_array_equal(split.rows(3, [2, 0]), split.batch(3)[[2, 0]])
    assert not np.array_equal(make_split(seed=1).batch(0), split.batch(0))


def window_ids(tokens: np.ndarray) -> list[int]:
    """Which windows of ``make_split``'s stream (seq_len 2, token i at position i) the rows (k, 3) are."""
    return (tokens[:, 0] // 2).tolist()


def test_each_epoch_visits_every_window_once_in_a_new_order():
    split = make_split(n_windows=12, batch_size=4)
    epoch0 = [w for step in range(3) for w in window_ids(split.batch(step))]
    epoch1 = [w for step in range(3, 6) for w in window_ids(split.batch(step))]
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_a_batch_spanning_two_epochs():
    split = make_split(n_windows=10, batch_size=4)  # step 2 holds samples 8..11: two of epoch 0, two of epoch 1
    epoch0 = [w for step in range(2) for w in window_ids(split.batch(step))]
    tail = window_ids(split.batch(2)[:2])
    assert sorted(epoch0 + tail) == list(range(10))


def test_eval_split_is_the_held_out_tail_in_order():
    stream = np.arange(41, dtype=np.uint16)
    train, evaluation = make_splits(
        [stream], seq_len=4, batch_size=2, eval_batch_size=2, eval_fraction=0.2, seed=0
    )  # 10 windows: 8 train, 2 eval
    assert sorted(train.indices.tolist()) == list(range(8))
    np.testing.assert_array_equal(evaluation.batch(0)[:, 0], [32, 36])
    np.testing.assert_array_equal(evaluation.batch(1), evaluation.batch(0))  # cycles
    train_only, none = make_splits([stream], seq_len=4, batch_size=2, eval_batch_size=2, eval_fraction=0.0, seed=0)
    assert none is None and len(train_only.indices) == 10


def test_binary_shards_are_memory_mapped(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(70000, 70010, dtype=np.uint32))
    write_shard(tmp_path / "b.bin", np.arange(5, dtype=np.uint32))
    streams, tokenizer = load_streams(str(tmp_path), text_glob="*.txt", tokenizer="byte", token_dtype="uint32")
    assert tokenizer is None  # shards do not say which tokenizer made them
    assert [type(s) for s in streams] == [np.memmap, np.memmap]
    np.testing.assert_array_equal(streams[0], np.arange(70000, 70010))
    with pytest.raises(ValueError, match="tokens must be uint16 or uint32, got int64"):
        write_shard(tmp_path / "c.bin", np.arange(3))


def test_pretokenize_writes_a_shard_the_loader_reads(tmp_path):
    (tmp_path / "a.txt").write_text("hi")
    pretokenize.main([str(tmp_path), str(tmp_path / "out" / "train.bin")])
    (stream,), _ = load_streams(str(tmp_path / "out"), text_glob="*.txt", tokenizer="byte", token_dtype="uint16")
    np.testing.assert_array_equal(stream, [104, 105, 256])
    with pytest.raises(SystemExit, match="exists; remove it first"):
        pretokenize.main([str(tmp_path), str(tmp_path / "out" / "train.bin")])


def test_text_folder_is_tokenized(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.py").write_text("xy")
    (tmp_path / "ignored.md").write_text("zz")
    (stream,), tokenizer = load_streams(str(tmp_path), text_glob="**/*.py", tokenizer="byte", token_dtype="uint16")
    np.testing.assert_array_equal(stream, [120, 121, 256])
    assert tokenizer.name == "byte"


def test_missing_or_empty_data_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_streams(str(tmp_path / "nope"), text_glob="*.txt", tokenizer="byte", token_dtype="uint16")
    with pytest.raises(ValueError, match=r"no \*.bin token shards and no text files matching '\*.txt'"):
        load_streams(str(tmp_path), text_glob="*.txt", tokenizer="byte", token_dtype="uint16")
    with pytest.raises(ValueError, match="leaves no training windows"):
        make_splits([np.arange(9)], seq_len=4, batch_size=1, eval_batch_size=1, eval_fraction=0.9, seed=0)


def test_a_transformers_tokenizer_by_path(tmp_path):
    """A tiny word-level tokenizer saved locally stands in for a Hub name (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, "state": 2, "space": 3}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="[UNK]").save_pretrained(tmp_path)
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("state space model")
    (stream,), tokenizer = load_streams(
        str(tmp_path / "texts"), text_glob="*.txt", tokenizer=str(tmp_path), token_dtype="uint16"
    )
    np.testing.assert_array_equal(stream, [2, 3, 1, 0])
    # Saved for an export: the tokenizer's own files, which load back as the same tokenizer.
    assert tokenizer.name == str(tmp_path)
    (tmp_path / "export").mkdir()
    save_tokenizer(tokenizer.name, tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").is_file() and not (tmp_path / "export" / TOKENIZER_FILE).exists()
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path / "export").encode("space state") == [3, 2]
    with pytest.raises(TrainError, match=r"cannot load the tokenizer '.*nowhere'"):
        load_streams(
            str(tmp_path / "texts"), text_glob="*.txt", tokenizer=str(tmp_path / "nowhere"), token_dtype="uint16"
        )


def test_the_byte_tokenizer_is_saved_by_name(tmp_path):
    save_tokenizer("byte", tmp_path)
    assert json.loads((tmp_path / TOKENIZER_FILE).read_text()) == {"tokenizer": "byte"}
    assert TOKENIZER_FILE == "mamba_jax_tokenizer.json"  # what python -m mamba_jax.generate reads


def test_empty_shards_are_skipped_and_bad_sizes_named(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(5, dtype=np.uint16))
    (tmp_path / "b.bin").write_bytes(b"")
    streams, _ = load_streams(str(tmp_path), text_glob="*.txt", tokenizer="byte", token_dtype="uint16")
    np.testing.assert_array_equal(streams, [np.arange(5)])
    with pytest.raises(TrainError, match=r"every \*.bin token shard is empty \(1 of them\)"):
        load_streams(str(tmp_path / "b.bin"), text_glob="*.txt", tokenizer="byte", token_dtype="uint16")
    # 10 bytes: five uint16 tokens, but not a whole number of uint32 ones.
    with pytest.raises(
        TrainError, match=r"token shard .*a.bin has 10 bytes, not a multiple of 4 \(--token-dtype uint32\)"
    ):
        load_streams(str(tmp_path), text_glob="*.txt", tokenizer="byte", token_dtype="uint32")
