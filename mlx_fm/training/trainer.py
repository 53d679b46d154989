"""Pretraining an FM model from scratch: `train(config)`.

Data-parallel over `mx.distributed` when launched with `mlx.launch`: every
process reads and packs the same data, takes its slice of each global batch,
and the gradients are averaged; rank 0 writes checkpoints and logs.
"""

import contextlib
import json
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import load_model as mlx_lm_load_model

from ..models.factorization_memory import MODEL_TYPE
from ..utils import (
    check_destination,
    freed_buffers_kept_for_training,
    load_model,
    make_directories,
    removed_on_failure,
    save_pretrained,
)
from . import checkpoint as ckpt
from .config import RESUME_MUST_MATCH, TrainConfig
from .data import WindowOrder, pack, read_documents, token_stream
from .initialization import build_model
from .optimizer import build_optimizer
from .progress import ProgressBar
from .tokenization import BYTES, load_saved_tokenizer, resolve_tokenizer

FINAL_MODEL = "model"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainResult:
    model_path: Path  # the final model, loadable by mlx_fm.load
    steps: int
    train_loss: float  # of the last step
    val_loss: Optional[float]  # at the end; None without validation data


def train(config: TrainConfig, progress_stream=None, force: bool = False) -> TrainResult:
    """Train (or resume) the run described by `config`; see TrainConfig for every option.

    A run that does not resume refuses to replace what OUTPUT's model/ or metrics.jsonl
    holds, unless `force`.
    """
    output = Path(config.output)
    with prepared_output(output):
        resume_from = resume_point(output, config)
        check_run_outputs(output, config, force or resume_from is not None)
        with freed_buffers_kept_for_training():
            return _train(config, output, resume_from, progress_stream)


def _train(
    config: TrainConfig, output: Path, resume_from: Optional[Path], progress_stream
) -> TrainResult:
    group = mx.distributed.init()
    is_main = group.rank() == 0
    tokenizer, data = tokenizer_and_data(config, resume_from, group)
    model, optimizer, state = model_and_optimizer(config, len(tokenizer), resume_from)
    local_batch = _local_batch_size(config, group.size())
    if config.grad_checkpoint:
        checkpoint_layers(model)
    train_step = make_train_step(model, optimizer, config, group)

    progress = ProgressBar(config.steps, config.log_every, progress_stream)
    metrics = MetricsLog(output / METRICS_FILE, state.step, enabled=is_main)
    if is_main:
        progress.message(_start_message(model, data, state, resume_from, group.size()))
    order = WindowOrder(len(data.train), config.seed)
    tokens_per_step = config.batch_size * config.seq_len
    loss, val_loss = float("nan"), None
    for step in range(state.step + 1, config.steps + 1):
        indices = order.indices(state.windows_seen, config.batch_size)
        mine = indices[group.rank() * local_batch : (group.rank() + 1) * local_batch]
        loss = train_step(mx.array(data.train[mine]))
        state.step, state.windows_seen = step, state.windows_seen + config.batch_size
        learning_rate = optimizer.learning_rate.item()
        metrics.write(step=step, loss=loss, learning_rate=learning_rate)
        if is_main:
            progress.update(step, loss, learning_rate, step * tokens_per_step)
        if step % config.val_every == 0 or step == config.steps:
            val_loss = validation_loss(model, data.validation, config, group)
            if val_loss is not None:
                metrics.write(step=step, val_loss=val_loss)
                if is_main:
                    progress.message(f"step {step}: validation loss {val_loss:.4f}")
        if is_main and (step % config.save_every == 0 or step == config.steps):
            state.rng_key = ckpt.rng_key()
            ckpt.save_checkpoint(
                output,
                state,
                model,
                optimizer,
                tokenizer,
                config.to_dict(),
                config.keep_checkpoints,
            )
    progress.close()
    model_path = output / FINAL_MODEL
    if is_main:
        save_pretrained(model_path, model, tokenizer)
        progress.message(f"saved the model to {model_path}")
    return TrainResult(model_path, state.step, loss, val_loss)


