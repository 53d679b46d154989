"""Routing and gates of the FM mixer (docs/SPEC.md): which slots a token writes and reads."""

import mlx.core as mx


@mx.compile
def route(router_logits: mx.array, temperature: float, top_k: int) -> mx.array:
    """Slot weights α̃ over the last axis (the m slots), in float32.

    Dense (top_k == m): softmax(ρ / τ). Sparse: the softmax restricted to its
    top_k entries and renormalized; every other slot gets exactly 0.
    """
    logits = router_logits.astype(mx.float32) / temperature
    weights = mx.softmax(logits, axis=-1, precise=True)
    num_slots = weights.shape[-1]
    if top_k >= num_slots:
        return weights
    top = mx.argpartition(-logits, kth=top_k - 1, axis=-1)[..., :top_k]
    keep = mx.put_along_axis(
        mx.zeros_like(weights), mx.stop_gradient(top), mx.array(1.0, mx.float32), axis=-1
    )
    kept = weights * keep
    return kept / kept.sum(axis=-1, keepdims=True)


@mx.compile
def gates(update_logits, merge_logits, eta_bias, mu_bias):
    """Update rate η and merge rate μ, per head, in float32."""
    eta = mx.sigmoid(update_logits.astype(mx.float32) + eta_bias.astype(mx.float32))
    mu = mx.sigmoid(merge_logits.astype(mx.float32) + mu_bias.astype(mx.float32))
    return eta, mu


def prepare(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias,
            *, top_k, temperature, mask=None):
    """What every scan takes: x̄ in float32, slot weights α̃, η (0 where masked), μ."""
    weights = route(router_logits, temperature, top_k)
    eta, mu = gates(update_logits, merge_logits, eta_bias, mu_bias)
    if mask is not None:
        eta = mx.where(mask[..., None], eta, 0.0)
    return x.astype(mx.float32), weights, eta, mu


@mx.compile
def merge(read, x, mu):
    """o = μ·r + (1 − μ)·x̄."""
    mu = mu[..., None]
    return mu * read + (1 - mu) * x
