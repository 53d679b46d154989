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

Each library is first tried in a child process (once per library and CPU; the verdict is
cached): OpenBLAS builds that are not DYNAMIC_ARCH carry one CPU's kernels, and on an older
CPU the first matmul dies of an illegal instruction, which would take this process with it.

MLX multiplies a vector by a matrix with cblas_sgemm, which in OpenBLAS first copies the whole
matrix: 3-5x the time of its sgemv, and most of a decode step. Where a C compiler is found,
``blas_gemv.c`` is built once into the cache, tried in a child with the library, and loaded
ahead of it, so that MLX binds its cblas_sgemm: a product with one row or one column goes to
the library's sgemv, every other to its sgemm.

OpenBLAS's threads are told to sleep sooner after a product (OPENBLAS_THREAD_TIMEOUT=20, unless
set): see THREAD_TIMEOUT.

Environment:
    MLX_FM_BLAS=off         do nothing
    MLX_FM_BLAS=/path/lib   load this library instead of searching
    MLX_FM_GEMV=off         leave matrix-vector products to the library's sgemm
"""

import ctypes
import hashlib
import importlib.metadata
import itertools
import os
import platform
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional

ENV_VAR = "MLX_FM_BLAS"
GEMV_ENV_VAR = "MLX_FM_GEMV"
GEMV_SOURCE = Path(__file__).with_name("blas_gemv.c")
_OFF = ("off", "0", "none", "false")
# After each product OpenBLAS's threads spin for 2^28 cycles (~0.1 s) before they sleep, and the
# spinning one holds a core that the work in between could use (on 2 cores: the C mix's second
# thread, mlx_fm/ops/native.py). 2^20 cycles (~0.4 ms) still spans the gap between a decode
# step's products. Read by OpenBLAS when it loads; a value the user set is kept.
THREAD_TIMEOUT_ENV_VAR, THREAD_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT", "20"
ROW_MAJOR, COL_MAJOR, NO_TRANS, TRANS = 101, 102, 111, 112  # CBLAS's enum values
GFORTRAN_SONAME = b"libgfortran.so.5"
_SYSTEM_PATHS = (
    "/usr/lib/{arch}-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{arch}-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

# What happened, for `blas_info()`: the library loaded, or why none was; and whether
# matrix-vector products go to its sgemv, or why not.
_status: dict = {"library": None, "reason": "not attempted", "gemv": "no library loaded"}


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
    elif setting.lower() in _OFF:
        _status["reason"] = f"switched off by {ENV_VAR}={setting}"
    elif "mlx.core" in sys.modules:
        _status["reason"] = "mlx.core was imported before mlx_fm"
    else:
        os.environ.setdefault(THREAD_TIMEOUT_ENV_VAR, THREAD_TIMEOUT)
        paths = [Path(setting)] if setting else list(_candidates())
        _status["reason"] = "no OpenBLAS found (pip install cmeel-openblas)"
        for path in paths:
            try:
                _check_runs(path)
                _load_with_gemv(path)
            except OSError as error:
                _status["reason"] = f"cannot load {path}: {error}"
                continue
            _status.update(library=str(path), reason="loaded")
            break
    return _status["library"]


def _load_with_gemv(path: Path) -> None:
    """Load `path` globally, behind the sgemm of blas_gemv.c where that can be built and works
    with it. Symbols resolve in load order, so the forwarding sgemm is loaded first, and only
    once `path` has loaded (locally): a forwarding sgemm with nothing to forward to must never
    be what MLX binds."""
    library = _load(path, ctypes.RTLD_LOCAL)
    try:
        if not hasattr(library, "cblas_sgemv"):
            raise BlasLoadError("the library has no cblas_sgemv")
        _forward(ctypes.CDLL(str(_gemv_forward(path)), mode=ctypes.RTLD_GLOBAL), library)
        _status["gemv"] = "forwarded"
    except OSError as error:
        _status["gemv"] = str(error)
    _load(path, ctypes.RTLD_GLOBAL)  # now global too, behind the forwarding sgemm


def _forward(forward: ctypes.CDLL, library: ctypes.CDLL) -> None:
    forward.forward_to(
        ctypes.cast(library.cblas_sgemm, ctypes.c_void_p),
        ctypes.cast(library.cblas_sgemv, ctypes.c_void_p),
    )


def _gemv_forward(path: Path) -> Path:
    """blas_gemv.c built, and tried with `path` in a child; BlasLoadError says why not."""
    setting = os.environ.get(GEMV_ENV_VAR, "").strip()
    if setting.lower() in _OFF:
        raise BlasLoadError(f"switched off by {GEMV_ENV_VAR}={setting}")
    forward = _built_gemv_forward()
    _check_runs(path, forward)
    return forward


def _built_gemv_forward() -> Path:
    return built_library(GEMV_SOURCE, "blas-gemv")


def built_library(source: Path, name: str, flags: tuple[str, ...] = ("-O2",)) -> Path:
    """The shared library built from the C file `source`, once per source, flags and compiler,
    in the cache under `name`; BlasLoadError says why it could not be built."""
    compiler = os.environ.get("CC") or next(
        filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None
    )
    if not compiler:
        raise BlasLoadError(f"no C compiler (cc, gcc or clang) to build mlx_fm's {source.name}")
    identity = [
        source.read_bytes(),
        compiler.encode(),
        platform.machine().encode(),
        *map(str.encode, flags),
    ]
    key = hashlib.sha256(b"\n".join(identity)).hexdigest()[:32]
    target = _cache_dir() / name / f"{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as staging:
        built = Path(staging) / f"{name}.so"
        command = [*shlex.split(compiler), *flags, "-shared", "-fPIC", "-o", str(built)]
        try:
            subprocess.run([*command, str(source)], capture_output=True, timeout=120, check=True)
        except subprocess.CalledProcessError as error:
            lines = error.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
            raise BlasLoadError(f"{compiler} could not build {source.name} ({lines[-1]})") from None
        except (OSError, subprocess.TimeoutExpired) as error:
            raise BlasLoadError(f"{compiler} could not build {source.name} ({error})") from None
        _write_atomically(target, built.read_bytes(), mode=0o755)
    return target


def _load(path: Path, mode: int) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path), mode=mode)
    except OSError as error:
        if GFORTRAN_SONAME.decode() not in str(error):
            raise
        _load_gfortran()
        return ctypes.CDLL(str(path), mode=mode)


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


# The child that tries a library: this file, loaded by path so that neither the mlx_fm package
# (which would load a BLAS itself) nor the working directory's modules are imported.
_CHILD = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('mlx_fm_blas_check', sys.argv[1])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(module)\n"
    "sys.exit(module.multiplies_correctly(*sys.argv[2:]))\n"
)
_CHECK_TIMEOUT_S = 120


def _check_runs(path: Path, forward: Optional[Path] = None) -> None:
    """Raise BlasLoadError unless `path` (behind the forwarding sgemm `forward`, if given)
    multiplies correctly on this CPU, as tried once in a child process (the verdict is cached
    per library, forwarding sgemm and CPU)."""
    verdict_file = _cache_dir() / "blas-checks" / _verdict_key(path, forward)
    try:
        verdict = verdict_file.read_text()
    except OSError:
        verdict = _try_in_child(path, forward)
        if verdict is not None:
            try:
                _write_atomically(verdict_file, verdict.encode())
            except OSError:  # an unwritable cache: try again next time
                pass
    if verdict is None:
        raise BlasLoadError(f"trying it took over {_CHECK_TIMEOUT_S} s")
    if verdict != "ok":
        raise BlasLoadError(verdict)


def _verdict_key(path: Path, forward: Optional[Path] = None) -> str:
    """A name for (this library file, the forwarding sgemm, this CPU)."""
    stat = path.stat()
    try:
        cpu = [
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith(("flags", "Features", "model name", "CPU part"))
        ][:4]
    except OSError:
        cpu = []
    identity = [str(path.resolve()), str(stat.st_size), str(stat.st_mtime_ns), platform.machine()]
    if forward is not None:
        identity.append(str(forward))  # its name is a hash of its source and compiler
    return hashlib.sha256("\n".join(identity + cpu).encode()).hexdigest()[:32]


def _try_in_child(path: Path, forward: Optional[Path] = None) -> Optional[str]:
    """ "ok", or why `path` (behind `forward`) cannot be used; None if the child took too long."""
    extra = [] if forward is None else [str(forward)]
    try:
        child = subprocess.run(
            [sys.executable, "-I", "-c", _CHILD, __file__, str(path), *extra],
            capture_output=True,
            text=True,
            timeout=_CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return None
    if child.returncode == 0:
        return "ok"
    built_for = f", built as {child.stdout.strip()}" if child.stdout.strip() else ""
    if child.returncode < 0:
        name = signal.Signals(-child.returncode).name
        return f"its first matmul crashed on this CPU ({name}{built_for})"
    lines = child.stderr.strip().splitlines() or ["no message"]
    return f"its first matmul failed ({lines[-1]}{built_for})"


def multiplies_correctly(path: str, forward: Optional[str] = None) -> int:
    """In a child process: load `path` (behind the forwarding sgemm `forward`, if given), print
    its build configuration, and multiply two 64×64 matrices with the cblas_sgemm that MLX
    would bind; with `forward`, also products with one row or column. 0 if all are right."""
    if forward is not None:
        forwarding = ctypes.CDLL(forward, mode=ctypes.RTLD_GLOBAL)
    library = _load(Path(path), ctypes.RTLD_GLOBAL)
    if hasattr(library, "openblas_get_config"):
        library.openblas_get_config.restype = ctypes.c_char_p
        print(library.openblas_get_config().decode(errors="replace"), flush=True)
    if forward is not None:
        _forward(forwarding, library)
    sgemm = ctypes.CDLL(None).cblas_sgemm  # the first global definition, as MLX binds it
    size = 64
    matrix = ctypes.c_float * (size * size)
    a = matrix(*[float(i % 7) for i in range(size * size)])
    identity = matrix(*[float(i % (size + 1) == 0) for i in range(size * size)])
    product = matrix()
    sgemm(
        *(ROW_MAJOR, NO_TRANS, NO_TRANS, size, size, size, ctypes.c_float(1.0)),
        *(a, size, identity, size, ctypes.c_float(0.0), product, size),
    )
    if list(product) != list(a):
        print("A·I ≠ A", file=sys.stderr)
        return 1
    if forward is not None and not _vector_products_right(sgemm):
        print("a product with one row or column is wrong", file=sys.stderr)
        return 1
    return 0


def _vector_products_right(sgemm) -> bool:
    """Whether C = 2AB + βC is exact for each order and transposition, with one row or one
    column, leading dimensions longer than the rows, and β = 0 over a C holding NaNs."""
    transpositions = (NO_TRANS, TRANS)
    shapes = ((1, 3, 4), (3, 1, 4), (1, 1, 4))
    cases = itertools.product(
        (ROW_MAJOR, COL_MAJOR), transpositions, transpositions, shapes, (0.0, 0.5)
    )
    return all(_vector_product_right(sgemm, *case) for case in cases)


class _Stored:
    """A rows×cols float matrix stored in BLAS `order` with a padded leading dimension."""

    def __init__(self, order: int, rows: int, cols: int, seed: int, transposed: bool = False):
        self.row_major, self.transposed = order == ROW_MAJOR, transposed
        self.lead = (cols if self.row_major else rows) + 1
        size = self.lead * (rows if self.row_major else cols)
        self.values = [float((i * 7 + seed) % 5 - 2) for i in range(size)]

    def index(self, i: int, j: int) -> int:
        """Where entry (i, j) of the matrix, or of its transpose if `transposed`, is stored."""
        i, j = (j, i) if self.transposed else (i, j)
        return i * self.lead + j if self.row_major else i + j * self.lead


def _vector_product_right(sgemm, order, trans_a, trans_b, shape, beta) -> bool:
    m, n, k = shape
    a = _Stored(order, *((m, k) if trans_a == NO_TRANS else (k, m)), 3, trans_a != NO_TRANS)
    b = _Stored(order, *((k, n) if trans_b == NO_TRANS else (n, k)), 1, trans_b != NO_TRANS)
    c = _Stored(order, m, n, 2)
    if beta == 0.0:
        c.values = [float("nan")] * len(c.values)
    expected = list(c.values)
    for i, j in itertools.product(range(m), range(n)):
        total = sum(a.values[a.index(i, p)] * b.values[b.index(p, j)] for p in range(k))
        kept = 0.0 if beta == 0.0 else beta * c.values[c.index(i, j)]
        expected[c.index(i, j)] = 2.0 * total + kept
    a_values, b_values, c_values = ((ctypes.c_float * len(x.values))(*x.values) for x in (a, b, c))
    sgemm(
        *(order, trans_a, trans_b, m, n, k, ctypes.c_float(2.0), a_values, a.lead, b_values),
        *(b.lead, ctypes.c_float(beta), c_values, c.lead),
    )
    return [str(x) for x in c_values] == [str(x) for x in expected]


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mlx_fm"


def _renamed_copy(source: Path) -> Path:
    """`source` with its SONAME set to libgfortran.so.5, cached by the source's size and mtime."""
    stat = source.stat()
    target = _cache_dir() / f"gfortran-{stat.st_size}-{stat.st_mtime_ns}" / "libgfortran.so.5"
    if target.exists():
        return target
    _write_atomically(target, with_soname(source.read_bytes(), GFORTRAN_SONAME), mode=0o755)
    return target


def _write_atomically(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Concurrent first imports each write a whole file, and none sees half of one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(handle, "wb") as file:
        file.write(data)
    os.chmod(staging, mode)
    os.replace(staging, target)


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


def sgemm_address() -> Optional[int]:
    """The address of the cblas_sgemm MLX binds (the forwarding one where it loaded), or None
    where no optimized BLAS was loaded: then MLX's bundled one is not reachable from here."""
    if _status["library"] is None:
        return None
    if "sgemm" not in _status:  # bound once, as MLX's is
        _status["sgemm"] = ctypes.cast(ctypes.CDLL(None).cblas_sgemm, ctypes.c_void_p).value
    return _status["sgemm"]


def blas_info() -> dict:
    """Which BLAS MLX's CPU back-end uses, and why; and what multiplies a vector by a matrix."""
    library = _status["library"]
    forwarded = library is not None and _status["gemv"] == "forwarded"
    return {
        "library": library or "MLX's bundled reference BLAS",
        "optimized": library is not None,
        "reason": _status["reason"],
        "matrix_vector": "sgemv (forwarded by mlx_fm/blas_gemv.c)"
        if forwarded
        else f"sgemm ({_status['gemv']})",
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
