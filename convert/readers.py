"""A checkpoint's tensors behind one lazy interface, whatever the files: safetensors or torch zip (``.bin``), single or
sharded with an index json. Nothing is read until ``read(name)``, one tensor at a time."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors can hand out bf16 arrays)
import numpy as np
from safetensors import SafetensorError, safe_open

from convert.errors import ConversionError
from convert.torch_zip import TorchZipReader

# safetensors' dtype codes -> torch's names (the names the torch zip reader and our errors use).
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
}


class SafetensorsReader:
    """The tensors of one ``.safetensors`` file: ``names``, ``shape(name)``, ``dtype(name)``, ``read(name)``."""

    def __init__(self, path: Path, stack: ExitStack):
        self.path = path
        try:
            self._file = stack.enter_context(safe_open(str(path), framework="numpy"))
            self.names = list(self._file.keys())
        except (SafetensorError, OSError) as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._file.get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The tensor's dtype, by torch's name (safetensors' own code when torch has no name for it)."""
        code = self._file.get_slice(name).get_dtype()
        return SAFETENSORS_DTYPES.get(code, code)

    def read(self, name: str) -> np.ndarray:
        try:
            return self._file.get_tensor(name)
        except (SafetensorError, OSError, TypeError) as e:
            raise ConversionError(f"{self.path}: cannot read tensor '{name}' ({e})") from None


def _open_file(path: Path, stack: ExitStack) -> SafetensorsReader | TorchZipReader:
    if not path.is_file():
        raise ConversionError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path, stack)
    return stack.enter_context(TorchZipReader(path))


def _read_index(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index json: its ``weight_map`` {tensor name: file name in the same directory}."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        items = list(weight_map.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index}: not an index json with a 'weight_map' ({type(e).__name__}: {e})") from None
    for name, file in items:
        if not isinstance(file, str) or Path(file).name != file:
            raise ConversionError(f"{index}: weight_map puts '{name}' in {file!r}, expected a file name")
    return dict(items)


class Weights:
    """All tensors of a checkpoint, from weight files or one index json of shards.

    ``names`` (in file order), ``shape(name)``, ``dtype(name)`` (torch's name), ``read(name) -> np.ndarray``. A
    context manager: files stay open (memory-mapped or seekable) until it exits.
    """

    def __init__(self, files: list[Path]):
        self._stack = ExitStack()
        try:
            self._where = self._open_all(files)
        except BaseException:
            self._stack.close()
            raise

    def _open_all(self, files: list[Path]) -> dict[str, SafetensorsReader | TorchZipReader]:
        index = files[0] if len(files) == 1 and files[0].name.endswith(".index.json") else None
        weight_map = _read_index(index) if index else {}
        paths = [index.parent / file for file in sorted(set(weight_map.values()))] if index else files
        where: dict[str, SafetensorsReader | TorchZipReader] = {}
        for path in paths:
            reader = _open_file(path, self._stack)
            for name in reader.names:
                if name in where:
                    raise ConversionError(f"tensor '{name}' is in both {where[name].path} and {path}")
                where[name] = reader
        for name, file in weight_map.items():
            if name not in where or where[name].path.name != file:
                raise ConversionError(f"{index}: lists tensor '{name}' in {file}, but that file does not hold it")
        return where

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> str:
        return self._where[name].dtype(name)

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Weights:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
