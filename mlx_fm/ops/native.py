"""The FM mixer's core as a fused loop in C, for inference on the CPU (fm_mix_cpu.c).

On MLX's CPU back-end every op of routing and of the chunked scan is a pass over memory on one
thread: together about half of a prompt's time. The recurrence itself touches only the k
written slots of a token (k·P multiply-adds a head), so one C loop per head, which routes,
gates, writes, reads and merges token by token, the heads shared among the cores, does it in a
fraction of that. It runs outside MLX's graph: its inputs are evaluated, handed to C as NumPy
views and its outputs copied back. So it is taken only where an evaluation is allowed (not
inside mx.compile or mx.vmap: `evaluates_here`), and its gradient is that of the same mix on
MLX ops, so that a gradient through it is still exact.

The library is built once per source and compiler into the user's cache, the first time a
prompt needs it. Without a C compiler, off the CPU, or with MLX_FM_OPS_ONLY=1, the mix stays
on MLX ops; `status()` says which.
"""

import ctypes
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..blas import built_library
from .chunk import fm_chunked
from .router import merge, prepare

SOURCE = Path(__file__).with_name("fm_mix_cpu.c")
_library: dict = {"function": None, "reason": "not built yet"}


def available() -> bool:
    """Whether the mix runs in C here: the CPU is the default device, MLX_FM_OPS_ONLY is not
    1, and the library could be built (it is, on the first call)."""
    if os.environ.get("MLX_FM_OPS_ONLY") == "1" or mx.default_device() != mx.cpu:
        return False
    return _mix_function() is not None


def status() -> str:
    """How a prompt's mix runs on the CPU, in words."""
    if os.environ.get("MLX_FM_OPS_ONLY") == "1":
        return "MLX ops (MLX_FM_OPS_ONLY=1)"
    if mx.default_device() != mx.cpu:
        return "not on the CPU (the default device is not the CPU)"
    if _mix_function() is None:
        return f"MLX ops ({_library['reason']})"
    return f"C, fused ({SOURCE.relative_to(SOURCE.parents[2])})"


def _mix_function():
    if _library["function"] is None and _library["reason"] == "not built yet":
        try:
            path = built_library(SOURCE, "fm-mix", ("-O3", "-pthread"))
            function = ctypes.CDLL(str(path)).fm_mix
        except OSError as error:
            _library["reason"] = str(error)
        else:
            function.argtypes = (
                [ctypes.c_long] * 6 + [ctypes.c_float] + [ctypes.c_void_p] * 10 + [ctypes.c_int]
            )
            function.restype = None
            _library.update(function=function, reason="built")
    return _library["function"]


def evaluates_here(*arrays: mx.array) -> bool:
    """Evaluate `arrays`; False where that is not allowed (inside mx.compile or mx.vmap)."""
    try:
        mx.eval(*arrays)
    except ValueError as error:
        if "function transformations" in str(error):
            return False
        raise
    return True


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
) -> tuple[mx.array, mx.array]:
    """`fm_mix` over T tokens, in C: the merged output o (B, T, H, P) and the new state, both
    float32. Call only where `available()` and `evaluates_here(...)` hold."""
    batch, _, heads, width = x.shape
    if state is None:
        state = mx.zeros((batch, heads, router_logits.shape[-1], width), mx.float32)

    def on_ops(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state):
        x, slot_weights, eta, mu = prepare(
            *(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias),
            top_k=top_k,
            temperature=temperature,
            mask=mask,
        )
        read, state = fm_chunked(x, slot_weights, eta, state)
        return merge(read, x, mu), state

    @mx.custom_function
    def mixed(*arrays):
        return _mix_in_c(*arrays, top_k=top_k, temperature=temperature, mask=mask)

    @mixed.vjp
    def mixed_vjp(primals, cotangents, outputs):
        return mx.vjp(on_ops, list(primals), list(cotangents))[1]

    return mixed(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state)


def _mix_in_c(*arrays: mx.array, top_k: int, temperature: float, mask: mx.array | None):
    float32 = [mx.contiguous(a.astype(mx.float32)) for a in arrays[:-1]]
    if mask is not None:
        mask = mx.contiguous(mask.astype(mx.uint8))
    mx.eval(float32, arrays[-1], mask)
    x, router, update, merge, eta_bias, mu_bias = (np.asarray(a) for a in float32)
    state = np.array(arrays[-1], dtype=np.float32, order="C")  # a copy: updated in place
    batch, length, heads, width = x.shape
    num_slots = router.shape[-1]
    threads = min(os.cpu_count() or 1, heads)
    out = np.empty(x.shape, np.float32)
    top_k = min(top_k, num_slots)
    scratch = np.empty((threads, 2, top_k), np.int64)
    _mix_function()(
        *(batch, length, heads, num_slots, width, top_k, temperature),
        *(a.ctypes.data for a in (x, router, update, merge, eta_bias, mu_bias)),
        None if mask is None else np.asarray(mask).ctypes.data,
        *(a.ctypes.data for a in (state, out, scratch)),
        threads,
    )
    return mx.array(out), mx.array(state)
