"""The FM mixer's elementwise and recurrent work, and a whole decode step, in C, for inference
on the CPU (fm_cpu.c).

On MLX's CPU back-end every op is a pass over memory on one thread, and a prompt's routing, scan,
conv and gates took most of its time, against the GEMMs' share. The recurrence itself touches
only the k written slots of a token (k·P multiply-adds a head), so one C loop per head, which
routes, gates, writes, reads and merges token by token (`fm_mix_native`), the heads shared among
the cores, does it in a fraction of that; and the causal conv with SiLU and the gated RMSNorm are
one pass each (`conv_silu`, `gate_norm`). They run outside MLX's graph: their inputs are
evaluated, handed to C as NumPy views and their outputs copied back. So they are taken only where
an evaluation is allowed (not inside mx.compile or mx.vmap: `evaluates_here`), and each has the
gradient of the same work on MLX ops, so that a gradient through it is still exact.

A decode step (`DecodeStep`) is the whole model on one token a row, in one call: its products go
to the BLAS's sgemm, as MLX's do, the rest through the same C functions. It is for inference
only (no gradient), where an optimized BLAS was loaded (mlx_fm/blas.py).

The library is built once per source and compiler into the user's cache, the first time a
prompt needs it. Without a C compiler, off the CPU, or with MLX_FM_OPS_ONLY=1, all of it stays
on MLX ops; `status()` and `decode_status()` say which.
"""

import ctypes
import math
import operator
import os
from pathlib import Path
from typing import Callable, NamedTuple

import mlx.core as mx
import numpy as np

from ..blas import built_library, sgemm_address

SOURCE = Path(__file__).with_name("fm_cpu.c")
_LONG, _FLOAT, _POINTER, _INT = ctypes.c_long, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {
    "fm_mix": [_LONG] * 6 + [_FLOAT] + [_POINTER] * 11 + [_LONG, _INT],
    "fm_conv_silu": [_LONG] * 4 + [_POINTER] * 2 + [_LONG] + [_POINTER] * 3 + [_INT],
    "fm_gate_norm": [_LONG] * 2 + [_FLOAT] + [_POINTER] * 2 + [_LONG] + [_POINTER] * 2 + [_INT],
    "fm_decode": [_LONG, _POINTER] + [_FLOAT] * 2 + [_POINTER] * 10,
    "fm_quantized_products": [],
    "fm_dequantize": [_POINTER, _LONG, _LONG, _POINTER, _INT],
    "fm_portable_only": [_INT],
}
_RESULTS = {name: ctypes.c_int for name in ("fm_mix", "fm_decode", "fm_quantized_products")}
# fm_decode's weights, in the order of its enums (fm_cpu.c): the model's, then each layer's.
MODEL_WEIGHTS = ("embeddings", "final_norm", "head")
LAYER_WEIGHTS = (
    "norm",
    "in_proj",
    "conv_weight",
    "conv_bias",
    "eta_bias",
    "mu_bias",
    "mixer_norm",
    "out_proj",
    "mlp_norm",
    "gate_proj",
    "up_proj",
    "down_proj",
)
_library: dict = {"functions": None, "reason": "not built yet"}
_OFF_CPU = "the default device is not the CPU"


def available() -> bool:
    """Whether the C path runs here: the CPU is the default device, MLX_FM_OPS_ONLY is not 1,
    and the library could be built (it is, on the first call)."""
    return _why_not() is None


def status() -> str:
    """How a prompt's mixer runs on the CPU, in words."""
    return _in_words(_why_not(), "C, fused", "MLX ops")


def decode_status() -> str:
    """How a decode step runs on the CPU, in words."""
    return _in_words(_why_not_decode(), "C, the whole model", "one compiled MLX graph")


def decodes_here() -> bool:
    """Whether a decode step can run in C (`DecodeStep`): `available()`, and an optimized BLAS
    was loaded, whose sgemm it calls as MLX does."""
    return _why_not_decode() is None


