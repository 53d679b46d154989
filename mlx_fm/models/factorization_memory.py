"""Factorization Memory language model (docs/SPEC.md), mlx-lm conformant.

Parameter names follow SPEC's PyTorch / Hugging Face layout, so a checkpoint
loads after `sanitize` with no renaming. The decode cache of each layer is an
`FMCache` (mlx_fm/cache.py), an mlx-lm `ArraysCache` [FM state (B, H, m, P)
float32, last K−1 conv inputs] that can also be rewound by a few tokens.
"""

import contextvars
import dataclasses
import operator
from dataclasses import dataclass
from functools import partial
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs, create_ssm_mask

from ..cache import DEFAULT_MAX_UNDO, Contents, FMCache, Overwritten
from ..layout import MODEL_TYPE, model_settings, with_conv_layout
from ..ops import fm_mix_keeping, native
from ..ops.activations import silu
from ..ops.metal import use_kernels


@dataclass
class ModelArgs(BaseModelArgs):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    num_slots: int
    model_type: str = MODEL_TYPE
    expand: int = 2
    top_k: Optional[int] = None
    router_temperature: float = 1.0
    conv_kernel: int = 4
    intermediate_size: int = 0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        # SPEC's config contract, shared with the converter and the PyTorch reference:
        # raises a ValueError that names the offending key.
        self.top_k = model_settings(dataclasses.asdict(self))["top_k"]

    @property
    def inner_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.inner_size // self.num_heads


