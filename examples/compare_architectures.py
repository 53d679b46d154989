"""The paper's comparison at small scale: FM dense, FM sparse, Llama and Mamba-2, trained alike.

    python examples/compare_architectures.py OUT_DIR [--books DIR] [--steps 250] [--only NAME ...]
                                             [--seeds 0 1]

1. The books of examples/fetch_books.py (fetched into --books if missing). Jane Austen's
   *Persuasion* is held out for the long-context evaluation; the models train on the rest.
2. One 4K-token sentencepiece BPE vocabulary, trained on the training books, for every model.
3. Four models of about the same parameter count (Llama's MLP width and Mamba-2's depth are
   chosen to match FM's), each trained by mlx_fm.train with the same data, order, sequence
   length (SEQ_LEN), batch, steps and learning-rate schedule: the same token budget.
4. Each model reads *Persuasion* in windows of 16 × SEQ_LEN tokens, each from an empty state;
   the per-position losses, averaged over windows, give the loss so far at 1×, 4× and 16× the
   training length, and the mean loss at positions past 4× (where only extrapolation helps).
   The table (results.md, results.json) and the plot (loss_by_position.png)
   go to OUT_DIR.

A model whose OUT_DIR/RUN/model exists is not trained again, so an interrupted run resumes
with the next model, and `--only` lets two processes train different models at once. Each
seed in --seeds (initialization and data order) is a separate run, RUN = NAME for seed 0 and
NAME-seedN otherwise: their spread is the run-to-run noise. A run's evaluation is kept in
OUT_DIR/RUN/position_losses.npy.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)
from mlx_fm.perplexity import plot_loss_by_position, running_mean, text_tokens, token_losses
from mlx_fm.training import build_config, build_model, train
from mlx_fm.training.data import read_documents
from mlx_fm.training.tokenization import train_sentencepiece
from mlx_fm.utils import parameter_count, written_file_atomically

import numpy as np
from mlx_lm import load
from transformers.utils import logging as transformers_logging

HERE = Path(__file__).parent
HELD_OUT = "austen_persuasion.txt"
SEQ_LEN = 256
EXTRAPOLATION = (1, 4, 16)  # evaluation lengths, in training lengths
VOCAB_SIZE = 4096
HIDDEN = 192
LAYERS = 4
FM_MLP = 512

FM = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    expand=2,
    num_heads=4,
    num_slots=32,
    intermediate_size=FM_MLP,
    conv_kernel=4,
    tie_word_embeddings=True,
)
LLAMA = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    num_attention_heads=3,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=SEQ_LEN,
)
MAMBA2 = dict(
    hidden_size=HIDDEN,
    num_heads=6,
    head_dim=64,
    intermediate_size=2 * HIDDEN,
    state_size=64,
    n_groups=1,
    conv_kernel=4,
    layer_norm_epsilon=1e-5,
    use_bias=False,
    use_conv_bias=True,
    tie_word_embeddings=True,
    time_step_limit=[0.0, math.inf],
    time_step_rank="auto",
)
# name → (architecture, model options; the sized-to-match option is added by matched_models)
MODELS = {
    "fm_dense": ("factorization_memory", FM | dict(top_k=32)),
    "fm_sparse": ("factorization_memory", FM | dict(top_k=8)),
    "llama": ("llama", LLAMA),
    "mamba2": ("mamba2", MAMBA2),
}
LABELS = {
    "fm_dense": "FM dense (k = m = 32)",
    "fm_sparse": "FM sparse (k = m/4 = 8)",
    "llama": "Llama (RoPE attention)",
    "mamba2": "Mamba-2",
}
TRAINING = dict(
    seq_len=SEQ_LEN,
    batch_size=16,
    learning_rate=2e-3,
    weight_decay=0.1,
    val_fraction=0.02,
    val_batches=16,
    log_every=10,
    seed=0,
)


def model_size(architecture, options) -> int:
    return parameter_count(build_model(options, VOCAB_SIZE, 0.02, 0, "float32", architecture))


def matching_value(architecture, options, key, step, target):
    """The multiple of `step` for options[key] that brings the parameter count closest to
    `target` (the count is linear in a width or a depth)."""
    low, high = (model_size(architecture, options | {key: v}) for v in (step, 2 * step))
    return max(step, step * round((target - low) / (high - low) + 1))


def matched_models() -> dict:
    """MODELS with Llama's MLP width and Mamba-2's depth set to match FM's parameter count."""
    target = model_size(*MODELS["fm_sparse"])
    models = dict(MODELS)
    for name, key, step in (("llama", "intermediate_size", 32), ("mamba2", "num_hidden_layers", 1)):
        architecture, options = models[name]
        value = matching_value(architecture, options, key, step, target)
        models[name] = (architecture, options | {key: value})
    return models


