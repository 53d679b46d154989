"""Inside an FM model's memory: how each layer and head routes tokens to its slots.

    mlx_fm.inspect [--model PATH] --data book.txt [--max-tokens N] [--plot DIR] [--json FILE]

The text streams through the model in segments that carry the recurrent cache, so memory stays
constant however long the text. At each layer the router logits, update and merge logits come
from the mixer's own in_proj, and `ops.router` turns them into the slot weights α̃ and gates η, μ
exactly as the model's forward does. A token *selects* a slot when its α̃ there is non-zero (it
writes and reads that slot). For every layer and head, over the whole text:

- usage: the fraction of tokens that select each slot (the k usages of a token sum to k);
  mean_weight: the mean α̃ of each slot; dead: the slots no token selects;
- balance: the entropy of the usage distribution (usage / Σ usage) over log m, 1 when all slots
  are used equally, log k / log m when every token picks the same k; max_over_mean: the largest
  usage over the mean usage, 1 when equal, m / k when collapsed onto k slots;
- softmax_entropy: the mean entropy (nats) of the full softmax α = softmax(ρ / τ) per token, at most
  log m; slot_weight_entropy: the same for α̃, at most log k; top_k_mass: the mean weight the
  selected slots hold in α before renormalization (what the sparse form keeps; 1 when dense);
- eta_histogram, theta_histogram: the counts of η per token, and of θ = η·α̃ per selected slot and
  token, in the bins HISTOGRAM_EDGES; eta_mean, mu_mean: the mean update and merge rates;
- lifetime: each slot's expected memory horizon, in tokens. A value written to slot i at token s
  enters with weight θ_s,i; each later token t multiplies it by 1 − θ_t,i (by 1 when t does not
  select i), so after n tokens its weight relative to when it was written is exp(−Σ d_t,i), with
  the log-decay d_t,i = −log(1 − θ_t,i). With d̄_i the slot's mean log-decay over the text, that
  falls to 1/e after lifetime_i = 1 / d̄_i tokens; infinite when the slot never decays;
- passage_weights: α̃ of the text's first tokens (the routing map).
"""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)

import mlx.core as mx
import numpy as np
from mlx_lm.models.base import create_ssm_mask
from mlx_lm.models.cache import make_prompt_cache

from .cli import add_model_argument, fail_cleanly, non_negative_int, positive_int
from .ops import router
from .perplexity import text_tokens
from .training.data import read_documents
from .utils import written_file_atomically

SEGMENT = 2048
PASSAGE_TOKENS = 48
# Bin 0 is [0, 1e-6); then 4 bins per decade up to 1 (a rate of 1e-6 forgets over ~1M tokens).
HISTOGRAM_EDGES = np.concatenate([[0.0], np.geomspace(1e-6, 1.0, 25)])
# The per-head statistics that layer_summary gives as [min, max] over heads, and their format.
SUMMARY_FORMATS = dict(
    balance=".3f", max_over_mean=".2f", top_k_mass=".3f", eta_mean=".3g", mu_mean=".2f"
)
PLOT_FILES = ("slot_usage.png", "lifetimes.png", "routing_map.png")


@dataclass
class RoutingStats:
    """What `routing_stats` measures (see the module's docstring); arrays are indexed by
    layer, head, then slot, bin or passage token."""

    tokens: int
    top_k: int
    usage: np.ndarray  # (L, H, m)
    mean_weight: np.ndarray  # (L, H, m)
    softmax_entropy: np.ndarray  # (L, H)
    slot_weight_entropy: np.ndarray  # (L, H)
    top_k_mass: np.ndarray  # (L, H)
    eta_mean: np.ndarray  # (L, H)
    mu_mean: np.ndarray  # (L, H)
    eta_histogram: np.ndarray  # (L, H, bins), counts of tokens
    theta_histogram: np.ndarray  # (L, H, bins), counts of (token, selected slot) pairs
    lifetime: np.ndarray  # (L, H, m), tokens; inf where a slot never decays
    passage: np.ndarray  # (P,) the token ids of the passage
    passage_weights: np.ndarray  # (L, H, P, m)

    @property
    def num_slots(self) -> int:
        return self.usage.shape[-1]

    @property
    def dead(self) -> np.ndarray:
        return self.usage == 0

    @property
    def balance(self) -> np.ndarray:
        distribution = self.usage / self.usage.sum(axis=-1, keepdims=True)
        return _entropy(distribution) / math.log(self.num_slots)

    @property
    def max_over_mean(self) -> np.ndarray:
        return self.usage.max(axis=-1) / self.usage.mean(axis=-1)

    def to_json(self) -> dict:
        """Every field and derived statistic as JSON values; null is an infinite lifetime."""
        derived = {"num_slots", "dead", "balance", "max_over_mean"}
        values = {name: getattr(self, name) for name in _field_names() | derived}
        values["histogram_edges"] = HISTOGRAM_EDGES
        return {name: _json_value(value) for name, value in values.items()}

    @classmethod
    def from_json(cls, values: dict) -> "RoutingStats":
        return cls(**{name: _array_value(values[name]) for name in _field_names()})


