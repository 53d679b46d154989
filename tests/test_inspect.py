"""mlx_fm.inspect: routing statistics on models built so that the answer is known, their
agreement with the model's own forward, the plots and the JSON."""

import json
import math
import re

import mlx_fm
from mlx_fm import inspect as fm_inspect
from mlx_fm.ops import router

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import TINY, tiny_model

SLOTS, TOP_K, HEADS = TINY["num_slots"], TINY["top_k"], TINY["num_heads"]
ETA_BIAS = [-1e4, -2.0]  # head 0 never writes (η ≡ 0)
MU_BIAS = [0.5, -1.0]
TEXT = "It is a truth universally acknowledged, that a single man in possession " * 3


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def routed_model():
    """The tiny model made to route every token of every layer and head to slots 0..k−1 with
    equal weight, with constant gates η = sigmoid(ETA_BIAS) and μ = sigmoid(MU_BIAS).

    Feature 0 of the residual stream is 10 for every token (the embedding's column 0, which no
    layer writes), so every normed mixer input has a positive feature 0; the router rows of
    slots 0..k−1 read only that feature, with a large weight, and all other rows are 0."""
    model = tiny_model()
    embedding = np.array(model.backbone.embeddings.weight)
    embedding[:, 0] = 10.0
    model.backbone.embeddings.weight = mx.array(embedding)
    for layer in model.layers:
        mixer = layer.mixer
        for linear in (mixer.out_proj, layer.mlp.down_proj):
            weight = np.array(linear.weight)
            weight[0] = 0.0
            linear.weight = mx.array(weight)
        weight = np.array(mixer.in_proj.weight)
        weight[mixer.splits[1] :] = 0.0  # router, update and merge rows
        for head in range(HEADS):
            weight[mixer.splits[1] + head * SLOTS + np.arange(TOP_K), 0] = 100.0
        mixer.in_proj.weight = mx.array(weight)
        mixer.eta_bias = mx.array(ETA_BIAS)
        mixer.mu_bias = mx.array(MU_BIAS)
    mx.eval(model.parameters())
    return model


def text_ids(length: int = 60) -> np.ndarray:
    return np.frombuffer(TEXT.encode(), np.uint8)[:length].astype(np.int32)


def test_a_router_that_always_picks_the_first_k_slots():
    tokens = text_ids()
    stats = fm_inspect.routing_stats(routed_model(), tokens, segment=17, passage=range(5, 25))
    layers = TINY["num_hidden_layers"]
    first = np.arange(SLOTS) < TOP_K
    assert stats.tokens == len(tokens) and stats.num_slots == SLOTS and stats.top_k == TOP_K
    np.testing.assert_array_equal(stats.usage, np.broadcast_to(first, (layers, HEADS, SLOTS)))
    np.testing.assert_array_equal(stats.dead, ~stats.usage.astype(bool))
    np.testing.assert_allclose(stats.mean_weight, stats.usage / TOP_K, rtol=1e-6)
    np.testing.assert_allclose(stats.balance, math.log(TOP_K) / math.log(SLOTS))
    np.testing.assert_allclose(stats.max_over_mean, SLOTS / TOP_K)
    np.testing.assert_allclose(stats.softmax_entropy, math.log(TOP_K), rtol=1e-6)
    np.testing.assert_allclose(stats.slot_weight_entropy, math.log(TOP_K), rtol=1e-6)
    np.testing.assert_allclose(stats.top_k_mass, 1.0, rtol=1e-6)
    eta = sigmoid(ETA_BIAS[1])
    np.testing.assert_array_equal(stats.eta_mean[:, 0], 0.0)
    np.testing.assert_allclose(stats.eta_mean[:, 1], eta, rtol=1e-6)
    np.testing.assert_allclose(stats.mu_mean, [[sigmoid(b) for b in MU_BIAS]] * layers, rtol=1e-6)
    # A write to a slot of head 1 decays by 1 − η/k per token: 1/e after −1/log(1 − η/k) tokens.
    assert np.isinf(stats.lifetime[:, 0]).all()
    np.testing.assert_allclose(stats.lifetime[:, 1, :TOP_K], -1 / math.log(1 - eta / TOP_K), 1e-5)
    assert np.isinf(stats.lifetime[:, 1, TOP_K:]).all()  # never selected, never decays
    theta_bin = np.searchsorted(fm_inspect.HISTOGRAM_EDGES, eta / TOP_K, side="right") - 1
    writes = len(tokens) * TOP_K
    np.testing.assert_array_equal(stats.theta_histogram[:, 0, 0], writes)
    np.testing.assert_array_equal(stats.theta_histogram[:, 1, theta_bin], writes)
    assert stats.theta_histogram.sum() == layers * HEADS * writes
    np.testing.assert_array_equal(stats.eta_histogram[:, 0, 0], len(tokens))
    assert stats.eta_histogram.sum() == layers * HEADS * len(tokens)
    np.testing.assert_array_equal(stats.passage, tokens[5:25])
    assert stats.passage_weights.shape == (layers, HEADS, 20, SLOTS)
    expected = np.broadcast_to(first / TOP_K, stats.passage_weights.shape)
    np.testing.assert_allclose(stats.passage_weights, expected, rtol=1e-6)


