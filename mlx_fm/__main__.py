"""`python -m mlx_fm`: the version, which BLAS MLX uses, and how fast its matmuls are."""

from . import __version__
from .blas import blas_info, matmul_gflops


def main():
    info = blas_info()
    print(f"mlx_fm {__version__}")
    print(f"BLAS used by MLX: {info['library']} ({info['reason']})")
    speeds = matmul_gflops()
    print(f"2048x2048 float32 matmul: MLX {speeds['mlx']:.0f} GFLOP/s, "
          f"numpy {speeds['numpy']:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