def _in_words(why_not: str | None, in_c: str, on_ops: str) -> str:
    if why_not is None:
        return f"{in_c} ({SOURCE.relative_to(SOURCE.parents[2])})"
    if why_not == _OFF_CPU:
        return f"not on the CPU ({why_not})"
    return f"{on_ops} ({why_not})"


def _why_not_decode() -> str | None:
    if sgemm_address() is None:
        return "no optimized BLAS was loaded: see python -m mlx_fm"
    return _why_not()


def _why_not() -> str | None:
    """None where the C path runs, else why not."""
    if os.environ.get("MLX_FM_OPS_ONLY") == "1":
        return "MLX_FM_OPS_ONLY=1"
    if mx.default_device() != mx.cpu:
        return _OFF_CPU
    if _functions() is None:
        return _library["reason"]
    return None


def _functions() -> dict | None:
    if _library["functions"] is None and _library["reason"] == "not built yet":
        try:
            library = ctypes.CDLL(
                str(built_library(SOURCE, "fm-cpu", ("-O3", "-fno-trapping-math", "-pthread")))
            )
            functions = {name: getattr(library, name) for name in _SIGNATURES}
        except (OSError, AttributeError) as error:
            _library["reason"] = str(error)
        else:
            for name, function in functions.items():
                function.argtypes, function.restype = _SIGNATURES[name], _RESULTS.get(name)
            _library.update(
                functions=functions,
                reason="built",
                quantized_products=functions["fm_quantized_products"]() == 1,
            )
    return _library["functions"]


def portable_only(on: bool) -> None:
    """Run fm_cpu.c's loops as built for any CPU of this kind, not for its vector units (AVX2
    and FMA on x86-64), or (False, the default) as the CPU allows: the tests run both builds.
    Call only where `available()` holds."""
    _functions()["fm_portable_only"](int(on))


def evaluates_here(*arrays: mx.array) -> bool:
    """Evaluate `arrays`; False where that is not allowed (inside mx.compile or mx.vmap)."""
    try:
        mx.eval(*arrays)
    except ValueError as error:
        if "function transformations" in str(error):
            return False
        raise
    return True


def runs_here(*arrays: mx.array) -> bool:
    """Whether work on `arrays` can run in C now: `available()`, and `evaluates_here`."""
    return available() and evaluates_here(*arrays)


def with_gradient_of(on_ops: Callable, in_c: Callable) -> Callable:
    """A function whose value is `in_c`'s and whose gradient is `on_ops`'s (same arguments)."""

    @mx.custom_function
    def fused(*arrays):
        return in_c(*arrays)

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        if isinstance(cotangents, mx.array):
            cotangents = [cotangents]
        return mx.vjp(on_ops, list(primals), list(cotangents))[1]

    return fused


def _threads(units: int) -> int:
    return min(os.cpu_count() or 1, units)


def _on_host(*arrays: mx.array) -> list[np.ndarray]:
    """Contiguous float32 NumPy views of `arrays`, evaluated."""
    arrays = [mx.contiguous(a.astype(mx.float32)) for a in arrays]
    mx.eval(arrays)
    return [np.asarray(a) for a in arrays]


def _rows_on_host(array: mx.array, row_axes: int) -> tuple[np.ndarray, int]:
    """`array` in float32 as rows over its first `row_axes` axes, each contiguous, evaluated: a
    NumPy view of its own memory where it is laid out so (a slice of a projection's columns
    is), else of a contiguous copy; and the floats from one row to the next."""
    array = array.astype(mx.float32)
    mx.eval(array)
    host = np.asarray(array)
    shape = math.prod(host.shape[:row_axes]), math.prod(host.shape[row_axes:])
    rows = host.reshape(shape)  # a view where it can be one
    if rows.shape[1] > 1 and rows.strides[1] != rows.itemsize or rows.strides[0] % rows.itemsize:
        rows = np.ascontiguousarray(rows)
    return rows, rows.strides[0] // rows.itemsize


