"""The torch-free .bin reader (mlx_fm_convert.torch_pickle) against crafted checkpoints.

Each crafted file must give either one line of CheckpointError naming the file,
or exactly the tensors torch itself reads from the same bytes: never a crash,
another exception, or bytes from outside a tensor's storage.
"""

import collections
import io
import pickle
import random
import re
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from mlx_fm.layout import CheckpointError

import mlx.core as mx
import numpy as np
import pytest

from mlx_fm_convert.weights import read_weights

PREFIX = "archive"
# No DoubleStorage: MLX makes float64 float32, so its bits could not match torch's.
STORAGE_NAMES = (
    "FloatStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "ByteStorage",
    "BoolStorage",
)
FOREIGN_STORAGE_NAMES = ("ComplexFloatStorage", "QInt8Storage", "UntypedStorage", "NoStorage")
ODD_NUMBERS = (
    -1,
    -(2**63),
    2**31,
    2**32,
    2**62,
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    1.0,
    1.5,
    "1",
    None,
    True,
    (1,),
)
CASES = {  # mutation kind: how many cases
    "entries": 1000,
    "storage_lengths": 400,
    "pickle_bytes": 800,
    "file_bytes": 500,
    "file_truncation": 300,
}
UNSIGNED_OF_SIZE = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}


# A checkpoint as data: what data.pkl says of each tensor, and the storage records.


@dataclass(frozen=True)
class Entry:
    """One tensor of data.pkl: its storage reference and _rebuild_tensor_v2's arguments."""

    dtype_name: object
    key: object
    numel: object
    offset: object
    size: object
    stride: object


@dataclass(frozen=True)
class Checkpoint:
    entries: dict  # tensor name -> Entry
    records: dict  # storage key -> bytes


def archive_bytes(checkpoint: Checkpoint, data_pkl: bytes = None) -> bytes:
    """The checkpoint as torch.save lays it out (its data.pkl replaced by `data_pkl` if given)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{PREFIX}/data.pkl", data_pkl or pickled(checkpoint.entries))
        archive.writestr(f"{PREFIX}/byteorder", "little")
        for key, data in checkpoint.records.items():
            archive.writestr(f"{PREFIX}/data/{key}", data)
        archive.writestr(f"{PREFIX}/version", "3\n")
    return buffer.getvalue()


def pickled(entries: dict) -> bytes:
    """data.pkl for `entries`, opcode for opcode as torch.save writes it (less the memo gets)."""
    parts = [b"\x80\x02}("]
    for name, entry in entries.items():
        parts += [
            _value(name),
            _global("torch._utils", "_rebuild_tensor_v2"),
            b"((",
            _value("storage"),
            _global("torch", entry.dtype_name),
            _value(entry.key),
            _value("cpu"),
            _value(entry.numel),
            b"tQ",
            _value(entry.offset),
            _value(entry.size),
            _value(entry.stride),
            b"\x89",
            _global("collections", "OrderedDict"),
            b")RtR",
        ]
    return b"".join(parts) + b"u."


def _value(value: object) -> bytes:
    return pickle.dumps(value, protocol=2)[2:-1]  # without PROTO and STOP


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


class _EntryRecorder(pickle.Unpickler):
    """Reads torch.save's data.pkl into Entries (test-side; the files are our own)."""

    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *_: Entry(*storage, offset, size, stride)
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        assert module == "torch", (module, name)
        return name

    def persistent_load(self, saved_id):
        _kind, dtype_name, key, _location, numel = saved_id
        return dtype_name, key, numel


def checkpoint_from_torch_save(data: bytes) -> Checkpoint:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = _EntryRecorder(io.BytesIO(archive.read(f"{PREFIX}/data.pkl"))).load()
        records = {
            entry.key: archive.read(f"{PREFIX}/data/{entry.key}") for entry in entries.values()
        }
    return Checkpoint(dict(entries), records)


def tiny_checkpoint(dtype_name="FloatStorage", data=bytes(range(24)), **entry) -> bytes:
    """One tensor "w" on a 24-byte storage, by default a contiguous 2×3 float32."""
    numel = len(data) // {"HalfStorage": 2, "LongStorage": 8}.get(dtype_name, 4)
    entry = (
        dict(dtype_name=dtype_name, key="0", numel=numel, offset=0, size=(2, 3), stride=(3, 1))
        | entry
    )
    return archive_bytes(Checkpoint({"w": Entry(**entry)}, {"0": data}))


