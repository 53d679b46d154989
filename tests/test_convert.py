"""mlx_fm.convert: SPEC checkpoints → MLX (and back), quantization, bad input."""

import dataclasses
import json
import os
import re
import shutil
import sys

from mlx_fm import load, load_model
from mlx_fm.layout import CheckpointError, with_conv_layout
from mlx_fm.tokenizer import BYTE_VOCAB_SIZE, save_byte_tokenizer
from mlx_fm.utils import write_safetensors

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import TINY, tiny_model
from mlx_fm_convert.checkpoint import convert
from mlx_fm_convert.cli import main as convert_main
from mlx_fm_convert.weights import read_weights

# hidden 32, inner 64, MLP 64: every Linear input size is a multiple of the group size 32.
SOURCE = TINY | dict(intermediate_size=64)
CONFIGS = {
    "sparse": {},
    "dense": {"top_k": None},
    "no-conv": {"conv_kernel": 0},
    "no-mlp-tied": {"intermediate_size": 0, "tie_word_embeddings": True},
}
FORMATS = {  # weights_format, max_shard_bytes of the reference's save_pretrained
    "safetensors": ("safetensors", None),
    "sharded-safetensors": ("safetensors", 30_000),
    "bin": ("bin", None),
    "pt": ("pt", None),
    "sharded-bin": ("bin", 30_000),
}
TOKENS = np.random.default_rng(0).integers(0, BYTE_VOCAB_SIZE, (2, 40))


def reference_checkpoint(
    path, config="sparse", weights_format="safetensors", max_shard_bytes=None, seed=0
):
    """A random PyTorch reference model saved to `path` with a tokenizer; returns the model."""
    torch = pytest.importorskip("torch")
    from mlx_fm_convert.reference import FactorizationMemoryForCausalLM, FMConfig

    torch.manual_seed(seed)
    model = FactorizationMemoryForCausalLM(FMConfig(**(SOURCE | CONFIGS[config])))
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.eta_bias.normal_()
            layer.mixer.mu_bias.normal_()
    model.save_pretrained(path, weights_format, max_shard_bytes)
    save_byte_tokenizer(path)
    return model.eval()


def reference_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor(TOKENS)).numpy()


def mlx_logits(model):
    """The logits of TOKENS in inference mode, as `load_model` returns models."""
    model.eval()
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def relative_norm_error(actual, expected):
    """‖actual − expected‖ / ‖expected‖ over all logits: an average, where conftest's
    relative_error is the worst case."""
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def spec_checkpoint(path, model):
    """An MLX model saved in SPEC's PyTorch layout with a tokenizer, without torch."""
    path.mkdir(parents=True)
    weights = with_conv_layout(dict(tree_flatten(model.parameters())), "pytorch")
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(model.args)))
    save_byte_tokenizer(path)


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("source") / "fm"
    spec_checkpoint(path, tiny_model(**SOURCE))
    return path


@pytest.mark.parametrize("source_format", FORMATS)
@pytest.mark.parametrize("config", CONFIGS)
def test_converted_model_matches_the_reference(tmp_path, config, source_format):
    model = reference_checkpoint(tmp_path / "src", config, *FORMATS[source_format])
    convert(str(tmp_path / "src"), str(tmp_path / "mlx"))
    converted, _ = load_model(tmp_path / "mlx")
    assert np.abs(mlx_logits(converted) - reference_logits(model)).max() < 1e-4