def _address(array: np.ndarray) -> int:
    return array.ctypes.data


def fm_mix_native(
    x: mx.array,
    router_logits: mx.array,
    update_logits: mx.array,
    merge_logits: mx.array,
    eta_bias: mx.array,
    mu_bias: mx.array,
    *,
    top_k: int,
    temperature: float,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    keep: int = 0,
    on_ops: Callable,
) -> tuple[mx.array, list[mx.array | None]]:
    """`fm_mix_keeping` over T tokens, in C: the merged output o (B, T, H, P) and the states
    before each of the last `keep` tokens and after the last (the first None when keep is T
    and no state was given), float32, with the gradient of `on_ops` (the same on MLX ops,
    taking the state as a keyword). Call only where `runs_here(...)` holds."""
    batch, length, heads, width = x.shape
    num_slots = router_logits.shape[-1]
    top_k = min(top_k, num_slots)
    fresh = state is None
    if fresh:
        state = mx.zeros((batch, heads, num_slots, width), mx.float32)

    def in_c(x, router_logits, update_logits, merge_logits, *rest):
        x, *biases, final_state = _on_host(x, *rest)
        final_state = final_state.copy()  # updated in place
        per_token = [_rows_on_host(a, 2) for a in (router_logits, update_logits, merge_logits)]
        strides = np.array([stride for _, stride in per_token], np.int64)
        mask_bytes = None if mask is None else np.asarray(mask, dtype=np.uint8)
        out = np.empty(x.shape, np.float32)
        snapshots = np.empty((keep, *final_state.shape), np.float32)
        failed = _functions()["fm_mix"](
            *(batch, length, heads, num_slots, width, top_k, temperature),
            *map(_address, (x, *(rows for rows, _ in per_token), strides, *biases)),
            None if mask_bytes is None else _address(mask_bytes),
            *map(_address, (final_state, out)),
            _address(snapshots) if keep else None,
            keep,
            _threads(heads),
        )
        if failed:
            raise MemoryError("no memory for the mix's scratch")
        before = mx.array(snapshots)
        return [mx.array(out), *(before[j] for j in range(keep)), mx.array(final_state)]

    def on_ops_flat(*arrays):
        out, states = on_ops(*arrays[:-1], state=arrays[-1])
        return [out, *states]

    out, *states = with_gradient_of(on_ops_flat, in_c)(
        x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state
    )
    if fresh and keep == length:  # before the first token, as the caller had it
        states[0] = None
    return out, states


def conv_silu(history: mx.array, x: mx.array, weight: mx.array, bias: mx.array) -> mx.array:
    """SiLU(depthwise causal conv) of float32 (B, T, E) inputs x after the (B, K−1, E) ones of
    `history`, with MLX conv weights (E, K, 1) and bias (E,): (B, T, E). x is read where it lies
    (a slice of a projection's columns). Call only where `runs_here(...)` holds."""
    batch, length, channels = x.shape
    history, bias = _on_host(history, bias)
    x, stride = _rows_on_host(x, 2)
    weight = np.ascontiguousarray(_conv_taps_first(weight))
    out = np.empty((batch, length, channels), np.float32)
    _functions()["fm_conv_silu"](
        *(batch, length, channels, weight.shape[0]),
        *map(_address, (history, x)),
        stride,
        *map(_address, (weight, bias, out)),
        _threads(batch * length),
    )
    return mx.array(out)


