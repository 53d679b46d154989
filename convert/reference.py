"""PyTorch reference of the Factorization Memory language model (docs/SPEC.md).

The contract that PyTorch-trained FM checkpoints follow: SPEC's parameter names
and Hugging Face layout (config.json plus safetensors or .bin weights). It runs
either as a step recurrence (one token at a time, the definition) or in a
chunked parallel form (prompts and training); the two agree to float32 precision.
"""

import dataclasses
import json
from pathlib import Path
from typing import Optional

from mlx_fm.layout import (
    MODEL_TYPE,
    model_settings,
    read_config,
    shard_file_names,
    shard_index,
    split_into_shards,
    weight_files,
)

import torch
import torch.nn.functional as F
from torch import nn

# 1 − θ is floored here so that log-decays stay finite when θ rounds to 1.
DECAY_FLOOR = 1e-30


@dataclasses.dataclass
class FMConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    num_slots: int
    expand: int = 2
    top_k: Optional[int] = None
    router_temperature: float = 1.0
    conv_kernel: int = 4
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self):
        self.top_k = model_settings(self.to_dict())["top_k"]

    @classmethod
    def from_dict(cls, config: dict) -> "FMConfig":
        """From config.json: checks model_type and every value; ignores unknown keys."""
        return cls(**model_settings(config))

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **dataclasses.asdict(self)}

    @property
    def inner_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.inner_size // self.num_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, v):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@dataclasses.dataclass
class LayerCache:
    """What one layer carries between calls: the last K−1 conv inputs and the state M."""

    conv_inputs: Optional[torch.Tensor] = None  # (B, K−1, E)
    state: Optional[torch.Tensor] = None  # (B, H, m, P) float32


def route(router_logits, temperature: float, top_k: int):
    """Slot weights α̃ (…, m) in float32: softmax(ρ/τ), restricted to the top k and
    renormalized."""
    slot_weights = torch.softmax(router_logits.float() / temperature, dim=-1)
    if top_k >= slot_weights.shape[-1]:
        return slot_weights
    top = slot_weights.topk(top_k, dim=-1).indices
    kept = torch.zeros_like(slot_weights).scatter(-1, top, slot_weights.gather(-1, top))
    return kept / kept.sum(-1, keepdim=True)


def fm_step(x, slot_weights, eta, state):
    """One token: x (B, H, P), slot_weights (B, H, m), eta (B, H), state (B, H, m, P).

    → (r, state)."""
    theta = (eta[..., None] * slot_weights)[..., None]
    state = (1 - theta) * state + theta * x[:, :, None, :]
    read = (slot_weights[..., None] * state).sum(-2)
    return read, state


def scan_recurrent(x, slot_weights, eta, state):
    """T tokens step by step: x (B, T, H, P), slot_weights (B, T, H, m), eta (B, T, H)."""
    reads = []
    for t in range(x.shape[1]):
        read, state = fm_step(x[:, t], slot_weights[:, t], eta[:, t], state)
        reads.append(read)
    return torch.stack(reads, dim=1), state


def scan_chunked(x, slot_weights, eta, state, chunk_size: int = 16):
    """The same scan, `chunk_size` tokens at a time, in parallel within each chunk.

    Inside a chunk, token t reads what token s ≤ t wrote through the decay
    exp(Σ_{s<u≤t} log(1 − θ_u)). Each such exponent is summed over its own span
    (never a difference of two cumulative sums), so it is ≤ 0 and exact.
    """
    length = x.shape[1]
    theta = eta[..., None] * slot_weights
    log_decay = torch.log(torch.clamp(1 - theta, min=DECAY_FLOOR))
    reads = []
    for start in range(0, length, chunk_size):
        part = slice(start, min(start + chunk_size, length))
        read, state = _chunk(
            x[:, part], slot_weights[:, part], theta[:, part], log_decay[:, part], state
        )
        reads.append(read)
    return torch.cat(reads, dim=1), state