def books(directory: Path) -> Path:
    if not (directory / HELD_OUT).is_file():
        subprocess.run([sys.executable, str(HERE / "fetch_books.py"), str(directory)], check=True)
    return directory


def train_tokenizer(training_files, path: Path) -> Path:
    if not path.is_file():
        model = train_sentencepiece(read_documents(training_files), VOCAB_SIZE, seed=0)
        with written_file_atomically(path) as staging:
            staging.write_bytes(model)
    return path


def run_name(name: str, seed: int) -> str:
    return name if seed == 0 else f"{name}-seed{seed}"


def run_seed(run: str, name: str):
    """The seed of run directory `run` of model `name` (run_name's inverse); None if it is
    another model's."""
    suffix = run.removeprefix(f"{name}-seed")
    return 0 if run == name else int(suffix) if suffix.isdigit() else None


def train_model(run: Path, architecture, options, seed, training_files, tokenizer, steps):
    if (run / "model").is_dir():
        return
    config = build_config(
        None,
        data=[str(f) for f in training_files],
        output=str(run),
        architecture=architecture,
        model=options,
        tokenizer=str(tokenizer),
        steps=steps,
        warmup_steps=steps // 10,
        val_every=max(steps // 5, 1),
        save_every=50,
        resume=(run / "checkpoints").is_dir(),
        **(TRAINING | {"seed": seed}),
    )
    print(f"== {run.name}: {architecture} {options}", flush=True)
    train(config)


def position_losses(model_dir: Path, text: Path) -> np.ndarray:
    """Per window (row), the loss at positions 1 .. 16·SEQ_LEN of the text's disjoint windows."""
    model, tokenizer = load(str(model_dir))
    tokens = text_tokens(read_documents([text]), tokenizer)
    length = EXTRAPOLATION[-1] * SEQ_LEN + 1
    starts = range(0, len(tokens) - length + 1, length)
    return np.stack([token_losses(model, tokens[s : s + length], segment=length) for s in starts])


def cached_position_losses(run: Path, text: Path) -> np.ndarray:
    """position_losses of the run's model, kept in RUN/position_losses.npy once computed."""
    cache = run / "position_losses.npy"
    if not cache.is_file():
        with written_file_atomically(cache, suffix=".npy") as staging:
            np.save(staging, position_losses(run / "model", text))
    return np.load(cache)


def final_val_loss(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def trained_runs(output: Path) -> dict:
    """{run: (name, seed, architecture, options)} of every finished run in `output`, whatever
    --only and --seeds say, by seed then model."""
    runs = []
    for name, (architecture, options) in matched_models().items():
        for path in output.glob(f"{name}*/model"):
            run = path.parent.name
            seed = run_seed(run, name)
            if seed is not None:
                runs.append((seed, run, name, architecture, options))
    return {
        run: (name, seed, architecture, options)
        for seed, run, name, architecture, options in sorted(runs, key=lambda r: r[0])
    }


def evaluate(runs: dict, output: Path, text: Path) -> dict:
    """{run: figures} of the runs ({run: (name, seed, architecture, options)})."""
    results = {}
    for run, (name, seed, architecture, options) in runs.items():
        losses = cached_position_losses(output / run, text)
        per_window = np.cumsum(losses, axis=1) / np.arange(1, losses.shape[1] + 1)
        at = {f"{m}x": float(running_mean(losses.mean(0))[m * SEQ_LEN - 1]) for m in EXTRAPOLATION}
        spread = {
            f"{m}x": float(per_window[:, m * SEQ_LEN - 1].std(ddof=1) / math.sqrt(len(losses)))
            for m in EXTRAPOLATION
        }
        label = LABELS[name] + ("" if seed == 0 else f", seed {seed}")
        far = losses[:, EXTRAPOLATION[-2] * SEQ_LEN :].mean(1)  # positions past 4×, up to 16×
        results[run] = dict(
            name=name,
            label=label,
            seed=seed,
            architecture=architecture,
            options=options,
            parameters=model_size(architecture, options),
            val_loss=final_val_loss(output / run),
            loss_so_far=at,
            standard_error=spread,
            windows=len(losses),
            far_loss=float(far.mean()),
            far_per_window=far.tolist(),
            far_standard_error=float(far.std(ddof=1) / math.sqrt(len(far))),
            curve=losses.mean(0).tolist(),
        )
        print(f"{run}: {results[run]['loss_so_far']}", flush=True)
    return results


def fm_sparse_of(results: dict, result: dict):
    """The result of FM sparse with the same seed as `result`; None if there is none."""
    return results.get(run_name("fm_sparse", result["seed"]))


def paired_difference(losses, reference) -> str:
    """Mean difference over the same windows ± its standard error; '' without a reference."""
    if reference is None:
        return ""
    difference = losses - reference
    if np.all(difference == 0):
        return "0"
    return f"{difference.mean():+.3f} ± {difference.std(ddof=1) / math.sqrt(len(difference)):.3f}"


def markdown_table(results: dict, steps: int) -> str:
    tokens = steps * TRAINING["batch_size"] * SEQ_LEN
    far = f"{EXTRAPOLATION[-2] * SEQ_LEN + 1}–{EXTRAPOLATION[-1] * SEQ_LEN}"
    head = (
        f"| model | parameters | val loss @ {SEQ_LEN} | "
        + " | ".join(f"loss so far @ {m * SEQ_LEN} ({m}×)" for m in EXTRAPOLATION)
        + f" | mean loss at positions {far} | same, minus FM sparse's (paired) |"
    )
    lines = [head, "|" + "---|" * (5 + len(EXTRAPOLATION))]
    for r in results.values():
        sparse = fm_sparse_of(results, r)
        reference = None if sparse is None else np.array(sparse["far_per_window"])
        cells = [
            f"{r['loss_so_far'][f'{m}x']:.3f} ± {r['standard_error'][f'{m}x']:.3f}"
            for m in EXTRAPOLATION
        ]
        lines.append(
            f"| {r['label']} | {r['parameters'] / 1e6:.2f}M | {r['val_loss']:.3f} | "
            + " | ".join(cells)
            + f" | {r['far_loss']:.3f} ± {r['far_standard_error']:.3f} | "
            + paired_difference(np.array(r["far_per_window"]), reference)
            + " |"
        )
    windows = next(iter(results.values()))["windows"]
    lines.append(
        f"\n{tokens / 1e6:.2f}M training tokens each; losses in nats per token; "
        f"± is the standard error over the {windows} held-out windows of *Persuasion*; "
        "differences are taken window by window against FM sparse of the same seed, "
        "which cancels the windows' own difficulty."
    )
    return "\n".join(lines)


def seed_spread(results: dict) -> str:
    """Per model run with two seeds or more: the mean and the standard deviation across seeds
    of the validation loss, of the far loss and of its paired difference from FM sparse."""
    by_model = {}
    for r in results.values():
        sparse = fm_sparse_of(results, r)
        difference = None if sparse is None else r["far_loss"] - sparse["far_loss"]
        by_model.setdefault(r["name"], []).append((r["val_loss"], r["far_loss"], difference))
    lines = []
    for name, rows in by_model.items():
        if len(rows) < 2:
            continue
        columns = [np.array([v for v in column if v is not None]) for column in zip(*rows)]
        cells = [
            f"{c.mean():{sign}.3f} ± {c.std(ddof=1):.3f}" if len(c) > 1 else "–"
            for c, sign in zip(columns, ("", "", "+"))
        ]
        lines.append(f"| {LABELS[name]} | {len(rows)} | " + " | ".join(cells) + " |")
    if not lines:
        return ""
    return (
        "\n\n| model | seeds | val loss | mean loss past 4× | minus FM sparse's |\n"
        "|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\nAcross seeds (initialization and data order): mean ± standard deviation."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--books", type=Path, default=Path("books"))
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--train-only", action="store_true", help="skip the evaluation")
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()  # it warns that it does not know model_type
    directory = books(args.books)
    training_files = sorted(p for p in directory.glob("*.txt") if p.name != HELD_OUT)
    args.output.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(training_files, args.output / "tokenizer.model")
    runs = {
        run_name(name, seed): (name, architecture, options, seed)
        for name, (architecture, options) in matched_models().items()
        if name in args.only
        for seed in args.seeds
    }
    for run, (_, architecture, options, seed) in runs.items():
        train_model(
            args.output / run, architecture, options, seed, training_files, tokenizer, args.steps
        )
    if args.train_only:
        return
    results = evaluate(trained_runs(args.output), args.output, directory / HELD_OUT)
    table = markdown_table(results, args.steps) + seed_spread(results)
    print(table)
    (args.output / "results.md").write_text(table + "\n")
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    plot_loss_by_position(
        {r["label"]: np.array(r["curve"]) for r in results.values()},
        args.output / "loss_by_position.png",
        title=f"Loss so far on held-out Persuasion; trained at {SEQ_LEN} tokens",
        marks=[m * SEQ_LEN for m in EXTRAPOLATION],
    )


if __name__ == "__main__":
    main()
