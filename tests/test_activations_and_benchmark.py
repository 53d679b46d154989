"""The polynomial SiLU and softmax, and the mlx_fm.benchmark tool."""

import time
from functools import partial

from mlx_fm import benchmark
from mlx_fm.ops import native
from mlx_fm.ops.activations import silu, softmax

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten


# The polynomial, to float32 rounding; and on one token's values x·sigmoid(x), to the accuracy
# of MLX's sigmoid (up to 3.6e-6 relative, in the far negative tail where SiLU is below 1e-15).
@pytest.mark.parametrize("count, rtol", [(20001, 5e-7), (2001, 4e-6)])
def test_silu_matches_the_exact_one(count, rtol):
    x = mx.concatenate([mx.linspace(-100, 100, count), mx.array([-1e30, 1e30, 0.0, -0.0])])
    wide = np.array(x, dtype=np.float64)
    with np.errstate(over="ignore"):
        exact = wide / (1 + np.exp(-wide))
    got = np.array(silu(x), dtype=np.float64)
    assert np.all(np.isfinite(got))
    assert np.allclose(got, exact, rtol=rtol, atol=1e-30)


@pytest.mark.parametrize("count", [6001, 1001])
def test_silu_gradient_matches_the_exact_one(count):
    x = mx.linspace(-30, 30, count)
    got = mx.grad(lambda v: silu(v).sum())(x)
    want = mx.grad(lambda v: nn.silu(v).sum())(x)
    assert mx.allclose(got, want, rtol=1e-5, atol=1e-6).item()


def test_silu_keeps_the_input_dtype():
    x = mx.linspace(-8, 8, 1001).astype(mx.bfloat16)
    out = silu(x)
    assert out.dtype == mx.bfloat16
    exact = nn.silu(x.astype(mx.float32))  # rounding to bfloat16 costs at most 2^-9 relative
    assert mx.allclose(out.astype(mx.float32), exact, rtol=2**-8, atol=1e-6).item()


@pytest.mark.parametrize("rows", [2000, 16])  # the polynomial, and one token's mx.softmax
def test_softmax_matches_the_exact_one_and_its_gradient(rows):
    logits = mx.random.normal((rows, 8), key=mx.random.key(1)) * 20
    logits[0] = mx.array([0.0, -81.0, -88.0, -1e30, 5.0, 5.0, -3.0, 1.0])
    exact = np.array(logits, dtype=np.float64)
    exact = np.exp(exact - exact.max(-1, keepdims=True))
    exact /= exact.sum(-1, keepdims=True)
    got = np.array(softmax(logits), dtype=np.float64)
    # float32 logits minus their largest carry ~4e-6 absolute error into e^x: in either path
    assert np.allclose(got, exact, rtol=1e-5, atol=1e-30 if rows == 16 else 3e-38)
    assert got[0, 1] > 0 and got[0, 3] == 0  # e^-86 of the largest, and e^-1e30
    assert got[0, 2] == 0 or rows == 16  # e^-93: 0 in the polynomial path
    weights = mx.arange(8, dtype=mx.float32)
    gradient = mx.grad(lambda v: (softmax(v) * weights).sum())(logits)
    want = mx.grad(lambda v: (mx.softmax(v, axis=-1, precise=True) * weights).sum())(logits)
    assert mx.allclose(gradient, want, rtol=1e-5, atol=1e-5).item()


