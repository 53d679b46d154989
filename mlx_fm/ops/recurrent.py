"""The FM scan as a step recurrence: one token at a time (decode, and the reference).

Shapes: x (B, H, P) the projected input x̄, weights (B, H, m) the slot weights α̃,
eta (B, H) the update rate, state (B, H, m, P), all float32.
"""

import mlx.core as mx


def fm_step(x, weights, eta, state):
    """Write one token into its slots, then read them. Returns (r, new_state)."""
    theta = (eta[..., None] * weights)[..., None]
    state = (1 - theta) * state + theta * x[:, :, None, :]
    read = (weights[:, :, None, :] @ state).squeeze(-2)
    return read, state


def fm_recurrent(x, weights, eta, state=None):
    """The scan over T tokens, step by step: x (B, T, H, P), weights (B, T, H, m), eta (B, T, H)."""
    batch, length, heads, width = x.shape
    if state is None:
        state = mx.zeros((batch, heads, weights.shape[-1], width), mx.float32)
    reads = []
    for t in range(length):
        read, state = fm_step(x[:, t], weights[:, t], eta[:, t], state)
        reads.append(read)
    return mx.stack(reads, axis=1), state
