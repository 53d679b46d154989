"""Converting PyTorch / Hugging Face FM checkpoints to MLX, and the PyTorch reference model."""