def test_the_layer_summary_spans_the_heads():
    stats = fm_inspect.routing_stats(routed_model(), text_ids())
    eta, decay_lifetime = sigmoid(ETA_BIAS[1]), -1 / math.log(1 - sigmoid(ETA_BIAS[1]) / TOP_K)
    summaries = fm_inspect.layer_summary(stats)
    assert len(summaries) == TINY["num_hidden_layers"]
    for summary in summaries:
        np.testing.assert_allclose(summary["balance"], [math.log(TOP_K) / math.log(SLOTS)] * 2)
        np.testing.assert_allclose(summary["max_over_mean"], [SLOTS / TOP_K] * 2)
        np.testing.assert_allclose(summary["eta_mean"], [0.0, eta], rtol=1e-6)
        np.testing.assert_allclose(summary["mu_mean"], sorted(map(sigmoid, MU_BIAS)), rtol=1e-6)
        assert summary["dead"] == HEADS * (SLOTS - TOP_K)
        # Live slots: head 0's never decay, head 1's decay by 1 − η/k per token.
        np.testing.assert_allclose(summary["lifetime"], [decay_lifetime, np.inf, np.inf], 1e-5)
    rows = fm_inspect.format_layer_summary(stats).splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["0", "1"]
    assert f"{decay_lifetime:.3g}/inf/inf" in rows[0]


def test_a_dense_router_keeps_all_the_weight():
    stats = fm_inspect.routing_stats(tiny_model(top_k=SLOTS), text_ids())
    np.testing.assert_array_equal(stats.usage, 1.0)
    np.testing.assert_allclose(stats.top_k_mass, 1.0, rtol=1e-6)
    np.testing.assert_allclose(stats.balance, 1.0)
    np.testing.assert_allclose(stats.softmax_entropy, stats.slot_weight_entropy, rtol=1e-6)
    assert (stats.softmax_entropy < math.log(SLOTS)).all()


class Recording(nn.Module):
    """A layer that appends what `inner` returns to `outputs`."""

    def __init__(self, inner: nn.Module, outputs: list) -> None:
        super().__init__()
        self.inner, self.outputs = inner, outputs

    def __call__(self, x: mx.array) -> mx.array:
        self.outputs.append(self.inner(x))
        return self.outputs[-1]


