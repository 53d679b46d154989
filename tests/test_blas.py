"""The fast BLAS that `import mlx_fm` loads on Linux from what pip installs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx_fm
from mlx_fm import blas
from mlx_fm.ops import native
from mlx_fm.utils import cache_limit

import mlx.core as mx
import numpy as np
import pytest

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the BLAS set-up is Linux's")


def bundled_gfortran() -> Path:
    libs = blas._installed_file("mlx-cpu", "mlx_cpu.libs")
    return sorted(libs.glob("libgfortran*.so.5*"))[0]


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": os.environ.get("PATH", "")} | env,
    )


def test_blas_agrees_with_numpy():
    if sys.platform == "linux":
        assert mlx_fm.blas_info()["optimized"], mlx_fm.blas_info()
    a = np.random.default_rng(0).standard_normal((300, 200), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((200, 100), dtype=np.float32)
    assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, atol=1e-4)


@linux_only
def test_a_bare_install_loads_openblas_silently(tmp_path):
    """With an empty cache the libgfortran copy is written, OpenBLAS loads, nothing is printed."""
    code = "import mlx_fm; print(mlx_fm.blas_info()['reason'])"
    result = run_python(code, XDG_CACHE_HOME=str(tmp_path), HOME=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("loaded\n", "")
    system_gfortran = subprocess.run(
        ["/sbin/ldconfig", "-p"], capture_output=True, text=True
    ).stdout
    if "libgfortran.so.5 " not in system_gfortran:
        (copy,) = tmp_path.glob("mlx_fm/gfortran-*/libgfortran.so.5")
        assert blas.elf_needed(copy.read_bytes()) == blas.elf_needed(
            bundled_gfortran().read_bytes()
        )


def test_blas_can_be_switched_off():
    result = run_python("import mlx_fm; print(mlx_fm.blas_info()['reason'])", MLX_FM_BLAS="off")
    assert result.returncode == 0, result.stderr
    assert "switched off" in result.stdout
    assert result.stderr == ""


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="a setting of MLX's CPU back-end")
def test_on_the_cpu_mlx_keeps_an_eighth_of_its_memory_limit_of_freed_buffers():
    code = "import mlx_fm, mlx.core as mx; print(mx.set_cache_limit(0), mx.get_memory_limit())"
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    kept, memory_limit = map(int, result.stdout.split())
    assert kept == memory_limit // 8 > 32 * 2**20  # MLX's own CPU limit is 32 MB


def test_a_library_that_cannot_load_is_reported_not_raised(tmp_path):
    broken = tmp_path / "libopenblas.so.0"
    broken.write_bytes(b"not a library")
    code = "import mlx_fm; print(mlx_fm.blas_info())"
    result = run_python(code, MLX_FM_BLAS=str(broken))
    assert result.returncode == 0, result.stderr
    assert f"cannot load {broken}" in result.stdout and "'optimized': False" in result.stdout


def compiled(tmp_path: Path, source: str, name: str) -> Path:
    """`source` (C) built into the shared library tmp_path/name."""
    compiler = shutil.which("gcc") or pytest.skip("no C compiler")
    source_file, library = tmp_path / f"{name}.c", tmp_path / name
    source_file.write_text(source)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", library, source_file], check=True)
    return library


@linux_only
def compiled_blas(tmp_path: Path, body: str) -> Path:
    """A shared library whose cblas_sgemm is `body`."""
    return compiled(tmp_path, f"void cblas_sgemm(void) {{ {body} }}\n", "libopenblas.so.0")


MULTIPLY_AND_REPORT = (
    "import mlx_fm, mlx.core as mx\n"
    "print(mlx_fm.blas_info()['reason'])\n"
    "print((mx.ones((64, 64)) @ mx.full((64, 64), 2.0))[0, 0].item())\n"
)


@linux_only
def test_a_library_that_crashes_on_this_cpu_is_tried_in_a_child_and_skipped(tmp_path):
    """A BLAS built for a newer CPU dies of an illegal instruction in its first matmul: that
    happens in a child, and MLX keeps its own BLAS."""
    library = compiled_blas(tmp_path, "__builtin_trap();")
    env = {"MLX_FM_BLAS": str(library), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    for _ in range(2):  # the second import reads the cached verdict
        result = run_python(MULTIPLY_AND_REPORT, **env)
        assert result.returncode == 0, result.stderr
        reason, product = result.stdout.splitlines()
        crashed = f"cannot load {library}: its first matmul crashed on this CPU (SIG"
        assert reason.startswith(crashed)
        assert product == "128.0"
    assert len(list((tmp_path / "cache/mlx_fm/blas-checks").iterdir())) == 1


@linux_only
def test_a_library_that_multiplies_wrongly_is_skipped(tmp_path):
    library = compiled_blas(tmp_path, "")  # leaves the product as it was: zeros
    result = run_python(
        MULTIPLY_AND_REPORT, MLX_FM_BLAS=str(library), XDG_CACHE_HOME=str(tmp_path / "cache")
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"cannot load {library}: its first matmul failed (A·I ≠ A)",
        "128.0",
    ]


@linux_only
def test_the_verdict_on_a_library_is_taken_from_the_cache(tmp_path):
    library = compiled_blas(tmp_path, "")
    verdict = tmp_path / "cache/mlx_fm/blas-checks" / blas._verdict_key(library)
    verdict.parent.mkdir(parents=True)
    verdict.write_text("a verdict from the cache")
    result = run_python(
        MULTIPLY_AND_REPORT, MLX_FM_BLAS=str(library), XDG_CACHE_HOME=str(tmp_path / "cache")
    )
    assert result.stdout.splitlines()[0] == f"cannot load {library}: a verdict from the cache"


def gemv_forwarded() -> bool:
    return mlx_fm.blas_info()["matrix_vector"].startswith("sgemv")


@linux_only
def test_matrix_vector_products_go_to_sgemv_and_agree_with_numpy():
    """Where a C compiler is found (CI has one), a product with one row or one column goes to
    sgemv through blas_gemv.c; whichever way MLX lays it out, it agrees with numpy."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert gemv_forwarded(), mlx_fm.blas_info()
    rng = np.random.default_rng(0)
    for m, k, n in ((1, 512, 300), (300, 512, 1), (1, 7, 1), (5, 3, 4)):
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        for a_mx in (mx.array(a), mx.array(a.T).T):
            for b_mx in (mx.array(b), mx.array(b.T).T):
                assert np.allclose(np.array(a_mx @ b_mx), a @ b, atol=1e-4), (m, k, n)
        c = rng.standard_normal((m, n), dtype=np.float32)
        got = mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=2.0, beta=0.5)
        assert np.allclose(np.array(got), 0.5 * c + 2 * a @ b, atol=1e-4)
    heads = rng.standard_normal((16, 1, 32), dtype=np.float32)
    states = rng.standard_normal((16, 32, 64), dtype=np.float32)
    assert np.allclose(np.array(mx.array(heads) @ mx.array(states)), heads @ states, atol=1e-4)


