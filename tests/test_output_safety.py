"""No command deletes what it did not create: refused destinations, stale staging, modes."""

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import mlx_fm
from mlx_fm.fuse import main as fuse_main
from mlx_fm.tokenizer import byte_tokenizer
from mlx_fm.train import main as train_main
from mlx_fm.utils import written_atomically, written_file_atomically

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from conftest import tiny_model
from mlx_fm_convert.cli import main as convert_main

ADAPTER_CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 2,
    "lora_parameters": {"rank": 2, "scale": 10.0, "dropout": 0.0},
}


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """tmp_path/models/base (a model) and tmp_path/adapters/run (its LoRA adapters)."""
    base = tmp_path / "models" / "base"
    shutil.copytree(tiny_model_dir, base)
    model, _ = mlx_fm.load_model(base)
    linear_to_lora_layers(model, ADAPTER_CONFIG["num_layers"], ADAPTER_CONFIG["lora_parameters"])
    adapters = tmp_path / "adapters" / "run"
    adapters.mkdir(parents=True)
    lora = {
        name: mx.random.normal(value.shape)
        for name, value in tree_flatten(model.parameters())
        if name.endswith(("lora_a", "lora_b"))
    }
    mx.save_safetensors(str(adapters / "adapters.safetensors"), lora)
    (adapters / "adapter_config.json").write_text(json.dumps(ADAPTER_CONFIG))
    return tmp_path, base, adapters


def snapshot(root: Path) -> dict:
    """Every file under `root`, by path, with its bytes."""
    return {path: path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def assert_refused(capsys, main, argv, message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_fm: error:"), lines
    assert message in lines[0]


def fuse_args(base, adapters, save_path, *extra):
    return [
        "--model",
        str(base),
        "--adapter-path",
        str(adapters),
        "--save-path",
        str(save_path),
        *extra,
    ]


def test_fuse_replaces_a_non_empty_destination_only_with_force(workspace, capsys):
    root, base, adapters = workspace
    destination = root / "fused"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    before = snapshot(root)
    assert_refused(
        capsys, fuse_main, fuse_args(base, adapters, destination), "already exists (pass --force"
    )
    assert snapshot(root) == before

    fuse_main(fuse_args(base, adapters, destination, "--force"))
    assert not (destination / "notes.txt").exists()
    assert (destination / "model.safetensors").is_file()
    assert sorted(path.name for path in root.iterdir()) == ["adapters", "fused", "models"]


@pytest.mark.parametrize("save_path", ["models/base", "models", "adapters/run", "adapters", "."])
def test_fuse_refuses_a_destination_holding_its_source_even_with_force(
    workspace, capsys, save_path
):
    root, base, adapters = workspace
    before = snapshot(root)
    assert_refused(
        capsys,
        fuse_main,
        fuse_args(base, adapters, root / save_path, "--force"),
        "holds the source",
    )
    assert snapshot(root) == before


def test_convert_refuses_a_destination_holding_its_source_even_with_force(workspace, capsys):
    root, base, _ = workspace
    before = snapshot(root)
    assert_refused(
        capsys,
        convert_main,
        ["--hf-path", str(base), "--mlx-path", str(root / "models"), "--force"],
        "holds the source",
    )
    assert snapshot(root) == before


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"{word}={word}.\n" for word in ["abc", "bad", "cab", "dec"] * 100))
    return path


def train_args(data, output, *extra):
    return [
        "--data",
        str(data),
        "--output",
        str(output),
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
        "--val-every",
        "1000",
        "--save-every",
        "2",
        "--no-compile",
        "--hidden-size",
        "16",
        "--num-hidden-layers",
        "1",
        "--num-heads",
        "2",
        "--num-slots",
        "4",
        "--top-k",
        "2",
        "--intermediate-size",
        "16",
        *extra,
    ]


@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_train_refuses_foreign_files_in_model_before_training(tmp_path, corpus, capsys, resume):
    output = tmp_path / "run"
    (output / "model").mkdir(parents=True)
    (output / "model" / "weights.bin").write_bytes(b"someone else's")
    before = snapshot(tmp_path)
    assert_refused(
        capsys,
        train_main,
        train_args(corpus, output, "--steps", "2", *resume),
        f"{output / 'model'} already exists (pass --force",
    )
    assert snapshot(tmp_path) == before
    assert sorted(path.name for path in output.iterdir()) == ["model"]  # nothing trained

    train_main(train_args(corpus, output, "--steps", "2", "--force", *resume))
    assert not (output / "model" / "weights.bin").exists()
    assert mlx_fm.load_model(output / "model")[0] is not None


