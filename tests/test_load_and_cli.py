"""Loading, saving, and the mlx_fm.generate command."""

import json
import shutil
import subprocess
import sys

from mlx_fm import ModelLoadError, load, load_model, save_pretrained

import mlx.core as mx
import pytest

from conftest import run_cli, tiny_model


def test_save_then_load_gives_the_same_logits(tmp_path, tiny_model_dir):
    model, _ = load_model(tiny_model_dir)
    original = tiny_model()
    original.eval()  # for inference, as load_model returns models
    tokens = mx.array([[1, 2, 3, 4]])
    assert mx.allclose(model(tokens), original(tokens)).item()
    save_pretrained(tmp_path / "copy", model)
    copy, _ = load_model(tmp_path / "copy")
    assert mx.array_equal(copy(tokens), model(tokens)).item()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


def corrupt(tiny_model_dir, tmp_path, edit):
    path = tmp_path / "model"
    shutil.copytree(tiny_model_dir, path)
    edit(path)
    return path


def set_config(path, **changes):
    config = json.loads((path / "config.json").read_text()) | changes
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda p: (p / "config.json").unlink(), "no config.json"),
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: set_config(p, model_type="llama"), "model_type"),
        (lambda p: set_config(p, top_k=99), "top_k"),
        (lambda p: (p / "model.safetensors").unlink(), "safetensors"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 10), "cannot load"),
        (lambda p: set_config(p, model_file="evil.py"), "custom module"),
    ],
)
def test_bad_checkpoints_raise_one_clear_error(tiny_model_dir, tmp_path, edit, message):
    path = corrupt(tiny_model_dir, tmp_path, edit)
    (path / "evil.py").write_text("raise SystemExit('checkpoint code ran')\n")
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_missing_path_is_an_error_without_network():
    with pytest.raises(ModelLoadError, match="not found"):
        load("./no/such/model")


def test_generate_cli(tiny_model_dir):
    result = run_cli(
        "mlx_fm.generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "Hello",
        "--max-tokens",
        "5",
        "--verbose",
    )
    assert result.returncode == 0, result.stderr
    assert "Generation: 5 tokens" in result.stdout and "Peak memory" in result.stdout
    from_stdin = run_cli(
        "mlx_fm.generate",
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "-",
        "--max-tokens",
        "5",
        stdin="Hello",
    )
    plain = run_cli(
        "mlx_fm.generate", "--model", str(tiny_model_dir), "--prompt", "Hello", "--max-tokens", "5"
    )
    assert from_stdin.stdout == plain.stdout


def test_unreachable_hub_repo_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot fetch model 'nobody/no-such-fm-model'"):
        load_model("nobody/no-such-fm-model")


@pytest.mark.parametrize("module", ["mlx_fm.generate", "mlx_fm"])
def test_a_reader_that_leaves_early_ends_a_command_quietly(module):
    """`... | head -c 5`: the command stops without a traceback or an error line."""
    args = ["--prompt", "Once upon a time", "--max-tokens", "300"] if module != "mlx_fm" else []
    command = [sys.executable, "-m", module, *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.read(5)
    process.stdout.close()
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 1
    assert stderr == b"", stderr.decode(errors="replace")