def _field_names() -> set:
    return {field.name for field in dataclasses.fields(RoutingStats)}


def _json_value(value):
    if not isinstance(value, np.ndarray):
        return value
    if value.dtype.kind == "f":
        return np.where(np.isinf(value), None, value).tolist()
    return value.tolist()


def _array_value(value):
    if not isinstance(value, list):
        return value
    array = np.asarray(value)
    if array.dtype == object:  # floats with nulls
        return np.where(array == None, np.inf, array).astype(np.float64)  # noqa: E711
    return array


class LayerRouting(NamedTuple):
    """One layer's routing of a segment of T tokens, in float32."""

    softmax: np.ndarray  # (T, H, m), α
    slot_weights: np.ndarray  # (T, H, m), α̃
    eta: np.ndarray  # (T, H)
    mu: np.ndarray  # (T, H)


def mixer_routing(mixer, u: mx.array) -> LayerRouting:
    """The routing that `mixer` applies to its (normed) input u of shape (1, T, D)."""
    _, _, router_logits, update_logits, merge_logits = mx.split(
        mixer.in_proj(u), mixer.splits, axis=-1
    )
    router_logits = router_logits[0].reshape(-1, mixer.num_heads, mixer.num_slots)
    softmax = router.route(router_logits, mixer.temperature, mixer.num_slots)
    slot_weights = router.route(router_logits, mixer.temperature, mixer.top_k)
    eta, mu = router.gates(update_logits[0], merge_logits[0], mixer.eta_bias, mixer.mu_bias)
    return LayerRouting(*(np.array(a) for a in (softmax, slot_weights, eta, mu)))


def segment_routing(model, inputs: mx.array, cache) -> Iterator[LayerRouting]:
    """Each layer's routing of `inputs` (1, T), advancing `cache` as the model's forward does."""
    backbone = model.backbone
    h = backbone.embeddings(inputs)
    mask = create_ssm_mask(h, cache[0])
    for layer, layer_cache in zip(backbone.layers, cache):
        yield mixer_routing(layer.mixer, layer.norm(h))
        h = layer(h, mask, layer_cache)
        mx.eval(h, layer_cache.state)


