"""Speculative decoding with an FM target: greedy output is exactly that of decoding alone."""

import shutil

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models import llama

from conftest import TINY, run_cli, tiny_model

PROMPT_LENGTHS = [1, 2, 7, 33]


def greedy(model, tokenizer, prompt, **draft):
    return [
        response.token
        for response in stream_generate(model, tokenizer, prompt, max_tokens=24, **draft)
    ]


def llama_draft():
    mx.random.seed(3)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=16,
        num_hidden_layers=1,
        intermediate_size=32,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=TINY["vocab_size"],
        num_key_value_heads=2,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def target_and_tokenizer(tiny_model_dir):
    from mlx_fm import load

    return load(tiny_model_dir)


@pytest.mark.parametrize("draft_kind", ["fm", "llama", "itself"])
def test_greedy_output_equals_decoding_without_a_draft(draft_kind, target_and_tokenizer):
    target, tokenizer = target_and_tokenizer
    drafts = {
        "fm": lambda: tiny_model(seed=1, hidden_size=16, num_hidden_layers=1),
        "llama": llama_draft,
        "itself": lambda: target,  # every draft token accepted
    }
    draft = drafts[draft_kind]()
    for length in PROMPT_LENGTHS:
        mx.random.seed(length)
        prompt = mx.random.randint(0, TINY["vocab_size"], (length,))
        expected = greedy(target, tokenizer, prompt)
        for num_draft_tokens in range(1, 9):
            tokens = greedy(
                target, tokenizer, prompt, draft_model=draft, num_draft_tokens=num_draft_tokens
            )
            assert tokens == expected, (length, num_draft_tokens)


def test_generate_command_with_a_draft_model_prints_the_same_text(tiny_model_dir):
    command = ["mlx_fm.generate", "--model", str(tiny_model_dir), "--prompt", "the cat"]
    command += ["--max-tokens", "12"]
    alone = run_cli(*command)
    drafted = run_cli(
        *command, "--draft-model", str(tiny_model_dir), "--num-draft-tokens", "3", "--verbose"
    )
    assert alone.returncode == 0 and drafted.returncode == 0, drafted.stderr[-2000:]
    assert drafted.stdout.startswith(alone.stdout)
    assert "Draft: 9 of 12 tokens accepted from it" in drafted.stdout


def test_mlx_lm_generate_with_a_draft_model(tiny_model_dir, tmp_path):
    # mlx_lm.generate loads the draft without --trust-remote-code: a draft of its own kind.
    from mlx_fm.utils import model_config

    from mlx_lm.utils import save_config, save_model

    draft = tmp_path / "draft"
    model = llama_draft()
    save_model(draft, model)
    save_config(model_config(model.args), draft / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tiny_model_dir / name, draft / name)
    result = run_cli(
        "mlx_lm",
        "generate",
        "--model",
        str(tiny_model_dir),
        "--draft-model",
        str(draft),
        "--num-draft-tokens",
        "4",
        "--trust-remote-code",
        "--prompt",
        "hello",
        "--max-tokens",
        "6",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Generation: 6 tokens" in result.stdout
