"""The FM language model as an mlx-lm model: config, weights, cache, generation."""

import copy

from mlx_fm import ModelArgs, load
from mlx_fm.cache import FMCache
from mlx_fm.models import factorization_memory
from mlx_fm.ops import fm_recurrent, native

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import batch_generate, generate
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache
from mlx_lm.sample_utils import make_sampler
from mlx_lm.tuner.utils import linear_to_lora_layers

from conftest import TINY, relative_error, tiny_model


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("top_k", 9, "top_k"),
        ("top_k", 0, "top_k"),
        ("num_heads", 3, "num_heads"),
        ("hidden_size", 0, "hidden_size"),
        ("num_slots", -1, "num_slots"),
        ("router_temperature", 0.0, "router_temperature"),
        ("conv_kernel", -1, "conv_kernel"),
        ("model_type", "llama", "model_type"),
    ],
)
def test_invalid_config_values_name_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        ModelArgs(**(TINY | {key: value}))


def test_from_dict_ignores_unknown_keys_and_defaults_to_dense():
    config = {k: v for k, v in TINY.items() if k != "top_k"}
    args = ModelArgs.from_dict(config | {"architectures": ["X"], "torch_dtype": "float32"})
    assert args.top_k == args.num_slots
    assert args.head_dim == args.expand * args.hidden_size // args.num_heads


def test_sanitize_accepts_pytorch_layout_and_is_idempotent():
    model = tiny_model()
    from mlx.utils import tree_flatten

    weights = dict(tree_flatten(model.parameters()))
    torch_layout = dict(weights)
    for key in [k for k in weights if k.endswith("conv1d.weight")]:
        torch_layout[key] = weights[key].swapaxes(1, 2)  # E×1×K
        assert torch_layout[key].shape[1] == 1
    once = model.sanitize(torch_layout)
    twice = model.sanitize(once)
    for key, value in weights.items():
        assert once[key].shape == value.shape and mx.array_equal(once[key], value).item()
        assert mx.array_equal(twice[key], value).item()


def reference_logits(model, tokens):
    """The LM computed straight from SPEC, token by token, with the step recurrence."""
    args = model.args
    h = model.backbone.embeddings(tokens)
    for layer in model.layers:
        mixer = layer.mixer
        u = layer.norm(h)
        z, x, rho, e, g = mx.split(mixer.in_proj(u), mixer.splits, axis=-1)
        k = args.conv_kernel
        padded = mx.pad(x, [(0, 0), (k - 1, 0), (0, 0)])
        w = mixer.conv1d.weight[:, :, 0]
        conv = mixer.conv1d.bias + sum(w[:, j] * padded[:, j : j + x.shape[1]] for j in range(k))
        xbar = mx.sigmoid(conv) * conv
        b, t = x.shape[:2]
        xbar = xbar.reshape(b, t, args.num_heads, args.head_dim)
        alpha = mx.softmax(rho.reshape(b, t, args.num_heads, -1) / args.router_temperature, -1)
        kth = mx.sort(alpha, axis=-1)[..., -args.top_k][..., None]
        alpha = mx.where(alpha >= kth, alpha, 0)
        alpha = alpha / alpha.sum(-1, keepdims=True)
        eta = mx.sigmoid(e + mixer.eta_bias)
        mu = mx.sigmoid(g + mixer.mu_bias)[..., None]
        r, _ = fm_recurrent(xbar, alpha, eta)
        o = (mu * r + (1 - mu) * xbar).reshape(b, t, -1)
        h = h + mixer.out_proj(mixer.norm(o * (mx.sigmoid(z) * z)))
        h = h + layer.mlp(layer.mlp_norm(h))
    return model.lm_head(model.backbone.norm_f(h))