GEMV_REPORT = (
    "import mlx_fm, mlx.core as mx\n"
    "print(mlx_fm.blas_info()['matrix_vector'])\n"
    "print((mx.ones((1, 64)) @ mx.full((64, 64), 2.0))[0, 0].item())\n"
)


@linux_only
@pytest.mark.parametrize(
    "setting, said",
    [
        ({"MLX_FM_GEMV": "off"}, "sgemm (switched off by MLX_FM_GEMV=off)"),
        ({"CC": "/no/such/cc"}, "sgemm (/no/such/cc could not build blas_gemv.c ("),
    ],
)
def test_without_the_forwarding_sgemm_matrix_vector_products_stay_right(tmp_path, setting, said):
    result = run_python(GEMV_REPORT, XDG_CACHE_HOME=str(tmp_path), **setting)
    assert result.returncode == 0, result.stderr
    reported, product = result.stdout.splitlines()
    assert reported.startswith(said) and product == "128.0"
    assert result.stderr == ""


@linux_only
def test_a_forwarding_sgemm_that_multiplies_wrongly_is_refused_in_the_child(tmp_path):
    """The child tries every order and transposition: one wrong branch is caught."""
    source = blas.GEMV_SOURCE.read_text()
    wrong = source.replace("b_plain ? TRANS : NO_TRANS", "NO_TRANS")
    assert wrong != source
    forward = compiled(tmp_path, wrong, "wrong.so")
    library = blas._status["library"] or pytest.skip("no OpenBLAS loaded")
    verdict = blas._try_in_child(Path(library), forward)
    assert verdict.startswith("its first matmul failed (a product with one row or column is wrong")
    assert blas._try_in_child(Path(library), blas._built_gemv_forward()) == "ok"


