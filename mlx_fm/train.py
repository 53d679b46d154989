"""Pretrain an FM model from scratch: `mlx_fm.train --data DIR --output RUN [--config FILE]`.

Options come from a YAML file (--config; keys are the option names with
underscores, plus a `model:` section of SPEC hyper-parameters) and the command
line, which wins. `architecture: llama` (or any mlx-lm model type) trains that
baseline instead, its `model:` section being that type's ModelArgs. For data parallelism, start it with mlx's launcher:
`mlx.launch --backend ring -n 2 -- python -m mlx_fm.train ...`.
"""

import argparse
import dataclasses

from .cli import fail_cleanly
from .training.config import MODEL_KEYS, TrainConfig

# (option, type, help); defaults are TrainConfig's.
TRAIN_OPTIONS = [
    ("architecture", str, "factorization_memory, or an mlx-lm model type (llama, mamba2, ...) "
                          "to train a baseline; its options go in the YAML model: section"),
    ("tokenizer", str, "'bytes', a sentencepiece .model, or a Hugging Face tokenizer "
                       "directory or tokenizer.json"),
    ("vocab_size", int, "train a sentencepiece tokenizer of this size on the data"),
    ("seq_len", int, "tokens per training sequence"),
    ("batch_size", int, "sequences per optimizer step, over all processes"),
    ("grad_accumulation", int, "micro-batches per optimizer step"),
    ("steps", int, "optimizer steps in the whole run"),
    ("learning_rate", float, "peak learning rate"),
    ("min_learning_rate", float, "learning rate at the end of the cosine decay "
                                 "(default: learning_rate / 10)"),
    ("warmup_steps", int, "steps of linear warmup"),
    ("weight_decay", float, "AdamW weight decay"),
    ("beta1", float, "AdamW beta1"),
    ("beta2", float, "AdamW beta2"),
    ("grad_clip", float, "maximum global gradient norm (0: no clipping)"),
    ("grad_checkpoint", bool, "recompute activations in the backward pass to save memory"),
    ("dtype", str, "weights' dtype: float32 or bfloat16"),
    ("init_std", float, "standard deviation of the initial weights"),
    ("seed", int, "seed of the initialization, the data split and the data order"),
    ("val_fraction", float, "fraction of the sequences held out for validation"),
    ("val_every", int, "steps between validations"),
    ("val_batches", int, "validation batches per validation (0: all)"),
    ("save_every", int, "steps between checkpoints"),
    ("keep_checkpoints", int, "checkpoints kept"),
    ("log_every", int, "steps between progress lines when not on a terminal"),
    ("compile", bool, "compile the training step with mx.compile"),
    ("resume", bool, "continue from the latest checkpoint in --output"),
]
MODEL_TYPES = {"router_temperature": float, "rms_norm_eps": float, "tie_word_embeddings": bool}


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", help="YAML file of options")
    parser.add_argument("--data", nargs="+", help="text (.txt) or jsonl files, or directories")
    parser.add_argument("--output", "-o", help="run directory (checkpoints, final model)")
    parser.add_argument("--force", action="store_true",
                        help="replace the model/ and metrics.jsonl in --output of a run that "
                             "is not resumed")
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for name, kind, text in TRAIN_OPTIONS:
        _add(parser, name, kind, f"{text} (default: {defaults[name]})")
    model = parser.add_argument_group("model (SPEC hyper-parameters; vocab_size: YAML only)")
    for name in MODEL_KEYS:
        if name != "vocab_size":
            _add(model, name, MODEL_TYPES.get(name, int), None, dest=f"model.{name}")
    return parser


def _add(parser, name, kind, text, dest=None):
    flag = "--" + name.replace("_", "-")
    if kind is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                            help=text, dest=dest or name)
    else:
        parser.add_argument(flag, type=kind, default=None, help=text, dest=dest or name,
                            metavar=name.upper())


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .training.config import build_config

    given = {key: value for key, value in vars(args).items() if value is not None}
    model = {key.split(".", 1)[1]: given.pop(key) for key in list(given)
             if key.startswith("model.")}
    return build_config(given.pop("config", None), **given, model=model)


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    force = args.force
    del args.force  # an instruction for this command, not part of the run's config
    from .training import train

    train(config_from_args(args), force=force)


if __name__ == "__main__":
    main()
