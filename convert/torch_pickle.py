"""Read a PyTorch state dict (torch.save's zip format) without torch and without running its pickle.

The unpickler resolves only the few names a state dict of tensors needs
(tensor rebuilding, storage types, OrderedDict) and refuses every other one, so a
malicious checkpoint cannot run code. Nothing it builds is trusted: every
tensor's offset, sizes and strides are checked against its storage's bytes
before an array is made of them, so a crafted file cannot make us read outside
them. Tensors come back as NumPy arrays; bfloat16 ones as their raw uint16 bits,
marked by `BFloat16Bits`. Every problem is a CheckpointError naming the file.
"""

import collections
import io
import math
import pickle
import pickletools
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

from mlx_fm.layout import CheckpointError

import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
INT64_END = 2**63  # torch keeps offsets, sizes and strides in int64
MAX_DIMENSIONS = 64  # NumPy's limit
# A state dict, or a dict wrapping one ({"state_dict": ...}): tensors lie this deep at most.
TENSOR_DEPTH = 2
# What zipfile raises on a damaged archive, besides BadZipFile.
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    zlib.error,
    EOFError,
    OSError,
    ValueError,
    NotImplementedError,
)


class BFloat16Bits(np.ndarray):
    """A uint16 array that holds the bits of a bfloat16 tensor."""


# The unpickler hands only tuples to the pickle, never arrays or objects with a
# __dict__: the pickle's BUILD opcode can rewrite those.
class _StorageType(NamedTuple):
    name: str


class _Storage(NamedTuple):
    key: str
    dtype_name: str
    data: bytes


class _TensorRecord(NamedTuple):
    storage: object
    offset: object
    size: object
    stride: object


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> _TensorRecord:
    return _TensorRecord(storage, offset, size, stride)


def _rebuild_parameter(data, *_unused):
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


def load_state_dict(path: Path) -> object:
    """What torch.save wrote to `path`, its tensors as NumPy arrays (see BFloat16Bits)."""
    try:
        with zipfile.ZipFile(path) as archive:
            root = _unpickle(archive)
        return _with_arrays(root, "", TENSOR_DEPTH)
    except CheckpointError as error:
        raise CheckpointError(f"cannot read {path.name}: {error}") from None
    except ZIP_ERRORS as error:
        raise CheckpointError(f"cannot read {path.name}: {error}") from error


def _unpickle(archive: zipfile.ZipFile) -> object:
    pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
    if len(pickles) != 1:
        raise CheckpointError("not a torch.save archive (no single data.pkl)")
    prefix = pickles[0][: -len("/data.pkl")]
    byteorder = f"{prefix}/byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
        raise CheckpointError("big-endian checkpoints are not supported")
    data = archive.read(pickles[0])
    _check_memo_indices(data)
    unpickler = _StateDictUnpickler(io.BytesIO(data), archive, prefix)
    try:
        return unpickler.load()
    except CheckpointError:
        raise
    except Exception as error:  # a malformed pickle can make the unpickler raise nearly anything
        raise CheckpointError(f"malformed data.pkl ({type(error).__name__}: {error})") from error


def _check_memo_indices(data: bytes) -> None:
    """Refuse memo indices past the pickle's length: the C unpickler sizes its memo by them.

    A 10-byte pickle that stores to memo index 2**31 makes it allocate gigabytes.
    """
    try:
        opcodes = list(pickletools.genops(data))
    except ValueError as error:  # genops' word for a malformed pickle
        raise CheckpointError(f"malformed data.pkl ({error})") from error
    for opcode, argument, position in opcodes:
        if "PUT" in opcode.name and argument > position:
            raise CheckpointError(f"malformed data.pkl (memo index {argument} at byte {position})")


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"unsupported tensor type torch.{printable(name)}")
        raise CheckpointError(
            f"not a plain tensor checkpoint (it references "
            f"{printable(f'{module}.{name}')}); refusing to run code from it"
        )

    def persistent_load(self, saved_id) -> _Storage:
        if not (type(saved_id) is tuple and len(saved_id) == 5 and saved_id[0] == "storage"):
            raise CheckpointError("a persistent id in data.pkl is not a storage reference")
        _kind, storage_type, key, _location, numel = saved_id
        if type(storage_type) is not _StorageType:
            raise CheckpointError(f"a storage has no known type ({type(storage_type).__name__})")
        if type(key) is not str:
            raise CheckpointError(f"a storage key is of type {type(key).__name__}, not text")
        numel = _natural(numel, f"the element count of storage {printable(key)}")
        if key not in self.storages:
            self.storages[key] = self._read_storage(key, storage_type.name, numel)
        storage = self.storages[key]
        if (storage.dtype_name, len(storage.data)) != (
            storage_type.name,
            _nbytes(storage_type.name, numel),
        ):
            raise CheckpointError(f"storage {printable(key)} is declared twice, differently")
        return storage

    def _read_storage(self, key: str, dtype_name: str, numel: int) -> _Storage:
        record = f"{self.prefix}/data/{key}"
        try:
            data = self.archive.read(record)
        except KeyError:
            raise CheckpointError(f"the storage record {printable(record)} is missing") from None
        except ZIP_ERRORS as error:
            raise CheckpointError(f"the storage record {printable(record)}: {error}") from error
        if len(data) != _nbytes(dtype_name, numel):
            raise CheckpointError(
                f"the storage record {printable(record)} holds {len(data)} bytes, not the "
                f"{numel} × {_itemsize(dtype_name)} of a {numel}-element {dtype_name}"
            )
        return _Storage(key, dtype_name, data)


