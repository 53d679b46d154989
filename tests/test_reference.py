"""The PyTorch reference model (convert/reference.py): step vs chunked form, checkpoints."""

import dataclasses
import json

import pytest

torch = pytest.importorskip("torch")

from mlx_fm.layout import CheckpointError  # noqa: E402

from conftest import relative_error  # noqa: E402
from mlx_fm_convert.reference import (  # noqa: E402
    FactorizationMemoryForCausalLM,
    FMConfig,
    LayerCache,
    fm_step,
    route,
    scan_chunked,
    scan_recurrent,
)

SMALL = dict(
    vocab_size=61,
    hidden_size=16,
    num_hidden_layers=2,
    num_heads=2,
    num_slots=8,
    top_k=3,
    intermediate_size=24,
    tie_word_embeddings=False,
)


def reference_model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = FactorizationMemoryForCausalLM(FMConfig(**(SMALL | overrides)))
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.eta_bias.normal_()
            layer.mixer.mu_bias.normal_()
    return model.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"top_k": None},
        {"conv_kernel": 0},
        {"intermediate_size": 0},
        {"tie_word_embeddings": True, "conv_kernel": 2, "top_k": 1},
    ],
)
@torch.no_grad()
def test_chunked_form_matches_the_step_recurrence(overrides):
    model = reference_model(**overrides)
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 37))  # not a multiple of the chunk
    assert relative_error(model(tokens), model(tokens, recurrent=True)) < 1e-5


@torch.no_grad()
def test_prefill_then_step_decoding_continues_the_same_sequence():
    model = reference_model()
    tokens = torch.randint(0, SMALL["vocab_size"], (2, 30))
    whole = model(tokens)
    cache = model.make_cache()
    parts = [model(tokens[:, :21], cache)]
    parts += [model(tokens[:, t : t + 1], cache, recurrent=True) for t in range(21, 30)]
    assert relative_error(torch.cat(parts, dim=1), whole) < 1e-5
    assert cache[0].state.shape == (2, 2, 8, 16) and cache[0].conv_inputs.shape == (2, 3, 32)


def test_chunked_scan_is_exact_when_decays_are_extreme():
    torch.manual_seed(1)
    x = torch.randn(1, 50, 2, 4)
    weights = route(torch.randn(1, 50, 2, 6) * 5, 0.3, 2)
    for eta in (
        torch.full((1, 50, 2), 1.0),
        torch.full((1, 50, 2), 1e-6),
        torch.rand(1, 50, 2) ** 0.01,
    ):
        state = torch.randn(1, 2, 6, 4)
        step_reads, step_state = scan_recurrent(x, weights, eta, state)
        chunk_reads, chunk_state = scan_chunked(x, weights, eta, state, chunk_size=16)
        assert torch.isfinite(chunk_reads).all()
        assert torch.allclose(chunk_reads, step_reads, atol=1e-5)
        assert torch.allclose(chunk_state, step_state, atol=1e-5)


def test_sparse_step_leaves_unrouted_slots_untouched_bit_for_bit():
    torch.manual_seed(2)
    weights = route(torch.randn(3, 2, 8), 1.0, 2)
    state = torch.randn(3, 2, 8, 5)
    _, new_state = fm_step(torch.randn(3, 2, 5), weights, torch.rand(3, 2), state)
    unrouted = weights == 0
    assert unrouted.sum() == 3 * 2 * 6
    assert torch.equal(new_state[unrouted], state[unrouted])
    assert not torch.equal(new_state[~unrouted], state[~unrouted])
    assert torch.allclose(weights.sum(-1), torch.ones(3, 2))


@torch.no_grad()
def test_conv_is_pytorchs_padded_conv_truncated_to_the_input_length():
    mixer = reference_model().backbone.layers[0].mixer
    x = torch.randn(2, 9, mixer.config.inner_size)
    expected = torch.nn.functional.silu(mixer.conv1d(x.transpose(1, 2))[..., :9].transpose(1, 2))
    assert torch.allclose(mixer._conv(x, LayerCache()), expected, atol=1e-6)


@pytest.mark.parametrize(
    "weights_format,max_shard_bytes,files",
    [
        ("safetensors", None, {"model.safetensors"}),
        (
            "safetensors",
            14_000,
            {"model.safetensors.index.json", "model-00001-of-00003.safetensors"},
        ),
        ("bin", None, {"pytorch_model.bin"}),
        ("bin", 14_000, {"pytorch_model.bin.index.json", "pytorch_model-00002-of-00003.bin"}),
        ("pt", None, {"model.pt"}),
    ],
)
@torch.no_grad()
def test_checkpoints_round_trip_in_every_format(tmp_path, weights_format, max_shard_bytes, files):
    model = reference_model()
    model.save_pretrained(tmp_path, weights_format, max_shard_bytes)
    assert files <= {path.name for path in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "factorization_memory" and config["top_k"] == 3
    loaded = FactorizationMemoryForCausalLM.from_pretrained(tmp_path)
    tokens = torch.randint(0, SMALL["vocab_size"], (1, 12))
    assert torch.equal(loaded(tokens), model(tokens))


def test_parameter_names_and_shapes_are_specs_hf_layout():
    model = reference_model(tie_word_embeddings=True)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    assert shapes["backbone.layers.1.mixer.in_proj.weight"] == (2 * 32 + 2 * 8 + 2 * 2, 16)
    assert shapes["backbone.layers.0.mixer.conv1d.weight"] == (32, 1, 4)
    assert shapes["backbone.layers.0.mlp.down_proj.weight"] == (16, 24)
    assert "lm_head.weight" not in shapes


def test_config_defaults_agree_with_the_mlx_model():
    from mlx_fm import ModelArgs

    required = {
        key: SMALL[key]
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "num_slots")
    }
    reference, mlx_args = FMConfig(**required), ModelArgs(**required)
    for field in dataclasses.fields(FMConfig):
        assert getattr(reference, field.name) == getattr(mlx_args, field.name), field.name


@pytest.mark.parametrize(
    "change,message",
    [
        ({"model_type": "mamba2"}, "model_type"),
        ({"num_slots": None}, "num_slots"),
        ({"top_k": 9}, "top_k"),
        ({"num_heads": 3}, "num_heads"),
        ({"rms_norm_eps": 0}, "rms_norm_eps"),
        ({"tie_word_embeddings": "yes"}, "tie_word"),
    ],
)
def test_invalid_configs_name_the_key(change, message):
    config = {"model_type": "factorization_memory", **SMALL} | change
    config = {key: value for key, value in config.items() if value is not None}
    with pytest.raises(CheckpointError, match=message):
        FMConfig.from_dict(config)
