"""mlx_fm: Factorization Memory language models on MLX."""

from .blas import blas_info, load_fast_blas

load_fast_blas()  # must precede the first `import mlx.core`

from .models.factorization_memory import Model, ModelArgs  # noqa: E402
from .utils import ModelLoadError, load, load_model, save_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["Model", "ModelArgs", "ModelLoadError", "load", "load_model", "save_model",
           "blas_info", "__version__"]
