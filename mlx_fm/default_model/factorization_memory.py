"""Factorization Memory for mlx-lm's --trust-remote-code, from mlx_fm."""

try:
    from mlx_fm.models.factorization_memory import Model, ModelArgs  # noqa: F401
except ImportError as error:
    raise ImportError(
        "this Factorization Memory checkpoint needs the mlx_fm package: pip install mlx-fm"
    ) from error
