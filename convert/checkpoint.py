"""Convert FM checkpoints: SPEC's PyTorch / Hugging Face layout to MLX (maybe quantized), and back.

The output is written to a temporary directory next to the destination and
renamed into place only when complete, so a failed conversion leaves nothing.
"""

import shutil
from pathlib import Path
from typing import Optional

from mlx_fm import Model, ModelArgs, load_model
from mlx_fm.layout import (
    CheckpointError,
    check_tensor_names_and_shapes,
    model_settings,
    read_config,
    tensor_shapes,
    weight_files,
    with_conv_layout,
)
from mlx_fm.utils import (
    DEFAULT_MAX_SHARD_BYTES,
    check_destination,
    resolve_model_path,
    with_model_file,
    write_safetensors,
    written_atomically,
)

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import (
    create_model_card,
    dequantize_model,
    quantize_model,
    save_config,
    upload_to_hub,
)

from .weights import read_weights

CONVERSION_DTYPES = ("float16", "bfloat16", "float32")
QUANTIZATION_KEYS = ("quantization", "quantization_config")
TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
SOURCE_PATTERNS = [
    "*.json",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "tokenizer.model",
    "*.txt",
    "*.jinja",
]


# Layers that decide routing or are most sensitive to error: the mixers' in_proj
# (router logits ρ and gates e, g, with z and x), the embedding and lm_head.
ROUTING_CRITICAL = ("mixer.in_proj", "embeddings", "lm_head")
# Each quantization mode's (group size, bits) when not given, as mlx-lm's.
QUANTIZATION_MODE_DEFAULTS = {
    "affine": (64, 4),
    "mxfp4": (32, 4),
    "nvfp4": (16, 4),
    "mxfp8": (32, 8),
}


def routing_safe_predicate(bits: int, group_size: int, mode: str):
    """The default quantization predicate (see examples/quantization_routing.py).

    The routing-critical layers get 8 bits when the rest get fewer, and stay in
    float when the rest get 8 or more; every other Linear gets `bits`.
    """

    def predicate(path: str, module: nn.Module):
        if not path.endswith(ROUTING_CRITICAL):
            return True
        if bits >= 8:
            return False
        if mode == "affine":
            return {"group_size": group_size, "bits": 8, "mode": "affine"}
        if module.weight.shape[-1] % 32 == 0:
            return {"group_size": 32, "bits": 8, "mode": "mxfp8"}
        return False

    return predicate


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
    upload_repo: Optional[str] = None,
    revision: Optional[str] = None,
    dequantize: bool = False,
    to_hf: bool = False,
    force: bool = False,
    quantize_all: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Convert `hf_path` (directory or Hugging Face repo id) and write it to `mlx_path`."""
    _check_options(quantize, dequantize, to_hf, dtype, upload_repo)
    destination = Path(mlx_path).expanduser()
    source = resolve_model_path(hf_path, revision, SOURCE_PATTERNS)
    try:
        check_destination(destination, [source], force)
    except ValueError as error:  # convert's bad input is a CheckpointError
        raise CheckpointError(str(error)) from None
    model, config, source = load_source(str(source))
    dtype = dtype or _config_dtype(config)
    if dtype is not None:
        print(f"[INFO] Using dtype: {dtype}")
        _cast_floats(model, getattr(mx, dtype))
    if quantize:
        model, config = _quantized(model, config, q_group_size, q_bits, q_mode, quantize_all)
    if dequantize or to_hf:
        model = dequantize_model(model)
        config = {key: value for key, value in config.items() if key not in QUANTIZATION_KEYS}
    with written_atomically(destination) as staging:
        if to_hf:
            _write_hf(staging, model, config, max_shard_bytes)
        else:
            _write_mlx(staging, model, config, max_shard_bytes)
            create_model_card(staging, None if Path(hf_path).expanduser().is_dir() else hf_path)
        _copy_tokenizer_files(source, staging)
    print(f"[INFO] Wrote {destination}")
    if upload_repo is not None:
        upload_to_hub(str(destination), upload_repo)
    return destination


def _check_options(quantize, dequantize, to_hf, dtype, upload_repo):
    if quantize and dequantize:
        raise CheckpointError("choose either --quantize or --dequantize, not both")
    if quantize and to_hf:
        raise CheckpointError("--to-hf writes float weights; it cannot be combined with --quantize")
    if to_hf and upload_repo is not None:
        raise CheckpointError(
            "--upload-repo uploads MLX models; upload a --to-hf export with "
            "`huggingface-cli upload`"
        )
    if dtype is not None and dtype not in CONVERSION_DTYPES:
        raise CheckpointError(f"--dtype must be one of {', '.join(CONVERSION_DTYPES)}")


def load_source(path_or_repo: str, revision: Optional[str] = None):
    """(model, config, directory): an FM checkpoint in SPEC's layout, or an MLX one."""
    source = resolve_model_path(path_or_repo, revision, SOURCE_PATTERNS)
    config = read_config(source)
    if "quantization" in config:
        # Only an MLX checkpoint is quantized; mlx-lm's loader rebuilds its layers.
        model, _ = load_model(source)
        return model, config, source
    settings = model_settings(config)
    weights = _in_spec_layout(read_weights(weight_files(source)), settings)
    check_tensor_names_and_shapes(
        {name: w.shape for name, w in weights.items()}, tensor_shapes(settings)
    )
    model = Model(ModelArgs.from_dict(config | settings))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    mx.eval(model.parameters())
    return model, config | settings, source


def _in_spec_layout(weights: dict, settings: dict) -> dict:
    """Accept an MLX checkpoint's conv1d (E×K×1) too, and a tied lm_head copy."""
    weights = with_conv_layout(weights, "pytorch")
    if settings["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)
    return weights


def _config_dtype(config: dict) -> Optional[str]:
    dtype = config.get("torch_dtype", config.get("dtype"))
    return dtype if dtype in CONVERSION_DTYPES else None


def _cast_floats(model: nn.Module, dtype) -> None:
    model.update(
        tree_map(
            lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )


def _quantized(model, config, group_size, bits, mode, quantize_all):
    if "quantization" in config:
        raise CheckpointError("the source is already quantized; use --dequantize first")
    default_group_size, default_bits = QUANTIZATION_MODE_DEFAULTS[mode]
    group_size, bits = group_size or default_group_size, bits or default_bits
    predicate = None if quantize_all else routing_safe_predicate(bits, group_size, mode)
    try:
        model, config = quantize_model(
            model, config, group_size, bits, mode=mode, quant_predicate=predicate
        )
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"cannot quantize with mode {mode}: {error}") from error
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    if not any(isinstance(module, quantized) for module in model.modules()):
        raise CheckpointError(
            f"no layer could be quantized: group size {config['quantization']['group_size']} "
            "divides none of their input sizes"
        )
    return model, config


def _write_mlx(directory: Path, model, config: dict, max_shard_bytes: int) -> None:
    write_safetensors(directory, dict(tree_flatten(model.parameters())), "mlx", max_shard_bytes)
    save_config(with_model_file(directory, dict(config)), directory / "config.json")


def _write_hf(directory: Path, model, config: dict, max_shard_bytes: int) -> None:
    """SPEC's PyTorch layout: conv1d weights E×1×K, no quantization."""
    weights = with_conv_layout(dict(tree_flatten(model.parameters())), "pytorch")
    write_safetensors(directory, weights, "pt", max_shard_bytes)
    save_config(with_model_file(directory, dict(config)), directory / "config.json")


def _copy_tokenizer_files(source: Path, destination: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, destination / name)
