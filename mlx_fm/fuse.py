"""Merge LoRA / DoRA adapters into an FM model: `mlx_fm.fuse --model PATH --adapter-path DIR`.

Writes a plain MLX model (atomically), loadable by `mlx_fm.load`; `--dequantize`
turns a quantized base into a float one.
"""

import argparse
from pathlib import Path

from mlx.utils import tree_unflatten

from . import load, save_pretrained
from .cli import add_model_argument, fail_cleanly
from .utils import check_destination, resolve_model_path


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.fuse", description=__doc__.split("\n")[0])
    add_model_argument(parser, required=True)
    parser.add_argument(
        "--adapter-path",
        default="adapters",
        help="Directory with adapters.safetensors and adapter_config.json",
    )
    parser.add_argument("--save-path", default="fused_model")
    parser.add_argument(
        "--force",
        action="store_true",
        help="Replace a non-empty --save-path (never one that holds the model or the adapters)",
    )
    parser.add_argument("--dequantize", action="store_true")
    parser.add_argument(
        "--upload-repo", default=None, help="Hugging Face repo to upload the fused model to"
    )
    return parser


def fuse(model, dequantize: bool = False):
    """Replace every adapted layer of `model` by its fused plain layer, in place."""
    from mlx_lm.utils import dequantize_model

    fused = [
        (name, module.fuse(dequantize=dequantize))
        for name, module in model.named_modules()
        if hasattr(module, "fuse")
    ]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return dequantize_model(model) if dequantize else model


@fail_cleanly
def main(argv=None):
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import upload_to_hub

    args = build_parser().parse_args(argv)
    model_path = resolve_model_path(args.model)
    check_destination(Path(args.save_path), [model_path, args.adapter_path], args.force)
    model, tokenizer, config = load(model_path, return_config=True)
    try:
        model = load_adapters(model, args.adapter_path)
    except (KeyError, ValueError) as error:
        raise ValueError(
            f"adapters in {args.adapter_path} do not fit {args.model}: {error}"
        ) from error
    model = fuse(model, args.dequantize)
    if args.dequantize:
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    save_pretrained(args.save_path, model, tokenizer, extra_config=config)
    print(f"fused model written to {args.save_path}")
    if args.upload_repo is not None:
        upload_to_hub(args.save_path, args.upload_repo)


if __name__ == "__main__":
    main()