# Reading, and comparing what was read bit for bit.


def raw_mlx(array: mx.array) -> tuple:
    bits = np.array(array.view(UNSIGNED_OF_SIZE[array.dtype.size]))
    return str(array.dtype).removeprefix("mlx.core."), tuple(array.shape), bits.tobytes()


def raw_torch(tensor) -> tuple:
    import torch

    tensor = tensor.detach().contiguous()
    bits = tensor.reshape(-1).view(torch.uint8).numpy()
    return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), bits.tobytes()


def read_by_torch(data: bytes):
    """{name: raw tensor} as torch reads `data`; None if torch refuses it or finds no tensors."""
    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # torch refusing it in any way leaves us free to refuse it too
        return None
    tensors = isinstance(state, dict) and all(
        isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state.items()
    )
    if not tensors:
        return None
    return {name: raw_torch(tensor) for name, tensor in state.items()}


def read_raw(path: Path, use_torch: bool):
    """{name: raw array} as read_weights reads the file, or its one-line CheckpointError."""
    try:
        return {name: raw_mlx(array) for name, array in read_weights([path], use_torch).items()}
    except CheckpointError as error:
        message = str(error)
        assert len(message.splitlines()) == 1 and path.name in message, message
        return error


def refusal(tmp_path: Path, data: bytes) -> str:
    path = tmp_path / "crafted.bin"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as error:
        read_weights([path], use_torch=False)
    message = str(error.value)
    assert message.startswith("cannot read crafted.bin: ") and "\n" not in message
    return message


# The checks, one by one (no torch needed).


def test_a_valid_tiny_checkpoint_reads(tmp_path):
    path = tmp_path / "w.bin"
    path.write_bytes(tiny_checkpoint(offset=1, size=(2, 2), stride=(1, 2)))
    array = read_weights([path], use_torch=False)["w"]
    elements = np.frombuffer(bytes(range(24)), np.float32)
    assert np.array_equal(np.array(array), elements[[[1, 3], [2, 4]]])  # offset 1, transposed


@pytest.mark.parametrize(
    "entry,message",
    [
        (dict(stride=(3, -1)), r"a stride of tensor w is -1, not an integer in \[0, 2\*\*63\)"),
        (dict(size=(2, -3)), "a size of tensor w is -3"),
        (dict(offset=-1), "the storage offset of tensor w is -1"),
        (dict(size=(2, 1.5)), "a size of tensor w is a float, not an integer"),
        (dict(stride=(3, True)), "a stride of tensor w is a bool"),
        (
            dict(offset=2**63),
            "the storage offset of tensor w is 9223372036854775808, not an integer",
        ),
        (dict(size=(2, 10**30)), "a size of tensor w is a huge int"),
        (dict(size="2x3"), "the sizes of tensor w are a str, not a tuple"),
        (dict(offset=1), r"tensor w reaches element 6 of a storage of 6 \(offset 1"),
        (dict(offset=6, size=(), stride=()), "tensor w reaches element 6 of a storage of 6"),
        (dict(stride=(4, 1)), "tensor w reaches element 6 of a storage of 6"),
        # (3 - 1) × 2**62 + 1 wraps to a small int64: only exact arithmetic sees it is past the end.
        (dict(size=(3, 2), stride=(2**62, 1)), "tensor w reaches element 9223372036854775809 of"),
        (dict(size=(2**40, 2**40), stride=(0, 0)), r"tensor w is too large: sizes \(1099511627776"),
        (dict(size=(10**6,), stride=(0,)), "tensor w has 1000000 elements, more than the 6 of its"),
        (dict(size=(0, 2**62), stride=(1, 1), dtype_name="LongStorage"), "tensor w is too large"),
        (dict(size=(0, 2**32), stride=(1, 1)), "MLX currently uses 32-bit integers for shape"),
        (dict(size=(1,) * 65, stride=(1,) * 65), "tensor w has 65 sizes, more than the 64"),
        (dict(stride=(3, 1, 1)), "tensor w has 2 sizes but 3 strides"),
        (dict(numel=5), r"holds 24 bytes, not the 5 × 4 of a 5-element FloatStorage"),
        (dict(numel=-6), "the element count of storage 0 is -6"),
        (dict(key="7"), "the storage record archive/data/7 is missing"),
        (dict(key=0), "a storage key is of type int, not text"),
        (
            dict(dtype_name="ComplexFloatStorage"),
            "unsupported tensor type torch.ComplexFloatStorage",
        ),
        (
            dict(dtype_name="LongStorage", numel=3, data=bytes(range(23))),
            "holds 23 bytes, not the 3 × 8",
        ),
    ],
)
def test_each_bad_tensor_is_refused_with_its_reason(tmp_path, entry, message):
    assert re.search(message, refusal(tmp_path, tiny_checkpoint(**entry)))