def test_benchmark_compares_models_of_matching_size(capsys):
    args = benchmark.build_parser().parse_args(
        [
            "--contexts",
            "40",
            "--decode-tokens",
            "2",
            "--hidden-size",
            "64",
            "--fm-layers",
            "2",
            "--vocab-size",
            "300",
            "--slots",
            "8",
            "--top-k",
            "2",
            "--train-seq-len",
            "16",
            "--train-batch",
            "2",
            "--batch",
            "3",
            "--bits",
            "4",
        ]
    )
    results = benchmark.run(args)
    assert set(results) == {"FM", "FM 4-bit", "Llama", "Mamba-2"}
    prompt, decode, peak = results["FM 4-bit"].contexts[40]
    assert prompt > 0 and decode > 0 and peak > 0 and min(results["FM 4-bit"].against_float[40]) > 0
    counts, against_limits = {}, 0
    for line in capsys.readouterr().out.splitlines():
        if "parameters" in line:
            name, rest = line.split(":")
            counts[name] = float(rest.split(",")[1].split("M")[0])
        against_limits += line.count("% of ")
    assert against_limits == 2 * 3  # the prompt and decode rates of FM, Llama and Mamba-2
    for name in ("Llama", "Mamba-2"):
        assert abs(counts[name] - counts["FM"]) / counts["FM"] < 0.35
    for name in ("FM", "Llama", "Mamba-2"):
        measured = results[name]
        prompt, decode, peak = measured.contexts[40]
        assert prompt > 0 and decode > 0 and peak > 0 and min(measured.limits[40]) > 0
        assert measured.training > 0 and min(measured.batch_decode) > 0
    benchmark.print_ratios(results)
    out = capsys.readouterr().out
    assert "FM/Mamba-2 decode" in out and "FM/FM 4-bit" not in out
    fm, mamba2 = results["FM"].training, results["Mamba-2"].training
    assert f"FM/Mamba-2 {fm / mamba2:.2f}x" in out


def test_the_benchmarks_quantized_model_is_its_float_model_quantized():
    args = benchmark.build_parser().parse_args(["--hidden-size", "64", "--fm-layers", "1"])
    model = benchmark.fm_model(args, 1)
    quantized = benchmark.quantized_copy(model, args, 4)
    layer = quantized.layers[0].mixer.in_proj
    assert isinstance(layer, nn.QuantizedLinear) and layer.bits == 4
    weight = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4)
    expected = model.layers[0].mixer.in_proj.weight
    assert (mx.abs(weight - expected).mean() / mx.abs(expected).mean()).item() < 0.1


def test_resident_memory_is_the_models_own():
    """Peak memory is a model's own (weights, and a quantized model's float copies) plus what
    a prompt adds: not that of another model still alive beside it."""
    args = benchmark.build_parser().parse_args(["--hidden-size", "128", "--vocab-size", "300"])
    first, first_gb = benchmark.resident_gb(partial(benchmark.fm_model, args, 2), 300)
    second, second_gb = benchmark.resident_gb(partial(benchmark.fm_model, args, 4), 300)

    def weights_gb(model):
        return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9

    assert weights_gb(first) <= first_gb and weights_gb(second) <= second_gb
    assert second_gb < weights_gb(second) + weights_gb(first)
    ballast = mx.zeros((50_000_000,))  # 0.2 GB of another model's, alive throughout
    mx.eval(ballast)
    peak = benchmark.measure(second, 40, 2, 300, resident=second_gb)[2]
    assert second_gb < peak < second_gb + 0.1
    del ballast
    quantized, quantized_gb = benchmark.resident_gb(
        partial(benchmark.quantized_copy, second, args, 4), 300
    )
    copies_gb = sum(c.nbytes for c in quantized._float_copies) / 1e9
    assert quantized_gb >= copies_gb
    if native.decodes_here() and native.takes_quantized("affine", 4, 64):
        assert copies_gb == 0 and quantized_gb < second_gb  # it decodes on its own weights
    else:
        assert copies_gb > 0


def test_benchmark_training_runs_the_trainers_step():
    model = benchmark.fm_model(benchmark.build_parser().parse_args(["--hidden-size", "64"]), 1)
    before = np.array(model.backbone.embeddings.weight)
    assert benchmark.training_rate(model, seq_len=8, batch_size=2, vocab_size=100) > 0
    after = np.array(model.backbone.embeddings.weight)
    assert not np.array_equal(before, after)  # AdamW updated the weights


