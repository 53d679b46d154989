"""The FM scan in parallel form, for prompts and training.

Per head, FM is gated linear attention with key dimension m: query α̃_t, key θ_t,
value x̄_t and per-slot log-decay g_t = log(1 − θ_t). A sequence is cut into
chunks of `chunk_size` tokens; chunks are computed in parallel and the state is
carried from one chunk to the next. Inside a chunk the token-to-token weights

    A_ts = Σ_i α̃_{t,i} θ_{s,i} exp(L_{t,i} − L_{s,i}),   s ≤ t,  L = cumsum(g)

cannot be factored as (α̃ e^L)(θ e^{−L})ᵀ: e^{−L} overflows. So each chunk is cut
again into sub-chunks of `sub_chunk` tokens (DESIGN-NOTES §2). Pairs inside one
sub-chunk use the explicit form; a pair (t in sub-chunk j, s in an earlier
sub-chunk j') factors through the end of j':

    exp(L_t − L_s) = exp(L_t − L_{end j'}) · exp(L_{end j'} − L_s),

both exponents ≤ 0, so those blocks are plain matmuls. Every exponent is a sum
over the few log-decays it spans (never a difference of two long cumulative
sums), which keeps float32 precise when decays are large.

Sequences are processed in segments of `segment` tokens so that memory stays
bounded in the sequence length.
"""

import mlx.core as mx

# 1 − θ is floored here so that log-decays stay finite when θ rounds to 1.
DECAY_FLOOR = 1e-30


def fm_chunked(x, weights, eta, state=None, chunk_size=64, sub_chunk=16, segment=1024):
    """The scan over T tokens: x (B, T, H, P), weights (B, T, H, m), eta (B, T, H).

    Returns the reads r (B, T, H, P) and the final state (B, H, m, P), float32.
    """
    batch, length, heads, width = x.shape
    num_slots = weights.shape[-1]
    if state is None:
        state = mx.zeros((batch, heads, num_slots, width), mx.float32)
    chunk_size = min(chunk_size, -(-length // sub_chunk) * sub_chunk)
    segment = max(segment // chunk_size, 1) * chunk_size
    padded = -(-length // chunk_size) * chunk_size

    theta = eta[..., None] * weights

    def head_major(a):
        a = mx.pad(a, [(0, 0), (0, padded - length), (0, 0), (0, 0)])
        return a.transpose(0, 2, 1, 3)

    x, weights, theta = map(head_major, (x, weights, theta))
    reads = []
    for start in range(0, padded, segment):
        part = slice(start, start + segment)
        read, state = _segment(
            x[:, :, part], weights[:, :, part], theta[:, :, part], state,
            chunk_size, sub_chunk,
        )
        reads.append(read)
    reads = mx.concatenate(reads, axis=2) if len(reads) > 1 else reads[0]
    return reads[:, :, :length].transpose(0, 2, 1, 3), state


def _segment(x, weights, theta, state, chunk_size, sub_chunk):
    """One segment, head-major: x (B, H, S, P), weights/theta (B, H, S, m)."""
    batch, heads, length, width = x.shape
    num_slots = weights.shape[-1]
    chunks, subs = length // chunk_size, chunk_size // sub_chunk
    by_sub = (batch, heads, chunks, subs, sub_chunk, num_slots)
    weights, theta = weights.reshape(by_sub), theta.reshape(by_sub)
    x = x.reshape(batch, heads, chunks, chunk_size, width)

    log_decay = mx.log(mx.maximum(1 - theta, DECAY_FLOOR))
    within = mx.cumsum(log_decay, axis=-2)  # L_t − L_{start of its sub-chunk}
    sub_total = within[..., -1, :]  # (B, H, N, J, m)

    to_sub_end = theta * mx.exp(sub_total[..., None, :] - within)
    scores = _within_sub_chunks(weights, theta, within) + _across_sub_chunks(
        weights, to_sub_end, within, sub_total
    )
    intra = scores @ x

    # The state entering each chunk, and what each chunk reads from it.
    before = mx.cumsum(sub_total, axis=-2, inclusive=False)
    after = mx.cumsum(sub_total, axis=-2, reverse=True, inclusive=False)
    chunk_shape = (batch, heads, chunks, chunk_size, num_slots)
    query = (weights * mx.exp(within + before[..., None, :])).reshape(chunk_shape)
    key = (to_sub_end * mx.exp(after[..., None, :])).reshape(chunk_shape)
    chunk_decay = mx.exp(sub_total.sum(axis=-2))[..., None]  # (B, H, N, m, 1)
    written = key.swapaxes(-1, -2) @ x  # (B, H, N, m, P)

    entering = []
    for n in range(chunks):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + written[:, :, n]
    inter = query @ mx.stack(entering, axis=2)
    return (intra + inter).reshape(batch, heads, length, width), state


def _within_sub_chunks(weights, theta, within):
    """The chunk's score matrix (…, Q, Q) with only the diagonal sub-chunk blocks."""
    sub_chunk, subs = weights.shape[-2], weights.shape[-3]
    causal = mx.tril(mx.ones((sub_chunk, sub_chunk), mx.bool_))[..., None]
    gap = within[..., :, None, :] - within[..., None, :, :]  # (…, J, t, s, m)
    decay = mx.exp(mx.where(causal, gap, -mx.inf))
    block = (decay * theta[..., None, :, :] * weights[..., :, None, :]).sum(-1)
    eye = mx.eye(subs, dtype=block.dtype)[:, None, :, None]
    scores = block[..., :, :, None, :] * eye  # (…, J, t, J', s)
    return scores.reshape(*scores.shape[:-4], subs * sub_chunk, subs * sub_chunk)


def _across_sub_chunks(weights, to_sub_end, within, sub_total):
    """The chunk's score matrix (…, Q, Q) with only the blocks below the diagonal.

    to_sub_end is θ_s · exp(L_{end of its sub-chunk} − L_s), the keys of the factoring.
    """
    subs, sub_chunk = weights.shape[-3], weights.shape[-2]
    index = mx.arange(subs)
    earlier = (index[:, None] > index[None, :])[:, None, :, None]  # j' < j
    # Σ of the sub-chunk totals strictly between j' and j, as (…, J, J', m).
    previous_total = mx.pad(sub_total[..., :-1, :], [(0, 0)] * 3 + [(1, 0), (0, 0)])
    spans = (index[:, None] > index[None, :] + 1)[..., None]
    between = mx.cumsum(mx.where(spans, previous_total[..., :, None, :], 0.0), axis=-3)

    exponent = within[..., :, :, None, :] + between[..., :, None, :, :]
    query = weights[..., :, :, None, :] * mx.exp(mx.where(earlier, exponent, -mx.inf))
    keys = to_sub_end[..., None, :, :, :].swapaxes(-1, -2)  # (…, 1, J', m, s)
    blocks = query.swapaxes(-3, -2) @ keys
    scores = blocks.swapaxes(-3, -2)  # (…, J, t, J', s)
    return scores.reshape(*scores.shape[:-4], subs * sub_chunk, subs * sub_chunk)