def _chunk(x, slot_weights, theta, log_decay, state):
    """One chunk: x (B, Q, H, P); slot_weights, theta, log_decay (B, Q, H, m);
    state (B, H, m, P)."""
    size = x.shape[1]
    steps = torch.arange(size)
    # spans[t, s, u] = 1 where s < u ≤ t: the steps whose decay lies between a write and a read.
    spans = (
        (steps[None, :, None] < steps[None, None, :])
        & (steps[None, None, :] <= steps[:, None, None])
    ).to(x.dtype)
    between = torch.einsum("tsu,buhi->bhtsi", spans, log_decay)
    causal = (steps[None, :] <= steps[:, None])[None, None, :, :, None]
    decay = torch.exp(torch.where(causal, between, -torch.inf))
    scores = torch.einsum("bthi,bshi,bhtsi->bhts", slot_weights, theta, decay)
    intra = torch.einsum("bhts,bshp->bthp", scores, x)

    from_start = torch.cumsum(log_decay, dim=1)  # Σ_{u≤t} log(1 − θ_u), (B, Q, H, m)
    inter = torch.einsum("bthi,bhip->bthp", slot_weights * torch.exp(from_start), state)
    to_end = between[:, :, -1]  # Σ_{s<u≤Q−1}, (B, H, Q, m)
    written = torch.einsum("bhsi,bshp->bhip", theta.transpose(1, 2) * torch.exp(to_end), x)
    state = torch.exp(from_start[:, -1])[..., None] * state + written
    return intra + inter, state


class FactorizationMemoryMixer(nn.Module):
    def __init__(self, config: FMConfig):
        super().__init__()
        self.config = config
        inner, heads = config.inner_size, config.num_heads
        self.splits = [inner, inner, heads * config.num_slots, heads, heads]
        self.in_proj = nn.Linear(config.hidden_size, sum(self.splits), bias=False)
        if config.conv_kernel > 0:
            self.conv1d = nn.Conv1d(
                inner,
                inner,
                config.conv_kernel,
                groups=inner,
                padding=config.conv_kernel - 1,
                bias=True,
            )
        self.eta_bias = nn.Parameter(torch.zeros(heads))
        self.mu_bias = nn.Parameter(torch.zeros(heads))
        self.norm = RMSNorm(inner, config.rms_norm_eps)
        self.out_proj = nn.Linear(inner, config.hidden_size, bias=False)
        self.chunk_size = 16

    def _conv(self, x, cache: Optional[LayerCache]):
        """SiLU(causal depthwise conv) over x (B, T, E), with the cached inputs before it."""
        kernel = self.config.conv_kernel
        if kernel == 0:
            return F.silu(x)
        if cache is None or cache.conv_inputs is None:
            history = x.new_zeros(x.shape[0], kernel - 1, x.shape[-1])
        else:
            history = cache.conv_inputs
        window = torch.cat([history, x], dim=1)
        if cache is not None:
            cache.conv_inputs = window[:, window.shape[1] - (kernel - 1) :]
        out = F.conv1d(
            window.transpose(1, 2),
            self.conv1d.weight,
            self.conv1d.bias,
            groups=self.config.inner_size,
        )
        return F.silu(out.transpose(1, 2))

    def forward(self, u, cache: Optional[LayerCache] = None, recurrent: bool = False):
        config = self.config
        batch, length, _ = u.shape
        heads, slots = config.num_heads, config.num_slots
        z, x, rho, e, g = self.in_proj(u).split(self.splits, dim=-1)
        x = self._conv(x, cache).reshape(batch, length, heads, config.head_dim).float()
        slot_weights = route(
            rho.reshape(batch, length, heads, slots), config.router_temperature, config.top_k
        )
        eta = torch.sigmoid(e.float() + self.eta_bias.float())
        mu = torch.sigmoid(g.float() + self.mu_bias.float())[..., None]
        state = (
            cache.state
            if cache is not None and cache.state is not None
            else x.new_zeros(batch, heads, slots, config.head_dim)
        )
        if recurrent:
            reads, state = scan_recurrent(x, slot_weights, eta, state)
        else:
            reads, state = scan_chunked(x, slot_weights, eta, state, self.chunk_size)
        if cache is not None:
            cache.state = state
        out = (mu * reads + (1 - mu) * x).reshape(batch, length, config.inner_size)
        return self.out_proj(self.norm(out.to(u.dtype) * F.silu(z)))