def test_torch_reading_a_tensor_larger_than_its_storage_is_refused(tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "crafted.bin"
    path.write_bytes(tiny_checkpoint(size=(10**6,), stride=(0,)))
    with pytest.raises(CheckpointError, match="tensor w has more elements than its storage"):
        read_weights([path], use_torch=True)


def test_a_storage_declared_with_two_types_is_refused(tmp_path):
    entry = Entry("FloatStorage", "0", 6, 0, (6,), (1,))
    entries = {"a": entry, "b": replace(entry, dtype_name="IntStorage")}
    data = archive_bytes(Checkpoint(entries, {"0": bytes(24)}))
    assert "storage 0 is declared twice, differently" in refusal(tmp_path, data)


def test_a_huge_memo_index_is_refused_before_the_unpickler_allocates_for_it(tmp_path):
    data_pkl = b"\x80\x02}r\x00\x00\x00\x7f."  # an empty dict stored at memo index 2**31 - 2**24
    data = archive_bytes(Checkpoint({}, {}), data_pkl)
    assert "malformed data.pkl (memo index 2130706432 at byte 3)" in refusal(tmp_path, data)


def test_code_in_the_pickle_is_refused(tmp_path):
    data_pkl = b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R."
    message = refusal(tmp_path, archive_bytes(Checkpoint({}, {}), data_pkl))
    assert message.endswith(
        "not a plain tensor checkpoint (it references posix.system); refusing to run code from it"
    )


def test_an_archive_without_data_pkl_is_refused(tmp_path):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data/0", bytes(8))
    assert "not a torch.save archive" in refusal(tmp_path, buffer.getvalue())


# The fuzz: torch.save's own files, mutated.


def base_tensors() -> dict:
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    shared = torch.arange(12, dtype=torch.float32)
    return {
        "float32": torch.randn(3, 4),
        "transposed": torch.randn(4, 3).t(),
        "float16": torch.randn(2, 3).half(),
        "bfloat16": torch.randn(5).bfloat16(),
        "int64": torch.arange(-3, 3).view(2, 3),
        "offset_view": torch.randn(4, 3)[1:, 1:],
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 3),
        "shared_rows": shared.view(3, 4)[1:],
        "shared_column": shared.view(3, 4)[:, 2],
    }


@pytest.fixture(scope="module")
def torch_saved() -> bytes:
    torch = pytest.importorskip("torch")
    buffer = io.BytesIO()
    torch.save(base_tensors(), buffer)
    return buffer.getvalue()


def mutated_entries(rng: random.Random, checkpoint: Checkpoint) -> bytes:
    entries = dict(checkpoint.entries)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(sorted(entries))
        field = rng.choice(["dtype_name", "key", "numel", "offset", "size", "stride"])
        entries[name] = replace(
            entries[name],
            **{field: mutated_field(rng, field, getattr(entries[name], field), checkpoint)},
        )
    return archive_bytes(replace(checkpoint, entries=entries))


def mutated_field(rng: random.Random, field: str, value: object, checkpoint: Checkpoint):
    if field == "dtype_name":
        return rng.choice(STORAGE_NAMES + FOREIGN_STORAGE_NAMES)
    if field == "key":
        return rng.choice(sorted(checkpoint.records) + ["404", 0, None])
    if field in ("size", "stride"):
        return mutated_tuple(rng, value)
    return mutated_number(rng, value)


def mutated_number(rng: random.Random, value: int):
    return rng.choice(
        [value - 1, value + 1, 2 * value + 1, 0, rng.randint(0, 40), rng.choice(ODD_NUMBERS)]
    )


