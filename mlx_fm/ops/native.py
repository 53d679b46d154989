"""The FM scan as a fused recurrent loop in C, for inference on the CPU (fm_scan_cpu.c).

On MLX's CPU back-end every op of the chunked scan is a pass over memory on one thread, and
the scan was a third of a prompt's time. The recurrence itself touches only the k written
slots of a token (k·P multiply-adds a head), so one C loop per head, the heads shared among
the cores, does it in a fraction of that. It runs outside MLX's graph: its inputs are
evaluated, handed to C as NumPy views and its outputs copied back. So it is taken only where
an evaluation is allowed (not inside mx.compile or mx.vmap: `evaluates_here`), and its
gradient is the chunked scan's, so that a gradient through it is still exact.

The library is built once per source and compiler into the user's cache, the first time a
prompt needs it. Without a C compiler, off the CPU, or with MLX_FM_OPS_ONLY=1, the scan
stays on MLX ops; `status()` says which.
"""

import ctypes
import os
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..blas import built_library
from .chunk import fm_chunked

SOURCE = Path(__file__).with_name("fm_scan_cpu.c")
_library: dict = {"handle": None, "reason": "not built yet"}


def available() -> bool:
    """Whether the scan runs in C here: the CPU is the default device, MLX_FM_OPS_ONLY is not
    1, and the library could be built (it is, on the first call)."""
    if os.environ.get("MLX_FM_OPS_ONLY") == "1" or mx.default_device() != mx.cpu:
        return False
    return _scan_function() is not None


def status() -> str:
    """How a prompt's scan runs on the CPU, in words."""
    if os.environ.get("MLX_FM_OPS_ONLY") == "1":
        return "MLX ops (MLX_FM_OPS_ONLY=1)"
    if mx.default_device() != mx.cpu:
        return "not on the CPU (the default device is not the CPU)"
    if _scan_function() is None:
        return f"MLX ops ({_library['reason']})"
    return "C, fused (mlx_fm/ops/fm_scan_cpu.c)"


def _scan_function():
    if _library["handle"] is None and _library["reason"] == "not built yet":
        try:
            path = built_library(SOURCE, "fm-scan", ("-O3", "-pthread"))
            function = ctypes.CDLL(str(path)).fm_scan
        except OSError as error:
            _library["reason"] = str(error)
        else:
            function.argtypes = [ctypes.c_long] * 5 + [ctypes.c_void_p] * 5 + [ctypes.c_int]
            function.restype = None
            _library.update(handle=function, reason="built")
    return _library["handle"]


def evaluates_here(*arrays: mx.array) -> bool:
    """Evaluate `arrays`; False where that is not allowed (inside mx.compile or mx.vmap)."""
    try:
        mx.eval(*arrays)
    except ValueError as error:
        if "function transformations" in str(error):
            return False
        raise
    return True


def fm_native(
    x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """The scan over T tokens, as `fm_chunked` takes and returns it. Call only where
    `available()` and `evaluates_here(...)` hold."""
    if state is None:
        state = mx.zeros((x.shape[0], x.shape[2], slot_weights.shape[-1], x.shape[-1]))
    return _scan(x, slot_weights, eta, state)


@mx.custom_function
def _scan(
    x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    batch, length, heads, width = x.shape
    num_slots = slot_weights.shape[-1]
    inputs = [mx.contiguous(a.astype(mx.float32)) for a in (x, slot_weights, eta)]
    mx.eval(inputs, state)
    x_view, weights_view, eta_view = (np.asarray(a) for a in inputs)
    final_state = np.array(state, dtype=np.float32, order="C")  # a copy: updated in place
    reads = np.empty((batch, length, heads, width), np.float32)
    _scan_function()(
        *(batch, length, heads, num_slots, width),
        *(a.ctypes.data for a in (x_view, weights_view, eta_view, final_state, reads)),
        min(os.cpu_count() or 1, batch * heads),
    )
    return mx.array(reads), mx.array(final_state)


@_scan.vjp
def _scan_vjp(primals, cotangents, outputs):
    return mx.vjp(fm_chunked, list(primals), list(cotangents))[1]