def test_forward_matches_spec_reference():
    model = tiny_model()
    tokens = mx.array([[3, 70, 12, 250, 9, 9, 41, 100, 7, 1, 2, 3, 4, 5, 6, 7, 8] * 5])
    assert relative_error(model(tokens), reference_logits(model, tokens)) < 1e-4


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conv_kernel": 0, "intermediate_size": 0},
        {"conv_kernel": 1, "top_k": 8},
        {"conv_kernel": 2},
    ],
)
def test_prefill_in_steps_then_decode_equals_full_forward(overrides):
    model = tiny_model(**overrides)
    mx.random.seed(5)
    tokens = mx.random.randint(0, 257, (2, 150))
    full = model(tokens)
    cache = make_prompt_cache(model)
    pieces = [model(tokens[:, :64], cache=cache), model(tokens[:, 64:128], cache=cache)]
    pieces += [model(tokens[:, t : t + 1], cache=cache) for t in range(128, 150)]
    assert relative_error(mx.concatenate(pieces, axis=1), full) < 1e-4


def test_compiled_decode_equals_layer_by_layer_decode_and_follows_new_weights():
    model = tiny_model(top_k=4)
    prompt = mx.array([[5, 80, 31, 7, 99], [1, 2, 3, 4, 6]])
    compiled, layer_by_layer = make_prompt_cache(model), make_prompt_cache(model)
    for cache in (compiled, layer_by_layer):
        model(prompt, cache=cache)
    for step, token in enumerate(([[9], [10]], [[11], [12]], [[13], [14]])):
        if step == 2:
            model.update(tree_map(lambda p: p * 1.25, model.parameters()))
        token = mx.array(token)
        fast = model(token, cache=compiled)  # a decode step: the compiled graph
        # input embeddings take the per-layer path, with the step recurrence
        slow = model(token, cache=layer_by_layer, input_embeddings=model.backbone.embeddings(token))
        assert relative_error(fast, slow) < 1e-6
        for c_fast, c_slow in zip(compiled, layer_by_layer):
            for a, b in zip(c_fast.cache, c_slow.cache):
                assert relative_error(a, b) < 1e-6
            assert c_fast.trimmable_tokens == c_slow.trimmable_tokens


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("group_size", [32, 64])
def test_quantized_prompt_on_dequantized_weights_equals_quantized_matmul(
    tied, group_size, monkeypatch
):
    """A prompt multiplies by its layers' weights dequantized: in inference, groups of 64 in C
    where it takes them (native.takes_quantized) as they are (float32 scales); groups of 32,
    bfloat16 scales, and training, by mx.dequantize."""
    model = tiny_model(hidden_size=64, intermediate_size=64, tie_word_embeddings=tied)
    nn.quantize(model, group_size=group_size, bits=4)
    model.eval()
    in_c = []
    dequantized_in_c = native.dequantized
    monkeypatch.setattr(native, "dequantized", lambda m: in_c.append(m) or dequantized_in_c(m))
    tokens = mx.random.randint(0, 257, (2, 40))
    dequantized = model(tokens)
    assert bool(in_c) == native.takes_quantized("affine", 4, group_size)
    model.train()  # C gives no gradient
    in_c.clear()
    assert relative_error(model(tokens), dequantized) < 1e-6 and not in_c
    monkeypatch.setattr(factorization_memory, "_DEQUANTIZE_FROM_TOKENS", 10**9)
    assert relative_error(dequantized, model(tokens)) < 1e-5
    monkeypatch.undo()
    model.eval()
    for _, layer in model.named_modules():  # C would not round to bfloat16, as MLX does
        if isinstance(layer, nn.QuantizedLinear):
            layer.scales, layer.biases = (
                layer[k].astype(mx.bfloat16) for k in ("scales", "biases")
            )
    monkeypatch.setattr(native, "dequantized", lambda m: in_c.append(m) or dequantized_in_c(m))
    model(tokens)
    assert not [m for m in in_c if m.scales.dtype != mx.float32]


def decoded_on_quantized_matmul(model, token, cache, monkeypatch):
    """The logits of a decode step on MLX's quantized matmul, not the float copies."""
    with monkeypatch.context() as patch:
        patch.setattr(factorization_memory, "_dequantizes", lambda layer, x: False)
        return model(token, cache=cache, input_embeddings=model.backbone.embeddings(token))


