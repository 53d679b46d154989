"""LoRA fine-tuning and fusing through mlx-lm's tuner, and the stateful chat."""

import json
import re
import shutil

import mlx_fm
from mlx_fm.chat import ChatSession

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler

from conftest import run_cli


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = root / "data"
    data.mkdir()
    lines = [json.dumps({"text": "the cat sat on the mat. " * 3}) for _ in range(16)]
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[:4]) + "\n")
    adapters = root / "adapters"
    result = run_cli(
        "mlx_fm.lora",
        "--model",
        str(tiny_model_dir),
        "--train",
        "--data",
        str(data),
        "--iters",
        "60",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--learning-rate",
        "3e-3",
        "--steps-per-eval",
        "60",
        "--val-batches",
        "2",
        "--adapter-path",
        str(adapters),
        "--seed",
        "0",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, adapters, root


@pytest.mark.slow
def test_lora_lowers_the_loss(lora_run):
    output, adapters, _ = lora_run
    plain = re.sub(r"\x1b\[[0-9;]*m", "", output)
    losses = [float(v) for v in re.findall(r"\bval\s+([0-9.]+)", plain)]
    assert len(losses) >= 2 and losses[-1] < 0.6 * losses[0], losses  # chance: ln 257 = 5.55
    assert (adapters / "adapters.safetensors").exists()


@pytest.mark.slow
def test_fused_model_equals_model_with_adapters(lora_run, tiny_model_dir):
    _, adapters, root = lora_run
    fused_dir = root / "fused"
    result = run_cli(
        "mlx_fm.fuse",
        "--model",
        str(tiny_model_dir),
        "--adapter-path",
        str(adapters),
        "--save-path",
        str(fused_dir),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    adapted, _ = mlx_fm.load(tiny_model_dir, adapter_path=str(adapters))
    fused, _ = mlx_fm.load(fused_dir)
    base, _ = mlx_fm.load(tiny_model_dir)
    tokens = mx.array([list(b"the cat sat on")])
    assert mx.allclose(fused(tokens), adapted(tokens), atol=1e-4).item()
    assert not mx.allclose(base(tokens), adapted(tokens), atol=1e-3).item()


@pytest.mark.slow
def test_fuse_with_adapters_of_another_model_fails_cleanly(lora_run, tmp_path):
    _, adapters, _ = lora_run
    other = tmp_path / "other"
    model = mlx_fm.Model(
        mlx_fm.ModelArgs(
            vocab_size=257, hidden_size=16, num_hidden_layers=2, num_heads=2, num_slots=4
        )
    )
    from mlx_fm.tokenizer import byte_tokenizer

    mlx_fm.save_pretrained(other, model, byte_tokenizer())
    result = run_cli(
        "mlx_fm.fuse",
        "--model",
        str(other),
        "--adapter-path",
        str(adapters),
        "--save-path",
        str(tmp_path / "fused"),
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "do not fit" in result.stderr
    assert not (tmp_path / "fused").exists()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
DATA_FORMATS = {
    "completions": lambda i: {"prompt": f"Q{i % 3}: the colour?", "completion": " blue, blue."},
    "chat": lambda i: {
        "messages": [
            {"role": "user", "content": f"Q{i % 3}"},
            {"role": "assistant", "content": "blue, blue."},
        ]
    },
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "data_format,fine_tune_type,quantized",
    [
        ("completions", "dora", False),
        ("chat", "full", False),
        ("completions", "lora", True),
    ],
)
def test_tuner_formats_types_and_quantized_models(
    tiny_model_dir, tmp_path, data_format, fine_tune_type, quantized
):
    from mlx_fm_convert.checkpoint import convert

    model_dir = tmp_path / "with_template"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if quantized:
        model_dir = tmp_path / "quantized"
        convert(
            str(tmp_path / "with_template"),
            str(model_dir),
            quantize=True,
            q_group_size=32,
            q_bits=4,
            quantize_all=True,
        )
        assert "quantization" in json.loads((model_dir / "config.json").read_text())
    data = tmp_path / "data"
    data.mkdir()
    rows = [DATA_FORMATS[data_format](i) for i in range(12)]
    write_jsonl(data / "train.jsonl", rows)
    write_jsonl(data / "valid.jsonl", rows[:4])
    result = run_cli(
        "mlx_fm.lora",
        "--model",
        str(model_dir),
        "--train",
        "--data",
        str(data),
        "--fine-tune-type",
        fine_tune_type,
        "--mask-prompt",
        "--iters",
        "40",
        "--batch-size",
        "2",
        "--num-layers",
        "2",
        "--learning-rate",
        "3e-3",
        "--steps-per-eval",
        "40",
        "--val-batches",
        "2",
        "--adapter-path",
        str(tmp_path / "adapters"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)
    losses = [float(v) for v in re.findall(r"\bval\s+([0-9.]+)", plain)]
    assert len(losses) >= 2 and losses[-1] < 0.7 * losses[0], plain[-1500:]


@pytest.mark.parametrize("data_format", ["completions", "chat"])
def test_readme_example_runs_on_a_small_model_without_chat_template(
    tiny_model_dir, tmp_path, monkeypatch, data_format
):
    """No --num-layers (mlx-lm's 16 > the model's 2), no chat template: both taken care of."""
    from mlx_fm.lora import main as lora_main

    monkeypatch.chdir(tmp_path)
    assert not mlx_fm.load(tiny_model_dir)[1].has_chat_template
    (tmp_path / "data").mkdir()
    rows = [DATA_FORMATS[data_format](i) for i in range(4)]
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "data" / "valid.jsonl", rows[:2])
    lora_main(
        [
            "--model",
            str(tiny_model_dir),
            "--train",
            "--data",
            "data",
            "--iters",
            "2",
            "--batch-size",
            "2",
            "--val-batches",
            "1",
            "--mask-prompt",
        ]
    )
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["num_layers"] == 2
    names = mx.load(str(tmp_path / "adapters" / "adapters.safetensors"))
    assert {name.split(".")[2] for name in names} == {"0", "1"}  # backbone.layers.N....


def chat_session(model_dir, **kwargs):
    model, tokenizer = mlx_fm.load(model_dir)
    return ChatSession(model, tokenizer, max_tokens=6, sampler=make_sampler(0.0), **kwargs)


def test_chat_feeds_only_new_tokens_and_keeps_a_constant_state(tiny_model_dir):
    session = chat_session(tiny_model_dir)
    session.reply("Hello there")
    first_turn, size = session.last_prompt_tokens, session.state_bytes
    session.reply("Hi")
    assert session.last_prompt_tokens < first_turn + 6  # not the whole conversation again
    for _ in range(3):
        session.reply("Tell me more, please, at some length")
    assert session.state_bytes == size


def test_saved_chat_state_continues_like_the_uninterrupted_chat(tiny_model_dir, tmp_path):
    uninterrupted = chat_session(tiny_model_dir, system_prompt="Be brief.")
    uninterrupted.reply("First question")
    uninterrupted.save(tmp_path / "chat.safetensors")
    expected = uninterrupted.reply("Second question")

    resumed = chat_session(tiny_model_dir, system_prompt="Be brief.")
    resumed.load(tmp_path / "chat.safetensors")
    assert resumed.reply("Second question") == expected

    resumed.reset()
    fresh = chat_session(tiny_model_dir, system_prompt="Be brief.")
    assert resumed.reply("First question") == fresh.reply("First question")


def test_chat_rejects_a_state_from_another_model(tiny_model_dir, tmp_path):
    other = mlx_fm.Model(
        mlx_fm.ModelArgs(
            vocab_size=257, hidden_size=16, num_hidden_layers=2, num_heads=2, num_slots=4
        )
    )
    other_session = ChatSession(other, mlx_fm.load(tiny_model_dir)[1], max_tokens=2)
    other_session.reply("hi")
    other_session.save(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="different model"):
        chat_session(tiny_model_dir).load(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_chat_cli_commands(tiny_model_dir, tmp_path):
    state = tmp_path / "conv"  # /save and /load add the suffix .safetensors
    script = f"Hello\n/tokens\nAgain\n/save {state}\n/reset\n/load {state}\n/quit\n"
    result = run_cli(
        "mlx_fm.chat", "--model", str(tiny_model_dir), "--max-tokens", "4", stdin=script
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"\[\d+ prompt tokens this turn, state \d+ bytes\]", result.stdout)
    assert "[saved" in result.stdout and "[loaded" in result.stdout
    assert "[conversation reset]" in result.stdout
    assert [path.name for path in tmp_path.iterdir()] == ["conv.safetensors"]