def test_the_decode_floor_streams_every_weight_matrix_once():
    model = benchmark.fm_model(benchmark.build_parser().parse_args(["--hidden-size", "64"]), 2)
    matrices = benchmark.weight_matrices(model)
    linear = sum(m.weight.size for _, m in model.named_modules() if isinstance(m, nn.Linear))
    embedding = model.backbone.embeddings.weight.size
    tied = model.args.tie_word_embeddings
    assert sum(w.size for w in matrices) == linear + (embedding if tied else 0)


def test_a_prompt_rate_is_that_of_its_fastest_run(monkeypatch):
    """Noise only slows a run down: of a short prompt's three runs the fastest counts; a long
    prompt is timed once."""
    model = benchmark.fm_model(benchmark.build_parser().parse_args(["--hidden-size", "64"]), 1)
    delays = iter([0.4, 0.05, 0.4, 0.4])  # seconds added to each prompt run

    class Slowed:
        def make_cache(self):
            return model.make_cache()

        def __call__(self, inputs, cache=None):
            if inputs.shape[1] > 1:  # a run's prefill: 39 tokens in one forward
                time.sleep(next(delays))
            return model(inputs, cache=cache)

    assert benchmark.measure(Slowed(), 40, 2, 100)[0] > 40 / 0.2
    monkeypatch.setattr(benchmark, "ONE_PROMPT_RUN_FROM", 40)
    assert benchmark.measure(Slowed(), 40, 2, 100)[0] < 40 / 0.4


def test_rates_in_turn_take_each_models_prompt_runs_in_turn():
    """A quantized model and its float self: their prompt runs alternate (and their decode
    windows, through timed_rates), so that noise meets both alike."""
    model = benchmark.fm_model(benchmark.build_parser().parse_args(["--hidden-size", "64"]), 1)
    model.eval()
    prefills = []

    class Delayed:
        def __init__(self, name, delay):
            self.name, self.delay = name, delay

        def make_cache(self):
            return model.make_cache()

        def __call__(self, inputs, cache=None):
            if inputs.shape[1] > 1:  # a run's prefill: 39 tokens in one forward
                prefills.append(self.name)
                time.sleep(self.delay)
            return model(inputs, cache=cache)

    (slow, _), (fast, _) = benchmark.rates_in_turn(
        [Delayed("slow", 0.2), Delayed("fast", 0.0)], 40, 2, 100
    )
    assert prefills == ["slow", "fast"] * benchmark.PROMPT_RUNS
    assert slow < 40 / 0.2 < fast


def test_rates_timed_together_run_in_turn_and_each_counts_its_fastest_run():
    """A decode and its floor are timed in alternate windows, so that noise on the machine meets
    both alike; each rate is that of its fastest window."""
    calls = []
    delays = {"decode": iter([0.0, 0.03, 0.01] + [0.03] * 50), "floor": iter([0.0] + [0.02] * 50)}

    def work(name):
        def run():
            calls.append(name)
            time.sleep(next(delays[name]))

        return run

    decode, floor = benchmark.timed_rates([work("decode"), work("floor")], 1, 0.1, runs=3)
    assert calls[: 2 * 4] == ["decode", "floor"] * 4
    assert 1 / 0.015 < decode <= 1 / 0.01 and 1 / 0.025 < floor <= 1 / 0.02


def test_the_limits_are_measured_with_the_rates_they_bound():
    model = benchmark.fm_model(benchmark.build_parser().parse_args(["--hidden-size", "64"]), 1)
    model.eval()
    benchmark.measure(model, 40, 2, 100)  # warm-up
    rates, (bound, floor) = benchmark.measure_against_limits(model, 40, 2, 100)
    assert min(rates) > 0 and bound > 0 and floor > 0
    # what timing the limits takes (the bound's GEMM: 2 MB and more here) is not in the peak
    assert rates[2] < benchmark.measure(model, 40, 2, 100)[2] + 0.0005