def test_quantized_decode_on_float_copies_equals_quantized_matmul_and_follows_new_weights(
    monkeypatch,
):
    """On the CPU a compiled decode step multiplies by float copies of the quantized weights:
    the same logits as MLX's quantized matmul, kept out of the parameters, and remade when
    the weights change (not constants of the compiled graph)."""
    model = tiny_model(hidden_size=64, intermediate_size=64, top_k=4)
    nn.quantize(model, group_size=32, bits=4)
    parameters = tree_flatten(model.parameters())
    prompt = mx.array([[5, 80, 31, 7, 99]])
    copies, quantized = make_prompt_cache(model), make_prompt_cache(model)
    for cache in (copies, quantized):
        model(prompt, cache=cache)
    for step, token in enumerate(([[9]], [[11]], [[13]])):
        if step == 2:
            requantized = tiny_model(hidden_size=64, intermediate_size=64, top_k=4, seed=3)
            nn.quantize(requantized, group_size=32, bits=4)
            model.update(requantized.parameters())
        fast = model(mx.array(token), cache=copies)
        slow = decoded_on_quantized_matmul(model, mx.array(token), quantized, monkeypatch)
        assert relative_error(fast, slow) < 1e-5
    quantized_layers = [
        m
        for _, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    ]
    assert len(model._float_copies) == len(quantized_layers) > 0
    assert [name for name, _ in tree_flatten(model.parameters())] == [n for n, _ in parameters]


def test_a_model_quantized_after_it_decoded_decodes_on_float_copies_of_its_new_weights(
    monkeypatch,
):
    model = tiny_model(hidden_size=64, intermediate_size=64, top_k=4)
    prompt, token = mx.array([[5, 80, 31, 7, 99]]), mx.array([[9]])
    cache = make_prompt_cache(model)
    model(prompt, cache=cache)
    model(token, cache=cache)  # a compiled step, on float weights: no copies
    assert model._float_copies == []
    nn.quantize(model, group_size=32, bits=4)
    copies, quantized = make_prompt_cache(model), make_prompt_cache(model)
    for cache in (copies, quantized):
        model(prompt, cache=cache)
    fast = model(token, cache=copies)
    slow = decoded_on_quantized_matmul(model, token, quantized, monkeypatch)
    assert relative_error(fast, slow) < 1e-5
    assert len(model._float_copies) == len(model._float_sources) > 0


def test_cache_state_is_float32_and_does_not_grow():
    model = tiny_model().apply(lambda p: p.astype(mx.bfloat16))
    cache = make_prompt_cache(model)
    model(mx.zeros((1, 20), mx.int32), cache=cache)  # more than the snapshots it keeps
    sizes = [c.nbytes for c in cache]
    assert cache[0][0].dtype == mx.float32
    model(mx.zeros((1, 500), mx.int32), cache=cache)
    assert [c.nbytes for c in cache] == sizes
    assert cache[0][0].dtype == mx.float32


def test_left_padding_leaks_into_neither_conv_nor_state():
    model = tiny_model()
    prompt = mx.array([[5, 80, 31, 7, 99, 12, 64]])
    alone = make_prompt_cache(model)
    expected = model(prompt, cache=alone)[:, -1]
    padded_cache = make_prompt_cache(model)
    for c in padded_cache:
        c.left_padding = mx.array([4])
    garbage = mx.array([[200, 201, 202, 203]])
    logits = model(mx.concatenate([garbage, prompt], axis=1), cache=padded_cache)[:, -1]
    assert relative_error(logits, expected) < 1e-4
    for c_alone, c_padded in zip(alone, padded_cache):
        for a, b in zip(c_alone.cache, c_padded.cache):
            assert relative_error(b, a) < 1e-5


