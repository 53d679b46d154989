"""mlx-lm's own commands, from the shell, on FM checkpoints (`--trust-remote-code`).

Each runs in a new process, where nothing imported mlx_fm first: the checkpoint's model file
(config.json `model_file`) is what brings the architecture in.
"""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from mlx_fm.tokenizer import PLAIN_CHAT_TEMPLATE
from mlx_fm.utils import MODEL_FILE

import pytest

from conftest import run_cli


def mlx_lm(command: str, *args, stdin=None, timeout: float = 300):
    return run_cli("mlx_lm", command, *args, stdin=stdin, timeout=timeout)


def test_checkpoints_name_their_model_file(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_file"] == MODEL_FILE
    assert "mlx_fm" in (tiny_model_dir / MODEL_FILE).read_text()


def test_generate(tiny_model_dir):
    result = mlx_lm(
        "generate",
        "--model",
        str(tiny_model_dir),
        "--trust-remote-code",
        "--prompt",
        "hello",
        "--max-tokens",
        "5",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Generation: 5 tokens" in result.stdout


def test_generate_without_trust_remote_code_is_refused(tiny_model_dir):
    result = mlx_lm("generate", "--model", str(tiny_model_dir), "--prompt", "hello")
    assert result.returncode != 0
    assert "trust_remote_code" in result.stderr


def test_chat(tiny_model_dir, tmp_path):
    # mlx_lm.chat needs the tokenizer's chat template, which base models lack: give it one.
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings["chat_template"] = PLAIN_CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    result = mlx_lm(
        "chat",
        "--model",
        str(model),
        "--trust-remote-code",
        "--max-tokens",
        "4",
        stdin="hello\nq\n",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "bye" in result.stdout  # answered, then quit at "q"


def test_lora(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    lines = [json.dumps({"text": "the cat sat on the mat. " * 2})] * 8
    for name in ("train", "valid"):
        (data / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    result = mlx_lm(
        "lora",
        "--model",
        str(tiny_model_dir),
        "--trust-remote-code",
        "--train",
        "--data",
        str(data),
        "--iters",
        "2",
        "--batch-size",
        "2",
        "--num-layers",
        "1",
        "--val-batches",
        "1",
        "--adapter-path",
        str(tmp_path / "adapters"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "adapters" / "adapters.safetensors").is_file()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_server(tiny_model_dir):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm", "server", "--model", str(tiny_model_dir)]
        + ["--trust-remote-code", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            data=json.dumps({"prompt": "hello", "max_tokens": 4, "temperature": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        reply = None
        deadline = time.monotonic() + 120
        while reply is None and server.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = json.loads(response.read())
            except ConnectionError:  # not listening yet
                time.sleep(0.5)
            except urllib.error.URLError as error:
                if not isinstance(error.reason, ConnectionError):
                    raise
                time.sleep(0.5)
        assert reply is not None, "no reply from mlx_lm.server"
        assert reply["usage"]["completion_tokens"] == 4
        assert isinstance(reply["choices"][0]["text"], str)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_model_file_without_mlx_fm_fails_with_one_clear_line(tiny_model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, copy)
    # A process in which `import mlx_fm` fails, as where it is not installed.
    script = (
        "import sys; sys.modules['mlx_fm'] = None\n"
        "from mlx_lm import load\n"
        f"load({str(copy)!r}, trust_remote_code=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        "ImportError: this Factorization Memory checkpoint needs the mlx_fm package: "
        "pip install mlx-fm"
    )


@pytest.mark.parametrize("writer", ["fuse", "convert"])
def test_written_checkpoints_carry_the_model_file(writer, tiny_model_dir, tmp_path):
    destination = tmp_path / "out"
    if writer == "convert":
        from mlx_fm_convert.checkpoint import convert

        convert(str(tiny_model_dir), str(destination))
    else:
        from mlx_fm import load, save_pretrained

        model, tokenizer, config = load(tiny_model_dir, return_config=True)
        save_pretrained(destination, model, tokenizer, extra_config=config)
    config = json.loads((destination / "config.json").read_text())
    assert config["model_file"] == MODEL_FILE
    assert (destination / MODEL_FILE).read_text() == (tiny_model_dir / MODEL_FILE).read_text()