def tokenizer_and_data(config: TrainConfig, resume_from: Optional[Path], group):
    """The run's tokenizer (a resumed run's own) and its packed data."""
    documents = read_documents(config.data, "the training data")
    if resume_from is None:
        tokenizer = resolve_tokenizer(config, documents, group)
    else:
        tokenizer = load_saved_tokenizer(resume_from)
    data = pack(
        token_stream(documents, tokenizer, tokenizer.eos_token_id),
        config.seq_len,
        config.val_fraction,
        config.seed,
    )
    return tokenizer, data


def model_and_optimizer(config: TrainConfig, vocab_size: int, resume_from: Optional[Path]):
    """A fresh model, optimizer and TrainerState, or those of the checkpoint (RNG included)."""
    if resume_from is None:
        model = build_model(
            config.model,
            vocab_size,
            config.init_std,
            config.seed,
            config.dtype,
            config.architecture,
        )
        state = ckpt.TrainerState(rng_key=ckpt.rng_key())
    else:
        model = load_trained_model(resume_from, config.architecture)
        model.train()  # loading returns it in inference mode; a resumed run trains as a fresh one
        state, _ = ckpt.read_trainer_state(resume_from)
    optimizer = build_optimizer(config)
    optimizer.init(model.trainable_parameters())  # from the weights: their dtype sets the state's
    if resume_from is not None:
        ckpt.restore_optimizer(optimizer, resume_from)
        ckpt.restore_rng(state.rng_key)
    return model, optimizer, state


def load_trained_model(path: Path, architecture: str):
    if architecture == MODEL_TYPE:
        return load_model(path)[0]
    return mlx_lm_load_model(path)[0]


@contextlib.contextmanager
def prepared_output(output: Path):
    """The run directory, made and checked writable; the directories made for it are
    removed again if the run fails before writing anything into them."""
    try:
        made = make_directories(output)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as error:
        raise ValueError(
            f"cannot write to the output directory {output}: {error.strerror or error}"
        ) from error
    with removed_on_failure(made):
        yield


def check_run_outputs(output: Path, config: TrainConfig, replace: bool) -> None:
    """Refuse to replace OUTPUT's model/ or metrics.jsonl unless `replace` (a resumed run
    wrote them itself), and to replace the data or the tokenizer in any case."""
    sources = [*config.data]
    if config.tokenizer not in (None, BYTES):
        sources.append(config.tokenizer)
    for written in (output / FINAL_MODEL, output / METRICS_FILE):
        check_destination(written, sources, replace)


def resume_point(output: Path, config: TrainConfig) -> Optional[Path]:
    """The checkpoint to resume from: the latest with --resume, else None (and none may exist)."""
    latest = ckpt.latest_checkpoint(output)
    if latest is None:
        return None
    if not config.resume:
        raise ValueError(
            f"{output} already holds checkpoints: pass --resume to continue "
            "that run, or choose another --output"
        )
    _, saved = ckpt.read_trainer_state(latest)
    current = config.to_dict()
    for key in RESUME_MUST_MATCH:
        if saved[key] != current[key]:
            raise ValueError(
                f"cannot resume from {latest}: {key} was {saved[key]!r}, now {current[key]!r}"
            )
    if config.steps <= _step_of(latest):
        raise ValueError(
            f"{latest} is already at step {_step_of(latest)}; "
            f"raise --steps (now {config.steps}) to train further"
        )
    return latest


def _step_of(checkpoint: Path) -> int:
    return ckpt.read_trainer_state(checkpoint)[0].step


def _local_batch_size(config: TrainConfig, world: int) -> int:
    per_step = world * config.grad_accumulation
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size ({config.batch_size}) must be a multiple of processes × "
            f"grad_accumulation ({world} × {config.grad_accumulation})"
        )
    return config.batch_size // world


