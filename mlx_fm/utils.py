"""Loading and saving FM models in the MLX format (config.json + safetensors)."""

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterable, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import load_model as _mlx_lm_load_model
from mlx_lm.utils import load_tokenizer

from .layout import (
    CheckpointError,
    read_config,
    shard_file_names,
    shard_index,
    split_into_shards,
)
from .models.factorization_memory import MODEL_TYPE, Model, ModelArgs

DEFAULT_MAX_SHARD_BYTES = 5 << 30  # as mlx-lm

# The file a checkpoint's config.json names as `model_file`, which mlx-lm's tools import with
# --trust-remote-code: it takes the architecture from the installed mlx_fm, copying no code.
MODEL_FILE = "factorization_memory.py"
MODEL_FILE_SOURCE = '''"""Factorization Memory for mlx-lm's --trust-remote-code, from mlx_fm."""

try:
    from mlx_fm.models.factorization_memory import Model, ModelArgs  # noqa: F401
except ImportError as error:
    raise ImportError(
        "this Factorization Memory checkpoint needs the mlx_fm package: pip install mlx-fm"
    ) from error
'''


class ModelLoadError(ValueError):
    """A model path or checkpoint that cannot be loaded; the message says why."""


def get_model_classes(config: dict):
    model_type = config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ModelLoadError(f"unsupported model_type {model_type!r} (expected {MODEL_TYPE!r})")
    return Model, ModelArgs


MODEL_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
# The small model trained on public-domain books by examples/build_default_model.py.
DEFAULT_MODEL_PATH = Path(__file__).parent / "default_model"


def resolve_model_path(
    path_or_hf_repo: Union[str, Path, None], revision=None, allow_patterns=MODEL_FILES
) -> Path:
    """A local directory, a Hugging Face repo id downloaded to the local cache, or (None)
    the bundled default model."""
    if path_or_hf_repo is None:
        if not DEFAULT_MODEL_PATH.is_dir():
            raise ModelLoadError(
                f"the bundled default model is missing ({DEFAULT_MODEL_PATH}): "
                "give a model path, or build it with "
                "examples/build_default_model.py"
            )
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
        config = read_config(path)
        get_model_classes(config)
    except CheckpointError as error:
        raise ModelLoadError(str(error)) from error
    if config.get("model_file") not in (None, MODEL_FILE):
        raise ModelLoadError(
            f"{path} names a custom module ({config['model_file']!r}) to build its model: "
            "mlx_fm runs no code from checkpoints"
        )
    if not any(path.glob("model*.safetensors")):
        raise ModelLoadError(f"no model*.safetensors weights in {path}")


def load_model(
    model_path: Union[str, Path, None] = None,
    lazy: bool = False,
    strict: bool = True,
    model_config: Optional[dict] = None,
    *,
    revision: Optional[str] = None,
) -> tuple[Model, dict]:
    """(model, config), as mlx-lm's `load_model`, from a local directory, a Hugging Face repo
    id or (None) the bundled default model; no tokenizer needed. Never runs code from the
    checkpoint."""
    model, config, _ = _load(model_path, lazy, strict, model_config, revision)
    return model, config


def _load(path_or_hf_repo, lazy=False, strict=True, model_config=None, revision=None):
    path = resolve_model_path(path_or_hf_repo, revision)
    _checked_config(path)
    try:
        model, config = _mlx_lm_load_model(
            path,
            lazy=lazy,
            strict=strict,
            # The checkpoint's model file is for mlx-lm's tools: ours is already imported.
            model_config=(model_config or {}) | {"model_file": None},
            get_model_classes=get_model_classes,
        )
    except ModelLoadError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load model from {path}: {error}") from error
    del config["model_file"]
    return model, config, path


# A tokenizer that transformers' AutoTokenizer can open has at least one of these.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def missing_tokenizer(path: Union[str, Path]) -> Optional[str]:
    """What is wrong when `path` holds no tokenizer, and how to add one; None if it has one."""
    if any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    return (
        f"no tokenizer files in {path}: copy the tokenizer's files "
        f"({', '.join(TOKENIZER_FILES)}) into it"
    )