def gate_norm(x: mx.array, gate: mx.array, weight: mx.array, eps: float) -> mx.array:
    """RMSNorm(x ⊙ SiLU(gate)) · weight over the last axis, float32, for (…, E) x and gate.
    Call only where `runs_here(...)` holds."""
    x, weight = _on_host(x, weight)
    gate, gate_stride = _rows_on_host(gate, gate.ndim - 1)
    out = np.empty(x.shape, np.float32)
    rows = x.size // x.shape[-1]
    _functions()["fm_gate_norm"](
        rows,
        x.shape[-1],
        eps,
        *map(_address, (x, gate)),
        gate_stride,
        *map(_address, (weight, out)),
        _threads(rows),
    )
    return mx.array(out)


class Quantized(NamedTuple):
    """A quantized layer's matrix as fm_decode multiplies by it (`takes_quantized`)."""

    weight: mx.array  # uint32 words of packed values, (outputs, inputs · bits / 32)
    scales: mx.array  # (outputs, inputs / group_size)
    biases: mx.array
    bits: int
    group_size: int

    def read_as_they_are(self) -> bool:
        """Whether fm_cpu.c reads these arrays as they are: uint32 words, float32 scales and
        biases."""
        return (
            self.weight.dtype == mx.uint32 and self.scales.dtype == self.biases.dtype == mx.float32
        )


class _QuantizedMatrix(ctypes.Structure):
    _fields_ = [("packed", _POINTER), ("scales", _POINTER), ("biases", _POINTER)]
    _fields_ += [("bits", _LONG), ("group", _LONG)]


def _quantized_on_host(matrix: Quantized) -> tuple[list[np.ndarray], _QuantizedMatrix]:
    """`matrix`'s arrays as contiguous NumPy arrays (to be kept while C reads them), and the
    struct fm_cpu.c reads them by."""
    arrays = [np.ascontiguousarray(a) for a in matrix[:3]]
    return arrays, _QuantizedMatrix(*map(_address, arrays), matrix.bits, matrix.group_size)


def takes_quantized(mode: str, bits: int, group_size: int) -> bool:
    """Whether fm_decode multiplies by a matrix so quantized itself, rather than by its float
    copy: MLX's affine mode, whole groups of 8 words (group_size · bits a multiple of 256), on a
    CPU where that product is fast (x86-64 with AVX2 and FMA: 0.2 ns a weight on one core, where
    OpenBLAS's float sgemv streams 4 bytes a weight; asked of the CPU once, as the library
    loads)."""
    return (
        mode == "affine"
        and bits in (2, 4, 8)
        and group_size * bits % 256 == 0
        and _functions() is not None
        and _library["quantized_products"]
    )


def dequantized(matrix: Quantized) -> mx.array:
    """The float32 matrix `matrix` stands for, bit for bit as mx.dequantize gives it. MLX's CPU
    dequantize takes ~4–5 ns a weight here, a tenth of a 2,048-token prompt's time on a 4-bit
    model that dequantizes each segment (see the model's `_dequantizes`); this, ~1.2 ns with the
    copy into MLX. Call only where `takes_quantized` and `matrix.read_as_they_are()` hold and
    the arrays can be evaluated (`evaluates_here`)."""
    (packed, _, _), host = _quantized_on_host(matrix)
    rows, inputs = packed.shape[0], packed.shape[1] * 32 // matrix.bits
    out = np.empty((rows, inputs), np.float32)
    _functions()["fm_dequantize"](ctypes.byref(host), rows, inputs, _address(out), _threads(rows))
    return mx.array(out)


