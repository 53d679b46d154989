"""What a training run is: `TrainConfig`, read from YAML and command-line options."""

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..models.factorization_memory import MODEL_TYPE, ModelArgs

DTYPES = ("float32", "bfloat16")

DEFAULT_MODEL = dict(
    hidden_size=256,
    num_hidden_layers=4,
    expand=2,
    num_heads=4,
    num_slots=64,
    top_k=16,
    router_temperature=1.0,
    conv_kernel=4,
    intermediate_size=768,
    tie_word_embeddings=True,
)

# What must not change when a run is resumed: the data, its order and the model.
RESUME_MUST_MATCH = (
    "data",
    "seq_len",
    "seed",
    "val_fraction",
    "batch_size",
    "dtype",
    "architecture",
    "model",
)


@dataclass
class TrainConfig:
    """Every option of `mlx_fm.train`; YAML keys and command-line options use these names,
    and each field's metadata["help"] is its command-line help."""

    data: list = field(
        default_factory=list, metadata={"help": "text (.txt) or jsonl files, or directories"}
    )
    output: str = field(
        default="",
        metadata={"help": "run directory: checkpoints/, model/ (the final model), metrics.jsonl"},
    )
    architecture: str = field(
        default=MODEL_TYPE,
        metadata={
            "help": "factorization_memory, or an mlx-lm model type (llama, mamba2, ...) to train "
            "a baseline with the same trainer; its options go in the YAML model: section"
        },
    )
    model: dict = field(
        default_factory=dict,
        metadata={
            "help": "the architecture's ModelArgs; for factorization_memory over DEFAULT_MODEL"
        },
    )
    tokenizer: Optional[str] = field(
        default=None,
        metadata={
            "help": "'bytes', a sentencepiece .model, or a Hugging Face tokenizer directory or "
            "tokenizer.json"
        },
    )
    vocab_size: Optional[int] = field(
        default=None, metadata={"help": "train a sentencepiece tokenizer of this size on the data"}
    )
    seq_len: int = field(default=512, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(
        default=8, metadata={"help": "sequences per optimizer step, over all processes"}
    )
    grad_accumulation: int = field(
        default=1, metadata={"help": "micro-batches per optimizer step, in each process"}
    )
    steps: int = field(default=1000, metadata={"help": "optimizer steps in the whole run"})
    learning_rate: float = field(default=3e-4, metadata={"help": "peak learning rate"})
    min_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "learning rate at the end of the cosine decay (default: learning_rate / 10)"
        },
    )
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear warmup"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(
        default=1.0, metadata={"help": "maximum global gradient norm (0: no clipping)"}
    )
    grad_checkpoint: bool = field(
        default=False,
        metadata={"help": "recompute activations in the backward pass to save memory"},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "weights' dtype: float32 or bfloat16; the optimizer and FM state stay float32"
        },
    )
    init_std: float = field(
        default=0.02, metadata={"help": "standard deviation of the initial weights"}
    )
    seed: int = field(
        default=0,
        metadata={"help": "seed of the initialization, the data split and the data order"},
    )
    val_fraction: float = field(
        default=0.05, metadata={"help": "fraction of the sequences held out for validation"}
    )
    val_every: int = field(default=100, metadata={"help": "steps between validations"})
    val_batches: int = field(
        default=16,
        metadata={"help": "batches of batch_size sequences per validation (0 or -1: all)"},
    )
    save_every: int = field(default=100, metadata={"help": "steps between checkpoints"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept"})
    log_every: int = field(
        default=10, metadata={"help": "steps between progress lines when not on a terminal"}
    )
    compile: bool = field(
        default=True, metadata={"help": "compile the training step with mx.compile"}
    )
    resume: bool = field(
        default=False, metadata={"help": "continue from the latest checkpoint in --output"}
    )

    def __post_init__(self):
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(path) for path in self.data]
        self.output = str(self.output)
        known = model_keys(self.architecture)
        unknown = set(self.model) - set(known)
        if unknown:
            raise ValueError(
                f"unknown {self.architecture} model option(s): "
                f"{', '.join(sorted(unknown))} (known: {', '.join(known)})"
            )
        if self.architecture == MODEL_TYPE:
            self.model = DEFAULT_MODEL | self.model
        if self.val_batches == -1:  # mlx-lm's "all"
            self.val_batches = 0
        self._validate()

    def _validate(self):
        if not self.data:
            raise ValueError("no training data: give --data FILE_OR_DIR")
        if not self.output:
            raise ValueError("no output directory: give --output DIR")
        for key in (
            "seq_len",
            "batch_size",
            "grad_accumulation",
            "steps",
            "val_every",
            "save_every",
            "keep_checkpoints",
            "log_every",
        ):
            _require(key, getattr(self, key), int, lambda v: v >= 1, "a positive integer")
        for key in ("warmup_steps", "val_batches", "seed"):
            _require(key, getattr(self, key), int, lambda v: v >= 0, "a non-negative integer")
        for key in ("learning_rate", "init_std"):
            _require(key, getattr(self, key), float, lambda v: v > 0, "a positive number")
        for key in ("weight_decay", "grad_clip"):
            _require(key, getattr(self, key), float, lambda v: v >= 0, "a non-negative number")
        for key in ("beta1", "beta2", "val_fraction"):
            _require(key, getattr(self, key), float, lambda v: 0 <= v < 1, "in [0, 1)")
        if self.vocab_size is not None:
            _require("vocab_size", self.vocab_size, int, lambda v: v >= 1, "a positive integer")
            if self.tokenizer is not None:
                raise ValueError("give --tokenizer or --vocab-size (to train one), not both")
        if 0 < self.steps <= self.warmup_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be below steps ({self.steps})"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of "
                f"grad_accumulation ({self.grad_accumulation})"
            )

    @property
    def final_learning_rate(self) -> float:
        if self.min_learning_rate is None:
            return self.learning_rate / 10
        return self.min_learning_rate

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_args_class(architecture: str):
    """The ModelArgs dataclass of an architecture: FM's, or that of mlx_lm.models.<architecture>."""
    if architecture == MODEL_TYPE:
        return ModelArgs
    if not isinstance(architecture, str) or not architecture.isidentifier():
        raise ValueError(f"architecture must be an mlx-lm model type, got {architecture!r}")
    try:
        return importlib.import_module(f"mlx_lm.models.{architecture}").ModelArgs
    except (ImportError, AttributeError):
        raise ValueError(
            f"unknown architecture {architecture!r}: not an mlx-lm model type "
            f"(e.g. {MODEL_TYPE}, llama, mamba2)"
        ) from None


