"""Perplexity of an FM model on a text, and its loss by token position.

    mlx_fm.perplexity --model PATH --data book.txt [--max-tokens N --segment 2048 --plot out.png]

The whole token sequence streams through the model in segments that carry the
recurrent cache, so memory stays constant however long the text. The loss of
predicting token t + 1 from tokens 0..t is that of position t + 1 (the context
length it saw). Besides the perplexity, a table gives at positions 1K, 2K, 4K, ...
the running mean of the loss so far and the mean over the bucket [P/2, P), which
shows whether the model keeps using context far back (the paper's long-context view).
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from .cli import add_model_argument, fail_cleanly
from .training.data import read_documents, token_stream
from .utils import written_file_atomically

FIRST_TABLE_POSITION = 1024
PLOT_POINTS = 2000


def text_tokens(documents, tokenizer, max_tokens=None) -> np.ndarray:
    """The documents' tokens joined with EOS, truncated to `max_tokens`; at least 2 of them."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (documents are joined with it)")
    # token_stream puts EOS after every document; joining needs it only between them.
    tokens = token_stream(documents, tokenizer._tokenizer, tokenizer.eos_token_id)[:-1]
    tokens = tokens[:max_tokens]
    if len(tokens) < 2:
        raise ValueError(f"the text has {len(tokens)} token(s): perplexity needs at least 2")
    return tokens


def token_losses(model, tokens, segment: int = 2048) -> np.ndarray:
    """Float32 cross-entropy of predicting each token after the first from all before it."""
    if segment < 1:
        raise ValueError("--segment must be at least 1")
    tokens = mx.array(np.asarray(tokens, dtype=np.int32))
    cache = make_prompt_cache(model)
    losses = []
    for start in range(0, tokens.size - 1, segment):
        end = min(start + segment, tokens.size - 1)
        logits = model(tokens[None, start:end], cache=cache)[0].astype(mx.float32)
        loss = nn.losses.cross_entropy(logits, tokens[start + 1 : end + 1])
        mx.eval(loss, [c.state for c in cache])
        losses.append(np.array(loss))
    return np.concatenate(losses)


def perplexity(losses) -> float:
    return math.exp(float(np.mean(losses, dtype=np.float64)))


@dataclass
class PositionRow:
    """At position `position`: the mean loss over positions 1..position and over the bucket."""

    position: int
    loss_so_far: float
    bucket_start: int  # the bucket is positions bucket_start .. position - 1
    bucket_loss: float


def running_mean(losses) -> np.ndarray:
    """Element p - 1 is the mean loss over positions 1..p."""
    return np.cumsum(losses, dtype=np.float64) / np.arange(1, len(losses) + 1)


def loss_by_position(losses, first_position: int = FIRST_TABLE_POSITION) -> List[PositionRow]:
    """Rows at positions first_position, 2 × first_position, ... up to the last position.

    losses[t] is the loss at position t + 1. The bucket of the row at P is [P/2, P).
    """
    so_far = running_mean(losses)
    rows, position = [], first_position
    while position <= len(losses):
        bucket = losses[position // 2 - 1 : position - 1]
        rows.append(
            PositionRow(
                position,
                float(so_far[position - 1]),
                position // 2,
                float(np.mean(bucket, dtype=np.float64)),
            )
        )
        position *= 2
    return rows


def bucket_means(losses):
    """(first position, mean loss) of each bucket [2^i, 2^(i+1)) of positions, the last partial."""
    buckets, start = [], 1
    while start <= len(losses):
        bucket = losses[start - 1 : 2 * start - 1]
        buckets.append((start, float(np.mean(bucket, dtype=np.float64))))
        start *= 2
    return buckets


def format_position(position: int) -> str:
    if position % (1 << 20) == 0:
        return f"{position >> 20}M"
    return f"{position >> 10}K" if position % 1024 == 0 else str(position)


def format_table(rows: List[PositionRow]) -> str:
    lines = [f"{'position':>9} {'loss so far':>12} {'bucket':>15} {'bucket loss':>12}"]
    for row in rows:
        bucket = f"[{format_position(row.bucket_start)}, {format_position(row.position)})"
        lines.append(
            f"{format_position(row.position):>9} {row.loss_so_far:12.4f} "
            f"{bucket:>15} {row.bucket_loss:12.4f}"
        )
    return "\n".join(lines)


def plot_loss_by_position(
    curves: Mapping[str, np.ndarray],
    path,
    title: str = "",
    marks: Sequence[int] = (),
    bucket_losses: Optional[np.ndarray] = None,
) -> None:
    """A PNG, written atomically, of loss against token position (log x): the loss so far of
    each of `curves` ({legend label: the losses at positions 1, 2, ...}), a dotted line at each
    position in `marks`, and the bucket means of `bucket_losses` (likewise) as steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for label, losses in curves.items():
        positions = np.unique(np.geomspace(1, len(losses), PLOT_POINTS).astype(np.int64))
        axes.plot(positions, running_mean(losses)[positions - 1], label=label)
    if bucket_losses is not None:
        starts, means = zip(*bucket_means(bucket_losses))
        axes.step(starts, means, where="post", marker="o", label="bucket mean [2^i, 2^(i+1))")
    for position in marks:
        axes.axvline(position, color="grey", linestyle=":", linewidth=1)
    axes.set(xscale="log", xlabel="token position", ylabel="loss (nats)", title=title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    with written_file_atomically(path) as staging:
        figure.savefig(staging, format="png", dpi=100)
    plt.close(figure)


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.perplexity", description=__doc__.split("\n")[0])
    add_model_argument(parser)
    parser.add_argument(
        "--data",
        "--data-path",
        required=True,
        help='A text file, or jsonl with {"text": ...} per line (--data-path: mlx-lm\'s name)',
    )
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="Evaluate only the first N tokens"
    )
    parser.add_argument("--segment", type=int, default=2048, help="Tokens per forward pass")
    parser.add_argument("--plot", default=None, help="Write the loss by position to this PNG")
    return parser


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2")
    if args.plot is not None and not Path(args.plot).parent.resolve().is_dir():
        raise ValueError(f"no directory for the plot: {Path(args.plot).parent}")
    if not Path(args.data).is_file():
        raise ValueError(f"data file not found: {args.data}")
    documents = read_documents([args.data])
    model, tokenizer = mlx_fm.load(args.model)
    tokens = text_tokens(documents, tokenizer, args.max_tokens)
    losses = token_losses(model, tokens, args.segment)
    print(
        f"Tokens: {len(tokens)}, mean loss {float(np.mean(losses, dtype=np.float64)):.4f} "
        f"nats, perplexity {perplexity(losses):.3f}"
    )
    rows = loss_by_position(losses)
    if rows:
        print(format_table(rows))
    if args.plot is not None:
        plot_loss_by_position(
            {"loss so far": losses}, args.plot, title=Path(args.data).name, bucket_losses=losses
        )
        print(f"Plot: {args.plot}")


if __name__ == "__main__":
    main()