class DecodeStep:
    """fm_decode (fm_cpu.c): a decode step of the whole model in C, one token a row, on the
    weights it was made with. A decode step on MLX ops is one compiled graph, but on the CPU
    the graph's many small nodes cost about as much again as its matrix-vector products, which
    fm_decode alone calls out to. Call only where `decodes_here()` and `evaluates_here(...)`
    hold."""

    def __init__(self, args, weights: list[mx.array | Quantized | None]) -> None:
        """`args`: the model's ModelArgs; `weights`: MODEL_WEIGHTS, then LAYER_WEIGHTS for
        each layer, float32 arrays or a quantized layer's `Quantized` (see `takes`), None for a
        conv or MLP the model has not."""
        self.weights = weights
        top_k = min(args.top_k, args.num_slots)
        dims = (args.hidden_size, args.num_hidden_layers, args.num_heads, args.num_slots)
        dims += (args.head_dim, top_k, args.conv_kernel, args.intermediate_size, args.vocab_size)
        self._dims = (ctypes.c_long * len(dims))(*dims)
        self._temperature, self._eps = args.router_temperature, args.rms_norm_eps
        self._vocab_size = args.vocab_size
        mx.eval(_arrays(weights))
        conv_weights = range(
            len(MODEL_WEIGHTS) + LAYER_WEIGHTS.index("conv_weight"),
            len(weights),
            len(LAYER_WEIGHTS),
        )
        self._hosts = [
            None
            if w is None or isinstance(w, Quantized)
            else np.ascontiguousarray(_conv_taps_first(w) if i in conv_weights else w)
            for i, w in enumerate(weights)
        ]
        self._pointers = _pointers(self._hosts)
        self._quantized = (_QuantizedMatrix * len(weights))()
        self._quantized_hosts = {}  # what self._quantized points into
        for i, w in enumerate(weights):
            if isinstance(w, Quantized):
                self._quantized_hosts[i], self._quantized[i] = _quantized_on_host(w)
        self._sgemm = sgemm_address()
        inner = args.num_heads * args.head_dim
        self._contents_shapes = [(args.num_heads, args.num_slots, args.head_dim)]
        if args.conv_kernel > 1:
            self._contents_shapes.append((args.conv_kernel - 1, inner))
        self._overwritten_shapes = [
            (args.num_heads, top_k),
            (args.num_heads, top_k, args.head_dim),
            (inner,) if args.conv_kernel > 1 else None,
        ]
        self._logits = np.empty((0, 1, args.vocab_size), np.float32)  # reused: its copy is returned
        self._contents, self._contents_pointers = [], None  # the last contents, checked
        self._layout = None  # of what a step overwrites, for the last batch size

    @staticmethod
    def takes(weights: list) -> bool:
        return all(
            w.read_as_they_are() if isinstance(w, Quantized) else w is None or w.dtype == mx.float32
            for w in weights
        )

    def made_from(self, weights: list) -> bool:
        made, given = _arrays(self.weights), _arrays(weights)
        return len(made) == len(given) and all(map(operator.is_, made, given))

    def __call__(
        self,
        tokens: mx.array,
        contents: list[list[mx.array]],
        mask: mx.array | None,
        keep_overwritten: bool,
    ) -> tuple[mx.array, "StepOverwrites | None"]:
        """The logits (B, 1, vocab) for `tokens` (B, 1), having updated each layer's cache
        contents [state, last conv inputs] in place: float32 arrays, evaluated and contiguous,
        that are the caller's to change (FMCache.writable_contents); and if `keep_overwritten`,
        what the step overwrote in them, to undo it by. A ValueError for a token out of the
        vocabulary, which MLX's gather would read past the embeddings for, and for contents of
        other shapes."""
        tokens = np.asarray(tokens).astype(np.int64).reshape(-1)
        pointers = self._pointers_to(contents, len(tokens))
        if len(self._logits) != len(tokens):
            self._logits = np.empty((len(tokens), 1, self._vocab_size), np.float32)
        if self._layout is None or self._layout.batch != len(tokens):
            self._layout = _layout(len(contents), len(tokens), self._overwritten_shapes)
        overwritten = StepOverwrites(self._layout) if keep_overwritten else None
        mask = None if mask is None else np.asarray(mask).astype(np.uint8).reshape(-1)
        failed = _functions()["fm_decode"](
            *(len(tokens), self._dims, self._temperature, self._eps, _address(tokens)),
            None if mask is None else _address(mask),
            self._pointers,
            self._quantized,
            pointers,
            *((None,) * 3 if overwritten is None else overwritten.addresses),
            _address(self._logits),
            self._sgemm,
        )
        if failed == 2:
            outside = tokens[(tokens < 0) | (tokens >= self._vocab_size)][0]
            raise ValueError(
                f"token id {outside} is out of the vocabulary (0 to {self._vocab_size - 1})"
            )
        if failed:
            raise MemoryError("no memory for a decode step's scratch")
        return mx.array(self._logits), overwritten

    def _pointers_to(self, contents: list[list[mx.array]], batch: int):
        """fm_decode's pointers to the contents, checked to be of this model's shapes (kept
        while they are the same arrays: a decode step in C updates them in place)."""
        arrays = [a for layer in contents for a in layer]
        if len(arrays) == len(self._contents) and all(map(operator.is_, arrays, self._contents)):
            if self._contents[0].shape[0] == batch:
                return self._contents_pointers
        expected = [(batch, *shape) for shape in self._contents_shapes]
        for layer in contents:
            if [tuple(a.shape) for a in layer] != expected:
                raise ValueError(
                    f"a cache holds arrays of shapes {[tuple(a.shape) for a in layer]}, not "
                    f"{expected}: a cache made for another model or batch?"
                )
        self._contents_pointers = _pointers(
            _pairs([[np.asarray(a) for a in layer] for layer in contents])
        )
        self._contents = arrays
        return self._contents_pointers