def test_prompt_cache_save_and_load(tmp_path):
    model = tiny_model()
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    restored = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    next_token = mx.array([[6]])
    assert mx.allclose(model(next_token, cache=restored), model(next_token, cache=cache)).item()


def test_batch_generate_matches_single_prompt_generation(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompts = [tokenizer.encode(p) for p in ["Hi", "A much longer prompt here", "Mid size"]]
    batch = batch_generate(model, tokenizer, prompts, max_tokens=10, verbose=False)
    for prompt, text in zip(prompts, batch.texts):
        alone = generate(model, tokenizer, prompt, max_tokens=10, sampler=make_sampler(0.0))
        assert text == alone


def test_batch_cache_merge_filter_extract():
    model = tiny_model()
    caches = []
    for prompt in ([[1, 2, 3]], [[4, 5, 6, 7, 8]]):
        cache = make_prompt_cache(model)
        model(mx.array(prompt), cache=cache)
        caches.append(cache)
    merged = [type(c0).merge([c0, c1]) for c0, c1 in zip(*caches)]
    step = mx.array([[9], [9]])
    together = model(step, cache=merged)
    apart = [model(step[:1], cache=c) for c in caches]
    assert relative_error(together[0], apart[0][0]) < 1e-5
    assert relative_error(together[1], apart[1][0]) < 1e-5
    extracted = [c.extract(1) for c in merged]
    for c in merged:
        c.filter([1])
    for a, b in zip(extracted, merged):
        for x, y in zip(a.cache, b.cache):
            assert mx.array_equal(x, y).item()


def test_only_training_asks_the_scan_for_backward_checkpoints(monkeypatch):
    asked = []

    def recording(*args, keep_checkpoints, **kwargs):
        asked.append(keep_checkpoints)
        return fm_mix_keeping(*args, keep_checkpoints=keep_checkpoints, **kwargs)

    fm_mix_keeping = factorization_memory.fm_mix_keeping
    monkeypatch.setattr(factorization_memory, "fm_mix_keeping", recording)
    model = tiny_model()
    tokens = mx.array([[1, 2, 3, 4]])
    model.train()
    model(tokens)
    model.eval()
    model(tokens)
    layers = len(model.layers)
    assert asked == [True] * layers + [False] * layers


def test_an_inference_prompt_runs_in_c_and_equals_a_training_forward(monkeypatch, c_build):
    """In eval mode a prompt's conv, mix and gated norm run in C on the CPU (ops/native.py),
    in training mode on MLX ops: the two forwards agree, with a cache and without one."""
    calls = []
    for name in ("conv_silu", "fm_mix_native", "gate_norm"):
        monkeypatch.setattr(native, name, counted(getattr(native, name), name, calls))
    model = tiny_model()
    tokens = mx.random.randint(0, TINY["vocab_size"], (2, 70))
    model.train()
    expected = model(tokens)
    assert calls == []
    model.eval()
    assert relative_error(model(tokens), expected) < 1e-5
    layers = len(model.layers)
    assert sorted(calls) == sorted(["conv_silu", "fm_mix_native", "gate_norm"] * layers)
    cache = model.make_cache()
    assert relative_error(model(tokens, cache=cache), expected) < 1e-5


def test_a_prompt_in_c_holds_one_layers_projection_at_a_time():
    """The conv inputs a cache carries are taken out of in_proj's output as each layer runs, so
    that they do not keep every layer's whole output alive: 10 layers peak about as 2 do (kept
    alive, each layer's would add one more)."""
    if not native.available():
        pytest.skip(f"no C path here: {native.status()}")
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 4096))
    mx.eval(tokens)

    def peak(layers):
        model = tiny_model(num_hidden_layers=layers)
        model.eval()
        for _ in range(2):  # the second, once MLX's buffers are warm
            cache = model.make_cache()
            mx.clear_cache()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            model(tokens, cache=cache)
            mx.eval([c.state for c in cache])
        return mx.get_peak_memory() - before

    one_layer_output = tokens.size * tiny_model().layers[0].mixer.in_proj.weight.shape[0] * 4
    assert peak(10) < peak(2) + 3 * one_layer_output


