"""SPEC's checkpoint contract in plain Python: config keys, tensor names and shapes, the
conv1d weight layout, weight files.

Shared by the model, the loader, the converter and the PyTorch reference; imports neither
torch nor mlx.
"""

import json
import os
from pathlib import Path
from typing import Literal

MODEL_TYPE = "factorization_memory"
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_slots")
# The same defaults as mlx_fm's ModelArgs; top_k None means dense (k = m).
DEFAULTS = {
    "expand": 2,
    "top_k": None,
    "router_temperature": 1.0,
    "conv_kernel": 4,
    "intermediate_size": 0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
POSITIVE_INTEGERS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_heads",
    "num_slots",
    "expand",
    "top_k",
)
NON_NEGATIVE_INTEGERS = ("conv_kernel", "intermediate_size")
POSITIVE_NUMBERS = ("router_temperature", "rms_norm_eps")


class CheckpointError(ValueError):
    """A checkpoint that does not follow SPEC's contract; the message says where."""


def model_settings(config: dict) -> dict:
    """SPEC's config keys, defaults filled in and every value checked."""
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(
            f"unsupported model_type {config.get('model_type')!r} (expected {MODEL_TYPE!r})"
        )
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    settings = {key: config[key] for key in REQUIRED_KEYS}
    settings |= {key: config.get(key, default) for key, default in DEFAULTS.items()}
    if settings["top_k"] is None:
        settings["top_k"] = settings["num_slots"]
    _check_values(settings)
    return settings


