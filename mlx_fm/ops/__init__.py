"""The FM mixer's core op: route, write, read, merge (docs/SPEC.md), on MLX ops.

`fm_mix` is the one place that picks an implementation: the Metal kernels
(mlx_fm.kernels) where Metal is available and the GPU is the default device
(MLX_FM_OPS_ONLY=1 forces the ops); otherwise the step recurrence for a single
token and the chunked parallel form for longer inputs.
"""

from .. import kernels
from .chunk import fm_chunked
from .recurrent import fm_recurrent, fm_step
from .router import gates, merge, prepare, route

__all__ = ["fm_mix", "fm_chunked", "fm_recurrent", "fm_step", "route", "gates"]


def fm_mix(
    x, router_logits, update_logits, merge_logits, eta_bias, mu_bias,
    *, top_k, temperature, state=None, mask=None,
):
    """One FM mixer over T tokens.

    x: (B, T, H, P) the projected input x̄; router_logits: (B, T, H, m);
    update_logits, merge_logits: (B, T, H); state: (B, H, m, P) float32 or None;
    mask: (B, T) bool, False for padding (such tokens leave the state untouched).
    Returns the merged output o (B, T, H, P) float32 and the new state.
    """
    if kernels.use_kernels():
        return kernels.fm_mix(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias,
                              top_k=top_k, temperature=temperature, state=state, mask=mask)
    x, weights, eta, mu = prepare(
        x, router_logits, update_logits, merge_logits, eta_bias, mu_bias,
        top_k=top_k, temperature=temperature, mask=mask,
    )
    if x.shape[1] == 1 and state is not None:
        read, state = fm_step(x[:, 0], weights[:, 0], eta[:, 0], state)
        read = read[:, None]
    else:
        read, state = fm_chunked(x, weights, eta, state)
    return merge(read, x, mu), state
