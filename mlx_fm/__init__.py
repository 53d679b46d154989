"""mlx_fm: Factorization Memory language models on MLX."""

from .blas import blas_info, load_fast_blas

load_fast_blas()  # must precede the first `import mlx.core`

import sys  # noqa: E402

import mlx.core as mx  # noqa: E402

from .models import factorization_memory  # noqa: E402
from .models.factorization_memory import Model, ModelArgs  # noqa: E402
from .utils import ModelLoadError, load, load_model, save_pretrained  # noqa: E402

# mlx-lm finds model code by `model_type` under mlx_lm.models; registering ours
# there lets mlx-lm's own tools (load, lora, fuse, server, ...) open FM checkpoints.
sys.modules.setdefault(f"mlx_lm.models.{factorization_memory.MODEL_TYPE}", factorization_memory)

# MLX's CPU back-end keeps at most 32 MB of freed buffers for reuse (Metal: up to its memory
# limit), so each of a prompt's large temporaries is handed back to the OS and its pages are
# faulted in again for the next one. Keeping up to an eighth of the memory limit made FM's
# 2,048-token prompts ~10% faster here. `mx.set_cache_limit` after this import overrides it.
if mx.default_device() == mx.cpu:
    mx.set_cache_limit(mx.get_memory_limit() // 8)

__version__ = "0.1.0"
__all__ = [
    "Model",
    "ModelArgs",
    "ModelLoadError",
    "load",
    "load_model",
    "save_pretrained",
    "blas_info",
    "__version__",
]