class _Totals:
    """Sums over the tokens seen so far, per layer and head (float64)."""

    def __init__(self, layers: int, heads: int, slots: int, passage: range) -> None:
        self.selected = np.zeros((layers, heads, slots), np.int64)
        self.weight = np.zeros((layers, heads, slots))
        self.log_decay = np.zeros((layers, heads, slots))
        self.softmax_entropy = np.zeros((layers, heads))
        self.slot_weight_entropy = np.zeros((layers, heads))
        self.top_k_mass = np.zeros((layers, heads))
        self.eta = np.zeros((layers, heads))
        self.mu = np.zeros((layers, heads))
        bins = len(HISTOGRAM_EDGES) - 1
        self.eta_histogram = np.zeros((layers, heads, bins), np.int64)
        self.theta_histogram = np.zeros((layers, heads, bins), np.int64)
        self.passage = passage
        self.passage_weights = [[] for _ in range(layers)]

    def add(self, layer: int, routing: LayerRouting, start: int) -> None:
        """Add `routing` of the tokens at positions start, start + 1, ..."""
        softmax, slot_weights, eta, mu = routing
        selected = slot_weights > 0
        theta = eta[..., None] * slot_weights
        self.selected[layer] += selected.sum(axis=0)
        self.weight[layer] += slot_weights.sum(axis=0, dtype=np.float64)
        with np.errstate(divide="ignore"):  # θ = 1 erases a slot at once: infinite log-decay
            self.log_decay[layer] -= np.log1p(-theta.astype(np.float64)).sum(axis=0)
        self.softmax_entropy[layer] += _entropy(softmax).sum(axis=0)
        self.slot_weight_entropy[layer] += _entropy(slot_weights).sum(axis=0)
        self.top_k_mass[layer] += (softmax * selected).sum(axis=(0, 2), dtype=np.float64)
        self.eta[layer] += eta.sum(axis=0, dtype=np.float64)
        self.mu[layer] += mu.sum(axis=0, dtype=np.float64)
        self.eta_histogram[layer] += _histogram_by_head(eta, np.ones_like(eta, bool))
        self.theta_histogram[layer] += _histogram_by_head(theta, selected)
        rows = slice(max(self.passage.start - start, 0), max(self.passage.stop - start, 0))
        self.passage_weights[layer].append(slot_weights[rows])

    def stats(self, tokens: np.ndarray, top_k: int) -> RoutingStats:
        count = len(tokens)
        with np.errstate(divide="ignore"):
            lifetime = count / self.log_decay
        weights = np.stack([np.concatenate(layer) for layer in self.passage_weights])
        return RoutingStats(
            tokens=count,
            top_k=top_k,
            usage=self.selected / count,
            mean_weight=self.weight / count,
            softmax_entropy=self.softmax_entropy / count,
            slot_weight_entropy=self.slot_weight_entropy / count,
            top_k_mass=self.top_k_mass / count,
            eta_mean=self.eta / count,
            mu_mean=self.mu / count,
            eta_histogram=self.eta_histogram,
            theta_histogram=self.theta_histogram,
            lifetime=lifetime,
            passage=tokens[self.passage.start : self.passage.stop],
            passage_weights=weights.transpose(0, 2, 1, 3),
        )


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy in nats over the last axis (0 log 0 = 0)."""
    p = probabilities.astype(np.float64)
    return -np.sum(p * np.log(np.where(p > 0, p, 1.0)), axis=-1)


def _histogram_by_head(values: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Counts (H, bins) in HISTOGRAM_EDGES of the `counted` entries of values (T, H, ...)."""
    bins = len(HISTOGRAM_EDGES) - 1
    index = np.clip(np.searchsorted(HISTOGRAM_EDGES, values, side="right") - 1, 0, bins - 1)
    heads = values.shape[1]
    head = np.arange(heads).reshape(1, heads, *([1] * (values.ndim - 2)))
    flat = (head * bins + index)[counted]
    return np.bincount(flat, minlength=heads * bins).reshape(heads, bins)


def routing_stats(
    model, tokens, segment: int = SEGMENT, passage: range = range(PASSAGE_TOKENS)
) -> RoutingStats:
    """Routing statistics of `model` over `tokens` (1-D), streamed in segments with the cache;
    passage_weights are those of the tokens at the positions in `passage`."""
    tokens = np.asarray(tokens, dtype=np.int32)
    args = model.args
    totals = _Totals(args.num_hidden_layers, args.num_heads, args.num_slots, passage)
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), segment):
        inputs = mx.array(tokens[None, start : start + segment])
        for layer, routing in enumerate(segment_routing(model, inputs, cache)):
            totals.add(layer, routing, start)
    return totals.stats(tokens, args.top_k)


# ---- the report -------------------------------------------------------------------------------


def live_lifetimes(stats: RoutingStats, layer: int, head: int) -> np.ndarray:
    return stats.lifetime[layer, head][~stats.dead[layer, head]]


def format_tokens(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3g}"


def format_report(stats: RoutingStats) -> str:
    m, k = stats.num_slots, stats.top_k
    lines = [
        f"Tokens: {stats.tokens}; {m} slots, top-k {k}; log m = {math.log(m):.3f}, "
        f"log k = {math.log(k):.3f} nats",
        f"{'layer':>5} {'head':>4} {'balance':>7} {'max/mean':>8} {'dead':>4} "
        f"{'H(softmax)':>10} {'H(weights)':>10} {'top-k mass':>10} {'eta':>7} {'mu':>6} "
        f"{'lifetime of live slots (min/median/max)':>40}",
    ]
    layers, heads = stats.balance.shape
    for layer in range(layers):
        for head in range(heads):
            at = layer, head
            lifetimes = live_lifetimes(stats, *at)
            span = "/".join(format_tokens(float(f(lifetimes))) for f in (np.min, np.median, np.max))
            lines.append(
                f"{layer:>5} {head:>4} {stats.balance[at]:7.3f} {stats.max_over_mean[at]:8.2f} "
                f"{int(stats.dead[at].sum()):>4} {stats.softmax_entropy[at]:10.3f} "
                f"{stats.slot_weight_entropy[at]:10.3f} {stats.top_k_mass[at]:10.3f} "
                f"{stats.eta_mean[at]:7.4f} {stats.mu_mean[at]:6.3f} {span:>40}"
            )
    return "\n".join(lines)


