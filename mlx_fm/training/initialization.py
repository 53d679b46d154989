"""A fresh model (FM, or an mlx-lm baseline) and its documented initialization."""

import importlib
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.factorization_memory import MODEL_TYPE, FactorizationMemory
from .config import model_args_class

# Initial update rates η₀ of the heads: geometrically spaced over this range.
INITIAL_UPDATE_RATES = (0.5, 0.01)
# Layers that write into the residual stream: their init is scaled down with depth.
RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj")


def build_model(
    model_options: dict,
    vocab_size: int,
    std: float,
    seed: int,
    dtype: str,
    architecture: str = MODEL_TYPE,
) -> nn.Module:
    """A model of `model_options` (its ModelArgs), initialized by `initialize_weights`."""
    options = {"vocab_size": vocab_size} | model_options
    if options["vocab_size"] < vocab_size:
        raise ValueError(
            f"model vocab_size ({options['vocab_size']}) is smaller than the "
            f"tokenizer's ({vocab_size})"
        )
    mx.random.seed(seed)
    try:
        args = model_args_class(architecture)(model_type=architecture, **options)
    except TypeError as error:  # a required option is missing
        raise ValueError(f"bad {architecture} model options: {error}") from None
    model = model_class(architecture)(args)
    initialize_weights(model, std)
    model.set_dtype(getattr(mx, dtype))
    mx.eval(model.parameters())
    return model


def model_class(architecture: str):
    if architecture == MODEL_TYPE:
        from ..models.factorization_memory import Model

        return Model
    return importlib.import_module(f"mlx_lm.models.{architecture}").Model


def initialize_weights(model: nn.Module, std: float = 0.02) -> None:
    """Set every parameter of `model` in place, drawing from mx.random's global state.

    - Token embeddings, in_proj (the z, x, ρ, e, g rows alike), the MLP's gate
      and up projections and an untied lm_head: N(0, std²). The router logits ρ
      thus start near 0: routing starts almost uniform.
    - The projections that write into the residual stream (mixer.out_proj,
      mlp.down_proj; a baseline's o_proj, out_proj and down_proj):
      N(0, (std / √(2·L))²) for L layers, as in GPT-2, so the residual stream's
      variance does not grow with depth.
    - conv1d: weight U(−1/√K, 1/√K) (PyTorch's default for a depthwise conv,
      fan-in K), bias 0.
    - eta_bias: logit(η₀) per head, with η₀ spaced geometrically from 0.5 down
      to 0.01 across heads (INITIAL_UPDATE_RATES), so the heads start with
      memory time scales from a few tokens to hundreds, as Mamba spreads Δ.
    - mu_bias: 0, so μ starts at ½: the memory read and the direct path mixed
      equally.
    - RMSNorm weights: 1.
    - A baseline's own parameters (Mamba-2's A_log, D, dt_bias): mlx-lm's defaults.
    """
    residual_std = std / math.sqrt(2 * model.args.num_hidden_layers)
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            scale = residual_std if name.endswith(RESIDUAL_OUTPUTS) else std
            module.weight = scale * mx.random.normal(module.weight.shape)
        elif isinstance(module, nn.Conv1d):
            bound = 1 / math.sqrt(module.weight.shape[1])
            module.weight = mx.random.uniform(-bound, bound, module.weight.shape)
            module.bias = mx.zeros_like(module.bias)
        elif isinstance(module, nn.RMSNorm):
            module.weight = mx.ones_like(module.weight)
        elif isinstance(module, FactorizationMemory):
            module.eta_bias = initial_eta_bias(module.num_heads)
            module.mu_bias = mx.zeros((module.num_heads,))


def initial_eta_bias(num_heads: int) -> mx.array:
    rates = np.geomspace(*INITIAL_UPDATE_RATES, num_heads)
    return mx.array(np.log(rates / (1 - rates)), dtype=mx.float32)