def counted(function, name, calls):
    def counting(*arguments, **options):
        calls.append(name)
        return function(*arguments, **options)

    return counting


def decoded(model, prompt, tokens, *, training, update_at=None):
    """Each decode step's logits and the caches after them, with the model in training mode
    (a compiled step on MLX ops) or in eval mode (in C on the CPU); the weights scaled by 1.25
    before step `update_at`."""
    model.train(training)
    cache = make_prompt_cache(model)
    model(prompt, cache=cache)
    logits = []
    for step, token in enumerate(tokens):
        if step == update_at:
            model.update(tree_map(lambda p: p * 1.25, model.parameters()))
        logits.append(model(mx.array(token), cache=cache))
    if update_at is not None:
        model.update(tree_map(lambda p: p / 1.25, model.parameters()))
    return logits, cache


def assert_decodes_alike(model, prompt, tokens, update_at=None):
    expected, expected_cache = decoded(model, prompt, tokens, training=True, update_at=update_at)
    actual, cache = decoded(model, prompt, tokens, training=False, update_at=update_at)
    for a, b in zip(actual, expected):
        assert a.shape == b.shape and relative_error(a, b) < 1e-5
    for layer_cache, expected_layer in zip(cache, expected_cache):
        for a, b in zip(layer_cache.cache, expected_layer.cache):
            assert a.dtype == b.dtype and relative_error(a, b) < 1e-5
        assert layer_cache.trimmable_tokens == expected_layer.trimmable_tokens


def decode_steps_in_c(monkeypatch) -> list:
    if not native.decodes_here():
        pytest.skip(f"no C decode step here: {native.decode_status()}")
    calls = []
    monkeypatch.setattr(
        native.DecodeStep, "__call__", counted(native.DecodeStep.__call__, "", calls)
    )
    return calls


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"conv_kernel": 0, "intermediate_size": 0},
        {"conv_kernel": 1, "top_k": 8},
        {"conv_kernel": 2, "tie_word_embeddings": True},
        {"router_temperature": 0.5, "top_k": 1},
    ],
)
def test_an_inference_decode_step_runs_in_c_and_equals_the_compiled_step(
    overrides, monkeypatch, c_build
):
    """In eval mode on the CPU a decode step of the whole model runs in C (native.DecodeStep):
    the logits and caches of the compiled step on MLX ops, for every layer shape, two rows, and
    weights that change between steps."""
    calls = decode_steps_in_c(monkeypatch)
    model = tiny_model(**overrides)
    prompt = mx.array([[5, 80, 31, 7, 99], [1, 2, 3, 4, 6]])
    tokens = ([[9], [10]], [[11], [12]], [[13], [14]], [[15], [16]])
    assert_decodes_alike(model, prompt, tokens, update_at=2)
    assert len(calls) == len(tokens)


def test_the_c_step_runs_on_layers_replaced_after_it_ran(monkeypatch):
    """A layer replaced between steps (a projection, with new weights) is what the next step
    multiplies by; LoRA layers, which the C step cannot take, leave the step to MLX ops."""
    calls = decode_steps_in_c(monkeypatch)
    model = tiny_model()
    model.eval()
    cache = make_prompt_cache(model)
    model(mx.array([[5, 80, 31, 7, 99]]), cache=cache)
    model(mx.array([[9]]), cache=cache)
    mx.random.seed(7)
    mlp = model.layers[1].mlp
    mlp.down_proj = nn.Linear(model.args.intermediate_size, model.args.hidden_size, bias=False)
    on_ops = copy.deepcopy(cache)
    model.train()
    expected = model(mx.array([[11]]), cache=on_ops)
    model.eval()
    assert relative_error(model(mx.array([[11]]), cache=cache), expected) < 1e-5
    assert len(calls) == 2
    linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    model.eval()
    model(mx.array([[13]]), cache=cache)
    assert len(calls) == 2