def _with_arrays(value: object, name: str, depth: int) -> object:
    """`value` with each tensor record in it, down to `depth` dicts deep, made an array."""
    if type(value) is _TensorRecord:
        return _array(value, name)
    if isinstance(value, dict) and depth > 0:
        return {
            key: _with_arrays(item, printable(key) if type(key) is str else "?", depth - 1)
            for key, item in value.items()
        }
    return value


def _array(record: _TensorRecord, name: str) -> np.ndarray:
    """The tensor's elements, copied out of its storage once its extent is known to lie inside."""
    if type(record.storage) is not _Storage:
        raise CheckpointError(f"tensor {name} has a {type(record.storage).__name__} for storage")
    storage = record.storage
    offset = _natural(record.offset, f"the storage offset of tensor {name}")
    sizes = _naturals(record.size, "size", name)
    strides = _naturals(record.stride, "stride", name)
    if len(sizes) != len(strides):
        raise CheckpointError(f"tensor {name} has {len(sizes)} sizes but {len(strides)} strides")
    dtype = np.dtype(STORAGE_DTYPES[storage.dtype_name])
    if math.prod(size for size in sizes if size) * dtype.itemsize >= INT64_END:
        raise CheckpointError(f"tensor {name} is too large: sizes {sizes}")
    array = _elements(storage, dtype, offset, sizes, strides, name)
    return array.view(BFloat16Bits) if storage.dtype_name == "BFloat16Storage" else array


def _elements(
    storage: _Storage, dtype: np.dtype, offset: int, sizes: tuple, strides: tuple, name: str
) -> np.ndarray:
    if 0 in sizes:
        return np.empty(sizes, dtype)
    available = len(storage.data) // dtype.itemsize
    if math.prod(sizes) > available:
        # Only repeated elements (stride 0) get there; reading them would multiply the file's size.
        raise CheckpointError(
            f"tensor {name} has {math.prod(sizes)} elements, more than the "
            f"{available} of its storage"
        )
    last = offset + sum((size - 1) * stride for size, stride in zip(sizes, strides))
    if last >= available:
        raise CheckpointError(
            f"tensor {name} reaches element {last} of a storage of "
            f"{available} (offset {offset}, sizes {sizes}, strides {strides})"
        )
    # A size-1 dimension never steps, so its stride (which may be anything) is not passed on.
    byte_strides = [
        stride * dtype.itemsize if size > 1 else 0 for size, stride in zip(sizes, strides)
    ]
    return np.ndarray(
        sizes, dtype, buffer=storage.data, offset=offset * dtype.itemsize, strides=byte_strides
    ).copy()


def _natural(value: object, what: str) -> int:
    if type(value) is not int or not 0 <= value < INT64_END:
        raise CheckpointError(f"{what} is {_described(value)}, not an integer in [0, 2**63)")
    return value


def _naturals(values: object, kind: str, name: str) -> tuple:
    """A tensor's sizes or strides (`kind`), each checked."""
    if type(values) not in (tuple, list):
        raise CheckpointError(
            f"the {kind}s of tensor {name} are a {type(values).__name__}, not a tuple"
        )
    if len(values) > MAX_DIMENSIONS:
        raise CheckpointError(
            f"tensor {name} has {len(values)} {kind}s, more than the "
            f"{MAX_DIMENSIONS} dimensions an array may have"
        )
    return tuple(_natural(value, f"a {kind} of tensor {name}") for value in values)


def _nbytes(dtype_name: str, numel: int) -> int:
    return numel * _itemsize(dtype_name)


def _itemsize(dtype_name: str) -> int:
    return np.dtype(STORAGE_DTYPES[dtype_name]).itemsize


def _described(value: object) -> str:
    if type(value) is int and abs(value) < 2**64:
        return str(value)
    return f"a {'huge ' if type(value) is int else ''}{type(value).__name__}"


def printable(text: str) -> str:
    """`text` fit for a one-line message, quoted if it holds line breaks or the like."""
    return text if text.isprintable() else ascii(text)
