"""Read ``torch.save`` checkpoints (PyTorch's zip format) without torch and without running code from the file.

A ``pytorch_model.bin`` is a zip archive. ``<prefix>/data.pkl`` pickles the state dict; in it every tensor is a call
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` and every storage a persistent id
``("storage", torch.<Type>Storage, key, location, numel)`` whose raw little-endian bytes are the zip member
``<prefix>/data/<key>``; dtypes without a storage class (uint16, float8, ...) are ``_rebuild_tensor_v3(..., dtype)``
calls on an untyped (byte) storage. We read the float and integer dtypes; the others are recognised, so that an
error can name them. Unpickling may call any importable function, so our unpickler resolves only the few names
that rebuilding tensors needs, each to an inert stand-in, and refuses every other global before anything runs.
Tensors are then read one at a time, only the bytes each one spans.
"""

from __future__ import annotations

import collections
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.errors import ConversionError

# torch's storage classes (how the pickle names a storage's element type) -> that element dtype, by torch's name.
STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
# The dtypes this reader hands out, as numpy dtypes.
NUMPY_DTYPES = {
    "float64": np.dtype(np.float64),
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
# dtypes that torch.save writes with ``_rebuild_tensor_v3`` (the tensor's dtype as a global ``torch.<dtype>``, its
# storage untyped bytes): recognised so that an error can name them, never read.
V3_DTYPES = (
    "uint16",
    "uint32",
    "uint64",
    "complex32",
    "float8_e5m2",
    "float8_e4m3fn",
    "float8_e5m2fnuz",
    "float8_e4m3fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "bits8",
    "bits16",
    "bits1x8",
    "bits2x4",
    "bits4x2",
)


@dataclass(frozen=True)
class StorageType:
    """Stand-in for a ``torch.<Type>Storage`` class (or ``torch.storage.UntypedStorage``: bytes): only its element
    dtype matters."""

    dtype: str


@dataclass(frozen=True)
class TorchDtype:
    """Stand-in for a ``torch.<dtype>`` object, as ``_rebuild_tensor_v3`` receives it."""

    name: str


@dataclass(frozen=True)
class Storage:
    """One storage of the checkpoint: ``numel`` elements of ``dtype`` in the zip member ``data/<key>``."""

    key: str
    dtype: str
    numel: int


@dataclass(frozen=True)
class TensorRef:
    """Where a tensor's elements are: a strided view of a storage (offset and stride counted in elements), and the
    tensor's dtype (torch's name; the storage's, but for ``_rebuild_tensor_v3`` tensors)."""

    storage: Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: str


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _check_record(storage, storage_offset, size, stride) -> None:
    """Raise unless the arguments of a rebuild call describe a strided view of a storage."""
    if not (isinstance(storage, Storage) and isinstance(storage_offset, int) and _is_int_tuple(size)):
        raise pickle.UnpicklingError(f"malformed tensor record (storage={storage!r}, offset={storage_offset!r})")
    if not _is_int_tuple(stride) or len(stride) != len(size):
        raise pickle.UnpicklingError(f"malformed tensor record: size {size!r} with stride {stride!r}")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``: records the view instead of building a tensor."""
    del requires_grad, backward_hooks, metadata  # autograd state, irrelevant to the values
    _check_record(storage, storage_offset, size, stride)
    return TensorRef(storage, storage_offset, size, stride, storage.dtype)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v3`` (the dtypes of ``V3_DTYPES``): records the view and dtype."""
    del requires_grad, backward_hooks, metadata
    _check_record(storage, storage_offset, size, stride)
    if not isinstance(dtype, TorchDtype):
        raise pickle.UnpicklingError(f"malformed tensor record: dtype {dtype!r}")
    return TensorRef(storage, storage_offset, size, stride, dtype.name)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    """Stand-in for ``torch._utils._rebuild_parameter`` (an ``nn.Parameter`` saved directly): its data."""
    del requires_grad, backward_hooks
    return data


ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.storage", "UntypedStorage"): StorageType("uint8"),
    **{("torch", name): StorageType(dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{("torch", name): TorchDtype(name) for name in V3_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``ALLOWED_GLOBALS`` and torch's storage persistent ids."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ConversionError(
                f"{self.source}: refused to load: the pickle asks for the global '{module}.{name}', which is not "
                "needed to rebuild tensors (nothing from the file was executed)"
            ) from None

    def persistent_load(self, pid):
        ok = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], StorageType)
            and isinstance(pid[2], str)
            and isinstance(pid[4], int)
        )
        if not ok:
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        return Storage(key=pid[2], dtype=pid[1].dtype, numel=pid[4])