class FactorizationMemory(nn.Module):
    """The FM mixer: projections, causal conv, routed slot memory, gated output."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.num_heads, self.num_slots = args.num_heads, args.num_slots
        self.head_dim, self.inner_size = args.head_dim, args.inner_size
        self.top_k, self.temperature = args.top_k, args.router_temperature
        self.conv_kernel = args.conv_kernel
        heads, inner = args.num_heads, args.inner_size
        self.splits = [
            inner,
            2 * inner,
            2 * inner + heads * args.num_slots,
            2 * inner + heads * args.num_slots + heads,
        ]
        self.in_proj = nn.Linear(args.hidden_size, self.splits[-1] + heads, bias=False)
        if self.conv_kernel > 0:
            self.conv1d = nn.Conv1d(inner, inner, args.conv_kernel, groups=inner, bias=True)
        self.eta_bias = mx.zeros((heads,))
        self.mu_bias = mx.zeros((heads,))
        self.norm = nn.RMSNorm(inner, eps=args.rms_norm_eps)
        self.out_proj = nn.Linear(inner, args.hidden_size, bias=False)

    def _conv(
        self, x: mx.array, contents: Optional[Contents], lengths: Optional[mx.array], keep: int
    ) -> tuple[mx.array, list[list[mx.array]]]:
        """SiLU(causal depthwise conv) over time; and the last K−1 inputs, which the cache
        carries, as they are before each of the last `keep` tokens and after the last one
        (keep + 1 lists, empty when no cache carries them)."""
        if self.conv_kernel == 0:
            return silu(x), [[] for _ in range(keep + 1)]
        carry = self.conv_kernel - 1
        cached = contents is not None and carry > 0
        if cached and contents[1] is not None:
            history = contents[1]
        else:
            history = mx.zeros((x.shape[0], carry, x.shape[-1]), x.dtype)
        conv = (self.conv1d.weight, self.conv1d.bias)
        in_c = self._in_c(x.shape[1], history, x, *conv)
        if in_c:
            out = native.with_gradient_of(_causal_conv_silu, native.conv_silu)(history, x, *conv)
        else:
            out = _causal_conv_silu(history, x, *conv)
        if not cached:
            return out, [[] for _ in range(keep + 1)]
        length = x.shape[1]
        # Before the first token, what the cache held (None in a fresh one).
        before = [
            [contents[1]] if t == 0 else [_window_rows(history, x, t)]
            for t in range(length - keep, length)
        ]
        carried = before + [[_last_inputs(history, x, lengths)]]
        if in_c:  # evaluated now, they no longer hold on to in_proj's output, x's whole buffer
            mx.eval(carried)
        return out, carried

    def __call__(
        self, u: mx.array, mask: Optional[mx.array] = None, cache: Optional[FMCache] = None
    ) -> mx.array:
        if cache is None:
            return self.mix(u, mask)[0]
        length = u.shape[1]
        out, contents = self.mix(u, mask, cache.cache, cache.lengths, cache.snapshots_for(length))
        cache.record(contents, length)
        cache.advance(length)
        return out

    def mix(
        self,
        u: mx.array,
        mask: Optional[mx.array] = None,
        contents: Optional[Contents] = None,
        lengths: Optional[mx.array] = None,
        keep: int = 0,
    ) -> tuple[mx.array, list[Contents]]:
        """The mixer on a cache's contents [state, last conv inputs] (None: no cache), with
        rows right-padded to `lengths`: the output, and the contents before each of the
        last `keep` tokens and after the last one."""
        batch, length, _ = u.shape
        z, x, router_logits, update_logits, merge_logits = mx.split(
            _project(self.in_proj, u), self.splits, axis=-1
        )
        if mask is not None and self.conv_kernel > 0:
            x = mx.where(mask[..., None], x, 0)
        x, carried = self._conv(x, contents, lengths, keep)
        heads = self.num_heads
        out, states = fm_mix_keeping(
            x.reshape(batch, length, heads, self.head_dim),
            router_logits.reshape(batch, length, heads, self.num_slots),
            update_logits,
            merge_logits,
            self.eta_bias,
            self.mu_bias,
            top_k=self.top_k,
            temperature=self.temperature,
            state=contents[0] if contents is not None else None,
            mask=mask,
            keep=keep,
            keep_checkpoints=self.training,  # a Metal scan's backward needs them; inference not
        )
        out = out.reshape(batch, length, self.inner_size).astype(u.dtype)
        return _project(self.out_proj, self._gate_norm(out, z)), [
            [state, *conv] for state, conv in zip(states, carried)
        ]

    def _in_c(self, tokens: int, *arrays: mx.array) -> bool:
        """Whether a prompt's work on float32 `arrays` runs in C (ops/native.py): in inference,
        on more than one token (a decode step is one compiled graph), where C runs now."""
        return (
            not self.training
            and tokens > 1
            and all(a.dtype == mx.float32 for a in arrays)
            and native.runs_here(*arrays)
        )

    def _gate_norm(self, out: mx.array, z: mx.array) -> mx.array:
        """RMSNorm(out ⊙ SiLU(z)) with the mixer's norm."""
        eps = self.norm.eps

        def on_ops(out, z, weight):
            return mx.fast.rms_norm(_gate(out, z), weight, eps)

        if self._in_c(out.shape[1], out, z, self.norm.weight):
            return native.with_gradient_of(on_ops, partial(native.gate_norm, eps=eps))(
                out, z, self.norm.weight
            )
        return on_ops(out, z, self.norm.weight)