def make_train_step(model, optimizer, config: TrainConfig, group):
    """A function: this process's slice of the global batch → the global batch's mean loss.

    Each micro-batch's gradients are summed; the update uses their mean over all
    micro-batches of all processes, so it equals a one-process step on the
    global batch (up to float rounding).
    """
    world = group.size()
    loss_and_grad = nn.value_and_grad(model, next_token_loss)

    def gradients(windows):
        loss, grads = loss_and_grad(model, windows)
        return loss, tree_map(lambda g: g.astype(mx.float32), grads)

    def apply(loss, grads):
        scale = 1 / config.grad_accumulation
        loss, grads = loss * scale, tree_map(lambda g: g * scale, grads)
        if world > 1:
            loss = mx.distributed.all_sum(loss, group=group) / world
            grads = nn.average_gradients(grads, group=group)
        if config.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, config.grad_clip)
        optimizer.update(model, grads)
        return loss

    if config.compile:
        state = [model.state, optimizer.state, mx.random.state]
        gradients = mx.compile(gradients, inputs=state, outputs=state)
        apply = mx.compile(apply, inputs=state, outputs=state)

    def step(windows: mx.array) -> float:
        total_loss, total_grads = None, None
        for micro_batch in mx.split(windows, config.grad_accumulation):
            loss, grads = gradients(micro_batch)
            if total_grads is None:
                total_loss, total_grads = loss, grads
            else:
                total_loss = total_loss + loss
                total_grads = tree_map(mx.add, total_grads, grads)
            mx.eval(total_loss, total_grads)
        loss = apply(total_loss, total_grads)
        mx.eval(loss, model.state, optimizer.state)
        return loss.item()

    return step


def next_token_loss(model, windows, reduction="mean"):
    """Cross-entropy of predicting each window's tokens 1..L from tokens 0..L−1."""
    logits = model(windows[:, :-1]).astype(mx.float32)
    return nn.losses.cross_entropy(logits, windows[:, 1:], reduction=reduction)


def validation_loss(model, windows, config: TrainConfig, group) -> Optional[float]:
    """Mean loss per token over the held-out windows (at most val_batches batches of them)."""
    if len(windows) == 0:
        return None
    if config.val_batches:
        windows = windows[: config.val_batches * config.batch_size]
    mine = windows[group.rank() :: group.size()]
    micro = max(config.batch_size // (group.size() * config.grad_accumulation), 1)
    total = mx.array(0.0)
    for start in range(0, len(mine), micro):
        total = total + next_token_loss(model, mx.array(mine[start : start + micro]), "sum")
        mx.eval(total)
    count = len(windows) * config.seq_len
    return (mx.distributed.all_sum(total, group=group) / count).item()


def checkpoint_layers(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them."""
    for layer in model.layers:
        layer.__class__ = _checkpointed(type(layer))


@lru_cache(maxsize=None)
def _checkpointed(block_class):
    class CheckpointedBlock(block_class):
        def __call__(self, h, mask=None, cache=None):
            if mask is not None or cache is not None:
                return super().__call__(h, mask, cache)

            def run(parameters, h):
                self.update(parameters)
                return block_class.__call__(self, h)

            return mx.checkpoint(run)(self.trainable_parameters(), h)

    return CheckpointedBlock


class MetricsLog:
    """OUTPUT/metrics.jsonl: one JSON object per step or validation; rank 0 only.

    A resumed run first drops what the interrupted one logged after its checkpoint.
    """

    def __init__(self, path: Path, resumed_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if resumed_step and path.exists():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resumed_step
            ]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as log:
                log.write(json.dumps(record) + "\n")


def _start_message(model, data, state, resume_from, world) -> str:
    parameters = sum(v.size for _, v in tree_flatten(model.parameters()))
    where = f"resuming from {resume_from} (step {state.step})" if resume_from else "from scratch"
    return (
        f"training {parameters / 1e6:.2f}M parameters {where}: {len(data.train)} training "
        f"and {len(data.validation)} validation sequences, {world} process(es)"
    )
