"""Metal kernel sources (*.metal), read by mlx_fm.ops.metal."""