@mx.compile
def _causal_conv_silu(history: mx.array, x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """SiLU(depthwise conv) of (B, T, E) inputs x after the (B, K−1, E) ones of `history`, with
    MLX conv weights (E, K, 1)."""
    taps, length = weight.shape[1], x.shape[1]
    window = mx.concatenate([history, x], axis=1)
    weight = weight.T.astype(window.dtype)  # (1, K, E)
    bias = bias.astype(window.dtype)
    if length == 1:  # a decode step: one product and one sum, not a graph node per tap
        return silu((window * weight).sum(axis=1, keepdims=True) + bias)
    out = bias
    for tap in range(taps):
        out = out + weight[:, tap : tap + 1] * window[:, tap : tap + length]
    return silu(out)


@mx.compile
def _gate(out: mx.array, z: mx.array) -> mx.array:
    return out * silu(z)


def _window_rows(history: mx.array, x: mx.array, start: int) -> mx.array:
    """The K−1 rows from `start` on of the conv window [history, x] (B, K−1+T, E), unmade."""
    carry = history.shape[1]
    return mx.concatenate([history[:, start:], x[:, max(start - carry, 0) : start]], axis=1)


def _last_inputs(history: mx.array, x: mx.array, lengths: Optional[mx.array]) -> mx.array:
    """The last K−1 real inputs of each row of the conv window [history, x] (rows may be
    right-padded to `lengths`), gathered from the two."""
    if lengths is None:
        return _window_rows(history, x, x.shape[1])
    carry, length = history.shape[1], x.shape[1]
    positions = (mx.clip(lengths, 0, length)[:, None] + mx.arange(carry))[..., None]
    from_history = mx.take_along_axis(history, mx.minimum(positions, carry - 1), axis=1)
    from_x = mx.take_along_axis(x, mx.clip(positions - carry, 0, length - 1), axis=1)
    return mx.where(positions < carry, from_history, from_x)


# From this many tokens a quantized layer multiplies by its dequantized weight on the CPU.
_DEQUANTIZE_FROM_TOKENS = 16
_QUANTIZED = (nn.QuantizedLinear, nn.QuantizedEmbedding)


def _dequantizes(layer: nn.Module, x: mx.array) -> bool:
    """Whether `layer` (quantized) multiplies `x` by its weight in float. MLX's CPU quantized
    matmul is scalar: 3× slower than a float matrix-vector product through sgemm here (10×
    through sgemv, mlx_fm/blas_gemv.c), and several times slower than dequantizing and a BLAS
    GEMM for a prompt's many tokens. So on the CPU a prompt dequantizes, and a decode step uses
    the float copy decoding keeps (`_FloatCopies`)."""
    return (
        isinstance(layer, _QUANTIZED)
        and mx.default_device() == mx.cpu
        and (x.size // x.shape[-1] >= _DEQUANTIZE_FROM_TOKENS or _FloatCopies.of(layer) is not None)
    )


def _dequantized(layer: nn.Module, dtype: mx.Dtype) -> mx.array:
    weight = _FloatCopies.of(layer)
    if weight is None and dtype == mx.float32:
        weight = _dequantized_in_c(layer)
    if weight is None:
        weight = _float_weight(layer)
    return weight if weight.dtype == dtype else weight.astype(dtype)  # astype would copy


def _dequantized_in_c(layer: nn.Module) -> Optional[mx.array]:
    """`layer`'s weight dequantized in C (native.dequantized) where C takes its quantization as
    it is, in inference (C gives no gradient); else None."""
    if layer.training or "biases" not in layer:
        return None
    if not native.takes_quantized(layer.mode, layer.bits, layer.group_size):
        return None
    matrix = native.Quantized(
        layer["weight"], layer["scales"], layer["biases"], layer.bits, layer.group_size
    )
    if not (matrix.read_as_they_are() and native.runs_here(*matrix[:3])):
        return None
    return native.dequantized(matrix)


def _float_weight(layer: nn.Module) -> mx.array:
    return mx.dequantize(
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class _FloatCopies:
    """Float copies of a model's quantized weights, which decoding on the CPU multiplies by.

    `refresh` (before each compiled decode step, and before a C one when a copy is missing or
    stale: `Model._decode_in_c`) keeps on every quantized layer, outside its
    parameters, a float copy of its weight, remade when the weight is replaced, and lists the
    copies in a list the compiled step takes as inputs: they must not be constants of its
    graph, which would go stale. While it traces, every array in that list and in the
    parameters is a placeholder, so the trace takes a layer's copy by its place in the list."""

    ATTRIBUTE = "_float_copy"  # (the weight it was made from, the copy, the list, its index)
    tracing_decode = contextvars.ContextVar("tracing_decode", default=False)

    @classmethod
    def of(cls, layer: nn.Module) -> Optional[mx.array]:
        kept = layer.__dict__.get(cls.ATTRIBUTE)
        if kept is None:
            return None
        source, copy, copies, index = kept
        if cls.tracing_decode.get():
            return copies[index]
        return copy if source is layer["weight"] else None

    @classmethod
    def refresh(cls, model: nn.Module, copies: list[mx.array], sources: list[mx.array]) -> None:
        """`sources` are the weights of the last refresh: while they are the same arrays, in
        the same order, the copies stand and a step checks no more than that."""
        if mx.default_device() != mx.cpu:
            copies.clear()
            sources.clear()
            return
        layers = _quantized_layers(model)
        weights = [layer["weight"] for layer in layers]
        if len(weights) == len(sources) and all(map(operator.is_, weights, sources)):
            return
        made, current = [], []
        for index, (layer, weight) in enumerate(zip(layers, weights)):
            copy = cls.of(layer)
            if copy is None:
                copy = _float_weight(layer)
                made.append(copy)
            layer.__dict__[cls.ATTRIBUTE] = (weight, copy, copies, index)
            current.append(copy)
        mx.eval(made)
        copies[:] = current
        sources[:] = weights


def _quantized_layers(tree) -> list[nn.Module]:
    """The quantized layers of a module tree, in a fixed order: a plain walk, which a decode
    step can afford (Module.named_modules costs ~0.4 ms on a 8-layer model here)."""
    found = []
    for value in tree.values() if isinstance(tree, dict) else tree:
        if isinstance(value, _QUANTIZED):
            found.append(value)
        elif isinstance(value, (dict, list, tuple)):
            found += _quantized_layers(value)
    return found


def _project(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x) for a Linear or a QuantizedLinear (see `_dequantizes`)."""
    if not _dequantizes(layer, x):
        return layer(x)
    out = x @ _dequantized(layer, x.dtype).T
    return out + layer["bias"] if "bias" in layer else out


def _embed(layer: nn.Module, inputs: mx.array) -> mx.array:
    """layer(inputs) for an Embedding or a QuantizedEmbedding. A quantized one with a float
    copy (`_FloatCopies`: decoding on the CPU) takes the rows of the copy, one gather, rather
    than gathering and dequantizing rows of its weight, scales and biases."""
    copy = _FloatCopies.of(layer)
    return layer(inputs) if copy is None else copy[inputs]


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        hidden = silu(_project(self.gate_proj, x)) * _project(self.up_proj, x)
        return _project(self.down_proj, hidden)


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mixer = FactorizationMemory(args)
        if args.intermediate_size > 0:
            self.mlp_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            self.mlp = MLP(args)

    def __call__(
        self, h: mx.array, mask: Optional[mx.array] = None, cache: Optional[FMCache] = None
    ) -> mx.array:
        return self._with_mlp(h + self.mixer(self.norm(h), mask, cache))

    def step(
        self, h: mx.array, mask: Optional[mx.array], contents: Contents
    ) -> tuple[mx.array, Contents]:
        """One token through the block on a cache's contents: (h, the contents after it)."""
        out, (contents,) = self.mixer.mix(self.norm(h), mask, contents)
        return self._with_mlp(h + out), contents

    def _with_mlp(self, h: mx.array) -> mx.array:
        if "mlp" in self:
            h = h + self.mlp(self.mlp_norm(h))
        return h


class Backbone(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Block(args) for _ in range(args.num_hidden_layers)]
        self.norm_f = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[FMCache]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        h = _embed(self.embeddings, inputs) if input_embeddings is None else input_embeddings
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_ssm_mask(h, cache[0])
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        return self.norm_f(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = Backbone(args)
        self._compiled_step = None
        # The float copies the compiled decode step reads as inputs, and the weights they were
        # made from; set past Module.__setattr__, which would make them parameters.
        object.__setattr__(self, "_float_copies", [])
        object.__setattr__(self, "_float_sources", [])
        object.__setattr__(self, "_step_in_c", None)  # a native.DecodeStep, made when first used
        object.__setattr__(self, "_weights_read", None)  # how it found its weights (_Reads)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache: Optional[list[FMCache]] = None,
        input_embeddings: Optional[mx.array] = None,
    ) -> mx.array:
        if input_embeddings is None and _decodes_whole(inputs, cache):
            return self._decode(inputs, cache)
        return self._head(self.backbone(inputs, cache, input_embeddings))

    def _head(self, h: mx.array) -> mx.array:
        if not self.args.tie_word_embeddings:
            return _project(self.lm_head, h)
        embeddings = self.backbone.embeddings
        if _dequantizes(embeddings, h):
            return h @ _dequantized(embeddings, h.dtype).T
        return embeddings.as_linear(h)

    def _decode(self, inputs: mx.array, cache: list[FMCache]) -> mx.array:
        """One token per row: in C on the CPU where it can (`_decode_in_c`), else as one
        compiled graph over every layer: per-op dispatch, not arithmetic, is most of a decode
        step's cost. The caches are its inputs and outputs."""
        mask = create_ssm_mask(inputs, cache[0])
        logits = self._decode_in_c(inputs, cache, mask)
        if logits is None:
            _FloatCopies.refresh(self, self._float_copies, self._float_sources)
            logits, contents = self._decode_compiled(inputs, [c.cache for c in cache], mask)
            for layer_cache, after in zip(cache, contents):
                keep = layer_cache.snapshots_for(1)
                layer_cache.record([layer_cache.cache, after][1 - keep :], 1)
        for layer_cache in cache:
            layer_cache.advance(1)
        return logits

    def _decode_compiled(
        self, inputs: mx.array, contents: list[Contents], mask: Optional[mx.array]
    ) -> tuple[mx.array, list[Contents]]:
        if self._compiled_step is None:
            self._compiled_step = mx.compile(self._step, inputs=[self.state, self._float_copies])
        tracing = _FloatCopies.tracing_decode.set(True)
        try:
            return self._compiled_step(inputs, contents, *(() if mask is None else (mask,)))
        finally:
            _FloatCopies.tracing_decode.reset(tracing)

    def _decode_in_c(
        self, inputs: mx.array, cache: list[FMCache], mask: Optional[mx.array]
    ) -> Optional[mx.array]:
        """The decode step in C (native.DecodeStep), which updates the caches' contents in place
        and records what it overwrote; its logits, or None where it does not run: in training,
        without an optimized BLAS or a C compiler, inside mx.compile or mx.vmap, on a cache
        that is not float32, or on weights other than float32 ones of plain Linear and
        Embedding layers and quantized ones (`_decode_matrix`)."""
        if self.training or not native.decodes_here():
            return None
        if self._step_in_c is None or not self._weights_read.unchanged():
            if not self._make_step_in_c():
                return None
        if not all(c.holds_float32() for c in cache):  # e.g. a cache saved from a bf16 model
            return None
        if not native.evaluates_here(inputs, *([] if mask is None else [mask])):
            return None
        keep = any(c.snapshots_for(1) for c in cache)
        contents = [[a for a in c.writable_contents() if a is not None] for c in cache]
        logits, overwritten = self._step_in_c(inputs, contents, mask, keep)
        for layer, layer_cache in enumerate(cache):
            layer_cache.record_overwritten(Overwritten(overwritten, layer) if keep else None)
        return logits

    def _make_step_in_c(self) -> bool:
        """Make the decode step in C on the model's weights as they are now, unless it is made
        on them already; False where it cannot take them (see `_decode_in_c`)."""
        read = _Reads()
        weights = self._decode_weights(read)
        if weights is None:  # perhaps a quantized layer without a float copy (yet)
            _FloatCopies.refresh(self, self._float_copies, self._float_sources)
            read = _Reads()
            weights = self._decode_weights(read)
        if weights is None or not native.DecodeStep.takes(weights):
            object.__setattr__(self, "_step_in_c", None)
            return False
        if self._step_in_c is None or not self._step_in_c.made_from(weights):
            object.__setattr__(self, "_step_in_c", native.DecodeStep(self.args, weights))
        object.__setattr__(self, "_weights_read", read)
        return True

    def _decode_weights(self, read: "_Reads") -> Optional[list]:
        """The weights fm_decode takes, in its order (native.MODEL_WEIGHTS, LAYER_WEIGHTS),
        None for a conv or MLP the model has not; None if a matrix cannot be had as one. A walk
        of the module dicts, each look-up through `read`, which can tell each step whether a
        walk would find the same (weights may have been replaced)."""
        backbone = read(self, "backbone")
        embeddings = _decode_matrix(read(backbone, "embeddings"), read)
        head = (
            embeddings
            if self.args.tie_word_embeddings
            else _decode_matrix(read(self, "lm_head"), read)
        )
        if embeddings is None or head is None:
            return None
        weights = [embeddings, read(read(backbone, "norm_f"), "weight"), head]
        for layer in read.items(read(backbone, "layers")):
            layer_weights = _layer_decode_weights(layer, read)
            if layer_weights is None:
                return None
            weights += layer_weights
        return weights

    def _step(
        self, inputs: mx.array, contents: list[Contents], mask: Optional[mx.array] = None
    ) -> tuple[mx.array, list[Contents]]:
        h = _embed(self.backbone.embeddings, inputs)
        after = []
        for layer, layer_contents in zip(self.layers, contents):
            h, layer_contents = layer.step(h, mask, layer_contents)
            after.append(layer_contents)
        return self._head(self.backbone.norm_f(h)), after

    @property
    def layers(self) -> list[Block]:
        return self.backbone.layers

    def make_cache(self, max_undo: int = DEFAULT_MAX_UNDO) -> list[FMCache]:
        """One `FMCache` per layer, rewindable by up to `max_undo` tokens."""
        size = 2 if self.args.conv_kernel > 1 else 1
        return [FMCache(size, max_undo=max_undo) for _ in self.layers]

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Accept SPEC's PyTorch layout (conv1d weight E×1×K); idempotent."""
        weights = with_conv_layout(weights, "mlx")
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights


def _layer_decode_weights(layer: Block, read: "_Reads") -> Optional[list]:
    """A block's weights in fm_decode's order (native.LAYER_WEIGHTS); see `_decode_weights`."""
    mixer, mlp = read(layer, "mixer"), read(layer, "mlp")
    matrices = [_decode_matrix(read(mixer, name), read) for name in ("in_proj", "out_proj")]
    if mlp is not None:
        names = ("gate_proj", "up_proj", "down_proj")
        matrices += [_decode_matrix(read(mlp, name), read) for name in names]
    if any(matrix is None for matrix in matrices):
        return None
    conv = read(mixer, "conv1d")
    return [
        read(read(layer, "norm"), "weight"),
        matrices[0],
        *((None, None) if conv is None else (read(conv, "weight"), read(conv, "bias"))),
        read(mixer, "eta_bias"),
        read(mixer, "mu_bias"),
        read(read(mixer, "norm"), "weight"),
        matrices[1],
        *([None] * 4 if mlp is None else [read(read(layer, "mlp_norm"), "weight"), *matrices[2:]]),
    ]


def _decode_matrix(layer: nn.Module, read: "_Reads") -> Optional[mx.array | native.Quantized]:
    """The matrix a Linear or Embedding `layer` multiplies by in a decode step, as fm_decode
    takes it: its weight; a quantized layer's own (`native.takes_quantized`) or else its float
    copy (kept while its weight is the same array); None for any other layer (e.g. one with a
    bias, or LoRA's)."""
    if read(layer, "bias") is not None:
        return None
    weight = read(layer, "weight")
    if isinstance(layer, _QUANTIZED):
        biases = read(layer, "biases")
        if biases is not None and native.takes_quantized(layer.mode, layer.bits, layer.group_size):
            return native.Quantized(
                weight, read(layer, "scales"), biases, layer.bits, layer.group_size
            )
        return _FloatCopies.of(layer)
    return weight if isinstance(layer, (nn.Linear, nn.Embedding)) else None


class _Reads:
    """The module-dict look-ups of a walk of the model, each with what it found: while
    `unchanged()` (one pass over them), the walk would find the same."""

    def __init__(self) -> None:
        self.containers, self.keys, self.found = [], [], []
        self.lists: list[tuple[list, tuple]] = []

    def __call__(self, container: dict, key: str):
        """container.get(key), recorded."""
        found = container.get(key)
        self.containers.append(container)
        self.keys.append(key)
        self.found.append(found)
        return found

    def items(self, items: list) -> list:
        """`items` (a list of modules), its items recorded."""
        self.lists.append((items, tuple(items)))
        return items

    def unchanged(self) -> bool:
        return all(
            map(operator.is_, map(dict.get, self.containers, self.keys), self.found)
        ) and all(
            len(items) == len(seen) and all(map(operator.is_, items, seen))
            for items, seen in self.lists
        )


def _decodes_whole(inputs: mx.array, cache: Optional[list[FMCache]]) -> bool:
    """Whether a forward is a decode step `Model._decode` takes whole (in C, or as one compiled
    graph): one token per row, on caches that hold a state and conv inputs for every row, not
    on the Metal kernels."""
    return (
        cache is not None
        and inputs.ndim == 2
        and inputs.shape[1] == 1
        and not use_kernels()
        and all(c.lengths is None and c.holds_contents() for c in cache)
    )
