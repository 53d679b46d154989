"""Pretraining FM models from scratch: data, optimization, checkpoints.

from mlx_fm.training import TrainConfig, train
train(TrainConfig(data=["corpus/"], output="runs/tiny", steps=200))
"""

from .config import TrainConfig, build_config
from .initialization import build_model, initialize_weights
from .trainer import TrainResult, train

__all__ = [
    "TrainConfig",
    "TrainResult",
    "build_config",
    "build_model",
    "initialize_weights",
    "train",
]
