"""``python -m mamba_jax.train`` and ``python -m mamba_jax.train.export`` on bad arguments: one ``error: ...`` line,
exit status 2, no traceback, and nothing written; a bug keeps its traceback. No training runs here."""

import re

import pytest

from mamba_jax.train import __main__ as cli
from mamba_jax.train import export
from tests.test_train import write_corpus

CASES = {
    "no data": (["--data", ""], r"--data is required"),
    "missing data": (["--data", "{tmp}/nope"], r"data path '.*nope' does not exist"),
    "empty data dir": (["--data", "{tmp}/empty"], r"data path '.*empty' holds no \*.bin token shards and no text"),
    "seq_len beyond the data": (["--seq-len", "100000"], r"no window of seq_len \+ 1 = 100001 tokens fits"),
    "unknown preset": (["--model", "mamba-9b"], r"unknown preset 'mamba-9b'"),
    "unknown --set key": (["--set", "colour=1"], r"unknown mamba_ssm MambaConfig keys \['colour'\]"),
    "batch and mesh": (["--batch-size", "4"], r"batch size 4 is not divisible by the batch mesh axes"),
    "bad remat": (["--remat", "all"], r"TrainConfig.remat must be one of"),
    "grad accum": (["--grad-accum", "3"], r"batch_size \(8\) must be divisible by grad_accum \(3\)"),
    "run dir is a file": (["--run-dir", "{tmp}/a_file"], r"--run-dir .*a_file is a file, not a directory"),
    "vocab below the tokenizer's": (["--set", "vocab_size=256"], r"the tokenizer 'byte' gives ids up to 256"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_bad_argument_is_one_line(case, tmp_path, capsys):
    write_corpus(tmp_path / "corpus")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("not a run")
    flags, message = CASES[case]
    model = ["--model", "mamba-130m", "--set", "d_model=16", "n_layer=1", "vocab_size=257"]
    if flags[0] == "--set":  # more overrides
        model += flags[1:]
        flags = []
    argv = ["--data", str(tmp_path / "corpus"), "--run-dir", str(tmp_path / "run"), "--seq-len", "16", *model]
    assert cli.main([*argv, *(flag.format(tmp=tmp_path) for flag in flags)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()  # checked before the run dir is created


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the start-up checks' ValueErrors are the user's; one raised while training is a bug, left to surface."""
    write_corpus(tmp_path / "corpus")

    def broken(run):
        raise ValueError("a bug")

    monkeypatch.setattr(cli, "run_prepared", broken)
    argv = ["--data", str(tmp_path / "corpus"), "--run-dir", str(tmp_path / "run"), "--seq-len", "16"]
    with pytest.raises(ValueError, match="a bug"):
        cli.main([*argv, "--model", "mamba-130m", "--set", "d_model=16", "n_layer=1", "vocab_size=257"])


@pytest.mark.parametrize("source, destination", [("fx/r1", "fx/r1"), ("fx/r1", "fx"), ("fx/r1", "fx/r1/out")])
def test_export_never_overlaps_the_run(tmp_path, capsys, source, destination):
    """``export RUN DST --force`` with DST the run, a folder holding it or one inside it is refused before anything
    is read or deleted."""
    (tmp_path / "fx" / "r1" / "checkpoints").mkdir(parents=True)
    (tmp_path / "fx" / "r1" / "metrics.jsonl").write_text("{}\n")
    assert export.main([str(tmp_path / source), str(tmp_path / destination), "--force"]) == 2
    assert re.fullmatch(
        r"error: destination .* overlaps the source .*r1; choose a separate directory\n", capsys.readouterr().err
    )
    assert (tmp_path / "fx" / "r1" / "metrics.jsonl").read_text() == "{}\n"


def test_export_of_something_else_than_a_run(tmp_path, capsys):
    assert export.main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err == f"error: {tmp_path / 'nope'} is not a training run: it has no checkpoints/ folder\n"
    )