def test_converted_directory_loads_with_its_tokenizer(tmp_path, source_dir):
    convert(str(source_dir), str(tmp_path / "mlx"))
    names = {path.name for path in (tmp_path / "mlx").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    model, tokenizer = load(tmp_path / "mlx")
    assert tokenizer.decode(tokenizer.encode("FM")) == "FM"
    assert model(mx.array([tokenizer.encode("FM")])).shape == (1, 2, SOURCE["vocab_size"])


def test_pickled_weights_read_the_same_without_torch(tmp_path):
    torch = pytest.importorskip("torch")
    tensors = {
        "float": torch.randn(3, 4),
        "transposed": torch.randn(4, 5)[1:].t(),
        "bfloat16": torch.randn(6).to(torch.bfloat16),
        "half": torch.randn(2, 2).half(),
        "long": torch.arange(5),
        "parameter": torch.nn.Parameter(torch.ones(2)),
    }
    torch.save(tensors, tmp_path / "weights.bin")
    with_torch = read_weights([tmp_path / "weights.bin"])
    without_torch = read_weights([tmp_path / "weights.bin"], use_torch=False)
    assert with_torch.keys() == without_torch.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert without_torch[name].dtype == with_torch[name].dtype
        assert mx.array_equal(without_torch[name], with_torch[name]).item(), name
        assert np.array_equal(
            np.array(with_torch[name].astype(mx.float32)), tensor.detach().float().numpy()
        )


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("use_torch", [True, False])
def test_pickled_code_is_refused_not_run(tmp_path, monkeypatch, use_torch):
    torch = pytest.importorskip("torch")
    torch.save({"backbone.norm_f.weight": RunsCode()}, tmp_path / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="cannot read pytorch_model.bin"):
        read_weights([tmp_path / "pytorch_model.bin"], use_torch=use_torch)
    assert not (tmp_path / "pwned").exists()


def as_bin_that_runs_code(path):
    """The checkpoint's weights as pytorch_model.bin, one of them an object that runs a command."""
    torch = pytest.importorskip("torch")
    weights = mx.load(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    state = {name: torch.from_numpy(np.array(w)) for name, w in weights.items()}
    torch.save(state | {"backbone.norm_f.weight": RunsCode()}, path / "pytorch_model.bin")


@pytest.mark.parametrize("use_torch", [True, False])
def test_the_command_line_refuses_a_checkpoint_that_runs_code_in_one_line(
    tmp_path, source_dir, capsys, monkeypatch, use_torch
):
    source = tmp_path / "src" / "fm"
    shutil.copytree(source_dir, source)
    as_bin_that_runs_code(source)
    monkeypatch.chdir(tmp_path)  # where RunsCode's `touch pwned` would land
    if not use_torch:
        monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: no torch
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "out")])
    assert exit_info.value.code != 0
    assert capsys.readouterr().err == (
        "mlx_fm: error: cannot read pytorch_model.bin: not a plain tensor checkpoint (it "
        f"references {os.system.__module__}.system); refusing to run code from it\n"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("config", ["sparse", "no-mlp-tied"])
def test_mlx_to_hf_to_mlx_is_exact_and_hf_matches_the_reference(tmp_path, config):
    torch = pytest.importorskip("torch")
    from mlx_fm_convert.reference import FactorizationMemoryForCausalLM

    reference_checkpoint(tmp_path / "src", config)
    convert(str(tmp_path / "src"), str(tmp_path / "mlx"))
    convert(str(tmp_path / "mlx"), str(tmp_path / "hf"), to_hf=True)
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx2"))
    first, second = load_model(tmp_path / "mlx")[0], load_model(tmp_path / "mlx2")[0]
    for (name, a), (_, b) in zip(
        tree_flatten(first.parameters()), tree_flatten(second.parameters())
    ):
        assert a.dtype == b.dtype and mx.array_equal(a, b).item(), name
    hf_weights = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    assert hf_weights["backbone.layers.0.mixer.in_proj.weight"].shape == (2 * 64 + 16 + 4, 32)
    if config == "sparse":
        assert hf_weights["backbone.layers.0.mixer.conv1d.weight"].shape == (64, 1, 4)
    reference = FactorizationMemoryForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert np.abs(reference_logits(reference) - mlx_logits(first)).max() < 1e-4


def quantized_types(model):
    return {name: type(module) for name, module in model.named_modules()}


def module_named(model, name):
    return dict(model.named_modules())[name]


ROUTING_CRITICAL = (
    "backbone.layers.0.mixer.in_proj",
    "backbone.layers.1.mixer.in_proj",
    "backbone.embeddings",
    "lm_head",
)
OTHERS = ("backbone.layers.1.mixer.out_proj", "backbone.layers.0.mlp.down_proj")


def test_4_bit_default_gives_routing_critical_layers_8_bits(tmp_path, source_dir):
    convert(str(source_dir), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=32)
    model, _ = load_model(tmp_path / "q")
    assert all(module_named(model, name).bits == 8 for name in ROUTING_CRITICAL)
    assert all(module_named(model, name).bits == 4 for name in OTHERS)
    quantization = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert quantization["bits"] == 4 and quantization["group_size"] == 32
    assert all(
        quantization[name] == {"group_size": 32, "bits": 8, "mode": "affine"}
        for name in ROUTING_CRITICAL
    )
    error = relative_norm_error(mlx_logits(model), mlx_logits(load_model(source_dir)[0]))
    assert 0 < error < 0.15


def test_8_bit_default_keeps_routing_critical_layers_float(tmp_path, source_dir):
    convert(str(source_dir), str(tmp_path / "q"), quantize=True, q_bits=8, q_group_size=32)
    model, _ = load_model(tmp_path / "q")
    types = quantized_types(model)
    assert {types[name] for name in ROUTING_CRITICAL} == {nn.Linear, nn.Embedding}
    assert all(module_named(model, name).bits == 8 for name in OTHERS)
    error = relative_norm_error(mlx_logits(model), mlx_logits(load_model(source_dir)[0]))
    assert 0 < error < 0.01


@pytest.mark.parametrize("bits,tolerance", [(4, 0.35), (8, 0.03)])
def test_naive_quantization_quantizes_every_layer_alike(tmp_path, source_dir, bits, tolerance):
    convert(
        str(source_dir),
        str(tmp_path / "q"),
        quantize=True,
        q_bits=bits,
        q_group_size=32,
        quantize_all=True,
    )
    model, _ = load_model(tmp_path / "q")
    assert all(module_named(model, name).bits == bits for name in ROUTING_CRITICAL + OTHERS)
    quantization = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]
    assert quantization == {"group_size": 32, "bits": bits, "mode": "affine"}
    float_logits = mlx_logits(load_model(source_dir)[0])
    error = relative_norm_error(mlx_logits(model), float_logits)
    assert 0 < error < tolerance
    convert(str(source_dir), str(tmp_path / "default"), quantize=True, q_bits=bits, q_group_size=32)
    routing_safe, _ = load_model(tmp_path / "default")
    assert relative_norm_error(mlx_logits(routing_safe), float_logits) < error