class TorchZipReader:
    """The tensors of one ``torch.save`` zip file, read lazily: ``names``, ``shape(name)``, ``dtype(name)``,
    ``read(name)``. Use as a context manager (it keeps the file open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise ConversionError(
                f"{self.path}: not a readable PyTorch zip checkpoint ({e}); it may be truncated, or written by "
                "torch.save before torch 1.6 (legacy format, not supported)"
            ) from None
        try:
            self.tensors = self._load_index()
        except BaseException:
            self._zip.close()
            raise

    def _load_index(self) -> dict[str, TensorRef]:
        names = set(self._zip.namelist())
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConversionError(f"{self.path}: expected one data.pkl in the zip, found {len(pickles)}")
        self._prefix = pickles[0][: -len("data.pkl")]
        byteorder = self._read_member(self._prefix + "byteorder") if self._prefix + "byteorder" in names else b""
        if byteorder not in (b"", b"little"):
            raise ConversionError(f"{self.path}: byte order {byteorder!r} is not supported (expected little-endian)")
        try:
            with self._zip.open(pickles[0]) as f:
                state = _RestrictedUnpickler(f, str(self.path)).load()
        except ConversionError:
            raise
        except Exception as e:  # a malformed pickle can fail in many ways; none of them ran foreign code
            raise ConversionError(f"{self.path}: corrupt data.pkl ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise ConversionError(f"{self.path}: expected a state dict, found a pickled {type(state).__name__}")
        for name, value in state.items():
            if not isinstance(name, str) or not isinstance(value, TensorRef):
                raise ConversionError(
                    f"{self.path}: expected a state dict of tensors, found key {name!r} holding {type(value).__name__}"
                )
        return dict(state)

    def _read_member(self, member: str, start: int = 0, length: int | None = None) -> bytes:
        try:
            with self._zip.open(member) as f:
                f.seek(start)
                data = f.read() if length is None else f.read(length)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise ConversionError(f"{self.path}: cannot read {member} ({e}); the file is corrupt") from None
        if length is not None and len(data) != length:
            raise ConversionError(f"{self.path}: {member} ended after {len(data)} of {length} bytes; truncated")
        return data

    @property
    def names(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def dtype(self, name: str) -> str:
        """The tensor's dtype, by torch's name ("float32", "bfloat16", "float8_e4m3fn", ...)."""
        return self.tensors[name].dtype

    def read(self, name: str) -> np.ndarray:
        """The tensor ``name`` as a read-only numpy array of its shape and dtype (reads only its bytes)."""
        ref = self.tensors[name]
        if ref.dtype not in NUMPY_DTYPES:
            raise ConversionError(f"{self.path}: tensor '{name}' has dtype {ref.dtype}, which this reader cannot read")
        storage, dtype = ref.storage, NUMPY_DTYPES[ref.dtype]
        itemsize = dtype.itemsize
        if 0 in ref.shape:
            return np.zeros(ref.shape, dtype)
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
        if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= storage.numel:
            raise ConversionError(
                f"{self.path}: tensor '{name}' (shape {ref.shape}, stride {ref.stride}, offset {ref.offset}) reaches "
                f"outside its storage of {storage.numel} elements; the file is corrupt"
            )
        member = f"{self._prefix}data/{storage.key}"
        try:
            size = self._zip.getinfo(member).file_size
        except KeyError:
            raise ConversionError(f"{self.path}: storage {member} of tensor '{name}' is missing") from None
        if size != storage.numel * itemsize:
            raise ConversionError(
                f"{self.path}: storage {member} has {size} bytes, expected {storage.numel} x {itemsize}; corrupt"
            )
        data = self._read_member(member, ref.offset * itemsize, (last - ref.offset + 1) * itemsize)
        flat = np.frombuffer(data, dtype)
        strides = tuple(s * itemsize for s in ref.stride)
        return np.lib.stride_tricks.as_strided(flat, ref.shape, strides, writeable=False)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> TorchZipReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
