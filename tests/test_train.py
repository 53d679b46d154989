"""mlx_fm.train: learning, checkpoints, tokenizers, resume, data parallelism, bad input."""

import json
import math
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx_fm
from mlx_fm.training import TrainConfig, build_config, train
from mlx_fm.training.config import DEFAULT_MODEL
from mlx_fm.training.data import WindowOrder
from mlx_fm.utils import cache_limit

import mlx.core as mx
import pytest
from mlx_lm import generate

from conftest import run_cli

TINY_MODEL = dict(
    hidden_size=32, num_hidden_layers=2, num_heads=2, num_slots=8, top_k=4, intermediate_size=64
)
ALPHABET = "abcdefgh"
EXAMPLES = Path(__file__).parent.parent / "examples"


def copy_lines(count, seed=0, width=3):
    """Lines `xyz=xyz.`: the part after `=` is predictable only by copying."""
    rng = random.Random(seed)
    words = ("".join(rng.choice(ALPHABET) for _ in range(width)) for _ in range(count))
    return [f"{word}={word}." for word in words]


@pytest.fixture
def copy_data(tmp_path):
    path = tmp_path / "copy.txt"
    path.write_text("\n".join(copy_lines(400)))
    return path


def tiny_config(data, output, **options):
    defaults = dict(
        data=[str(data)],
        output=str(output),
        seq_len=32,
        batch_size=4,
        steps=4,
        learning_rate=3e-3,
        warmup_steps=1,
        val_every=1000,
        save_every=1000,
        model=TINY_MODEL,
    )
    return TrainConfig(**(defaults | options))


def cli_options(config: dict):
    args = []
    for key, value in config.items():
        flag = "--" + key.replace("_", "-")
        if key == "model":
            args += cli_options(value)
        elif key == "data":
            args += [flag, *value]
        else:
            args += [flag, str(value)]
    return args


def metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def weights(model_dir):
    return mx.load(str(model_dir / "model.safetensors"))


@pytest.mark.slow
def test_training_learns_to_copy_and_the_checkpoint_generates_the_copy(tmp_path):
    data = tmp_path / "copy.txt"
    data.write_text("\n".join(copy_lines(3000)))
    config = tiny_config(
        data,
        tmp_path / "run",
        steps=100,
        seq_len=64,
        batch_size=16,
        learning_rate=1e-2,
        warmup_steps=10,
        val_every=50,
        save_every=50,
        model=TINY_MODEL | dict(hidden_size=64, intermediate_size=128),
    )
    result = train(config)
    chance = math.log(257)
    # The 3 random letters of each 9-token line cost ln 8 each, the rest can be predicted.
    best_possible = 3 * math.log(len(ALPHABET)) / 9
    assert result.val_loss < best_possible + 0.2 < chance / 5
    assert [m["val_loss"] for m in metrics(tmp_path / "run") if "val_loss" in m][
        0
    ] > result.val_loss
    model, tokenizer = mlx_fm.load(result.model_path)
    for word in ("hag", "cab", "fed"):
        assert generate(model, tokenizer, f"\n{word}=", max_tokens=4) == f"{word}."


def test_bfloat16_weights_keep_float32_optimizer_state(tmp_path, copy_data):
    config = tiny_config(copy_data, tmp_path / "run", dtype="bfloat16", save_every=2)
    result = train(config)
    assert {w.dtype for w in weights(result.model_path).values()} == {mx.bfloat16}
    state = mx.load(str(tmp_path / "run/checkpoints/step_0000004/optimizer.safetensors"))
    moments = [v for k, v in state.items() if k.endswith((".m", ".v", ".master"))]
    assert len(moments) == 3 * len(weights(result.model_path))
    assert {v.dtype for v in moments} == {mx.float32}
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert losses[-1] < losses[0]