def test_soname_is_rewritten_in_place_and_nothing_else_changes():
    original = bundled_gfortran().read_bytes()
    renamed = blas.with_soname(original, b"libgfortran.so.5")
    entries, strings = blas._dynamic_section(renamed)
    assert blas._string_at(renamed, strings + entries[14][0]) == b"libgfortran.so.5"
    changed = [i for i, (x, y) in enumerate(zip(original, renamed)) if x != y]
    assert len(renamed) == len(original)
    assert changed[-1] - changed[0] < len(b"libgfortran.so.5") + 1


@linux_only
def test_soname_that_does_not_fit_is_refused():
    original = bundled_gfortran().read_bytes()
    with pytest.raises(blas.BlasLoadError, match="shorter"):
        blas.with_soname(original, b"x" * 200)


def test_a_file_that_is_not_elf_is_refused():
    with pytest.raises(blas.BlasLoadError, match="ELF"):
        blas.elf_needed(b"MZ this is not ELF")


def test_python_m_mlx_fm_says_what_it_measures():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_fm"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].startswith("BLAS used by MLX:")
    assert lines[2] == f"matrix-vector products: {mlx_fm.blas_info()['matrix_vector']}"
    assert lines[3] == f"freed buffers MLX keeps for reuse: up to {cache_limit() / 2**30:.1f} GiB"
    assert lines[4] == f"FM's prompt mixer on the CPU: {native.status()}"
    assert lines[5] == f"FM's decode step on the CPU: {native.decode_status()}"
    assert lines[6].startswith("measuring") and "GFLOP/s" in lines[7]


@linux_only
def test_openblas_threads_are_told_to_sleep_sooner_unless_the_user_says_otherwise():
    code = "import os, mlx_fm; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"
    assert run_python(code).stdout == "20\n"
    assert run_python(code, OPENBLAS_THREAD_TIMEOUT="26").stdout == "26\n"


@linux_only
def test_without_an_optimized_blas_a_decode_step_is_one_compiled_mlx_graph():
    code = (
        "import mlx_fm, mlx.core as mx\n"
        "from mlx_fm.ops import native\n"
        "from mlx_lm.models.cache import make_prompt_cache\n"
        "model = mlx_fm.Model(mlx_fm.ModelArgs(vocab_size=50, hidden_size=16, "
        "num_hidden_layers=1, num_heads=2, num_slots=4))\n"
        "model.eval()\n"
        "cache = make_prompt_cache(model)\n"
        "model(mx.array([[1, 2, 3]]), cache=cache)\n"
        "print(native.decode_status()); print(model(mx.array([[4]]), cache=cache).shape)"
    )
    result = run_python(code, MLX_FM_BLAS="off")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "one compiled MLX graph (no optimized BLAS was loaded: see python -m mlx_fm)",
        "(1, 1, 50)",
    ]
