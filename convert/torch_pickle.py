"""Read a PyTorch state dict (torch.save's zip format) without torch and without running its pickle.

The unpickler resolves only the few names a state dict of tensors needs
(tensor rebuilding, storage types, OrderedDict) and refuses every other one, so a
malicious checkpoint cannot run code. Tensors come back as NumPy arrays; bfloat16
ones as their raw uint16 bits, marked by `BFloat16Bits`.
"""

import collections
import pickle
import zipfile
from pathlib import Path

import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class BFloat16Bits(np.ndarray):
    """A uint16 array that holds the bits of a bfloat16 tensor."""


class _StorageType:
    def __init__(self, name: str):
        self.name = name


def _rebuild_tensor(storage, offset, size, stride, *_unused):
    array = storage[offset:]
    strides = [step * array.itemsize for step in stride]
    tensor = np.lib.stride_tricks.as_strided(array, shape=size, strides=strides).copy()
    return tensor.view(BFloat16Bits) if isinstance(storage, BFloat16Bits) else tensor


def _rebuild_parameter(data, *_unused):
    return data


ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint")

    def persistent_load(self, saved_id):
        kind, storage_type, key, _location, _size = saved_id
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage {saved_id!r}")
        data = self.archive.read(f"{self.prefix}/data/{key}")
        array = np.frombuffer(data, dtype=STORAGE_DTYPES[storage_type.name])
        return array.view(BFloat16Bits) if storage_type.name == "BFloat16Storage" else array


def load_state_dict(path: Path) -> dict:
    """The tensors of a torch.save zip archive, as NumPy arrays (see BFloat16Bits)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise pickle.UnpicklingError("not a torch.save archive (no single data.pkl)")
        prefix = pickles[0][: -len("/data.pkl")]
        byteorder = f"{prefix}/byteorder"
        if byteorder in archive.namelist() and archive.read(byteorder) != b"little":
            raise pickle.UnpicklingError("big-endian checkpoints are not supported")
        with archive.open(pickles[0]) as file:
            return _StateDictUnpickler(file, archive, prefix).load()