@pytest.mark.parametrize("mode,tolerance", [("mxfp4", 0.3), ("nvfp4", 0.3), ("mxfp8", 0.1)])
def test_float_quantization_modes_run_and_reload(tmp_path, source_dir, mode, tolerance):
    convert(str(source_dir), str(tmp_path / "q"), quantize=True, q_mode=mode)
    model, _ = load_model(tmp_path / "q")
    assert model.layers[0].mixer.out_proj.mode == mode
    in_proj = model.layers[0].mixer.in_proj
    if mode == "mxfp8":
        assert type(in_proj) is nn.Linear
    else:
        assert in_proj.mode == "mxfp8"
    float_model, _ = load_model(source_dir)
    assert relative_norm_error(mlx_logits(model), mlx_logits(float_model)) < tolerance


def test_dequantize_writes_float_weights_equal_to_the_quantized_values(tmp_path, source_dir):
    convert(str(source_dir), str(tmp_path / "q"), quantize=True, q_group_size=32)
    convert(str(tmp_path / "q"), str(tmp_path / "dq"), dequantize=True)
    quantized, dequantized = load_model(tmp_path / "q")[0], load_model(tmp_path / "dq")[0]
    config = json.loads((tmp_path / "dq" / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert type(dequantized.layers[0].mixer.out_proj) is nn.Linear
    assert np.allclose(mlx_logits(dequantized), mlx_logits(quantized), atol=1e-5)


def test_dtype_casts_float_weights(tmp_path, source_dir):
    convert(str(source_dir), str(tmp_path / "bf16"), dtype="bfloat16")
    model, _ = load_model(tmp_path / "bf16")
    dtypes = {value.dtype for _, value in tree_flatten(model.parameters())}
    assert dtypes == {mx.bfloat16}
    float_model, _ = load_model(source_dir)
    assert relative_norm_error(mlx_logits(model), mlx_logits(float_model)) < 0.05


def test_large_models_are_written_in_shards(tmp_path, source_dir):
    assert (
        convert_main(
            [
                "--hf-path",
                str(source_dir),
                "--mlx-path",
                str(tmp_path / "mlx"),
                "--max-shard-size",
                "50KB",
            ]
        )
        is None
    )
    shards = sorted((tmp_path / "mlx").glob("model-*.safetensors"))
    assert len(shards) > 2 and all(path.stat().st_size < 80_000 for path in shards)
    index = json.loads((tmp_path / "mlx" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {path.name for path in shards}
    float_model, _ = load_model(source_dir)
    assert np.array_equal(mlx_logits(load_model(tmp_path / "mlx")[0]), mlx_logits(float_model))


# Bad input: one line on stderr, exit status 1, nothing at the destination.


def edit_config(**changes):
    def edit(path):
        config = json.loads((path / "config.json").read_text()) | changes
        (path / "config.json").write_text(json.dumps(config))

    return edit


def drop_config_key(key):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        del config[key]
        (path / "config.json").write_text(json.dumps(config))

    return edit


def edit_weights(change):
    def edit(path):
        weights = mx.load(str(path / "model.safetensors"))
        change(weights)
        mx.save_safetensors(str(path / "model.safetensors"), weights)

    return edit


def truncate(name):
    def edit(path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return edit


def index_pointing_outside(absolute):
    def edit(path):
        outside = path.parent / "elsewhere.safetensors"
        (path / "model.safetensors").rename(outside)
        name = str(outside) if absolute else "../elsewhere.safetensors"
        index = {"weight_map": {key: name for key in mx.load(str(outside))}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))

    return edit


def as_bin(path):
    torch = pytest.importorskip("torch")

    weights = mx.load(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    torch.save(
        {name: torch.from_numpy(np.array(w)) for name, w in weights.items()},
        path / "pytorch_model.bin",
    )


@pytest.mark.parametrize(
    "edit,message",
    [
        (drop_config_key("num_slots"), "config.json lacks num_slots"),
        (edit_config(model_type="mamba2"), "unsupported model_type 'mamba2'"),
        (edit_config(top_k=20), r"top_k \(20\) must not exceed num_slots"),
        (edit_config(conv_kernel=-2), "conv_kernel must be a non-negative integer"),
        (lambda p: (p / "config.json").write_text("{oops"), "not valid JSON"),
        (
            edit_weights(lambda w: w.pop("backbone.layers.1.mixer.mu_bias")),
            "missing tensors: backbone.layers.1.mixer.mu_bias",
        ),
        (edit_weights(lambda w: w.update(extra=mx.zeros(2))), "unexpected tensors: extra"),
        (
            edit_weights(lambda w: w.update({"backbone.norm_f.weight": mx.zeros(31)})),
            r"backbone.norm_f.weight is \(31,\), expected \(32,\)",
        ),
        (truncate("model.safetensors"), "cannot read model.safetensors"),
        (lambda p: (as_bin(p), truncate("pytorch_model.bin")(p)), "cannot read pytorch_model.bin"),
        (
            index_pointing_outside(absolute=False),
            "names '../elsewhere.safetensors', outside the checkpoint directory",
        ),
        (
            index_pointing_outside(absolute=True),
            "/elsewhere.safetensors', outside the checkpoint directory",
        ),
        (lambda p: (p / "model.safetensors").unlink(), "no weights in"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(
    tmp_path, source_dir, capsys, edit, message
):
    source = tmp_path / "src" / "fm"
    shutil.copytree(source_dir, source)
    edit(source)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["--hf-path", str(source), "--mlx-path", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("mlx_fm: error: ") and stderr.count("\n") == 1
    assert re.search(message, stderr), stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["src"]


def test_shards_linked_from_elsewhere_like_the_hub_cache_are_read(tmp_path):
    model = reference_checkpoint(tmp_path / "blobs", "sparse", "safetensors", 30_000)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for path in (tmp_path / "blobs").iterdir():
        (snapshot / path.name).symlink_to(path)
    convert(str(snapshot), str(tmp_path / "mlx"))
    converted, _ = load_model(tmp_path / "mlx")
    assert np.abs(mlx_logits(converted) - reference_logits(model)).max() < 1e-4


def test_existing_destination_needs_force(tmp_path, source_dir, capsys):
    destination = tmp_path / "out"
    destination.mkdir()
    (destination / "keep.txt").write_text("old")
    with pytest.raises(SystemExit):
        convert_main(["--hf-path", str(source_dir), "--mlx-path", str(destination)])
    assert "already exists (pass --force" in capsys.readouterr().err
    assert (destination / "keep.txt").exists()
    convert_main(["--hf-path", str(source_dir), "--mlx-path", str(destination), "--force"])
    assert not (destination / "keep.txt").exists()
    assert (destination / "model.safetensors").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_a_failure_during_writing_leaves_the_old_destination(tmp_path, source_dir, monkeypatch):
    destination = tmp_path / "out"
    convert(str(source_dir), str(destination))
    before = (destination / "model.safetensors").read_bytes()

    def disk_full(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("mlx_fm_convert.checkpoint.save_config", disk_full)
    with pytest.raises(OSError, match="No space"):
        convert(str(source_dir), str(destination), quantize=True, q_group_size=32, force=True)
    assert (destination / "model.safetensors").read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["-q", "--dequantize"], "either --quantize or --dequantize"),
        (["-q", "--to-hf"], "cannot be combined with --quantize"),
        (["--to-hf", "--upload-repo", "me/fm"], "--upload-repo uploads MLX models"),
        (["-q", "--q-group-size", "48"], "no layer could be quantized"),
    ],
)
def test_conflicting_options_are_refused(tmp_path, source_dir, capsys, args, message):
    with pytest.raises(SystemExit):
        convert_main(["--hf-path", str(source_dir), "--mlx-path", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantizing_a_quantized_model_is_refused(tmp_path, source_dir):
    convert(str(source_dir), str(tmp_path / "q"), quantize=True, q_group_size=32)
    with pytest.raises(CheckpointError, match="already quantized"):
        convert(str(tmp_path / "q"), str(tmp_path / "qq"), quantize=True)


def test_converting_onto_the_source_is_refused(tmp_path, source_dir):
    source = tmp_path / "fm"
    shutil.copytree(source_dir, source)
    with pytest.raises(CheckpointError, match="holds the source"):
        convert(str(source), str(source), force=True)
    assert (source / "model.safetensors").exists()


def test_mlx_models_from_save_model_convert_too(tmp_path):
    """An MLX-layout source (conv1d E×K×1, as mlx_fm.save_pretrained writes it)."""
    from mlx_fm import save_pretrained

    model = tiny_model()
    save_pretrained(tmp_path / "mlx", model)
    convert(str(tmp_path / "mlx"), str(tmp_path / "hf"), to_hf=True)
    hf = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    assert hf["backbone.layers.0.mixer.conv1d.weight"].shape == (64, 1, 4)
    assert np.array_equal(mlx_logits(load_model(tmp_path / "hf")[0]), mlx_logits(model))


def test_the_command_line_reports_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_fm_convert.cli",
            "--hf-path",
            str(tmp_path / "nothing"),
            "--mlx-path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr == f"mlx_fm: error: model path not found: {tmp_path / 'nothing'}\n"


def test_write_safetensors_keeps_every_tensor(tmp_path):
    weights = {f"w{i}": mx.full((100,), i, mx.float32) for i in range(5)}
    write_safetensors(tmp_path, weights, "mlx", max_shard_bytes=800)
    read = read_weights(sorted(tmp_path.glob("model-*.safetensors")))
    assert len(list(tmp_path.glob("model-*.safetensors"))) == 3
    assert read.keys() == weights.keys()
    assert all(mx.array_equal(read[name], weights[name]).item() for name in weights)
