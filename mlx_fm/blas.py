"""Make MLX's CPU back-end use OpenBLAS on Linux, from what pip installs.

The mlx-cpu wheel for Linux bundles a reference BLAS (~30x slower matmuls than
OpenBLAS). Loading an OpenBLAS with global symbol visibility *before*
``mlx.core`` is first imported makes MLX's ``cblas_sgemm`` resolve to it. Once
``mlx.core`` is loaded its BLAS symbols are bound, so this must run first.

The OpenBLAS comes from the ``cmeel-openblas`` wheel (a dependency on Linux),
falling back to a system one. That library needs ``libgfortran.so.5``, which a
bare machine lacks; mlx-cpu bundles a libgfortran under another name (auditwheel
renames it), so a copy whose SONAME reads ``libgfortran.so.5`` is written once to
the user's cache and loaded first. Nothing is printed: ``blas_info()`` and
``python -m mlx_fm`` say what happened.

Environment:
    MLX_FM_BLAS=off         do nothing
    MLX_FM_BLAS=/path/lib   load this library instead of searching
"""

import ctypes
import importlib.metadata
import os
import platform
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

ENV_VAR = "MLX_FM_BLAS"
GFORTRAN_SONAME = b"libgfortran.so.5"
_SYSTEM_PATHS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for `blas_info()`: the library loaded, or why none was.
_status: dict = {"library": None, "reason": "not attempted"}


class BlasLoadError(OSError):
    """An OpenBLAS that was found but could not be loaded; the message says why."""


def _installed_file(distribution: str, relative: str) -> Optional[Path]:
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(relative))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.exists() else None


def _candidates() -> Iterator[Path]:
    wheel = _installed_file("cmeel-openblas", "cmeel.prefix/lib/libopenblas.so.0")
    if wheel is not None:
        yield wheel
    arch = platform.machine()
    for pattern in _SYSTEM_PATHS:
        path = Path(pattern.format(arch=arch))
        if path.exists():
            yield path


def load_fast_blas() -> Optional[str]:
    """Load an optimized BLAS globally, once; return its path or None."""
    if _status["reason"] != "not attempted":
        return _status["library"]
    setting = os.environ.get(ENV_VAR, "").strip()
    if platform.system() != "Linux":
        _status["reason"] = "not Linux: MLX uses Accelerate or Metal"
    elif setting.lower() in ("off", "0", "none", "false"):
        _status["reason"] = f"switched off by {ENV_VAR}={setting}"
    elif "mlx.core" in sys.modules:
        _status["reason"] = "mlx.core was imported before mlx_fm"
    else:
        paths = [Path(setting)] if setting else list(_candidates())
        _status["reason"] = "no OpenBLAS found (pip install cmeel-openblas)"
        for path in paths:
            try:
                _load_global(path)
            except OSError as error:
                _status["reason"] = f"cannot load {path}: {error}"
                continue
            _status.update(library=str(path), reason="loaded")
            break
    return _status["library"]


def _load_global(path: Path) -> None:
    try:
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as error:
        if GFORTRAN_SONAME.decode() not in str(error):
            raise
        _load_gfortran()
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def _load_gfortran() -> None:
    """Load a library whose SONAME is libgfortran.so.5: the system's, else mlx-cpu's copy."""
    try:
        ctypes.CDLL(GFORTRAN_SONAME.decode(), mode=ctypes.RTLD_GLOBAL)
        return
    except OSError:
        pass
    bundled = _installed_file("mlx-cpu", "mlx_cpu.libs")
    sources = sorted(bundled.glob("libgfortran*.so.5*")) if bundled else []
    if not sources:
        raise BlasLoadError("it needs libgfortran.so.5, and neither the system nor mlx-cpu has one")
    source = sources[0]
    for needed in elf_needed(source.read_bytes()):  # e.g. mlx-cpu's renamed libquadmath
        if (source.parent / needed).exists():
            ctypes.CDLL(str(source.parent / needed), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(_renamed_copy(source)), mode=ctypes.RTLD_GLOBAL)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_fm"


def _renamed_copy(source: Path) -> Path:
    """`source` with its SONAME set to libgfortran.so.5, cached by the source's size and mtime."""
    stat = source.stat()
    target = _cache_dir() / f"gfortran-{stat.st_size}-{stat.st_mtime_ns}" / "libgfortran.so.5"
    if target.exists():
        return target
    data = with_soname(source.read_bytes(), GFORTRAN_SONAME)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=".libgfortran.")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.chmod(staging, 0o755)
    os.replace(staging, target)  # atomic: concurrent first imports each write a whole file
    return target


def _dynamic_section(data: bytes) -> tuple[dict, int]:
    """A 64-bit little-endian ELF's dynamic entries {tag: [values]} and its string table offset."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise BlasLoadError("not a 64-bit little-endian ELF library")
    (ph_offset,) = struct.unpack_from("<Q", data, 0x20)
    ph_size, ph_count = struct.unpack_from("<HH", data, 0x36)
    segments, dynamic = [], None
    for index in range(ph_count):
        kind, _, offset, address, _, file_size, _, _ = struct.unpack_from(
            "<IIQQQQQQ", data, ph_offset + index * ph_size
        )
        if kind == 1:  # PT_LOAD
            segments.append((address, offset, file_size))
        elif kind == 2:  # PT_DYNAMIC
            dynamic = (offset, file_size)
    if dynamic is None:
        raise BlasLoadError("the library has no dynamic section")
    entries: dict = {}
    for offset in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, offset)
        if tag == 0:
            break
        entries.setdefault(tag, []).append(value)
    (string_address,) = entries[5]  # DT_STRTAB, an address: map it to a file offset
    for address, offset, size in segments:
        if address <= string_address < address + size:
            return entries, string_address - address + offset
    raise BlasLoadError("the library's string table is outside its segments")


def _string_at(data: bytes, offset: int) -> bytes:
    return data[offset : data.index(0, offset)]


def elf_needed(data: bytes) -> list[str]:
    """The DT_NEEDED library names of an ELF shared library."""
    entries, strings = _dynamic_section(data)
    return [_string_at(data, strings + value).decode() for value in entries.get(1, [])]


def with_soname(data: bytes, soname: bytes) -> bytes:
    """The library with its DT_SONAME string overwritten in place (never lengthened)."""
    entries, strings = _dynamic_section(data)
    if 14 not in entries:  # DT_SONAME
        raise BlasLoadError("the library has no SONAME")
    start = strings + entries[14][0]
    if len(soname) > len(_string_at(data, start)):
        raise BlasLoadError(f"its SONAME is shorter than {soname.decode()}")
    patched = bytearray(data)
    patched[start : start + len(soname) + 1] = soname + b"\0"
    return bytes(patched)


def blas_info() -> dict:
    """Which BLAS MLX's CPU back-end uses, and why."""
    library = _status["library"]
    return {
        "library": library or "MLX's bundled reference BLAS",
        "optimized": library is not None,
        "reason": _status["reason"],
    }


def matmul_gflops(size: int = 1024, seconds: float = 1.0) -> dict:
    """Float32 matmul speed through MLX and through numpy, in GFLOP/s, each timed for about
    `seconds` (at least one product)."""
    import mlx.core as mx
    import numpy as np

    def rate(multiply) -> float:
        multiply()
        count, start = 0, time.perf_counter()
        while count == 0 or time.perf_counter() - start < seconds:
            multiply()
            count += 1
        return 2 * size**3 * count / (time.perf_counter() - start) / 1e9

    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = mx.array(a)
    return {"mlx": rate(lambda: mx.eval(b @ b)), "numpy": rate(lambda: a @ a)}