def layer_summary(stats: RoutingStats) -> list:
    """Per layer, over its heads: [min, max] of balance, max_over_mean, top_k_mass, eta_mean and
    mu_mean, the count of dead slots, and [min, median, max] of the live slots' lifetimes."""
    summaries = []
    for layer in range(stats.balance.shape[0]):
        live = stats.lifetime[layer][~stats.dead[layer]]
        summary = {
            name: [
                float(getattr(stats, name)[layer].min()),
                float(getattr(stats, name)[layer].max()),
            ]
            for name in SUMMARY_FORMATS
        }
        summary["dead"] = int(stats.dead[layer].sum())
        summary["lifetime"] = [float(f(live)) for f in (np.min, np.median, np.max)]
        summaries.append(summary)
    return summaries


def format_layer_summary(stats: RoutingStats) -> str:
    lines = [
        f"{'layer':>5} {'balance':>13} {'max/mean':>11} {'dead':>4} {'top-k mass':>11} "
        f"{'eta':>15} {'mu':>11} {'lifetimes (min/median/max)':>28}"
    ]
    for layer, summary in enumerate(layer_summary(stats)):
        low_high = {name: _span(summary[name], form) for name, form in SUMMARY_FORMATS.items()}
        lifetimes = "/".join(format_tokens(value) for value in summary["lifetime"])
        lines.append(
            f"{layer:>5} {low_high['balance']:>13} {low_high['max_over_mean']:>11} "
            f"{summary['dead']:>4} {low_high['top_k_mass']:>11} {low_high['eta_mean']:>15} "
            f"{low_high['mu_mean']:>11} {lifetimes:>28}"
        )
    return "\n".join(lines)


def _span(values: list, form: str) -> str:
    return "–".join(format(value, form) for value in values)


