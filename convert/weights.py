"""Read checkpoint weight files into MLX arrays, never running code from them.

safetensors go through mx.load (no torch needed). .bin / .pt files go through
torch.load(weights_only=True) when torch is installed, else through the
restricted unpickler of torch_pickle. A file either reads or fails with one line
of CheckpointError.
"""

import pickle
import zipfile
from pathlib import Path

from mlx_fm.layout import CheckpointError

import mlx.core as mx
import numpy as np

from . import torch_pickle
from .torch_pickle import printable

# Wrappers that training scripts put around the state dict in a .pt file.
STATE_DICT_KEYS = ("state_dict", "model")


def read_weights(files: list, use_torch: bool = True) -> dict:
    """All tensors of the given files by name; a name found in two files is an error."""
    weights = {}
    for file in files:
        for name, array in _read_file(Path(file), use_torch).items():
            if name in weights:
                raise CheckpointError(f"tensor {name} appears in more than one weight file")
            weights[name] = array
    return weights


def _read_file(file: Path, use_torch: bool) -> dict:
    try:
        if file.suffix == ".safetensors":
            weights = mx.load(str(file))
        else:
            weights = _tensors_by_name(_read_pickled(file, use_torch), file)
        mx.eval(weights)  # reading is lazy: a truncated file must fail here
    except CheckpointError:
        raise
    except (
        RuntimeError,
        ValueError,
        OverflowError,
        OSError,
        EOFError,
        KeyError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
    ) as error:
        raise CheckpointError(f"cannot read {file.name}: {error}") from error
    return weights


def _read_pickled(file: Path, use_torch: bool) -> object:
    if use_torch:
        try:
            import torch
        except ImportError:
            use_torch = False
    if not use_torch:
        return torch_pickle.load_state_dict(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a crafted file makes torch raise nearly anything, in many lines
        torch_pickle.load_state_dict(file)  # names what is wrong in one line, where it sees it
        raise CheckpointError(f"cannot read {file.name}: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _tensors_by_name(state: object, file: Path) -> dict:
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in STATE_DICT_KEYS:
        state = next(iter(state.values()))
    if not isinstance(state, dict):
        raise CheckpointError(f"{file.name} does not hold a state dict of tensors")
    weights = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{file.name} has a {type(name).__name__} for a tensor name")
        weights[name] = _to_mlx(value, printable(name), file)
    return weights


def _to_mlx(value, name: str, file: Path) -> mx.array:
    if isinstance(value, torch_pickle.BFloat16Bits):
        return mx.array(np.asarray(value, dtype=np.uint16)).view(mx.bfloat16)
    if isinstance(value, np.ndarray):
        return mx.array(value)
    if type(value).__module__.startswith("torch") and hasattr(value, "numpy"):
        return _torch_to_mlx(value, name, file)
    raise CheckpointError(f"{file.name}: {name} is a {type(value).__name__}, not a tensor")


def _torch_to_mlx(tensor, name: str, file: Path) -> mx.array:
    import torch

    if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
        # Only repeated elements (stride 0) get there; copying them would multiply the file's size.
        raise CheckpointError(f"{file.name}: tensor {name} has more elements than its storage")
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.view(torch.int16).numpy()).view(mx.bfloat16)
    return mx.array(tensor.numpy())