def _check_values(settings: dict) -> None:
    def is_integer(value):
        return isinstance(value, int) and not isinstance(value, bool)

    for key in POSITIVE_INTEGERS:
        if not is_integer(settings[key]) or settings[key] < 1:
            raise CheckpointError(f"{key} must be a positive integer, got {settings[key]!r}")
    for key in NON_NEGATIVE_INTEGERS:
        if not is_integer(settings[key]) or settings[key] < 0:
            raise CheckpointError(f"{key} must be a non-negative integer, got {settings[key]!r}")
    for key in POSITIVE_NUMBERS:
        value = settings[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise CheckpointError(f"{key} must be a positive number, got {value!r}")
    if not isinstance(settings["tie_word_embeddings"], bool):
        raise CheckpointError(
            f"tie_word_embeddings must be true or false, got {settings['tie_word_embeddings']!r}"
        )
    if settings["top_k"] > settings["num_slots"]:
        raise CheckpointError(
            f"top_k ({settings['top_k']}) must not exceed num_slots ({settings['num_slots']})"
        )
    inner = settings["expand"] * settings["hidden_size"]
    if inner % settings["num_heads"]:
        raise CheckpointError(
            f"num_heads ({settings['num_heads']}) must divide expand*hidden_size ({inner})"
        )


def tensor_shapes(settings: dict) -> dict:
    """Every tensor name of SPEC's PyTorch layout and its shape."""
    dim, vocab = settings["hidden_size"], settings["vocab_size"]
    inner, heads = settings["expand"] * dim, settings["num_heads"]
    kernel, hidden = settings["conv_kernel"], settings["intermediate_size"]
    shapes = {"backbone.embeddings.weight": (vocab, dim), "backbone.norm_f.weight": (dim,)}
    for layer in range(settings["num_hidden_layers"]):
        prefix = f"backbone.layers.{layer}."
        shapes[prefix + "norm.weight"] = (dim,)
        shapes[prefix + "mixer.in_proj.weight"] = (
            2 * inner + heads * settings["num_slots"] + 2 * heads,
            dim,
        )
        if kernel > 0:
            shapes[prefix + "mixer.conv1d.weight"] = (inner, 1, kernel)
            shapes[prefix + "mixer.conv1d.bias"] = (inner,)
        shapes[prefix + "mixer.eta_bias"] = (heads,)
        shapes[prefix + "mixer.mu_bias"] = (heads,)
        shapes[prefix + "mixer.norm.weight"] = (inner,)
        shapes[prefix + "mixer.out_proj.weight"] = (dim, inner)
        if hidden > 0:
            shapes[prefix + "mlp_norm.weight"] = (dim,)
            shapes[prefix + "mlp.gate_proj.weight"] = (hidden, dim)
            shapes[prefix + "mlp.up_proj.weight"] = (hidden, dim)
            shapes[prefix + "mlp.down_proj.weight"] = (dim, hidden)
    if not settings["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, dim)
    return shapes


# conv1d weights are E×1×K in SPEC's PyTorch layout and E×K×1 in MLX's.
ConvLayout = Literal["pytorch", "mlx"]
_KERNEL_AXIS = {"pytorch": 2, "mlx": 1}


def with_conv_layout(weights: dict, layout: ConvLayout) -> dict:
    """`weights` (torch, mlx or numpy arrays) with every conv1d weight in `layout`; one
    already in it, or not E×1×K nor E×K×1, is left as it is."""
    kernel_axis = _KERNEL_AXIS[layout]
    unit_axis = 3 - kernel_axis

    def in_layout(name: str, value):
        swapped = (
            name.endswith("conv1d.weight")
            and value.ndim == 3
            and value.shape[kernel_axis] == 1
            and value.shape[unit_axis] != 1
        )
        return value.swapaxes(1, 2) if swapped else value

    return {name: in_layout(name, value) for name, value in weights.items()}


def read_config(directory: Path) -> dict:
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"no config.json in {directory}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_file} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object")
    return config


# Sharded checkpoints: the index names the shards. Single files, in order of preference.
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def weight_files(directory: Path) -> list:
    """The files that hold the weights of the checkpoint in `directory`."""
    directory = Path(directory)
    for index_name in INDEX_FILES:
        if (directory / index_name).is_file():
            return _indexed_files(directory, directory / index_name)
    for name in SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    checkpoints = sorted(directory.glob("*.pt"))
    if len(checkpoints) == 1:
        return checkpoints
    if checkpoints:
        names = ", ".join(path.name for path in checkpoints)
        raise CheckpointError(f"several .pt files in {directory} ({names}); keep one")
    raise CheckpointError(
        f"no weights in {directory} (model.safetensors, a sharded index, "
        "pytorch_model.bin or a .pt file)"
    )


def _indexed_files(directory: Path, index_file: Path) -> list:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{index_file.name} is not a valid index: {error}") from error
    # Lexical, not resolved: a Hugging Face cache links every file to a blob elsewhere.
    root = Path(os.path.normpath(directory.absolute()))
    files = []
    for name in names:
        path = Path(os.path.normpath(root / str(name)))
        if not path.is_relative_to(root) or path == root:
            raise CheckpointError(
                f"{index_file.name} names {name!r}, outside the checkpoint directory"
            )
        if not path.is_file():
            raise CheckpointError(f"{index_file.name} names {name!r}, which is missing")
        files.append(path)
    return files


def split_into_shards(weights: dict, max_shard_bytes) -> list:
    """Consecutive groups of tensors of at most `max_shard_bytes` each (None: one group);
    a larger tensor gets a group of its own."""
    shards, size = [{}], 0
    for name, tensor in weights.items():
        if max_shard_bytes is not None and shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += tensor.nbytes
    return shards


def shard_file_names(stem: str, suffix: str, count: int) -> list:
    """Hugging Face's names: model.safetensors, or model-00001-of-00002.safetensors, …"""
    if count == 1:
        return [stem + suffix]
    return [f"{stem}-{i:05d}-of-{count:05d}{suffix}" for i in range(1, count + 1)]


def shard_index(shards: list, names: list) -> dict:
    """The index (model.safetensors.index.json) of sharded weights."""
    total_size = sum(tensor.nbytes for shard in shards for tensor in shard.values())
    weight_map = {key: name for shard, name in zip(shards, names) for key in shard}
    return {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}


def check_tensor_names_and_shapes(shapes: dict, expected: dict) -> None:
    """Raise naming the missing, unexpected and misshapen tensors, if any."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshapen = [
        f"{name} is {tuple(shapes[name])}, expected {expected[name]}"
        for name in sorted(set(shapes) & set(expected))
        if tuple(shapes[name]) != expected[name]
    ]
    problems = []
    if missing:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected tensors: " + ", ".join(unexpected))
    if misshapen:
        problems.append("misshapen tensors: " + "; ".join(misshapen))
    if problems:
        raise CheckpointError("; ".join(problems))
