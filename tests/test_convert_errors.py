"""python -m convert on bad input: one-line errors naming the file / key and the expected vs found values, exit 1,
and the destination never written or touched. Plus Hub repo-id resolution from a fake offline cache."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert.__main__ import main
from tests import checkpoints as ck

REPO_ROOT = Path(__file__).resolve().parents[1]


def error_of(capsys, argv) -> str:
    """Run the CLI, expect exit 1; return its one error line."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tied transformers Mamba checkpoint (model.safetensors)."""
    return ck.write_transformers_mamba(tmp_path_factory.mktemp("hf"))


def edited_copy(hf_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of hf_dir whose tensors dict went through ``edit``."""
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors")
    return out


def test_wrong_shape(hf_dir, tmp_path, capsys):
    def widen(t):
        t["backbone.layers.1.mixer.x_proj.weight"] = np.zeros((12, 32), np.float32)

    src = edited_copy(hf_dir, tmp_path, widen)
    line = error_of(capsys, [src, tmp_path / "dst"])
    assert "model.safetensors: tensor 'backbone.layers.1.mixer.x_proj.weight' has shape (12, 32)" in line
    assert "the config needs (11, 32)" in line
    assert not (tmp_path / "dst").exists()


def test_missing_and_unexpected(hf_dir, tmp_path, capsys):
    src = edited_copy(hf_dir, tmp_path, lambda t: t.pop("backbone.layers.0.mixer.D"))
    line = error_of(capsys, [src, tmp_path / "dst"])
    assert "tensors missing from the checkpoint: backbone.layers.0.mixer.D" in line

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))  # config disagrees with weights
    line = error_of(capsys, [src, tmp_path / "dst"])
    assert "unexpected tensors that no parameter of this config takes: backbone.layers.1." in line
    assert not (tmp_path / "dst").exists()


def test_tied_head_must_equal_embedding(hf_dir, tmp_path, capsys):
    def add_head(t):
        t["lm_head.weight"] = t["backbone.embeddings.weight"] + 1

    line = error_of(capsys, [edited_copy(hf_dir, tmp_path, add_head), tmp_path / "dst"])
    assert "model.safetensors: the config ties the embeddings, but 'lm_head.weight' (37, 16) differs" in line


def test_truncated_and_malicious_files(hf_dir, tmp_path, capsys):
    src = tmp_path / "truncated"
    src.mkdir()
    (src / "config.json").write_text((hf_dir / "config.json").read_text())
    data = (hf_dir / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    line = error_of(capsys, [src, tmp_path / "dst"])
    assert f"{src / 'model.safetensors'}: not a readable safetensors file" in line

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((hf_dir / "config.json").read_text())
    ck.write_pickle_zip(evil / "pytorch_model.bin", {"backbone.norm_f.weight": Payload()})
    line = error_of(capsys, [evil, tmp_path / "dst"])
    assert "refused to load: the pickle asks for the global 'posix.system'" in line
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "dst").exists()


def test_existing_destination_untouched(hf_dir, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    line = error_of(capsys, [hf_dir, dst])
    assert line == f"error: destination {dst} already exists; pass --force to replace it"
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]

    line = error_of(capsys, [hf_dir, hf_dir / "inside", "--force"])
    assert "overlaps the source" in line

    (dst / "config.json").write_text("{}")  # a config.json without weights is not a checkpoint of ours
    line = error_of(capsys, [hf_dir, dst, "--force"])
    assert line == (
        "error: --force replaces only an empty directory or a checkpoint this tool wrote (config.json with params/ "
        f"or model.safetensors), but {dst} holds config.json, keep.txt; move it away or choose another destination"
    )
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "keep.txt"]
    shutil.rmtree(dst)

    assert main([str(hf_dir), str(dst)]) == 0
    (dst / "tokenizer.json").write_text("{}")
    assert main([str(hf_dir), str(dst), "--force"]) == 0  # replaces a converted checkpoint
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no staging directories left behind

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(hf_dir), str(empty), "--force"]) == 0

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    line = error_of(capsys, [hf_dir, a_file, "--force"])
    assert line == f"error: --force replaces only a directory, but {a_file} is a file; choose another destination"
    assert a_file.read_text() == "mine"


def test_destination_checked_before_converting(hf_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("mine")
    dst = tmp_path / "a_file" / "sub"
    line = error_of(capsys, [tmp_path / "no_source", dst])  # the destination is refused before the source is read
    assert line == f"error: destination {dst}: {tmp_path / 'a_file'} is not a directory"
    line = error_of(capsys, ["--to", "hf", tmp_path / "no_source", dst])
    assert line == f"error: destination {dst}: {tmp_path / 'a_file'} is not a directory"

    too_long = tmp_path / ("x" * 256)
    line = error_of(capsys, [hf_dir, too_long])
    assert line == f"error: destination {too_long}: its name is 256 bytes long; this file system allows at most 255"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]

    longest = tmp_path / ("x" * 255)  # the staging directory's name must not be longer than the destination's
    assert main([str(hf_dir), str(longest)]) == 0
    assert sorted(p.name for p in longest.iterdir()) == ["config.json", "params"]


def test_destination_mode_follows_umask(hf_dir, tmp_path):
    """A destination gets the mode mkdir gives (0o777 & ~umask), not the 0o700 of a temporary directory."""
    previous = os.umask(0o027)
    try:
        assert main([str(hf_dir), str(tmp_path / "ours")]) == 0
        assert main(["--to", "hf", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "ours").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "back").stat().st_mode) == 0o750


def test_converted_checkpoint_as_source(hf_dir, tmp_path, capsys):
    assert main([str(hf_dir), str(tmp_path / "ours")]) == 0
    line = error_of(capsys, [tmp_path / "ours", tmp_path / "again"])
    assert line == (
        f"error: {tmp_path / 'ours'} looks like a checkpoint converted by python -m convert (config.json and params/): "
        "load it with mamba_jax.load_pretrained, or export it with python -m convert --to hf SRC DST"
    )


def test_no_ocdbt_merge_warning(hf_dir, tmp_path, caplog):
    assert main([str(hf_dir), str(tmp_path / "ours")]) == 0
    assert not [r for r in caplog.records if "Skipping merge of OCDBT" in r.getMessage()]


ACCEPTED = "expected one of float16, bfloat16, float32, float64"
NON_FLOAT = ["int64", "uint16", "complex64", "float8_e4m3fn", "bool"]


@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_non_float_tensor_in_safetensors(hf_dir, tmp_path, capsys, dtype):
    def retype(t):
        t["backbone.layers.0.mixer.D"] = t["backbone.layers.0.mixer.D"].astype(getattr(ml_dtypes, dtype, dtype))

    src = edited_copy(hf_dir, tmp_path, retype)
    line = error_of(capsys, [src, tmp_path / "dst"])
    assert (
        line == f"error: {src / 'model.safetensors'}: tensor 'backbone.layers.0.mixer.D' has dtype {dtype}; {ACCEPTED}"
    )
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("dtype", NON_FLOAT)
def test_non_float_tensor_in_bin(hf_dir, tmp_path, capsys, dtype):
    """Also the dtypes torch.save writes with _rebuild_tensor_v3 (uint16, float8) and complex storages: named as
    unsupported dtypes, not refused as foreign code."""
    torch = pytest.importorskip("torch")
    state = {name: torch.from_numpy(array) for name, array in load_file(hf_dir / "model.safetensors").items()}
    name = "backbone.layers.0.mixer.D"
    state[name] = state[name].to(getattr(torch, dtype))
    src = tmp_path / "bin"
    src.mkdir()
    (src / "config.json").write_text((hf_dir / "config.json").read_text())
    torch.save(state, src / "pytorch_model.bin")
    line = error_of(capsys, [src, tmp_path / "dst"])
    assert line == f"error: {src / 'pytorch_model.bin'}: tensor '{name}' has dtype {dtype}; {ACCEPTED}"
    assert not (tmp_path / "dst").exists()


def test_bad_arguments(hf_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(hf_dir), str(tmp_path / "dst"), "--dtype", "int8"])
    assert info.value.code == 2
    line = error_of(capsys, [tmp_path / "nowhere", tmp_path / "dst"])
    assert line == f"error: source directory {tmp_path / 'nowhere'} does not exist"
    line = error_of(capsys, [hf_dir, tmp_path / "dst", "--revision", "main"])
    assert "--revision applies to Hub repo ids" in line
    line = error_of(capsys, ["--to", "hf", hf_dir, tmp_path / "dst"])
    assert "is not a checkpoint written by python -m convert" in line


def test_hub_repo_id_from_offline_cache(hf_dir, tmp_path):
    """A repo id resolves through huggingface_hub's cache layout, honouring HF_HUB_CACHE and HF_HUB_OFFLINE."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-mamba"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((hf_dir / name).read_bytes())
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}

    def run(*args):
        command = [sys.executable, "-m", "convert", *map(str, args)]
        return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)

    done = run("acme/tiny-mamba", tmp_path / "dst")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dst" / "params").is_dir()
    converted = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert converted["d_model"] == 16 and converted["vocab_size"] == ck.VOCAB

    missing = run("acme/not-cached", tmp_path / "dst2")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: 'acme/not-cached' is not a local directory, and the Hub could not")
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "dst2").exists()


@pytest.mark.parametrize(
    ("removed", "problem"),
    [
        ("backbone.norm_f.weight", "array backbone.norm_f.weight missing"),
        ("backbone.norm_f.weight/0", "array backbone.norm_f.weight: chunk 0 missing"),
        ("_METADATA", "cannot read _METADATA: "),
    ],
)
def test_incomplete_converted_checkpoint(hf_dir, tmp_path, capsys, removed, problem):
    assert main([str(hf_dir), str(tmp_path / "ours")]) == 0
    path = tmp_path / "ours" / "params" / removed  # e.g. an interrupted copy
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    line = error_of(capsys, ["--to", "hf", tmp_path / "ours", tmp_path / "back"])
    assert line.startswith(f"error: {tmp_path / 'ours' / 'params'}: incomplete Orbax checkpoint ({problem}")
    assert not (tmp_path / "back").exists()
