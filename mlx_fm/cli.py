"""What every mlx_fm command shares: bad input ends in one line and a non-zero exit."""

import argparse
import contextlib
import functools
import io
import os
import sys
from typing import Callable, Iterator, Union

from .utils import ModelLoadError


class UsageError(ValueError):
    """A command line that argparse rejects."""


def fail_cleanly(main: Callable) -> Callable:
    """Turn expected errors into one `mlx_fm: error: ...` line on stderr and exit status 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            with _usage_errors_raised():
                return main(*args, **kwargs)
        except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
            sys.exit(1)
        except (ModelLoadError, ValueError, FileNotFoundError, OSError) as error:
            print(f"mlx_fm: error: {one_line(error)}", file=sys.stderr)
            sys.exit(1)
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


@contextlib.contextmanager
def _usage_errors_raised() -> Iterator[None]:
    # argparse prints the usage text before its error line. The parsers are built in every
    # command module and, for mlx_fm.lora, in mlx-lm: so it is argparse itself that is told
    # to raise instead, while a command runs.
    original = argparse.ArgumentParser.error
    argparse.ArgumentParser.error = _raise_usage_error
    try:
        yield
    finally:
        argparse.ArgumentParser.error = original


def _raise_usage_error(parser: argparse.ArgumentParser, message: str):
    raise UsageError(f"{parser.prog}: {message} (see --help)")


def one_line(text) -> str:
    """`text` with its lines joined by spaces."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def warn(message: str) -> None:
    print(f"mlx_fm: warning: {message}", file=sys.stderr)


def valid_utf8(text: Union[str, bytes], what: str) -> str:
    """`text` with the bytes that are not UTF-8 (surrogate escapes in a str, as in sys.argv)
    replaced by U+FFFD, and one warning when there were any."""
    raw = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        warn(f"{what} is not valid UTF-8: its undecodable bytes were replaced by U+FFFD")
        return raw.decode("utf-8", "replace")


def escape_undecodable_stdin() -> None:
    """Have sys.stdin deliver bytes that are not UTF-8 as surrogate escapes, as sys.argv does,
    for `valid_utf8`: by default reading them raises, and what was read with them is lost."""
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")


def add_model_argument(parser: argparse.ArgumentParser, required: bool = False) -> None:
    """--model: a model directory or Hugging Face repo id (if not `required`, the bundled
    model by default)."""
    text = "Model directory or Hugging Face repo id"
    parser.add_argument(
        "--model",
        required=required,
        default=None,
        help=text if required else f"{text} (default: the bundled model)",
    )


# Argparse types of the sampling and generation options of mlx_fm.generate and mlx_fm.chat.


def _checked(kind: type, test: Callable, what: str) -> Callable:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "an integer of at least 1")
boolean = _checked(
    lambda text: {"true": True, "t": True, "false": False, "f": False}.get(text.lower()),
    lambda v: True,
    "true or false",
)
non_negative_int = _checked(int, lambda v: v >= 0, "an integer of at least 0")
non_negative_float = _checked(float, lambda v: v >= 0, "a number of at least 0")
probability = _checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
positive_probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def add_sampling_arguments(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    """--max-tokens, --temp, --top-p, --top-k, --min-p, --seed and --prefill-step-size."""
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=positive_int,
        default=max_tokens,
        help=f"Most tokens to generate (default {max_tokens})",
    )
    parser.add_argument(
        "--temp", type=non_negative_float, default=0.0, help="Sampling temperature (0: greedy)"
    )
    parser.add_argument("--top-p", type=positive_probability, default=1.0)
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="0: no top-k")
    parser.add_argument("--min-p", type=probability, default=0.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=2048,
        help="Prompt tokens per forward pass",
    )


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """--verbose [true|false], as mlx-lm's: the text, then the speeds and peak memory."""
    parser.add_argument(
        "--verbose",
        type=boolean,
        nargs="?",
        const=True,
        default=False,
        help="Also print prompt and generation speed and peak memory (--verbose or "
        "--verbose true; default false)",
    )


def add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter-path", default=None, help="Directory of LoRA/DoRA adapters to apply"
    )