@pytest.mark.parametrize("segment", [1, 7, 1000])
def test_streamed_routing_is_the_models_own(segment):
    """The router logits and gates that each mixer's in_proj produces in the model's forward over
    the whole text, routed by ops.router, are what routing_stats measures in segments."""
    model, tokens = tiny_model(), text_ids(40)
    projections, in_projs = [], [layer.mixer.in_proj for layer in model.layers]
    for layer, in_proj in zip(model.layers, in_projs):
        layer.mixer.in_proj = Recording(in_proj, projections)
    model(mx.array(tokens)[None])
    for layer, in_proj in zip(model.layers, in_projs):
        layer.mixer.in_proj = in_proj
    stats = fm_inspect.routing_stats(model, tokens, segment=segment, passage=range(len(tokens)))
    assert len(projections) == TINY["num_hidden_layers"]
    for layer, (projection, block) in enumerate(zip(projections, model.layers)):
        mixer = block.mixer
        _, _, router_logits, update, merge = mx.split(projection[0], mixer.splits, axis=-1)
        router_logits = router_logits.reshape(len(tokens), HEADS, SLOTS)
        weights = router.route(router_logits, mixer.temperature, mixer.top_k)
        eta, mu = router.gates(update, merge, mixer.eta_bias, mixer.mu_bias)
        expected = np.array(weights).transpose(1, 0, 2)
        np.testing.assert_allclose(stats.passage_weights[layer], expected, atol=1e-5)
        np.testing.assert_allclose(stats.eta_mean[layer], np.array(eta).mean(0), rtol=1e-5)
        np.testing.assert_allclose(stats.mu_mean[layer], np.array(mu).mean(0), rtol=1e-5)


def assert_same_stats(actual: fm_inspect.RoutingStats, expected: fm_inspect.RoutingStats):
    for name, value in vars(expected).items():
        np.testing.assert_array_equal(getattr(actual, name), value, err_msg=name)


def test_json_round_trips_infinite_lifetimes_as_null():
    stats = fm_inspect.routing_stats(routed_model(), text_ids())
    text = json.dumps(stats.to_json(), allow_nan=False)
    values = json.loads(text)
    assert values["lifetime"][0][0] == [None] * SLOTS
    assert values["dead"][0][0] == [False] * TOP_K + [True] * (SLOTS - TOP_K)
    assert_same_stats(fm_inspect.RoutingStats.from_json(values), stats)


def test_token_labels_show_spaces_and_escapes():
    assert fm_inspect.token_label(" a$b\n") == "·a\\$b\\n"


def test_cli_prints_a_row_per_head_and_writes_json_and_plots(
    tiny_model_dir, tmp_path, capsys, monkeypatch
):
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(
        Figure, "savefig", lambda figure, *a, **k: (saved.append(figure), savefig(figure, *a, **k))
    )
    data, plots, stats_file = tmp_path / "book.txt", tmp_path / "plots", tmp_path / "stats.json"
    data.write_text(TEXT)
    argv = ["--model", str(tiny_model_dir), "--data", str(data), "--max-tokens", "100"]
    argv += ["--plot", str(plots), "--json", str(stats_file), "--map-layer", "1", "--map-head", "1"]
    fm_inspect.main(argv)
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d) +(\d) +[0-9.]+ ", out, re.M)
    assert rows == [(str(layer), str(head)) for layer in range(2) for head in range(HEADS)]
    model, _ = mlx_fm.load(tiny_model_dir)
    expected = fm_inspect.routing_stats(model, text_ids(100))
    assert out.split("By layer, over its heads:\n")[1].startswith(
        fm_inspect.format_layer_summary(expected)
    )
    assert_same_stats(
        fm_inspect.RoutingStats.from_json(json.loads(stats_file.read_text())), expected
    )
    assert sorted(p.name for p in plots.iterdir()) == sorted(fm_inspect.PLOT_FILES)
    for name in fm_inspect.PLOT_FILES:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(plots / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 100
    assert len(saved) == len(fm_inspect.PLOT_FILES)
    routing_map = saved[-1].axes[0]
    assert routing_map.get_title() == "slot weights α̃, layer 1 head 1"
    labels = [label.get_text() for label in routing_map.get_yticklabels()]
    assert labels[:4] == ["I", "t", "·", "i"]  # the byte tokenizer's tokens