def load(
    path_or_hf_repo=None,
    tokenizer_config: Optional[dict] = None,
    model_config: Optional[dict] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision=None,
):
    """(model, tokenizer) from a local directory, a Hugging Face repo id or (None) the bundled
    default model."""
    model, config, path = _load(path_or_hf_repo, lazy, True, model_config, revision)
    if adapter_path is not None:
        from mlx_lm.tuner.utils import load_adapters

        model = load_adapters(model, adapter_path)
        model.eval()
    if problem := missing_tokenizer(path):
        raise ModelLoadError(problem)
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # it warns that it does not know model_type
    try:
        tokenizer = load_tokenizer(path, tokenizer_config, eos_token_ids=config.get("eos_token_id"))
    except Exception as error:  # transformers raises many kinds
        raise ModelLoadError(f"cannot load the tokenizer in {path}: {error}") from error
    finally:
        transformers_logging.set_verbosity(verbosity)
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def save_pretrained(
    path: Union[str, Path],
    model: Model,
    tokenizer=None,
    extra_config: Optional[dict] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write config.json, the safetensors (and the tokenizer) to `path`, atomically: the
    directory `load` reads. (Not mlx-lm's `save_model`, which writes the weights alone.)"""
    path = Path(path)
    with written_atomically(path) as staging:
        write_model(staging, model, tokenizer, extra_config, max_shard_bytes)
    return path


def write_model(
    directory: Path,
    model: Model,
    tokenizer=None,
    extra_config: Optional[dict] = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """The files of `save_pretrained`, into an existing directory."""
    write_safetensors(directory, dict(tree_flatten(model.parameters())), "mlx", max_shard_bytes)
    config = with_model_file(directory, model_config(model.args) | (extra_config or {}))
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def with_model_file(directory: Path, config: dict) -> dict:
    """`config`, naming the model file written into `directory` if it is an FM config (a
    baseline trained by mlx_fm.train is mlx-lm's own model type and needs none)."""
    if config.get("model_type") != MODEL_TYPE:
        return config
    (directory / MODEL_FILE).write_text(MODEL_FILE_SOURCE)
    return config | {"model_file": MODEL_FILE}


def model_config(args) -> dict:
    """The args as config.json holds them: unset options (None by default) left out, as
    transformers rejects a null where it expects a number (e.g. a llama's
    max_position_embeddings)."""
    unset = {f.name for f in dataclasses.fields(args) if f.default is None}
    return {
        key: value
        for key, value in dataclasses.asdict(args).items()
        if not (value is None and key in unset)
    }


def cache_limit() -> int:
    """MLX's buffer cache limit in bytes (reading it means setting it: set it back)."""
    limit = mx.set_cache_limit(0)
    mx.set_cache_limit(limit)
    return limit


@contextlib.contextmanager
def freed_buffers_kept_for_training():
    """On the CPU, MLX keeps freed buffers for reuse up to its memory limit in the block, as it
    does on Metal; after it, up to what it kept before. A training step's temporaries (~3.9 GB
    for the benchmark's 19M FM model on 2,048 tokens) outgrow the eighth of that limit that
    `import mlx_fm` allows, and each step handed most of them back to the OS and faulted their
    pages in again: ~15% of an FM step here."""
    if mx.default_device() != mx.cpu:
        yield
        return
    before = mx.set_cache_limit(mx.get_memory_limit())
    try:
        yield
    finally:
        mx.set_cache_limit(before)
        mx.clear_cache()


@contextlib.contextmanager
def written_atomically(destination: Path):
    """A staging directory next to `destination`, renamed to it when the block succeeds.

    Directories this makes (the parents too) follow the umask; parents it had to make are
    removed again if the block fails and they are still empty.
    """
    made = make_directories(destination.parent)
    with removed_on_failure(made):
        remove_stale_staging(destination.parent)
        staging = _own_entry(destination, "staging", os.mkdir)
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
    """A temporary file next to `destination` (mode per the umask), renamed to it when the
    block succeeds."""
    destination = Path(destination)
    remove_stale_staging(destination.parent)
    staging = _own_entry(destination, "staging", _create_file, suffix)
    try:
        yield staging
        os.replace(staging, destination)
    finally:
        staging.unlink(missing_ok=True)


def _replace(staging: Path, destination: Path) -> None:
    """Move the old destination aside, put the new one in place, then delete the old."""
    retired = _own_entry(destination, "old", os.mkdir)
    aside = retired / destination.name
    os.replace(destination, aside)
    os.replace(staging, destination)
    shutil.rmtree(retired)


# Staging entries are named `.NAME.mlx_fm-KIND.HOST.PID.TOKEN[SUFFIX]`, so that a later run can
# tell which ones a dead process of this host left behind, and touch nothing else.
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"
_OWN_ENTRY = re.compile(
    r"\..+\.mlx_fm-(?:staging|old)\.(?P<host>[A-Za-z0-9-]+)"
    r"\.(?P<pid>\d+)\.[0-9a-f]{16}(?:\.\w+)?"
)


def _own_entry(
    destination: Path, kind: str, create: Callable[[Path], object], suffix: str = ""
) -> Path:
    """A new entry next to `destination`, made by `create(path)`, named as ours."""
    name = f".{destination.name}.mlx_fm-{kind}.{_HOST}.{os.getpid()}.{secrets.token_hex(8)}"
    path = destination.parent / (name + suffix)
    create(path)
    return path


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def remove_stale_staging(directory: Path) -> None:
    """Remove the staging entries in `directory` of our naming whose process has died."""
    for entry in directory.iterdir():
        match = _OWN_ENTRY.fullmatch(entry.name)
        if match is None or not _process_gone(match["host"], int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # another run may be removing it too
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def _process_gone(host: str, pid: int) -> bool:
    """Whether no process `pid` runs on `host`; False when that cannot be known."""
    if host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # e.g. another user's process: alive
        pass
    return False


def make_directories(path: Path) -> list[Path]:
    """`mkdir -p path`; the directories it made, deepest first."""
    missing = [directory for directory in (path, *path.parents) if not directory.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        remove_empty_directories(missing)
        raise
    return missing


@contextlib.contextmanager
def removed_on_failure(directories: list[Path]):
    """Remove `directories` (deepest first) that are still empty if the block fails."""
    try:
        yield
    except BaseException:
        remove_empty_directories(directories)
        raise


def remove_empty_directories(directories: list[Path]) -> None:
    """Remove each of `directories`, deepest first, stopping at one that is not empty."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def check_destination(destination: Path, sources: Iterable[Union[str, Path]], force: bool) -> None:
    """Refuse to write `destination` over what the command did not make.

    The destination must not hold (be, or contain) any of `sources`, even with `force`;
    without `force` it must be absent or empty.
    """
    target = destination.resolve()
    for source in sources:
        if Path(source).resolve().is_relative_to(target):
            raise ValueError(
                f"the destination {destination} holds the source {source}; "
                "choose another destination"
            )
    if not force and not _is_empty(destination):
        raise ValueError(f"{destination} already exists (pass --force to replace it)")


def _is_empty(path: Path) -> bool:
    """Absent, an empty directory or an empty file: nothing that replacing it would lose."""
    if path.is_symlink():
        return False
    if path.is_dir():
        return next(path.iterdir(), None) is None
    return not path.exists() or path.stat().st_size == 0


def write_safetensors(
    directory: Path, weights: dict, format_tag: str, max_shard_bytes: int
) -> None:
    """model.safetensors, or shards, and model.safetensors.index.json (as mlx-lm writes)."""
    shards = split_into_shards(weights, max_shard_bytes)
    names = shard_file_names("model", ".safetensors", len(shards))
    for shard, name in zip(shards, names):
        mx.save_safetensors(str(directory / name), shard, metadata={"format": format_tag})
    index = shard_index(shards, names)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def parameter_count(model) -> int:
    """The number of parameters of `model`, an mlx.nn.Module."""
    return sum(v.size for _, v in tree_flatten(model.parameters()))
