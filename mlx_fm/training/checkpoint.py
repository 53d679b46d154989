"""Resumable checkpoints: a loadable MLX model directory plus the training state.

OUTPUT/checkpoints/step_NNNNNNN/ holds config.json, model.safetensors and the
tokenizer (what `mlx_fm.load` reads), optimizer.safetensors (the optimizer's
state, float32) and trainer_state.json (step, data position, RNG key, config).
A checkpoint is written under a hidden name and renamed into place, so one
either exists whole or not at all, even if the process is killed while writing; what a
killed run left half-written is removed when the next checkpoint is written.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from ..utils import write_model, written_atomically

CHECKPOINTS = "checkpoints"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
_PREFIX = "step_"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    windows_seen: int = 0  # training windows consumed: the position in the data order
    rng_key: tuple = ()  # mx.random's key after `step` steps


def save_checkpoint(
    output: Path, state: TrainerState, model, optimizer, tokenizer, config: dict, keep: int
) -> Path:
    final = output / CHECKPOINTS / f"{_PREFIX}{state.step:07d}"
    with written_atomically(final) as staging:
        write_model(staging, model, tokenizer)
        mx.save_safetensors(str(staging / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        record = {
            "step": state.step,
            "windows_seen": state.windows_seen,
            "rng_key": list(state.rng_key),
            "config": config,
        }
        (staging / STATE_FILE).write_text(json.dumps(record, indent=2) + "\n")
    for old in checkpoints(output)[:-keep]:
        shutil.rmtree(old)
    return final


def checkpoints(output: Path):
    """Complete checkpoints, oldest first."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith(_PREFIX) and p.is_dir())


def latest_checkpoint(output: Path) -> Optional[Path]:
    found = checkpoints(output)
    return found[-1] if found else None


def read_trainer_state(checkpoint: Path):
    """(TrainerState, the config dict it was saved with)."""
    record = json.loads((checkpoint / STATE_FILE).read_text())
    state = TrainerState(record["step"], record["windows_seen"], tuple(record["rng_key"]))
    return state, record["config"]


def restore_optimizer(optimizer, checkpoint: Path) -> None:
    saved = mx.load(str(checkpoint / OPTIMIZER_FILE))
    optimizer.state = tree_unflatten(list(saved.items()))


def rng_key() -> tuple:
    return tuple(int(v) for v in mx.random.state[0].tolist())


def restore_rng(key: tuple) -> None:
    """Set mx.random's key: seed s sets the key (s >> 32, s & 0xffffffff)."""
    high, low = key
    mx.random.seed((high << 32) | low)
