"""Loading and saving FM models in the MLX format (config.json + safetensors)."""

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from mlx_fm_convert.layout import (
    CheckpointError, read_config, shard_file_names, shard_index, split_into_shards,
)

from .models.factorization_memory import MODEL_TYPE, Model, ModelArgs

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # as mlx-lm


class ModelLoadError(ValueError):
    """A model path or checkpoint that cannot be loaded; the message says why."""


def get_model_classes(config: dict):
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ModelLoadError(
            f"unsupported model_type {model_type!r} (expected {MODEL_TYPE!r})"
        )
    return Model, ModelArgs


MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
# The small model trained on public-domain books by examples/build_default_model.py.
DEFAULT_MODEL_PATH = Path(__file__).parent / "default_model"


def resolve_model_path(path_or_hf_repo: Union[str, Path, None], revision=None,
                       allow_patterns=MODEL_FILES) -> Path:
    """A local directory, a Hugging Face repo id downloaded to the local cache, or (None)
    the bundled default model."""
    if path_or_hf_repo is None:
        if not DEFAULT_MODEL_PATH.is_dir():
            raise ModelLoadError(f"the bundled default model is missing ({DEFAULT_MODEL_PATH}): "
                                 "give a model path, or build it with "
                                 "examples/build_default_model.py")
        return DEFAULT_MODEL_PATH
    path = Path(path_or_hf_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hf_repo)
    looks_like_repo = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_repo:
        raise ModelLoadError(f"model path not found: {text}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:  # the hub raises many kinds; one line is what users need
        raise ModelLoadError(f"cannot fetch model {text!r}: {error}") from error


def _checked_config(path: Path) -> None:
    try:
        get_model_classes(read_config(path))
    except CheckpointError as error:
        raise ModelLoadError(str(error)) from error
    if not any(path.glob("model*.safetensors")):
        raise ModelLoadError(f"no model*.safetensors weights in {path}")


def load_model(path_or_hf_repo=None, lazy: bool = False, strict: bool = True,
               model_config: Optional[dict] = None, revision=None) -> Model:
    """The model alone (no tokenizer needed). Never runs code from the checkpoint."""
    return _load(path_or_hf_repo, lazy, strict, model_config, revision)[0]


def _load(path_or_hf_repo, lazy=False, strict=True, model_config=None, revision=None):
    path = resolve_model_path(path_or_hf_repo, revision)
    _checked_config(path)
    try:
        model, config = _mlx_lm_load_model(
            path, lazy=lazy, strict=strict, model_config=model_config,
            get_model_classes=get_model_classes,
        )
    except ModelLoadError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load model from {path}: {error}") from error
    return model, config, path


def load(path_or_hf_repo=None, tokenizer_config: Optional[dict] = None,
         model_config: Optional[dict] = None, adapter_path: Optional[str] = None,
         lazy: bool = False, return_config: bool = False, revision=None):
    """(model, tokenizer) from a local directory, a Hugging Face repo id or (None) the bundled
    default model."""
    model, config, path = _load(path_or_hf_repo, lazy, True, model_config, revision)
    if adapter_path is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, adapter_path)
        model.eval()
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # it warns that it does not know model_type
    try:
        tokenizer = load_tokenizer(
            path, tokenizer_config, eos_token_ids=config.get("eos_token_id")
        )
    except Exception as error:  # transformers raises many kinds
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {error}") from error
    finally:
        transformers_logging.set_verbosity(verbosity)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def save_model(path: Union[str, Path], model: Model, tokenizer=None,
               extra_config: Optional[dict] = None,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write config.json, the safetensors (and the tokenizer) to `path`, atomically."""
    path = Path(path)
    with written_atomically(path) as staging:
        write_model(staging, model, tokenizer, extra_config, max_shard_bytes)
    return path


def write_model(directory: Path, model: Model, tokenizer=None,
                extra_config: Optional[dict] = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """The files of `save_model`, into an existing directory."""
    write_safetensors(directory, dict(tree_flatten(model.parameters())), "mlx", max_shard_bytes)
    config = model_config(model.args) | (extra_config or {})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def model_config(args) -> dict:
    """The args as config.json holds them: unset options (None by default) left out, as
    transformers rejects a null where it expects a number (e.g. a llama's max_position_embeddings)."""
    unset = {f.name for f in dataclasses.fields(args) if f.default is None}
    return {key: value for key, value in dataclasses.asdict(args).items()
            if not (value is None and key in unset)}


@contextlib.contextmanager
def written_atomically(destination: Path):
    """A staging directory next to `destination`, renamed to it when the block succeeds."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        yield staging
        if destination.exists() or destination.is_symlink():
            _replace(staging, destination)
        else:
            os.replace(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def written_file_atomically(destination, suffix: str = ""):
    """A temporary file (mode 0644) next to `destination`, renamed to it when the block succeeds."""
    destination = Path(destination)
    handle, staging = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.",
                                       suffix=suffix)
    os.close(handle)
    os.chmod(staging, 0o644)  # mkstemp's 0600 is for secrets
    try:
        yield Path(staging)
        os.replace(staging, destination)
    finally:
        Path(staging).unlink(missing_ok=True)


def _replace(staging: Path, destination: Path) -> None:
    """Move the old destination aside, put the new one in place, then delete the old."""
    retired = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old.", dir=destination.parent))
    aside = retired / destination.name
    os.replace(destination, aside)
    os.replace(staging, destination)
    shutil.rmtree(retired)


def write_safetensors(directory: Path, weights: dict, format_tag: str,
                      max_shard_bytes: int) -> None:
    """model.safetensors, or shards, and model.safetensors.index.json (as mlx-lm writes)."""
    shards = split_into_shards(weights, max_shard_bytes)
    names = shard_file_names("model", ".safetensors", len(shards))
    for shard, name in zip(shards, names):
        mx.save_safetensors(str(directory / name), shard, metadata={"format": format_tag})
    index = shard_index(shards, names)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))