class _Layout(NamedTuple):
    """Where fm_decode's written, overwritten and left lie in one buffer of `size` floats, for
    `layers` layers of `batch` rows: (shape, offset) each, None for no conv inputs."""

    layers: int
    batch: int
    parts: list[tuple[tuple, int] | None]
    size: int


def _layout(layers: int, batch: int, shapes: list[tuple | None]) -> _Layout:
    parts, size = [], 0
    for shape in shapes:
        parts.append(None if shape is None else ((layers, batch, *shape), size))
        size += 0 if shape is None else layers * batch * int(np.prod(shape))
    return _Layout(layers, batch, parts, size)


class StepOverwrites:
    """What a decode step in C overwrote in every layer's contents, to undo it by, in one
    buffer: fm_decode's written, overwritten and left."""

    def __init__(self, layout: _Layout) -> None:
        self._layout = layout
        self._buffer = np.empty(layout.size, np.float32)
        start = _address(self._buffer)
        self.addresses = tuple(None if p is None else start + 4 * p[1] for p in layout.parts)

    def of_layer(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Layer `layer`'s: the slots each head wrote (B, H, k), their rows before (B, H, k,
        P), and the conv input that left the window (B, E), None without conv inputs."""
        slots, rows, left = (
            None
            if part is None
            else self._buffer[part[1] : part[1] + int(np.prod(part[0]))].reshape(part[0])[layer]
            for part in self._layout.parts
        )
        return slots.view(np.int32), rows, left

    @property
    def layer_nbytes(self) -> int:
        return self._buffer.nbytes // self._layout.layers


def _arrays(weights: list) -> list[mx.array]:
    """The arrays of `weights` (a Quantized one's three), in order."""
    return [
        a for w in weights if w is not None for a in (w[:3] if isinstance(w, Quantized) else [w])
    ]


def _conv_taps_first(weight: mx.array) -> np.ndarray:
    """MLX's conv weight (E, K, 1) as fm_cpu.c's conv takes it: (K, E)."""
    return np.asarray(weight).reshape(weight.shape[0], weight.shape[1]).T


def _pairs(contents: list[list[np.ndarray]]) -> list[np.ndarray | None]:
    """Each layer's [state, last conv inputs], the latter None where the layer has none."""
    return [a for layer in contents for a in (layer + [None])[:2]]


def _pointers(arrays: list[np.ndarray | None]):
    return (ctypes.c_void_p * len(arrays))(*(None if a is None else _address(a) for a in arrays))