def test_train_refuses_to_replace_its_data_even_with_force(tmp_path, corpus, capsys):
    output = tmp_path / "run"
    data = output / "model" / "corpus.txt"
    data.parent.mkdir(parents=True)
    shutil.copy(corpus, data)
    before = snapshot(tmp_path)
    assert_refused(
        capsys, train_main, train_args(data, output, "--steps", "2", "--force"), "holds the source"
    )
    assert snapshot(tmp_path) == before


def test_a_resumed_run_replaces_its_own_model_and_dirs_follow_the_umask(tmp_path, corpus):
    old_umask = os.umask(0o022)
    try:
        output = tmp_path / "new" / "run"
        train_main(train_args(corpus, output, "--steps", "2"))
        first = (output / "model" / "model.safetensors").read_bytes()
        train_main(train_args(corpus, output, "--steps", "3", "--resume"))
    finally:
        os.umask(old_umask)
    assert (output / "model" / "model.safetensors").read_bytes() != first
    for directory in (
        tmp_path / "new",
        output,
        output / "model",
        output / "checkpoints" / "step_0000002",
    ):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755, directory
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert stat.S_IMODE((output / "model" / name).stat().st_mode) == 0o644, name


def test_a_failed_run_leaves_no_directory_it_made(tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text("too short for one sequence")
    with pytest.raises(SystemExit):
        train_main(train_args(data, tmp_path / "made" / "run", "--steps", "2"))
    assert "too few" in capsys.readouterr().err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["short.txt"]


def test_a_failed_save_removes_the_parents_it_made_and_keeps_those_that_existed(tmp_path):
    (tmp_path / "existing").mkdir()
    with pytest.raises(RuntimeError):
        with written_atomically(tmp_path / "existing" / "a" / "b" / "model"):
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == [tmp_path / "existing"]
    assert list((tmp_path / "existing").iterdir()) == []


def test_saved_models_and_conversions_follow_the_umask(tmp_path):
    old_umask = os.umask(0o022)
    try:
        mlx_fm.save_pretrained(tmp_path / "a" / "saved", tiny_model(), byte_tokenizer())
        convert_main(
            [
                "--hf-path",
                str(tmp_path / "a" / "saved"),
                "--mlx-path",
                str(tmp_path / "b" / "converted"),
            ]
        )
        with written_file_atomically(tmp_path / "notes.txt") as staging:
            staging.write_text("hello")
    finally:
        os.umask(old_umask)
    for directory in ("a", "a/saved", "b", "b/converted"):
        assert stat.S_IMODE((tmp_path / directory).stat().st_mode) == 0o755, directory
    for file in (
        "a/saved/model.safetensors",
        "b/converted/model.safetensors",
        "b/converted/config.json",
        "notes.txt",
    ):
        assert stat.S_IMODE((tmp_path / file).stat().st_mode) == 0o644, file


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_only_our_own_staging_of_dead_processes_is_removed(tmp_path):
    unrelated = tmp_path / ".cache"
    unrelated.mkdir()
    (unrelated / "data").write_text("keep")
    with written_atomically(tmp_path / "model") as live:
        (live / "weights").write_text("being written")
        host = live.name.split(".")[-3]  # .NAME.mlx_fm-staging.HOST.PID.TOKEN
        dead = live.name.replace(f".{os.getpid()}.", f".{dead_pid()}.")
        stale_dirs = [tmp_path / dead, tmp_path / dead.replace("mlx_fm-staging", "mlx_fm-old")]
        stale_file = tmp_path / f"{dead}.npy"  # as written_file_atomically names them
        other_host = tmp_path / dead.replace(f".{host}.", ".elsewhere.")
        for directory in [*stale_dirs, other_host]:
            directory.mkdir()
            (directory / "weights").write_text("left by a killed run")
        stale_file.write_text("left by a killed run")

        mlx_fm.save_pretrained(tmp_path / "other", tiny_model())  # a later run into the same parent
        assert (live / "weights").read_text() == "being written"
        assert sorted(path.name for path in tmp_path.iterdir()) == sorted(
            [".cache", live.name, other_host.name, "other"]
        )
    assert (unrelated / "data").read_text() == "keep"
    assert (other_host / "weights").exists()