def test_training_keeps_freed_buffers_up_to_the_memory_limit_and_then_as_before(
    tmp_path, copy_data, monkeypatch
):
    """A step's temporaries are reused by the next one, not handed back to the OS (on the
    CPU: on Metal MLX keeps them anyway), also when training fails."""
    from mlx_fm.training import trainer

    before, limits = cache_limit(), []
    made = trainer.make_train_step
    monkeypatch.setattr(
        trainer, "make_train_step", lambda *a: limits.append(cache_limit()) or made(*a)
    )
    train(tiny_config(copy_data, tmp_path / "run", steps=2))
    assert limits == [mx.get_memory_limit()] and before < limits[0]
    assert cache_limit() == before
    monkeypatch.setattr(trainer, "make_train_step", lambda *a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train(tiny_config(copy_data, tmp_path / "failed", steps=2))
    assert cache_limit() == before


def test_gradient_checkpointing_changes_memory_not_results(tmp_path, copy_data):
    plain = train(tiny_config(copy_data, tmp_path / "plain", steps=3))
    checkpointed = train(tiny_config(copy_data, tmp_path / "ckpt", steps=3, grad_checkpoint=True))
    assert checkpointed.train_loss == pytest.approx(plain.train_loss, rel=1e-5)
    expected, actual = weights(plain.model_path), weights(checkpointed.model_path)
    assert all(mx.allclose(expected[k], actual[k], atol=1e-6).item() for k in expected)


BASELINES = {
    "llama": dict(
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "mamba2": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_heads=4,
        head_dim=16,
        intermediate_size=64,
        state_size=16,
        n_groups=1,
        conv_kernel=4,
        layer_norm_epsilon=1e-5,
        use_bias=False,
        use_conv_bias=True,
        tie_word_embeddings=True,
        time_step_limit=[0.0, math.inf],
        time_step_rank="auto",
    ),
}


@pytest.mark.parametrize("architecture", list(BASELINES))
def test_mlx_lm_baselines_train_resume_and_load_with_mlx_lm(tmp_path, copy_data, architecture):
    from mlx_lm import load as mlx_lm_load

    options = dict(
        architecture=architecture, model=BASELINES[architecture], save_every=3, learning_rate=1e-2
    )
    interrupted = train(tiny_config(copy_data, tmp_path / "run", steps=3, **options))
    resumed = train(tiny_config(copy_data, tmp_path / "run", steps=12, resume=True, **options))
    losses = [m["loss"] for m in metrics(tmp_path / "run") if "loss" in m]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    assert interrupted.steps == 3 and resumed.steps == 12
    model, tokenizer = mlx_lm_load(str(resumed.model_path))
    assert model.model_type == architecture
    assert len(generate(model, tokenizer, "abc=", max_tokens=3)) > 0
    fresh = train(
        tiny_config(
            copy_data,
            tmp_path / "fresh",
            steps=1,
            learning_rate=1e-9,
            warmup_steps=0,
            **{k: v for k, v in options.items() if k != "learning_rate"},
        )
    )
    initial = mlx_lm_load(str(fresh.model_path))[0]
    residual = (
        initial.layers[0].mlp.down_proj
        if architecture == "llama"
        else initial.layers[0].mixer.out_proj
    ).weight
    expected_std = 0.02 / math.sqrt(2 * 2)  # the residual-stream init, scaled by depth
    assert float(mx.std(residual)) == pytest.approx(expected_std, rel=0.15)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(architecture="no_such_model"), "unknown architecture 'no_such_model'"),
        (
            dict(architecture="llama", model=dict(num_slots=4)),
            "unknown llama model option(s): num_slots",
        ),
        (dict(architecture="llama", model=dict(hidden_size=32)), "bad llama model options"),
    ],
)
def test_bad_architecture_options_are_one_clear_error(tmp_path, copy_data, options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(tiny_config(copy_data, tmp_path / "run", **options))


def sentencepiece_model(tmp_path, lines):
    import sentencepiece as spm

    prefix = tmp_path / "sp"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(prefix),
        vocab_size=300,
        byte_fallback=True,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


def test_given_tokenizers_are_saved_with_the_model(tmp_path, copy_data):
    import sentencepiece as spm

    sp_model = sentencepiece_model(tmp_path, copy_lines(400))
    train(tiny_config(copy_data, tmp_path / "run", tokenizer=str(sp_model), steps=2))
    model, tokenizer = mlx_fm.load(tmp_path / "run/model")
    text = "fed=fed. bag cab"
    expected = spm.SentencePieceProcessor(model_file=str(sp_model)).encode(text)
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == text
    assert model.args.vocab_size == 300


def test_hf_tokenizer_directory(tmp_path, copy_data, tiny_model_dir):
    train(tiny_config(copy_data, tmp_path / "run", tokenizer=str(tiny_model_dir), steps=2))
    _, tokenizer = mlx_fm.load(tmp_path / "run/model")
    assert tokenizer.encode("abc") == [97, 98, 99]
    assert tokenizer.eos_token_id == 256


def test_yaml_config_and_flags_that_override_it(tmp_path):
    config = build_config(
        EXAMPLES / "train_tiny.yaml",
        data=["corpus"],
        output="out",
        seq_len=64,
        model={"num_slots": 16},
    )
    assert (config.seq_len, config.learning_rate, config.steps) == (64, 3e-3, 500)
    assert config.model["num_slots"] == 16 and config.model["hidden_size"] == 128
    assert set(config.model) == set(DEFAULT_MODEL) | {"rms_norm_eps"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1e-3\n")
    with pytest.raises(ValueError, match="learning_rat"):
        build_config(bad, data=["corpus"], output="out")


def test_data_order_is_a_pure_function_of_seed_and_epoch():
    order = WindowOrder(7, seed=3)
    run = order.indices(0, 21)
    assert sorted(run[:7]) == list(range(7)) and sorted(run[7:14]) == list(range(7))
    assert list(run[7:14]) != list(run[:7])
    assert list(WindowOrder(7, seed=3).indices(5, 11)) == list(run[5:16])


def free_port_pair():
    """A port p with p + 1 also free: the ring back-end listens on one port per rank."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as next_port:
                next_port.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path, copy_data):
    # Few windows, so the run crosses epochs; bfloat16 and accumulation, so the
    # master weights and the micro-batches must come back exactly too.
    options = dict(
        data=[str(copy_data)],
        seq_len=64,
        batch_size=4,
        grad_accumulation=2,
        steps=30,
        save_every=4,
        val_every=10,
        learning_rate=3e-3,
        warmup_steps=2,
        dtype="bfloat16",
        model=TINY_MODEL,
    )
    whole = run_cli("mlx_fm.train", *cli_options(options), "--output", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    interrupted = tmp_path / "interrupted"
    args = [*cli_options(options), "--output", str(interrupted)]
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_fm.train", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not (interrupted / "checkpoints/step_0000004").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.02)
    process.kill()  # SIGKILL: no chance to clean up
    assert process.wait() == -9
    assert not (interrupted / "model").exists()

    resumed = run_cli("mlx_fm.train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    resumed_from = int(resumed.stdout.split("(step ")[1].split(")")[0])
    assert 4 <= resumed_from < 30
    expected, actual = weights(tmp_path / "whole/model"), weights(interrupted / "model")
    assert expected.keys() == actual.keys()
    assert all(mx.array_equal(expected[k], actual[k]).item() for k in expected)
    assert metrics(interrupted) == metrics(tmp_path / "whole")

    with pytest.raises(ValueError, match="seq_len was 64, now 32"):
        train(
            TrainConfig(
                **(options | dict(seq_len=32, steps=40)), output=str(interrupted), resume=True
            )
        )
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(TrainConfig(**options, output=str(interrupted)))


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": line}) + "\n" for line in copy_lines(300)))
    options = dict(
        data=[str(data)],
        seq_len=32,
        batch_size=4,
        steps=5,
        val_every=5,
        learning_rate=3e-3,
        warmup_steps=1,
        vocab_size=320,
        model=TINY_MODEL,
    )
    single = train(TrainConfig(**options, output=str(tmp_path / "one")))

    launch = [
        str(Path(sys.executable).with_name("mlx.launch")),
        "--backend",
        "ring",
        "-n",
        "2",
        "--starting-port",
        str(free_port_pair()),
        "--",
        sys.executable,
        "-m",
        "mlx_fm.train",
        *cli_options(options),
        "--output",
        str(tmp_path / "two"),
    ]
    result = subprocess.run(launch, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 process(es)" in result.stdout

    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        key = "loss" if "loss" in a else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6)
    assert two[-1]["val_loss"] == pytest.approx(single.val_loss, rel=1e-5)
    # Both trained the same sentencepiece tokenizer (rank 0's, sent to rank 1).
    assert (tmp_path / "one/model/tokenizer.json").read_text() == (
        tmp_path / "two/model/tokenizer.json"
    ).read_text()
    _, tokenizer = mlx_fm.load(tmp_path / "two/model")
    assert tokenizer.decode(tokenizer.encode("hag=hag.\nfed")) == "hag=hag.\nfed"


def test_mlx_lm_option_names_are_accepted(tmp_path):
    from mlx_fm.train import build_parser, config_from_args

    argv = ["--data", "corpus.txt", "--output", str(tmp_path / "run"), "--iters", "700"]
    args = build_parser().parse_args([*argv, "--val-batches", "-1"])
    del args.force  # as main() does: an instruction for the command, not the run's config
    config = config_from_args(args)
    assert config.steps == 700
    assert config.val_batches == 0  # mlx-lm's -1, "all", is our 0
