"""`python -m mlx_fm`: the version, which BLAS MLX uses, how many freed buffers it keeps, how a
prompt's mixer and a decode step run on the CPU, and how fast its matmuls are."""

from . import __version__
from .blas import blas_info, matmul_gflops
from .cli import fail_cleanly
from .ops import native
from .utils import cache_limit

SIZE = 1024


@fail_cleanly
def main() -> None:
    info = blas_info()
    print(f"mlx_fm {__version__}")
    print(f"BLAS used by MLX: {info['library']} ({info['reason']})")
    print(f"matrix-vector products: {info['matrix_vector']}")
    print(f"freed buffers MLX keeps for reuse: up to {cache_limit() / 2**30:.1f} GiB")
    print(f"FM's prompt mixer on the CPU: {native.status()}")
    print(f"FM's decode step on the CPU: {native.decode_status()}")
    print(f"measuring {SIZE}x{SIZE} float32 matmuls, about 2 s ...", flush=True)
    speeds = matmul_gflops(SIZE)
    print(f"matmul speed: MLX {speeds['mlx']:.0f} GFLOP/s, numpy {speeds['numpy']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