class MLP(nn.Module):
    def __init__(self, config: FMConfig):
        super().__init__()
        size, hidden = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(size, hidden, bias=False)
        self.up_proj = nn.Linear(size, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: FMConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mixer = FactorizationMemoryMixer(config)
        if config.intermediate_size > 0:
            self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.mlp = MLP(config)

    def forward(self, h, cache=None, recurrent=False):
        h = h + self.mixer(self.norm(h), cache, recurrent)
        if hasattr(self, "mlp"):
            h = h + self.mlp(self.mlp_norm(h))
        return h


class Backbone(nn.Module):
    def __init__(self, config: FMConfig):
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm_f = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids, cache=None, recurrent=False):
        h = self.embeddings(input_ids)
        for layer, layer_cache in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, layer_cache, recurrent)
        return self.norm_f(h)


class FactorizationMemoryForCausalLM(nn.Module):
    """The FM language model: logits = lm_head(backbone(tokens))."""

    def __init__(self, config: FMConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, cache: Optional[list] = None, recurrent: bool = False):
        """Logits (B, T, V) for input_ids (B, T). `cache` (from make_cache) carries the
        state across calls; `recurrent` runs the step recurrence instead of the chunked form."""
        h = self.backbone(input_ids, cache, recurrent)
        if self.config.tie_word_embeddings:
            return F.linear(h, self.backbone.embeddings.weight)
        return self.lm_head(h)

    def make_cache(self) -> list:
        return [LayerCache() for _ in range(self.config.num_hidden_layers)]

    def save_pretrained(
        self, path, weights_format: str = "safetensors", max_shard_bytes: Optional[int] = None
    ) -> Path:
        """config.json and the weights as "safetensors", "bin" (pytorch_model.bin) or "pt"
        (model.pt); sharded with an index when they exceed `max_shard_bytes`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        weights = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        shards = split_into_shards(weights, max_shard_bytes)
        names = _shard_names(weights_format, len(shards))
        for shard, name in zip(shards, names):
            _write_weights(path / name, shard, weights_format)
        if len(shards) > 1:
            index_name = (
                "model.safetensors.index.json"
                if weights_format == "safetensors"
                else "pytorch_model.bin.index.json"
            )
            index = shard_index(shards, names)
            (path / index_name).write_text(json.dumps(index, indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, path) -> "FactorizationMemoryForCausalLM":
        """A checkpoint in SPEC's layout; .bin/.pt files are read with weights_only=True."""
        path = Path(path)
        model = cls(FMConfig.from_dict(read_config(path)))
        weights = {}
        for file in weight_files(path):
            weights |= _read_weights(file)
        if model.config.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        model.load_state_dict(weights, strict=True)
        return model


def _shard_names(weights_format: str, count: int) -> list:
    if weights_format == "pt":
        if count > 1:
            raise ValueError("a .pt checkpoint is a single file; use 'bin' to shard")
        return ["model.pt"]
    stem, suffix = {"safetensors": ("model", ".safetensors"), "bin": ("pytorch_model", ".bin")}[
        weights_format
    ]
    return shard_file_names(stem, suffix, count)


def _write_weights(file: Path, weights: dict, weights_format: str) -> None:
    if weights_format == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(file), metadata={"format": "pt"})
    else:
        torch.save(weights, file)


def _read_weights(file: Path) -> dict:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)
