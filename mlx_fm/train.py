"""Pretrain an FM model from scratch: `mlx_fm.train --data DIR --output RUN [--config FILE]`.

Options come from a YAML file (--config; keys are the option names with
underscores, plus a `model:` section of SPEC hyper-parameters) and the command
line, which wins. `architecture: llama` (or any mlx-lm model type) trains that
baseline instead, its `model:` section being that type's ModelArgs. For data
parallelism, start it with mlx's launcher:
`mlx.launch --backend ring -n 2 -- python -m mlx_fm.train ...`.
"""

import argparse
import dataclasses
from typing import Optional, get_args

from .cli import fail_cleanly
from .models.factorization_memory import ModelArgs
from .training.config import TrainConfig

# Other names an option answers to: short ones, and mlx-lm's (mlx_lm.lora's --iters).
FLAG_ALIASES = {"output": ["-o"], "steps": ["--iters"]}


def build_parser() -> argparse.ArgumentParser:
    """An option for every TrainConfig field, with the field's help, and one per FM model key."""
    parser = argparse.ArgumentParser(prog="mlx_fm.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", help="YAML file of options")
    for option in dataclasses.fields(TrainConfig):
        if option.name != "model":  # set key by key, in the model group
            _add_option(parser, option)
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace the model/ and metrics.jsonl in --output of a run that is not resumed",
    )
    model = parser.add_argument_group("model (SPEC hyper-parameters; vocab_size: YAML only)")
    for option in dataclasses.fields(ModelArgs):
        if option.name not in ("model_type", "vocab_size"):
            _add_option(model, option, dest=f"model.{option.name}")
    return parser


def _add_option(parser, option: dataclasses.Field, dest: Optional[str] = None) -> None:
    # default None: config_from_args takes only the options given, so YAML values survive.
    name = option.name
    kind = _argument_type(option.type)
    if kind is bool:
        parsing = dict(action=argparse.BooleanOptionalAction)
    elif kind is list:  # of paths
        parsing = dict(nargs="+", metavar=name.upper())
    else:
        parsing = dict(type=kind, metavar=name.upper())
    parser.add_argument(
        "--" + name.replace("_", "-"),
        *FLAG_ALIASES.get(name, []),
        default=None,
        help=_help(option),
        dest=dest or name,
        **parsing,
    )


def _argument_type(annotation) -> type:
    """What an option's text is read as: int for int and for Optional[int]."""
    given = [kind for kind in get_args(annotation) if kind is not type(None)]
    return given[0] if given else annotation


def _help(option: dataclasses.Field) -> Optional[str]:
    """The field's help (ModelArgs' fields have none), with its default if there is one."""
    text = option.metadata.get("help")
    if text is None or option.default in (None, "", dataclasses.MISSING):
        return text
    return f"{text} (default: {option.default})"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .training.config import build_config

    given = {key: value for key, value in vars(args).items() if value is not None}
    model = {
        key.split(".", 1)[1]: given.pop(key) for key in list(given) if key.startswith("model.")
    }
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