def model_keys(architecture: str) -> tuple:
    """The options a `model:` section of this architecture may set."""
    return tuple(
        f.name for f in dataclasses.fields(model_args_class(architecture)) if f.name != "model_type"
    )


def _require(key, value, kind, test, what):
    numeric = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not numeric or not test(value):
        raise ValueError(f"{key} must be {what}, got {value!r}")


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads 3e-4 (no dot) as a string; read it as a float, as mlx-lm does."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml_mapping(path, loader=_YamlLoader) -> dict:
    """The mapping in a YAML file, {} if it is empty; an error names the file and the line."""
    path = Path(path)
    try:
        options = yaml.load(path.read_text(encoding="utf-8"), Loader=loader)
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    except yaml.YAMLError as error:
        raise ValueError(_yaml_error(path, error)) from None
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ValueError(f"{path} must hold a mapping of options")
    return options


def _yaml_error(path: Path, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    if mark is None:
        return f"{path} is not valid YAML: {' '.join(str(error).split())}"
    return f"{path}, line {mark.line + 1}: not valid YAML: {error.problem or error.context}"


def read_yaml(path) -> dict:
    """The options in a YAML file (mlx-lm style: keys are option names, plus `model:`)."""
    options = read_yaml_mapping(path)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown option(s) in {path}: {', '.join(sorted(unknown))}")
    if not isinstance(options.get("model", {}), dict):
        raise ValueError(f"`model` in {path} must be a mapping of hyper-parameters")
    return options


def build_config(yaml_path=None, **overrides) -> TrainConfig:
    """YAML options (if any), then `overrides` on top; `model` entries merge key by key."""
    options = read_yaml(yaml_path) if yaml_path is not None else {}
    model = dict(options.get("model") or {}) | dict(overrides.pop("model", None) or {})
    return TrainConfig(**(options | overrides | {"model": model}))