def mutated_tuple(rng: random.Random, values: tuple):
    values = list(values)
    choice = rng.randrange(6)
    if choice == 0 and values:
        index = rng.randrange(len(values))
        values[index] = mutated_number(rng, values[index])
    elif choice == 1:
        values.insert(rng.randint(0, len(values)), rng.choice([0, 1, 2, rng.randint(0, 12)]))
    elif choice == 2 and values:
        del values[rng.randrange(len(values))]
    elif choice == 3:
        values = [rng.randint(0, 6) for _ in values]
    elif choice == 4:
        return rng.choice([list(values), "12", None, 3, (1,) * 65])
    return tuple(values)


def mutated_storage_lengths(rng: random.Random, checkpoint: Checkpoint) -> bytes:
    key = rng.choice(sorted(checkpoint.records))
    data = checkpoint.records[key]
    length = rng.choice(
        [
            0,
            1,
            len(data) - 1,
            len(data) + 1,
            len(data) - 2,
            len(data) + 4,
            rng.randint(0, 2 * len(data) + 8),
        ]
    )
    resized = data[:length] + rng.randbytes(max(0, length - len(data)))
    return archive_bytes(replace(checkpoint, records=checkpoint.records | {key: resized}))


def mutated_pickle_bytes(rng: random.Random, checkpoint: Checkpoint) -> bytes:
    data_pkl = bytearray(pickled(checkpoint.entries))
    for _ in range(rng.randint(1, 3)):
        position = rng.randrange(len(data_pkl))
        if rng.random() < 0.2:
            data_pkl.insert(position, rng.randrange(256))
        else:
            data_pkl[position] = rng.randrange(256)
    if rng.random() < 0.1:
        del data_pkl[rng.randrange(len(data_pkl)) :]
    return archive_bytes(checkpoint, bytes(data_pkl))


def mutated_file_bytes(rng: random.Random, saved: bytes) -> bytes:
    data = bytearray(saved)
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return bytes(data)


def truncated_file(rng: random.Random, saved: bytes) -> bytes:
    return saved[: rng.randrange(len(saved))]


def crafted(kind: str, index: int, saved: bytes, checkpoint: Checkpoint) -> bytes:
    rng = random.Random(f"{kind}-{index}")
    if kind == "entries":
        return mutated_entries(rng, checkpoint)
    if kind == "storage_lengths":
        return mutated_storage_lengths(rng, checkpoint)
    if kind == "pickle_bytes":
        return mutated_pickle_bytes(rng, checkpoint)
    if kind == "file_bytes":
        return mutated_file_bytes(rng, saved)
    return truncated_file(rng, saved)


def test_our_rewrite_of_a_torch_save_file_reads_as_the_original(tmp_path, torch_saved):
    original = read_by_torch(torch_saved)
    rewritten = archive_bytes(checkpoint_from_torch_save(torch_saved))
    assert read_by_torch(rewritten) == original
    path = tmp_path / "rewritten.bin"
    path.write_bytes(rewritten)
    assert read_raw(path, use_torch=False) == read_raw(path, use_torch=True) == original
    assert original.keys() == base_tensors().keys()


def test_crafted_checkpoints_give_torchs_data_or_one_clean_error(tmp_path, torch_saved):
    checkpoint = checkpoint_from_torch_save(torch_saved)
    original = read_by_torch(torch_saved)
    path = tmp_path / "crafted.bin"
    outcomes = collections.Counter()  # of the torch-free reader
    for kind, count in CASES.items():
        for index in range(count):
            data = crafted(kind, index, torch_saved, checkpoint)
            path.write_bytes(data)
            torchs = read_by_torch(data)
            for use_torch in (False, True):
                ours = read_raw(path, use_torch)
                if isinstance(ours, CheckpointError):
                    outcomes["refused", torchs is None] += not use_torch
                    continue
                # Where torch refuses (a damaged record we never open, say), the file's
                # tensors must still be the untouched ones.
                assert ours == (original if torchs is None else torchs), (kind, index, use_torch)
                outcomes["read", ours == original] += not use_torch
    assert sum(outcomes.values()) == sum(CASES.values())
    assert outcomes["read", False] > 50  # mutated tensors that torch accepts, read as torch does
    assert outcomes["refused", False] < 0.1 * sum(CASES.values())  # few that torch reads refused
