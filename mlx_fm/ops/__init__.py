"""The FM mixer's core op (docs/SPEC.md): route, write, read, merge.

The op family, side by side (as flash-linear-attention's fla/ops/<op>/):

- router.py: the slot weights α̃ (softmax, top-k), the gates η and μ, the merge;
- recurrent.py: the step recurrence, one token at a time (decode, and the reference);
- chunk.py: the chunked parallel form (prompts and training);
- native.py: route, gates, scan and merge fused in C (and the mixer's conv and gated norm),
  for inference on the CPU;
- metal.py: the fused Metal kernels (sources in metal/): a decode step and a
  differentiable scan.

`fm_mix` is the one place that picks among them.
"""

from functools import partial

import mlx.core as mx

from . import metal, native
from .chunk import fm_chunked
from .metal import FMKernels
from .recurrent import fm_recurrent, fm_step, fm_token
from .router import gates, merge, prepare, route

__all__ = [
    "fm_mix",
    "fm_mix_keeping",
    "fm_chunked",
    "fm_recurrent",
    "fm_step",
    "fm_token",
    "route",
    "gates",
    "FMKernels",
]


def fm_mix(
    x: mx.array,
    router_logits: mx.array,
    update_logits: mx.array,
    merge_logits: mx.array,
    eta_bias: mx.array,
    mu_bias: mx.array,
    *,
    top_k: int,
    temperature: float,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    kernels: FMKernels | None = None,
    keep_checkpoints: bool = True,
) -> tuple[mx.array, mx.array]:
    """One FM mixer over T tokens.

    x: (B, T, H, P) the projected input x̄; router_logits: (B, T, H, m);
    update_logits, merge_logits: (B, T, H); state: (B, H, m, P) float32 or None;
    mask: (B, T) bool, False for padding (such tokens leave the state untouched).
    Returns the merged output o (B, T, H, P) float32 and the new state.

    Runs on `kernels` if given, else on the default Metal kernels where they run
    (`metal.use_kernels()`, MLX_FM_OPS_ONLY=1 opts out), else on MLX ops. A single
    token with a state takes the decode step, anything else the scan.
    `keep_checkpoints=False` (inference) runs the scan without saving the
    states its backward needs: still differentiable, at the cost of a
    second forward in the backward. On the CPU, more than one token then
    runs in C (`native`) where the graph can be evaluated there and then.
    """
    if kernels is None and metal.use_kernels():
        kernels = metal.default_kernels()
    decoding = x.shape[1] == 1 and state is not None
    if kernels is not None and decoding:
        out, state = kernels.decode(
            x[:, 0],
            router_logits[:, 0],
            update_logits[:, 0],
            merge_logits[:, 0],
            eta_bias,
            mu_bias,
            state,
            top_k=top_k,
            temperature=temperature,
            mask=None if mask is None else mask[:, 0],
        )
        return out[:, None], state
    if _mixes_in_c(x, router_logits, state, keep_checkpoints, kernels is not None):
        out, (state,) = native.fm_mix_native(
            *(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias),
            top_k=top_k,
            temperature=temperature,
            state=state,
            mask=mask,
            on_ops=partial(fm_mix_keeping, top_k=top_k, temperature=temperature, mask=mask),
        )
        return out, state
    x, slot_weights, eta, mu = prepare(
        x,
        router_logits,
        update_logits,
        merge_logits,
        eta_bias,
        mu_bias,
        top_k=top_k,
        temperature=temperature,
        mask=mask,
    )
    if kernels is not None:
        read, state = kernels.scan(x, slot_weights, eta, state, keep_checkpoints=keep_checkpoints)
    elif decoding:
        read, state = fm_token(x, slot_weights, eta, state)
    else:
        read, state = fm_chunked(x, slot_weights, eta, state)
    return merge(read, x, mu), state


def fm_mix_keeping(
    x: mx.array,
    router_logits: mx.array,
    update_logits: mx.array,
    merge_logits: mx.array,
    eta_bias: mx.array,
    mu_bias: mx.array,
    *,
    top_k: int,
    temperature: float,
    state: mx.array | None = None,
    mask: mx.array | None = None,
    keep: int = 0,
    keep_checkpoints: bool = True,
) -> tuple[mx.array, list[mx.array | None]]:
    """`fm_mix`, also returning the states before each of the last `keep` tokens: the output
    and keep + 1 states, the last the final state (the first is `state` when keep is T).

    The last `keep` tokens are mixed one at a time, as decoding mixes them: so their states
    come for free, and a forward that verifies draft tokens computes exactly what decoding
    them one by one would. In C (`fm_mix`'s conditions) one call mixes them all and copies
    the states out as it goes: the same token by token mix.
    """
    if keep and _mixes_in_c(x, router_logits, state, keep_checkpoints, metal.use_kernels()):
        return native.fm_mix_native(
            *(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias),
            top_k=top_k,
            temperature=temperature,
            state=state,
            mask=mask,
            keep=keep,
            on_ops=partial(
                fm_mix_keeping, top_k=top_k, temperature=temperature, mask=mask, keep=keep
            ),
        )
    head = x.shape[1] - keep
    per_token = (x, router_logits, update_logits, merge_logits, mask)

    def mix(part: slice, state: mx.array | None) -> tuple[mx.array, mx.array]:
        x, router_logits, update_logits, merge_logits, mask = (
            None if a is None else a[:, part] for a in per_token
        )
        return fm_mix(
            x,
            router_logits,
            update_logits,
            merge_logits,
            eta_bias,
            mu_bias,
            top_k=top_k,
            temperature=temperature,
            state=state,
            mask=mask,
            keep_checkpoints=keep_checkpoints,
        )

    outs, states = [], []
    if head > 0:
        out, state = mix(slice(0, head), state)
        outs.append(out)
    for t in range(head, head + keep):
        states.append(state)
        out, state = mix(slice(t, t + 1), state)
        outs.append(out)
    states.append(state)
    return (mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]), states


def _mixes_in_c(x, router_logits, state, keep_checkpoints: bool, on_metal: bool) -> bool:
    """Whether a mix runs in C (`native.fm_mix_native`): more than one token or no state (a
    decode step has its own paths), in inference, on no Metal kernels, where C runs now."""
    decoding = x.shape[1] == 1 and state is not None
    if decoding or keep_checkpoints or on_metal:
        return False
    return native.runs_here(x, router_logits, *([] if state is None else [state]))
