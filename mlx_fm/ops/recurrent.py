"""The FM scan as a step recurrence: one token at a time (decode, and the reference).

Shapes: x (B, H, P) the projected input x̄, slot_weights (B, H, m) the slot
weights α̃, eta (B, H) the update rate, state (B, H, m, P), all float32.
"""

import mlx.core as mx


def fm_step(
    x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """Write one token into its slots, then read them. Returns (r, new_state)."""
    theta = (eta[..., None] * slot_weights)[..., None]
    state = (1 - theta) * state + theta * x[:, :, None, :]
    read = (slot_weights[:, :, None, :] @ state).squeeze(-2)
    return read, state


def fm_token(
    x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
) -> tuple[mx.array, mx.array]:
    """`fm_step` on one token laid out as the scans take it: x (B, 1, H, P), slot_weights
    (B, 1, H, m), eta (B, 1, H); returns r (B, 1, H, P). The same arithmetic, with one
    reshape per operand: every shape change is a graph node, and a decode step runs this
    once per layer."""
    batch, _, heads, width = x.shape
    num_slots = slot_weights.shape[-1]
    theta = eta.reshape(batch, heads, 1, 1) * slot_weights.reshape(batch, heads, num_slots, 1)
    state = (1 - theta) * state + theta * x.reshape(batch, heads, 1, width)
    read = slot_weights.reshape(batch, heads, 1, num_slots) @ state
    return read.reshape(batch, 1, heads, width), state


def fm_recurrent(
    x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array | None = None
) -> tuple[mx.array, mx.array]:
    """The scan over T tokens, step by step.

    x (B, T, H, P), slot_weights (B, T, H, m), eta (B, T, H)."""
    batch, length, heads, width = x.shape
    if state is None:
        state = mx.zeros((batch, heads, slot_weights.shape[-1], width), mx.float32)
    reads = []
    for t in range(length):
        read, state = fm_step(x[:, t], slot_weights[:, t], eta[:, t], state)
        reads.append(read)
    return mx.stack(reads, axis=1), state
