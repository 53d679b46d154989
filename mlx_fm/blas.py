"""Make MLX's CPU back-end use an optimized BLAS on Linux.

The mlx-cpu wheel for Linux bundles a reference BLAS (~30x slower matmuls than
OpenBLAS). Loading an OpenBLAS with global symbol visibility *before*
``mlx.core`` is first imported makes MLX's BLAS calls resolve to it. Once
``mlx.core`` is loaded its BLAS symbols are bound, so this must run first.

Environment:
    MLX_FM_BLAS=off         do nothing
    MLX_FM_BLAS=/path/lib   load this library instead of searching
"""

import ctypes
import ctypes.util
import os
import platform
import sys
from pathlib import Path
from typing import Optional

ENV_VAR = "MLX_FM_BLAS"
_SEARCH_PATHS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for `blas_info()`: the library loaded, or why none was.
_status = {"library": None, "reason": "not attempted"}


def _candidates():
    arch = platform.machine()
    for pattern in _SEARCH_PATHS:
        yield pattern.format(arch=arch)
    found = ctypes.util.find_library("openblas")
    if found:
        yield found


def _say_once(message: str):
    if not _status.get("said"):
        _status["said"] = True
        print(f"mlx_fm: {message}", file=sys.stderr)


def load_fast_blas() -> Optional[str]:
    """Load an optimized BLAS globally, once; return its path or None."""
    if _status["reason"] != "not attempted":
        return _status["library"]
    setting = os.environ.get(ENV_VAR, "").strip()
    if platform.system() != "Linux":
        _status["reason"] = "not Linux: MLX uses Accelerate or Metal"
        return None
    if setting.lower() in ("off", "0", "none", "false"):
        _status["reason"] = f"switched off by {ENV_VAR}={setting}"
        return None
    if "mlx.core" in sys.modules:
        _status["reason"] = "mlx.core was imported before mlx_fm"
        _say_once(
            "optimized BLAS not loaded: import mlx_fm before mlx.core "
            "for fast CPU matmuls"
        )
        return None
    paths = [setting] if setting else _candidates()
    for path in paths:
        if "/" in path and not Path(path).exists():
            continue
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _status.update(library=path, reason="loaded")
        return path
    _status["reason"] = "no OpenBLAS found"
    _say_once(
        "no OpenBLAS found, MLX CPU matmuls will be slow "
        "(Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    )
    return None


def blas_info() -> dict:
    """Which BLAS MLX's CPU back-end uses, and why."""
    library = _status["library"]
    return {
        "library": library or "MLX's bundled reference BLAS",
        "optimized": library is not None,
        "reason": _status["reason"],
    }


def matmul_gflops(size: int = 2048, repeats: int = 5) -> dict:
    """Float32 matmul speed through MLX and through numpy, in GFLOP/s."""
    import time

    import mlx.core as mx
    import numpy as np

    def rate(multiply):
        multiply()
        start = time.perf_counter()
        for _ in range(repeats):
            multiply()
        return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = mx.array(a)
    return {"mlx": rate(lambda: mx.eval(b @ b)), "numpy": rate(lambda: a @ a)}

