"""Convert an FM checkpoint to MLX: `mlx_fm.convert --hf-path SRC --mlx-path DST [-q]`.

Mirrors `mlx_lm.convert`. SRC is a directory or a Hugging Face repo id holding
config.json and weights in SPEC's layout (safetensors, sharded safetensors,
pytorch_model.bin, sharded .bin or a .pt file), or an MLX FM model.
"""

import argparse
from pathlib import Path

from mlx_fm.cli import fail_cleanly, one_line, warn
from mlx_fm.utils import missing_tokenizer


def parse_size(text: str) -> int:
    """Bytes in "5GB", "500MB", "20KB" or "1000"."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            number, multiplier = text[: -len(unit)], scale
            break
    else:
        number, multiplier = text, 1
    try:
        size = int(float(number) * multiplier)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"the size must be positive: {text!r}")
    return size


def build_parser():
    from .checkpoint import (
        CONVERSION_DTYPES,
        DEFAULT_MAX_SHARD_BYTES,
        QUANTIZATION_MODE_DEFAULTS,
    )

    parser = argparse.ArgumentParser(prog="mlx_fm.convert", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--hf-path", "--model", required=True, help="Source directory or Hugging Face repo id"
    )
    parser.add_argument("--mlx-path", default="mlx_model", help="Where to write the result")
    parser.add_argument("--revision", default=None, help="Revision of a Hugging Face repo")
    parser.add_argument("-q", "--quantize", action="store_true", help="Quantize the model")
    parser.add_argument(
        "--q-group-size",
        type=int,
        default=None,
        help="Quantization group size (default: the mode's, 64 for affine)",
    )
    parser.add_argument(
        "--q-bits",
        type=int,
        default=None,
        help="Bits per weight (default: the mode's, 4 for affine)",
    )
    parser.add_argument("--q-mode", choices=tuple(QUANTIZATION_MODE_DEFAULTS), default="affine")
    parser.add_argument(
        "--quantize-all",
        action="store_true",
        help="Quantize in_proj (the router), embeddings and lm_head at --q-bits "
        "too: smaller, but tokens go to other slots more often",
    )
    parser.add_argument(
        "--dtype",
        choices=CONVERSION_DTYPES,
        default=None,
        help="Type of the float weights (default: config's torch_dtype, else unchanged)",
    )
    parser.add_argument(
        "-d", "--dequantize", action="store_true", help="Dequantize a quantized MLX model"
    )
    parser.add_argument(
        "--to-hf",
        action="store_true",
        help="Write SPEC's PyTorch / Hugging Face layout instead of MLX's",
    )
    parser.add_argument(
        "--upload-repo", default=None, help="Hugging Face repo to upload the result to"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="Replace a non-empty --mlx-path (never one that holds the source)",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=DEFAULT_MAX_SHARD_BYTES,
        help="Largest weight file, e.g. 5GB or 500MB (default 5 GiB, as mlx-lm)",
    )
    return parser


@fail_cleanly
def main(argv=None):
    args = vars(build_parser().parse_args(argv))
    from .checkpoint import convert

    args["max_shard_bytes"] = args.pop("max_shard_size")
    # The upload is done here, after convert(), so that its failure is told apart from one
    # of the conversion: the model is written by then, and stays.
    upload_repo = args.pop("upload_repo")
    if upload_repo is not None and args["to_hf"]:
        raise ValueError(
            "--upload-repo uploads MLX models; upload a --to-hf export with "
            "`huggingface-cli upload`"
        )
    destination = convert(**args)
    if problem := missing_tokenizer(destination):
        warn(f"{problem} (generating text needs them)")
    if upload_repo is not None:
        upload(destination, upload_repo)


def upload(destination: Path, repo: str) -> None:
    """Upload the written model to the Hugging Face Hub; a failure leaves it where it is."""
    from mlx_lm.utils import upload_to_hub

    try:
        upload_to_hub(str(destination), repo)
    except Exception as error:  # the hub and its HTTP client raise many kinds
        raise OSError(
            f"{destination} was written, but uploading it to {repo} failed: {one_line(error)}"
        ) from error


if __name__ == "__main__":
    main()