# ---- the plots --------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> None:
    with written_file_atomically(path) as staging:
        figure.savefig(staging, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(figure)


def plot_slot_usage(stats: RoutingStats, path: Path) -> None:
    """A heatmap of usage: one row per (layer, head), one column per slot."""
    plt = _pyplot()
    layers, heads, slots = stats.usage.shape
    figure, axes = plt.subplots(figsize=(2 + 0.2 * slots, 1 + 0.3 * layers * heads))
    image = axes.imshow(
        stats.usage.reshape(layers * heads, slots), aspect="auto", cmap="viridis", vmin=0
    )
    for boundary in range(1, layers):
        axes.axhline(boundary * heads - 0.5, color="white", linewidth=2)
    rows = [f"L{layer} H{head}" for layer in range(layers) for head in range(heads)]
    axes.set_yticks(range(layers * heads), rows)
    axes.set(xlabel="slot", title=f"slot usage: fraction of tokens whose top-{stats.top_k} has it")
    figure.colorbar(image, ax=axes)
    _save(figure, path)


def plot_lifetimes(stats: RoutingStats, path: Path) -> None:
    """Per layer: the lifetimes of the live slots, and the distribution of θ, by head."""
    plt = _pyplot()
    layers, heads, _ = stats.usage.shape
    figure, axes = plt.subplots(layers, 2, figsize=(11, 2.2 * layers), squeeze=False)
    finite = stats.lifetime[np.isfinite(stats.lifetime) & ~stats.dead]
    top = max(10.0, stats.tokens, float(finite.max()) if finite.size else 10.0)
    lifetime_bins = np.geomspace(1.0, top * 1.01, 30)
    theta_centres = np.sqrt(HISTOGRAM_EDGES[1:] * np.maximum(HISTOGRAM_EDGES[:-1], 1e-7))
    for layer in range(layers):
        left, right = axes[layer]
        for head in range(heads):
            lifetimes = live_lifetimes(stats, layer, head)
            never = int(np.isinf(lifetimes).sum())
            label = f"head {head}" + (f" ({never} never decay)" if never else "")
            left.hist(
                np.maximum(lifetimes[np.isfinite(lifetimes)], 1.0),
                bins=lifetime_bins,
                histtype="step",
                label=label,
            )
            counts = stats.theta_histogram[layer, head]
            right.step(theta_centres, counts / max(counts.sum(), 1), where="mid")
        left.axvline(stats.tokens, color="grey", linestyle=":", label="tokens read")
        left.set(xscale="log", ylabel=f"layer {layer}\nslots")
        right.set(xscale="log", ylabel="fraction of writes")
        left.legend(fontsize=7)
    axes[0, 0].set_title("lifetime of each live slot (tokens to 1/e)")
    axes[0, 1].set_title("θ = η·α̃ of each write")
    axes[-1, 0].set_xlabel("tokens")
    axes[-1, 1].set_xlabel("θ")
    figure.tight_layout()
    _save(figure, path)


def plot_routing_map(
    stats: RoutingStats, labels: Sequence[str], layer: int, head: int, path: Path
) -> None:
    """α̃ of the passage's tokens (rows, labelled with their text) over the slots (columns)."""
    plt = _pyplot()
    weights = stats.passage_weights[layer, head]
    tokens, slots = weights.shape
    figure, axes = plt.subplots(figsize=(2 + 0.2 * slots, 1 + 0.18 * tokens))
    image = axes.imshow(weights, aspect="auto", cmap="magma", vmin=0, interpolation="nearest")
    axes.set_yticks(range(tokens), labels, fontsize=7, family="monospace")
    axes.set(xlabel="slot", title=f"slot weights α̃, layer {layer} head {head}")
    figure.colorbar(image, ax=axes)
    _save(figure, path)


def token_label(text: str) -> str:
    """A token's text as an axis label: spaces as ·, escapes for other whitespace and control
    characters, and no `$` for matplotlib to read as math."""
    return repr(text)[1:-1].replace(" ", "·").replace("$", r"\$")


def write_plots(stats: RoutingStats, tokenizer, directory: Path, layer: int, head: int) -> None:
    directory.mkdir(exist_ok=True)
    usage, lifetimes, routing_map = (directory / name for name in PLOT_FILES)
    plot_slot_usage(stats, usage)
    plot_lifetimes(stats, lifetimes)
    labels = [token_label(tokenizer.decode([int(token)])) for token in stats.passage]
    plot_routing_map(stats, labels, layer, head, routing_map)


# ---- the command ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx_fm.inspect", description=__doc__.split("\n")[0])
    add_model_argument(parser)
    parser.add_argument(
        "--data", required=True, help='A text file, or jsonl with {"text": ...} per line'
    )
    parser.add_argument("--max-tokens", type=int, default=None, help="Read only the first N tokens")
    parser.add_argument(
        "--plot", default=None, help=f"Write {', '.join(PLOT_FILES)} into this directory"
    )
    parser.add_argument("--json", default=None, help="Write the statistics to this JSON file")
    parser.add_argument(
        "--map-layer", type=non_negative_int, default=0, help="The routing map's layer"
    )
    parser.add_argument(
        "--map-head", type=non_negative_int, default=0, help="The routing map's head"
    )
    parser.add_argument(
        "--map-start", type=non_negative_int, default=0, help="The routing map's first token"
    )
    parser.add_argument(
        "--map-tokens",
        type=positive_int,
        default=PASSAGE_TOKENS,
        help=f"Tokens in the routing map (default {PASSAGE_TOKENS})",
    )
    return parser


def check_destinations(args: argparse.Namespace) -> None:
    if args.plot is not None:
        plot = Path(args.plot)
        if not plot.parent.resolve().is_dir() or (plot.exists() and not plot.is_dir()):
            raise ValueError(f"cannot make the plot directory {plot}")
    if args.json is not None and not Path(args.json).parent.resolve().is_dir():
        raise ValueError(f"no directory for the JSON file: {Path(args.json).parent}")


def check_map(args: argparse.Namespace, model_args) -> None:
    layers, heads = model_args.num_hidden_layers, model_args.num_heads
    if args.map_layer >= layers:
        raise ValueError(f"--map-layer {args.map_layer}: the model has {layers} layers")
    if args.map_head >= heads:
        raise ValueError(f"--map-head {args.map_head}: the model has {heads} heads")


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2")
    check_destinations(args)
    if not Path(args.data).is_file():
        raise ValueError(f"data file not found: {args.data}")
    documents = read_documents([args.data])
    model, tokenizer = mlx_fm.load(args.model)
    check_map(args, model.args)
    tokens = text_tokens(documents, tokenizer, args.max_tokens)
    if args.map_start >= len(tokens):
        raise ValueError(f"--map-start {args.map_start}: the text has {len(tokens)} tokens")
    passage = range(args.map_start, args.map_start + args.map_tokens)
    stats = routing_stats(model, tokens, passage=passage)
    print(format_report(stats))
    print("\nBy layer, over its heads:")
    print(format_layer_summary(stats))
    if args.json is not None:
        with written_file_atomically(args.json) as staging:
            staging.write_text(json.dumps(stats.to_json()))
        print(f"JSON: {args.json}")
    if args.plot is not None:
        write_plots(stats, tokenizer, Path(args.plot), args.map_layer, args.map_head)
        print(f"Plots: {', '.join(str(Path(args.plot) / name) for name in PLOT_FILES)}")


if __name__ == "__main__":
    main()
