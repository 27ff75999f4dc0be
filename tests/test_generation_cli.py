"""``python -m mamba_jax.generate``: the command line on a tiny transformers checkpoint with a word-level tokenizer
saved beside it (no network), its errors, and the ``-m`` entry point next to the ``mamba_jax.generate`` function."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mamba_jax import generate
from mamba_jax.generation import cli
from mamba_jax.pretrained import load_pretrained
from mamba_jax.train.data import TOKENIZER_FILE, ByteTokenizer
from tests import checkpoints

WORDS = ["<eos>", "[UNK]"] + [f"w{i}" for i in range(checkpoints.VOCAB - 2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A transformers Mamba checkpoint directory (vocab 37) holding a tokenizer with one token per word."""
    pytest.importorskip("torch")  # tests.checkpoints builds the model with torch + transformers
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    directory = tmp_path_factory.mktemp("mamba-tiny")
    checkpoints.random_model("mamba", vocab_size=checkpoints.VOCAB, tie=True).save_pretrained(directory)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, eos_token="<eos>", unk_token="[UNK]").save_pretrained(directory)
    return directory


def test_streams_the_greedy_continuation_and_reports_speed(checkpoint, capsys):
    cli.main(["--model", str(checkpoint), "--prompt", "w3 w1 w4", "--max-new-tokens", "5", "--batch", "2"])
    out, err = capsys.readouterr()

    tokens = np.asarray(generate(load_pretrained(checkpoint), np.array([[5, 3, 6]] * 2), max_new_tokens=5))
    row = list(tokens[0])
    if 0 in row:  # the tokenizer's EOS ends the text
        row = row[: row.index(0)]
    text = " ".join(["w3 w1 w4", *(WORDS[i] for i in row)])  # the prompt and the new words, spaced as one text
    assert out.startswith(f"{text}\n--- row 1 ---\n{text}\n")
    assert "prompt 3 tokens" in err and "tokens/s" in err and "first token after" in err


