"""The converter's file layer: the restricted torch zip reader (against torch.load), safetensors and sharded readers,
source detection and the atomic writer. No model involved."""

import json
import os
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from convert.errors import ConversionError
from convert.formats import MAMBA_SSM, TRANSFORMERS, inspect_source
from convert.readers import Weights
from convert.torch_zip import TorchZipReader
from convert.writer import staged_directory
from tests import checkpoints as ck


def test_torch_zip_reads_what_torch_load_reads(tmp_path):
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=gen)
    state = {
        "f32": torch.randn(3, 4, generator=gen),
        "f16": torch.randn(6, generator=gen).half(),
        "bf16": torch.randn(2, 3, 5, generator=gen).bfloat16(),
        "f64": torch.randn(3, generator=gen).double(),
        "i64": torch.arange(-4, 9),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.T,  # stride (1, 7)
        "column": base[:, 3],  # offset 3, stride (7,)
        "rows": base[2:4],  # offset 14 into the same storage
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.randn(4, generator=gen)),
    }
    path = tmp_path / "x.bin"
    torch.save(state, path)
    expected = torch.load(path, weights_only=True)
    with TorchZipReader(path) as reader:
        assert reader.names == list(state)
        for name, tensor in expected.items():
            array = reader.read(name)
            assert array.shape == tuple(tensor.shape), name
            assert str(array.dtype) == str(tensor.dtype).removeprefix("torch."), name
            np.testing.assert_array_equal(array.astype(np.float64), tensor.detach().double().numpy(), err_msg=name)


class _RunsShell:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _RunsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_torch_zip_refuses_code_and_runs_nothing(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsShell(marker) if payload == "system" else _RunsEval()
    path = ck.write_pickle_zip(tmp_path / "pytorch_model.bin", {"x": evil})
    with pytest.raises(
        ConversionError, match=rf"refused to load: the pickle asks for the global '\w+\.{payload}'"
    ) as info:
        TorchZipReader(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "global_name", ["torch.load", "torch._utils._rebuild_qtensor", "torch.storage._load_from_bytes", "torch.nn.Module"]
)
def test_torch_zip_refuses_other_torch_globals(tmp_path, global_name):
    """Recognising torch's dtypes and storage classes opens nothing else of torch."""
    module, name = global_name.rsplit(".", 1)
    path = tmp_path / "x.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", f"c{module}\n{name}\n.".encode())  # protocol 0: GLOBAL, STOP
    with pytest.raises(ConversionError, match=rf"refused to load: the pickle asks for the global '{global_name}'"):
        TorchZipReader(path)


def test_torch_zip_errors(tmp_path):
    torch = pytest.importorskip("torch")
    good = tmp_path / "good.bin"
    torch.save({"w": torch.randn(4, 4)}, good)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"truncated\.bin: not a readable PyTorch zip"):
        TorchZipReader(truncated)

    short_storage = tmp_path / "short.bin"  # a storage member with fewer bytes than the tensor needs
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(short_storage, "w") as out:
        for info in src.infolist():
            content = src.read(info)
            out.writestr(info.filename, content[:-8] if "/data/" in info.filename else content)
    with (
        TorchZipReader(short_storage) as reader,
        pytest.raises(ConversionError, match=r"has 56 bytes, expected 16 x 4"),
    ):
        reader.read("w")

    not_a_dict = tmp_path / "list.bin"
    torch.save([torch.ones(2)], not_a_dict)
    with pytest.raises(ConversionError, match="expected a state dict, found a pickled list"):
        TorchZipReader(not_a_dict)

    nested = tmp_path / "nested.bin"
    torch.save({"model": {"w": torch.ones(2)}}, nested)
    with pytest.raises(ConversionError, match=r"key 'model' holding dict"):
        TorchZipReader(nested)


def test_safetensors_and_shards(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 2)).astype(np.float32), rng.standard_normal(4).astype(ml_dtypes.bfloat16)
    save_file({"a": a}, tmp_path / "s1.safetensors")
    save_file({"b": b}, tmp_path / "s2.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    with Weights([index]) as weights:
        assert sorted(weights.names) == ["a", "b"]
        assert weights.shape("b") == (4,)
        np.testing.assert_array_equal(weights.read("a"), a)
        assert weights.read("b").dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(weights.read("b"), b)

    index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s1.safetensors"}}))
    with pytest.raises(ConversionError, match=r"lists tensor 'b' in s1.safetensors, but that file does not hold it"):
        Weights([index])
    index.write_text(json.dumps({"weight_map": {"a": "missing.safetensors"}}))
    with pytest.raises(ConversionError, match=r"missing.safetensors does not exist"):
        Weights([index])
    index.write_text("{not json")
    with pytest.raises(ConversionError, match=r"index.json: not an index json"):
        Weights([index])

    save_file({"a": a}, tmp_path / "dup.safetensors")
    with pytest.raises(ConversionError, match=r"tensor 'a' is in both"):
        Weights([tmp_path / "s1.safetensors", tmp_path / "dup.safetensors"])

    data = (tmp_path / "s1.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-5])
    with pytest.raises(ConversionError, match=r"cut.safetensors: not a readable safetensors file"):
        Weights([tmp_path / "cut.safetensors"])


def test_inspect_source(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1}))
    with pytest.raises(ConversionError, match=r"no weights found; expected one of model\.safetensors\.index\.json"):
        inspect_source(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # inspection picks files; it reads no weights
    (tmp_path / "tokenizer.json").write_text("{}")
    source = inspect_source(tmp_path)
    assert source.dialect == MAMBA_SSM and source.weights.name == "pytorch_model.bin"
    assert [f.name for f in source.tokenizer_files] == ["tokenizer.json"]

    save_file({}, tmp_path / "model.safetensors")  # preferred over the .bin
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2", "hidden_size": 8}))
    source = inspect_source(tmp_path)
    assert source.dialect == TRANSFORMERS and source.weights.name == "model.safetensors"

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="found model_type 'llama'"):
        inspect_source(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ConversionError, match=r"config\.json does not exist"):
        inspect_source(tmp_path)


def write_checkpoint(directory: Path, version: str) -> None:
    """What --force takes for a checkpoint of ours: config.json and params/."""
    (directory / "config.json").write_text(version)
    (directory / "params").mkdir()


def test_staged_directory(tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_directory(dst, force=False) as staging:
        (staging / "half-written").write_text("x")
        raise RuntimeError("conversion failed midway")
    assert list(tmp_path.iterdir()) == []  # no DST, no leftover staging directory

    with staged_directory(dst, force=False) as staging:
        write_checkpoint(staging, "1")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params"]

    with pytest.raises(ConversionError, match=r"out already exists; pass --force"):
        with staged_directory(dst, force=False):
            pass
    with pytest.raises(RuntimeError), staged_directory(dst, force=True):
        raise RuntimeError("failed")
    assert (dst / "config.json").read_text() == "1"  # a failed --force run leaves the old DST as it was

    with staged_directory(dst, force=True) as staging:
        write_checkpoint(staging, "2")
    assert (dst / "config.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
