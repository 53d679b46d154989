"""Routing and gates of the FM mixer (docs/SPEC.md): which slots a token writes and reads."""

import mlx.core as mx

from .activations import softmax


def route(router_logits: mx.array, temperature: float, top_k: int) -> mx.array:
    """Slot weights α̃ over the last axis (the m slots), in float32.

    Dense (top_k == m): softmax(ρ / τ). Sparse: the softmax restricted to its
    top_k entries and renormalized, i.e. the softmax of the top_k logits alone;
    every other slot gets exactly 0.
    """
    logits = router_logits.astype(mx.float32)
    if temperature != 1:  # dividing by 1 would still be a graph node of its own
        logits = logits / temperature
    num_slots = logits.shape[-1]
    if top_k >= num_slots:
        return softmax(logits)
    first = num_slots - top_k  # argpartition leaves the top_k largest from here on
    top = mx.stop_gradient(mx.argpartition(logits, kth=first, axis=-1)[..., first:])
    weights = softmax(mx.take_along_axis(logits, top, axis=-1))
    return mx.put_along_axis(mx.zeros_like(logits), top, weights, axis=-1)


@mx.compile
def gates(
    update_logits: mx.array, merge_logits: mx.array, eta_bias: mx.array, mu_bias: mx.array
) -> tuple[mx.array, mx.array]:
    """Update rate η and merge rate μ, per head, in float32."""
    eta = mx.sigmoid(update_logits.astype(mx.float32) + eta_bias.astype(mx.float32))
    mu = mx.sigmoid(merge_logits.astype(mx.float32) + mu_bias.astype(mx.float32))
    return eta, mu


def prepare(
    x: mx.array,
    router_logits: mx.array,
    update_logits: mx.array,
    merge_logits: mx.array,
    eta_bias: mx.array,
    mu_bias: mx.array,
    *,
    top_k: int,
    temperature: float,
    mask: mx.array | None = None,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """What every scan takes: x̄ in float32, slot weights α̃, η (0 where masked), μ."""
    slot_weights = route(router_logits, temperature, top_k)
    eta, mu = gates(update_logits, merge_logits, eta_bias, mu_bias)
    if mask is not None:
        eta = mx.where(mask[..., None], eta, 0.0)
    return x.astype(mx.float32), slot_weights, eta, mu


@mx.compile
def merge(read: mx.array, x: mx.array, mu: mx.array) -> mx.array:
    """o = μ·r + (1 − μ)·x̄."""
    mu = mu[..., None]
    return mu * read + (1 - mu) * x