@pytest.mark.parametrize("group_size", [32, 64])
def test_a_quantized_model_decodes_in_c_on_its_own_weights_or_float_copies(group_size, monkeypatch):
    """Groups of 64 4-bit values are whole 8-word vectors, which fm_decode multiplies by itself
    where that is fast (native.takes_quantized); groups of 32 go through float copies."""
    calls = decode_steps_in_c(monkeypatch)
    model = tiny_model(hidden_size=64, intermediate_size=64, top_k=4)
    nn.quantize(model, group_size=group_size, bits=4)
    assert_decodes_alike(model, mx.array([[5, 80, 31, 7, 99]]), ([[9]], [[11]], [[13]]))
    assert len(calls) == 3
    own = [w for w in model._step_in_c.weights if isinstance(w, native.Quantized)]
    assert bool(own) == native.takes_quantized("affine", 4, group_size)
    quantized = make_prompt_cache(model)
    model(mx.array([[5, 80, 31, 7, 99]]), cache=quantized)
    slow = decoded_on_quantized_matmul(model, mx.array([[9]]), quantized, monkeypatch)
    copies = make_prompt_cache(model)
    model(mx.array([[5, 80, 31, 7, 99]]), cache=copies)
    assert relative_error(model(mx.array([[9]]), cache=copies), slow) < 1e-5


def test_a_left_padded_batch_decodes_in_c_as_on_mlx_ops(monkeypatch):
    calls = decode_steps_in_c(monkeypatch)
    model = tiny_model()
    results = []
    for training in (True, False):
        model.train(training)
        cache = [FMCache(2, left_padding=[3, 0]) for _ in model.layers]
        model(mx.array([[0, 0, 0, 5, 80], [1, 2, 3, 4, 6]]), cache=cache)
        results.append([model(mx.array([[9], [10]]), cache=cache) for _ in range(3)])
        results[-1] += [c.cache[0] for c in cache]
    for a, b in zip(*results):
        assert relative_error(a, b) < 1e-5
    assert len(calls) == 3


@pytest.mark.parametrize("case", ["ops only", "bfloat16", "bfloat16 cache", "lora", "compiled"])
def test_a_decode_step_the_c_step_cannot_take_runs_on_mlx_ops(case, monkeypatch):
    calls = decode_steps_in_c(monkeypatch)
    model = tiny_model()
    model.eval()
    if case == "ops only":
        monkeypatch.setenv("MLX_FM_OPS_ONLY", "1")
    elif case == "bfloat16":
        model.apply(lambda p: p.astype(mx.bfloat16))
    elif case == "lora":
        linear_to_lora_layers(model, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
        model.eval()

    def decode(prompt, token):
        cache = make_prompt_cache(model)
        model(prompt, cache=cache)
        if case == "bfloat16 cache":  # e.g. one saved from a bfloat16 model
            for layer_cache in cache:
                layer_cache[1] = layer_cache[1].astype(mx.bfloat16)
        return model(token, cache=cache)

    if case == "compiled":  # mx.compile refuses the evaluation C needs
        decode = mx.compile(decode)
    logits = decode(mx.array([[5, 80, 31]]), mx.array([[9]]))
    assert logits.shape == (1, 1, TINY["vocab_size"]) and calls == []


def test_a_token_out_of_the_vocabulary_or_a_cache_of_another_model_is_refused_by_the_c_step(
    monkeypatch,
):
    decode_steps_in_c(monkeypatch)
    model = tiny_model()
    model.eval()
    cache = make_prompt_cache(model)
    model(mx.array([[5, 80, 31]]), cache=cache)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        model(mx.array([[TINY["vocab_size"]]]), cache=cache)
    other = tiny_model(num_slots=4, top_k=2)
    other.eval()
    with pytest.raises(ValueError, match="a cache made for another model"):
        other(mx.array([[7]]), cache=cache)