def test_step_implementation_flag(checkpoint, capsys, monkeypatch):
    """--step-implementation reaches every layer of the model: the fused kernels (interpreted here) continue as
    XLA's step does."""
    loaded = []

    def load(*args, **kwargs):
        loaded.append(load_pretrained(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(cli, "load_pretrained", load)
    texts = []
    for implementation in ("reference", "pallas"):
        argv = ["--model", str(checkpoint), "--prompt", "w3 w1 w4", "--max-new-tokens", "4"]
        cli.main([*argv, "--step-implementation", implementation])
        texts.append(capsys.readouterr().out)
        assert {layer.mixer.step_implementation for layer in loaded[-1].backbone.layers} == {implementation}
    assert texts[0] == texts[1]


def test_state_dtype_flag(checkpoint, capsys, monkeypatch):
    """--state-dtype reaches generate (which keeps the SSM states in that dtype between tokens)."""
    calls = []

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(cli, "generate", recording)
    cli.main(["--model", str(checkpoint), "--prompt", "w3 w1 w4", "--max-new-tokens", "3", "--state-dtype", "bfloat16"])
    assert calls[0]["state_dtype"] == "bfloat16"
    assert capsys.readouterr().out.startswith("w3 w1 w4")


@pytest.mark.parametrize(
    ("arguments", "match"),
    [
        (["--top-p", "0"], r"top_p must be a number in \(0, 1\]"),
        (["--max-new-tokens", "0"], "--max-new-tokens and --batch must be >= 1"),
        (["--tokenizer", "/no/such/tokenizer"], "cannot load the tokenizer '/no/such/tokenizer'"),
        (["--prompt", ""], "encodes to no tokens"),
    ],
)
def test_errors_name_the_problem(checkpoint, capsys, arguments, match):
    defaults = {"--model": str(checkpoint), "--prompt": "w1"}
    for flag, value in zip(arguments[::2], arguments[1::2], strict=True):
        defaults[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        cli.main([item for pair in defaults.items() for item in pair])
    assert exit_info.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_missing_checkpoint_directory(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--model", "./no/such/checkpoint", "--prompt", "w1"])
    assert "does not exist" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "mamba_jax.generate", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 0, result.stderr
    assert "usage: python -m mamba_jax.generate" in result.stdout
    assert "--repetition-penalty" in result.stdout


def test_importing_the_cli_module_keeps_generate_callable():
    """``import mamba_jax.generate`` binds the CLI module to the package's ``generate``: it forwards calls to the
    function, so ``mamba_jax.generate(model, ...)`` works either way."""
    code = (
        "import mamba_jax, mamba_jax.generate, numpy as np\n"
        "from flax import nnx\n"
        "config = mamba_jax.MambaConfig(d_model=16, n_layer=1, vocab_size=32)\n"
        "model = mamba_jax.MambaLMHeadModel(config, rngs=nnx.Rngs(0))\n"
        "print(np.asarray(mamba_jax.generate(model, np.ones((1, 3), np.int32), max_new_tokens=2)).shape)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 2)"


class Words:
    """A tokenizer that decodes a text's first word without the space before it (as SentencePiece drops a leading
    "▁"), so that a decoded window differs from the same ids inside a longer text."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


def stream(streamer: cli.Streamer, ids) -> None:
    for token in ids:
        streamer(np.asarray([token]))


@pytest.mark.parametrize("count", [5, cli.Streamer.WINDOW + 1, 3 * cli.Streamer.WINDOW + 7])
def test_streamer_prints_the_whole_text_across_windows(capsys, count):
    ids = list(range(count))
    streamer = cli.Streamer(Words(), eos_token_id=None)
    stream(streamer, ids)
    streamer.finish()
    assert capsys.readouterr().out == Words().decode(ids)
    assert len(streamer.times) == count


def test_streamer_continues_the_prompt_with_its_space(capsys):
    """With the prompt's last ids as the window's first context, a tokenizer that drops a text's leading space still
    prints the space between the prompt and the first new word (it glued them: "w7 w8w1 w2")."""
    prompt = list(range(3, 3 + cli.Streamer.CONTEXT + 2))
    streamer = cli.Streamer(Words(), eos_token_id=None, context=prompt)
    stream(streamer, [1, 2])
    streamer.finish()
    assert capsys.readouterr().out == " w1 w2"


def test_streamer_waits_for_whole_characters_and_flushes_the_rest(capsys):
    """Multi-byte characters print once complete; a character cut off by the end prints as the tokenizer renders
    it (the replacement character) instead of being dropped; EOS ends the text."""
    tokenizer = cli.ByteTextTokenizer()
    ids = tokenizer("héllo wörld ✓")["input_ids"] + list("✓".encode())[:2]
    streamer = cli.Streamer(tokenizer, tokenizer.eos_token_id)
    for token in ids:
        streamer(np.asarray([token]))
        assert "\ufffd" not in capsys.readouterr().out or token == ids[-1]
    streamer(np.asarray([tokenizer.eos_token_id]))
    streamer(np.asarray([65]))  # after EOS: timed, not printed
    assert capsys.readouterr().out == "\ufffd"
    streamer.finish()
    assert capsys.readouterr().out == ""
    assert len(streamer.times) == len(ids) + 2


def test_byte_tokenizer_by_name_or_from_the_checkpoint(tmp_path):
    assert isinstance(cli.load_tokenizer("byte", tmp_path), cli.ByteTextTokenizer)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"tokenizer": "byte"}))
    tokenizer = cli.load_tokenizer(None, tmp_path)
    assert tokenizer("aé")["input_ids"] == [97, 195, 169] and tokenizer.decode([97, 195, 169, 256]) == "aé"
    (tmp_path / TOKENIZER_FILE).write_text('{"name": "byte"}')
    with pytest.raises(OSError, match=r'mamba_jax_tokenizer.json: expected \{"tokenizer": NAME\}'):
        cli.load_tokenizer(None, tmp_path)


def test_byte_level_checkpoint_streams_its_text(tmp_path, capsys):
    """A checkpoint that names the byte-level tokenizer (as mamba_jax.train.export writes for a byte-level run)
    generates and prints bytes, with no tokenizer to download."""
    pytest.importorskip("torch")
    checkpoints.random_model("mamba", vocab_size=264, tie=True).save_pretrained(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"tokenizer": "byte"}))
    cli.main(["--model", str(tmp_path), "--prompt", "ab", "--max-new-tokens", "6"])
    tokens = list(np.asarray(generate(load_pretrained(tmp_path), np.array([[97, 98]]), max_new_tokens=6))[0])
    if 256 in tokens:
        tokens = tokens[: tokens.index(256)]
    assert capsys.readouterr().out == "ab" + ByteTokenizer().decode(tokens) + "\n"
