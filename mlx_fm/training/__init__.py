"""Pretraining FM models from scratch: data, optimization, checkpoints."""
