"""Fine-tune an FM model: `mlx_fm.lora [--model PATH] --train --data DIR [...]`.

mlx-lm's tuner, unchanged: LoRA, DoRA (`--fine-tune-type dora`) or full
fine-tuning, its data formats (completions, chat, text jsonl), `--mask-prompt`,
and its YAML keys (`lora_parameters: {rank, scale, dropout, keys}`), on float or
quantized FM models. `import mlx_fm` registers the FM model type with mlx-lm.

Before handing over to mlx-lm, the options and the local data are checked (a bad
line is named by file and line number). Without `--model` the bundled model is
used; without `--num-layers`, mlx-lm's 16 layers or all of a smaller model's; a
tokenizer without a chat template gets mlx_fm.chat's plain one. A run that fails
removes the adapter directory it created.
"""

import contextlib
import importlib.util
import json
import os
import shutil
import types
from pathlib import Path
from typing import Iterator, Optional, Tuple

from .cli import fail_cleanly

MLX_LM_NUM_LAYERS = 16  # mlx-lm's default --num-layers
SPLITS = ("train", "valid", "test")
POSITIVE_OPTIONS = (
    "batch_size",
    "iters",
    "steps_per_report",
    "steps_per_eval",
    "save_every",
    "grad_accumulation_steps",
    "max_seq_length",
)


def parse_options(argv=None) -> types.SimpleNamespace:
    """mlx-lm's options: the command line, then the YAML file (-c), then mlx-lm's defaults."""
    from mlx_lm import lora

    from .training.config import read_yaml_mapping

    parser = lora.build_parser()
    parser.prog = "mlx_fm.lora"
    options = vars(parser.parse_args(argv))
    config = read_yaml_mapping(options["config"], lora.yaml_loader) if options["config"] else {}
    defaults = lora.CONFIG_DEFAULTS | {"model": None, "num_layers": None}
    for source in (config, defaults):
        for key, value in source.items():
            if options.get(key) is None:
                options[key] = value
    return types.SimpleNamespace(**options)


def check_options(options: types.SimpleNamespace) -> None:
    if not (options.train or options.test):
        raise ValueError("give --train, --test or both")
    for key in POSITIVE_OPTIONS:
        value = getattr(options, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def check_data(options: types.SimpleNamespace) -> None:
    """Check the local --data directory, which mlx-lm reads without saying where a bad line is."""
    if getattr(options, "hf_dataset", None):
        return
    path = Path(options.data)
    if not path.exists():
        # mlx-lm takes a name that is no directory for a Hugging Face dataset.
        if importlib.util.find_spec("datasets") is None:
            raise ValueError(
                f"data directory not found: {options.data} (a Hugging Face "
                "dataset would need `pip install datasets`)"
            )
        return
    if not path.is_dir():
        raise ValueError(f"--data must be a directory of {', '.join(SPLITS)}.jsonl: {path}")
    needed = {"train": options.train, "valid": False, "test": options.test}
    for split in SPLITS:
        file = path / f"{split}.jsonl"
        if file.is_file():
            check_jsonl(file, options)
        elif needed[split]:
            raise ValueError(f"no {split}.jsonl in {path} (--{split} needs it)")


def check_jsonl(file: Path, options: types.SimpleNamespace) -> None:
    """Every line a JSON object with the keys of the data format of the first line."""
    keys = None
    with open(file, "rb") as lines:
        for number, line in enumerate(lines, 1):
            where = f"{file}, line {number}"
            if not line.strip():
                raise ValueError(f"{where}: an empty line (each line must be a JSON object)")
            try:
                record = json.loads(line)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError
                reason = getattr(error, "msg", None) or getattr(error, "reason", error)
                raise ValueError(f"{where}: not valid JSON: {reason}") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: not a JSON object")
            keys = keys or format_keys(record, options, where)
            missing = [key for key in keys if key not in record]
            if missing:
                raise ValueError(f"{where}: no {missing[0]!r}, which the first line has")
    if keys is None:
        raise ValueError(f"{file} is empty")


def format_keys(record: dict, options: types.SimpleNamespace, where: str) -> Tuple[str, ...]:
    """The keys of `record`'s data format, tried in the order of mlx-lm's create_dataset."""
    prompt = getattr(options, "prompt_feature", "prompt")
    completion = getattr(options, "completion_feature", "completion")
    chat = getattr(options, "chat_feature", "messages")
    text = getattr(options, "text_feature", "text")
    for keys in ((prompt, completion), (chat,), (text,)):
        if all(key in record for key in keys):
            return keys
    raise ValueError(
        f"{where}: no data format's keys: {prompt!r} and {completion!r} "
        f"(completions), {chat!r} (chat) or {text!r} (text)"
    )


def resolve_num_layers(requested: Optional[int], layers: int) -> int:
    """The layers to fine-tune: mlx-lm's default, or `requested` (-1: all), within the model."""
    if requested is None:
        return min(MLX_LM_NUM_LAYERS, layers)
    if requested != -1 and not 1 <= requested <= layers:
        raise ValueError(
            f"--num-layers must be -1 (all) or 1 to {layers}, the model's layers; got {requested}"
        )
    return requested


@contextlib.contextmanager
def removed_if_failed(directory: Path) -> Iterator[None]:
    """Remove what the block creates of `directory` (with missing parents) if it fails.

    An interrupted run (Ctrl-C) keeps what it wrote: mlx-lm saves adapters as it goes.
    """
    missing = [path for path in (directory, *directory.parents) if not path.exists()]
    try:
        yield
    except Exception:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)
        raise


def run(options: types.SimpleNamespace, model, tokenizer) -> None:
    """mlx-lm's lora.run, with the model and tokenizer loaded by mlx_fm."""
    import numpy as np
    from mlx_lm import lora
    from mlx_lm.tuner.callbacks import get_reporting_callbacks
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.tuner.utils import load_adapters

    from .utils import freed_buffers_kept_for_training

    np.random.seed(options.seed)
    callback = get_reporting_callbacks(
        options.report_to,
        project_name=options.project_name,
        log_dir=options.adapter_path,
        config=vars(options),
    )
    train_set, valid_set, test_set = load_dataset(options, tokenizer)
    if options.train:
        with freed_buffers_kept_for_training():
            lora.train_model(options, model, train_set, valid_set, callback)
    elif options.adapter_path != "":
        load_adapters(model, options.adapter_path)
    if options.test:
        lora.evaluate_model(options, model, test_set)


@fail_cleanly
def main(argv=None):
    from . import load
    from .tokenizer import with_plain_chat_template
    from .utils import resolve_model_path

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")  # as mlx-lm's lora
    options = parse_options(argv)
    check_options(options)
    check_data(options)
    if options.model is None:
        options.model = str(resolve_model_path(None))
    model, tokenizer = load(
        options.model, tokenizer_config={"trust_remote_code": options.trust_remote_code}
    )
    options.num_layers = resolve_num_layers(options.num_layers, len(model.layers))
    with removed_if_failed(Path(options.adapter_path)):
        run(options, model, with_plain_chat_template(tokenizer))


if __name__ == "__main__":
    main()
