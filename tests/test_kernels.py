"""The FM Metal kernels (mlx_fm.ops.metal), run through the CPU emulator of
mx.fast.metal_kernel, against the ops path (mlx_fm.ops)."""

from functools import partial

from mlx_fm import ops
from mlx_fm.ops import metal
from mlx_fm.testing.metal_kernel import metal_kernel

import mlx.core as mx
import numpy as np
import pytest

from conftest import relative_error

FLOAT32_TOLERANCE = 1e-5
# The kernels read 16-bit inputs and compute in float32 as the ops do after
# their cast, so half inputs are held to the float32 tolerance too.
HALF_TOLERANCE = 1e-5
SCAN_CHUNK = 4  # small, so that short sequences span several chunks


@pytest.fixture(scope="module")
def emulated():
    return metal.FMKernels(metal_kernel=metal_kernel, scan_chunk=SCAN_CHUNK)


@pytest.fixture(autouse=True)
def ops_reference(monkeypatch):
    """ops.fm_mix stays the reference, even on a Mac with Metal."""
    monkeypatch.setenv("MLX_FM_OPS_ONLY", "1")


def mix_inputs(batch, length, heads, width, slots, dtype=mx.float32, seed=0):
    """Arguments of fm_mix (without top_k, temperature and mask), state included."""
    mx.random.seed(seed)
    x = mx.random.normal((batch, length, heads, width)).astype(dtype)
    router_logits = (mx.random.normal((batch, length, heads, slots)) * 3).astype(dtype)
    update_logits = (mx.random.normal((batch, length, heads)) * 2).astype(dtype)
    merge_logits = mx.random.normal((batch, length, heads)).astype(dtype)
    eta_bias = mx.random.normal((heads,))
    mu_bias = mx.random.normal((heads,))
    state = mx.random.normal((batch, heads, slots, width))
    return [x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state]


def scan_inputs(batch, length, heads, width, slots, top_k, seed=0):
    """x, slot weights α̃, eta and a state, as fm_chunked takes them."""
    x, router_logits, update_logits, _, eta_bias, _, state = mix_inputs(
        batch, length, heads, width, slots, seed=seed
    )
    slot_weights = ops.route(router_logits, 0.7, top_k)
    eta = mx.sigmoid(update_logits + eta_bias)
    return x, slot_weights, eta, state


def both_mixes(emulated, inputs, **options):
    """fm_mix on the emulated kernels, and on the ops."""
    *arguments, state = inputs
    actual = ops.fm_mix(*arguments, state=state, kernels=emulated, **options)
    expected = ops.fm_mix(*arguments, state=state, **options)
    return actual, expected


# --- decode ---------------------------------------------------------------------

DECODE_CASES = [  # (width, slots, top_k)
    (20, 12, 12),
    (20, 12, 1),
    (20, 40, 10),
    (20, 40, 40),
    (8, 64, 16),
    (300, 4, 2),  # wider than one threadgroup pass over the columns
]


@pytest.mark.parametrize("width,slots,top_k", DECODE_CASES)
def test_decode_matches_ops(emulated, width, slots, top_k):
    inputs = mix_inputs(2, 1, 3, width, slots)
    (out, state), (expected_out, expected_state) = both_mixes(
        emulated, inputs, top_k=top_k, temperature=0.7
    )
    assert out.shape == expected_out.shape and out.dtype == mx.float32
    assert relative_error(out, expected_out) < FLOAT32_TOLERANCE
    assert relative_error(state, expected_state) < FLOAT32_TOLERANCE


def test_inputs_under_eight_elements_reach_the_kernels_as_constant_buffers(emulated):
    """One head of width 1 and 4 slots: the states and checkpoints have fewer
    than 8 elements, so MLX passes them in the constant address space."""
    inputs = mix_inputs(1, 1, 1, 1, 4)
    (out, state), (expected_out, expected_state) = both_mixes(
        emulated, inputs, top_k=2, temperature=0.7
    )
    assert relative_error(out, expected_out) < FLOAT32_TOLERANCE
    assert relative_error(state, expected_state) < FLOAT32_TOLERANCE
    scan = scan_inputs(1, 1, 1, 1, 4, 2)
    grads = mx.grad(scan_loss(emulated.scan), argnums=(0, 1, 2, 3))(*scan)
    expected = mx.grad(scan_loss(ops.fm_chunked), argnums=(0, 1, 2, 3))(*scan)
    for grad, expected_grad in zip(grads, expected):
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE


def test_kernels_fit_a_lower_thread_limit():
    limit = 64
    kernels = metal.FMKernels(
        metal_kernel=partial(metal_kernel, max_threads_per_threadgroup=limit),
        scan_chunk=SCAN_CHUNK,
        max_threads=limit,
    )
    inputs = scan_inputs(1, 5, 1, 20, 12, 3)
    grads = mx.grad(scan_loss(kernels.scan), argnums=(0, 1, 2, 3))(*inputs)
    expected = mx.grad(scan_loss(ops.fm_chunked), argnums=(0, 1, 2, 3))(*inputs)
    for grad, expected_grad in zip(grads, expected):
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE
    (out, _), (expected_out, _) = both_mixes(
        kernels, mix_inputs(1, 1, 1, 100, 8), top_k=8, temperature=1.0
    )
    assert relative_error(out, expected_out) < FLOAT32_TOLERANCE


@pytest.mark.parametrize(
    "kernel,slots", [("decode", 3969), ("scan backward", 4096), ("chunkwise scan backward", 184)]
)
def test_threadgroup_memory_past_32_kb_is_refused_clearly(emulated, kernel, slots):
    with pytest.raises(ValueError, match=f"FM {kernel} kernel needs .* Metal allows 32768"):
        if kernel == "decode":
            x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state = mix_inputs(
                1, 1, 1, 64, slots
            )
            emulated.decode(
                x[:, 0],
                router_logits[:, 0],
                update_logits[:, 0],
                merge_logits[:, 0],
                eta_bias,
                mu_bias,
                state,
                top_k=4,
                temperature=1.0,
            )
        else:
            x, slot_weights, eta, state = scan_inputs(1, 1, 1, 1, slots, 4)
            backward = {
                "scan backward": emulated._scan_backward,
                "chunkwise scan backward": emulated._scan_chunkwise_backward,
            }[kernel]
            backward(x, slot_weights, eta, state[:, :, None], x, state)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_decode_half_inputs_match_ops(emulated, dtype):
    inputs = mix_inputs(2, 1, 2, 20, 40, dtype=dtype)
    (out, state), (expected_out, expected_state) = both_mixes(
        emulated, inputs, top_k=10, temperature=0.5
    )
    assert state.dtype == mx.float32
    assert relative_error(out, expected_out) < HALF_TOLERANCE
    assert relative_error(state, expected_state) < HALF_TOLERANCE


def test_decode_leaves_unselected_rows_bit_identical(emulated):
    x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state = mix_inputs(
        2, 1, 3, 20, 40
    )
    _, new_state = emulated.decode(
        x[:, 0],
        router_logits[:, 0],
        update_logits[:, 0],
        merge_logits[:, 0],
        eta_bias,
        mu_bias,
        state,
        top_k=3,
        temperature=0.7,
    )
    selected = np.array(ops.route(router_logits[:, 0], 0.7, 3)) != 0
    old, new = np.array(state), np.array(new_state)
    assert selected.sum(-1).tolist() == [[3] * 3] * 2
    assert np.array_equal(new[~selected], old[~selected])
    assert (new[selected] != old[selected]).any(axis=-1).all()


def test_decode_masked_row_keeps_its_state(emulated):
    inputs = mix_inputs(2, 1, 3, 20, 12)
    mask = mx.array([[True], [False]])
    (out, state), (expected_out, expected_state) = both_mixes(
        emulated, inputs, top_k=4, temperature=0.7, mask=mask
    )
    assert np.array_equal(np.array(state[1]), np.array(inputs[-1][1]))
    assert not np.array_equal(np.array(state[0]), np.array(inputs[-1][0]))
    assert relative_error(out, expected_out) < FLOAT32_TOLERANCE
    assert relative_error(state, expected_state) < FLOAT32_TOLERANCE


# --- scan -----------------------------------------------------------------------

SCAN_CASES = [  # (length, slots, top_k): T = 1, T not a multiple of the chunk, k = 1, k = m
    (1, 12, 12),
    (1, 40, 1),
    (11, 12, 1),
    (13, 40, 10),
    (13, 40, 40),
    (8, 64, 16),
]


@pytest.mark.parametrize("length,slots,top_k", SCAN_CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
def test_scan_matches_chunked(emulated, length, slots, top_k, with_state):
    x, slot_weights, eta, state = scan_inputs(2, length, 2, 20, slots, top_k)
    state = state if with_state else None
    reads, final_state = emulated.scan(x, slot_weights, eta, state)
    expected_reads, expected_state = ops.fm_chunked(x, slot_weights, eta, state)
    assert reads.shape == expected_reads.shape and final_state.shape == expected_state.shape
    assert relative_error(reads, expected_reads) < FLOAT32_TOLERANCE
    assert relative_error(final_state, expected_state) < FLOAT32_TOLERANCE


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_prefill_with_padding_and_state_matches_ops(emulated, dtype):
    inputs = mix_inputs(3, 10, 2, 20, 40, dtype=dtype)
    lengths = mx.array([10, 7, 3])
    mask = mx.arange(10)[None, :] >= (10 - lengths)[:, None]  # left padding
    (out, state), (expected_out, expected_state) = both_mixes(
        emulated, inputs, top_k=10, temperature=0.7, mask=mask
    )
    tolerance = FLOAT32_TOLERANCE if dtype == mx.float32 else HALF_TOLERANCE
    assert relative_error(out, expected_out) < tolerance
    assert relative_error(state, expected_state) < tolerance


@pytest.mark.parametrize("length,slots,top_k", [(1, 12, 12), (13, 40, 10), (8, 64, 64)])
def test_inference_scan_matches_the_checkpointing_scan_bit_for_bit(emulated, length, slots, top_k):
    x, slot_weights, eta, state = scan_inputs(2, length, 2, 20, slots, top_k)
    reads, final_state = emulated.scan(x, slot_weights, eta, state, keep_checkpoints=False)
    kept_reads, kept_state = emulated.scan(x, slot_weights, eta, state)
    expected_reads, expected_state = ops.fm_chunked(x, slot_weights, eta, state)
    assert np.array_equal(np.array(reads), np.array(kept_reads))
    assert np.array_equal(np.array(final_state), np.array(kept_state))
    assert relative_error(reads, expected_reads) < FLOAT32_TOLERANCE
    assert relative_error(final_state, expected_state) < FLOAT32_TOLERANCE


def test_fm_mix_without_checkpoints_never_runs_the_checkpointing_forward(emulated, monkeypatch):
    inputs = mix_inputs(2, 9, 2, 20, 12)
    (_, expected_state) = ops.fm_mix(*inputs[:-1], state=inputs[-1], top_k=4, temperature=0.7)

    def refused(*args):
        raise AssertionError("the forward wrote checkpoints")

    monkeypatch.setattr(emulated, "_scan_forward", refused)
    _, state = ops.fm_mix(
        *inputs[:-1],
        state=inputs[-1],
        top_k=4,
        temperature=0.7,
        kernels=emulated,
        keep_checkpoints=False,
    )
    assert relative_error(state, expected_state) < FLOAT32_TOLERANCE
    with pytest.raises(AssertionError, match="wrote checkpoints"):
        ops.fm_mix(*inputs[:-1], state=inputs[-1], top_k=4, temperature=0.7, kernels=emulated)


# --- chunkwise scan ---------------------------------------------------------------

CHUNKWISE_CASES = [  # (length, width, slots, top_k): chunks of 8 tokens, tiles of 8 columns
    (1, 20, 12, 12),
    (8, 20, 64, 16),
    (13, 20, 40, 10),
    (17, 9, 5, 2),  # neither m nor P a multiple of 8
    (29, 40, 40, 40),  # k = m; more column tiles than a threadgroup holds
]


@pytest.mark.parametrize("length,width,slots,top_k", CHUNKWISE_CASES)
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "state"])
def test_chunkwise_scan_matches_chunked(emulated, length, width, slots, top_k, with_state):
    x, slot_weights, eta, state = scan_inputs(2, length, 2, width, slots, top_k)
    if not with_state:
        state = mx.zeros_like(state)
    reads, final_state = emulated._scan_chunkwise(x, slot_weights, eta, state)
    expected_reads, expected_state = ops.fm_chunked(x, slot_weights, eta, state)
    assert relative_error(reads, expected_reads) < FLOAT32_TOLERANCE
    assert relative_error(final_state, expected_state) < FLOAT32_TOLERANCE


@pytest.fixture
def chunkwise_from_two_tokens(emulated, monkeypatch):
    """The chunkwise scan taken from T = 2, the step recurrence refused."""

    def refused(*args):
        raise AssertionError("ran the step recurrence")

    monkeypatch.setattr(metal, "CHUNKWISE_MIN_LENGTH", 2)
    monkeypatch.setattr(emulated, "_scan_sequential_inference", refused)
    return emulated


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_chunkwise_prefill_with_padding_matches_ops(chunkwise_from_two_tokens, dtype):
    inputs = mix_inputs(3, 10, 2, 20, 40, dtype=dtype)
    mask = mx.arange(10)[None, :] >= (10 - mx.array([10, 7, 3]))[:, None]
    *arguments, state = inputs
    options = dict(top_k=10, temperature=0.7, mask=mask, state=state)
    out, new_state = ops.fm_mix(
        *arguments, kernels=chunkwise_from_two_tokens, keep_checkpoints=False, **options
    )
    expected_out, expected_state = ops.fm_mix(*arguments, **options)
    assert relative_error(out, expected_out) < FLOAT32_TOLERANCE
    assert relative_error(new_state, expected_state) < FLOAT32_TOLERANCE


def test_chunkwise_forward_saves_the_state_entering_each_chunk(emulated):
    x, slot_weights, eta, state = scan_inputs(2, 17, 2, 20, 12, 4)
    reads, final_state, checkpoints = emulated._scan_chunkwise(
        x, slot_weights, eta, state, checkpoints=True
    )
    inference_reads, inference_state = emulated._scan_chunkwise(x, slot_weights, eta, state)
    assert np.array_equal(np.array(reads), np.array(inference_reads))
    assert np.array_equal(np.array(final_state), np.array(inference_state))
    assert checkpoints.shape == (2, 2, 3, 12, 20)
    assert np.array_equal(np.array(checkpoints[:, :, 0]), np.array(state))
    for chunk in (1, 2):
        tokens = slice(0, 8 * chunk)
        _, entering = ops.fm_chunked(x[:, tokens], slot_weights[:, tokens], eta[:, tokens], state)
        assert relative_error(checkpoints[:, :, chunk], entering) < FLOAT32_TOLERANCE


# --- chunkwise backward ---------------------------------------------------------


def refusing(name):
    def refused(*args, **kwargs):
        raise AssertionError(f"ran {name}")

    return refused


@pytest.fixture
def chunkwise_only(monkeypatch):
    """Kernels on which every scan, forward and backward, takes the chunkwise
    pair: from one token, the step kernels refused."""
    kernels = metal.FMKernels(metal_kernel=metal_kernel, scan_chunk=SCAN_CHUNK)
    monkeypatch.setattr(metal, "CHUNKWISE_MIN_LENGTH", 1)
    for name in ("_scan_forward", "_scan_backward", "_scan_sequential_inference"):
        monkeypatch.setattr(kernels, name, refusing(name))
    return kernels


def scan_gradients(scan, inputs):
    return mx.grad(scan_loss(scan), argnums=(0, 1, 2, 3))(*inputs)


CHUNKWISE_GRADIENT_CASES = [
    *CHUNKWISE_CASES,
    (17, 40, 128, 32),  # the backward fits 3 tiles a threadgroup, the forward 4
    (17, 8, 176, 4),  # the largest m whose backward fits (one tile)
]


@pytest.mark.parametrize("length,width,slots,top_k", CHUNKWISE_GRADIENT_CASES)
def test_chunkwise_scan_gradients_match_the_step_kernels_and_ops(
    emulated, chunkwise_only, monkeypatch, length, width, slots, top_k
):
    inputs = scan_inputs(2, length, 2, width, slots, top_k)
    grads = scan_gradients(chunkwise_only.scan, inputs)
    monkeypatch.setattr(emulated, "_takes_chunkwise", lambda *args, **kwargs: False)
    step_grads = scan_gradients(emulated.scan, inputs)
    expected = scan_gradients(ops.fm_chunked, inputs)
    names = ("x", "slot_weights", "eta", "state")
    for name, grad, step_grad, expected_grad in zip(names, grads, step_grads, expected):
        assert grad.shape == expected_grad.shape, name
        assert relative_error(grad, step_grad) < FLOAT32_TOLERANCE, name
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE, name


def test_chunkwise_scan_gradients_through_decays_of_zero_match_ops(chunkwise_only):
    """θ = η·α̃ = 1 (one-hot routing, η = 1 on every other token) empties its
    slot: decay products reach exactly 0, where a quotient of cumulative decays
    would be 0 / 0."""
    x, slot_weights, eta, state = scan_inputs(2, 21, 2, 20, 12, 1)
    eta = mx.where(mx.arange(21)[None, :, None] % 2 == 0, 1.0, eta)
    inputs = (x, slot_weights, eta, state)
    grads = scan_gradients(chunkwise_only.scan, inputs)
    expected = scan_gradients(ops.fm_chunked, inputs)
    assert (np.array(slot_weights * eta[..., None]) == 1).sum() > 40
    for grad, expected_grad in zip(grads, expected):
        assert np.isfinite(np.array(grad)).all()
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE


def test_chunkwise_inference_scan_gradients_recompute_the_checkpoints(chunkwise_only):
    inputs = scan_inputs(2, 11, 2, 20, 12, 4)
    grads = scan_gradients(partial(chunkwise_only.scan, keep_checkpoints=False), inputs)
    expected = scan_gradients(ops.fm_chunked, inputs)
    for grad, expected_grad in zip(grads, expected):
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE


def test_scan_gradients_at_the_threshold_take_the_chunkwise_pair(emulated, monkeypatch):
    for name in ("_scan_forward", "_scan_backward"):
        monkeypatch.setattr(emulated, name, refusing(name))
    inputs = scan_inputs(1, metal.CHUNKWISE_MIN_LENGTH, 1, 8, 12, 4)
    grads = scan_gradients(emulated.scan, inputs)
    expected = scan_gradients(ops.fm_chunked, inputs)
    for grad, expected_grad in zip(grads, expected):
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE


def recorded_scans(kernels, monkeypatch):
    """The scan kernels of `kernels` replaced by stand-ins that record their
    calls and return zeros of the right shapes."""
    calls = []

    def outputs(x, state, checkpoints):
        return [mx.zeros(x.shape), state, *([mx.zeros((1,))] if checkpoints else [])]

    def chunkwise(x, slot_weights, eta, state, checkpoints=False):
        calls.append("chunkwise forward" + (" with checkpoints" if checkpoints else ""))
        return outputs(x, state, checkpoints)

    def step(checkpoints):
        def forward(x, slot_weights, eta, state):
            calls.append("step forward" + (" with checkpoints" if checkpoints else ""))
            return outputs(x, state, checkpoints)

        return forward

    def backward(name):
        def run(x, slot_weights, eta, checkpoints, d_reads, d_final_state):
            calls.append(name)
            zeros = (x, slot_weights, eta, d_final_state)
            return tuple(mx.zeros_like(a) for a in zeros)

        return run

    for name, stand_in in (
        ("_scan_chunkwise", chunkwise),
        ("_scan_forward", step(True)),
        ("_scan_sequential_inference", step(False)),
        ("_scan_chunkwise_backward", backward("chunkwise backward")),
        ("_scan_backward", backward("step backward")),
    ):
        monkeypatch.setattr(kernels, name, stand_in)
    return calls


THRESHOLD = metal.CHUNKWISE_MIN_LENGTH
CHUNKWISE_PAIR = ["chunkwise forward with checkpoints", "chunkwise backward"]
STEP_PAIR = ["step forward with checkpoints", "step backward"]


@pytest.mark.parametrize(
    "length,slots,keep_checkpoints,calls",
    [
        (THRESHOLD, 12, True, CHUNKWISE_PAIR),
        (THRESHOLD, 12, False, ["chunkwise forward", *CHUNKWISE_PAIR]),
        (THRESHOLD - 1, 12, True, STEP_PAIR),
        (THRESHOLD - 1, 12, False, ["step forward", *STEP_PAIR]),
        (THRESHOLD, 176, True, CHUNKWISE_PAIR),
        (THRESHOLD, 184, True, STEP_PAIR),  # the backward past 32 KB
        (THRESHOLD, 184, False, ["chunkwise forward", *STEP_PAIR]),  # the forward within
        (THRESHOLD, 208, False, ["step forward", *STEP_PAIR]),  # both past 32 KB
    ],
)
def test_scans_take_the_chunkwise_kernels_from_the_threshold_where_they_fit(
    emulated, monkeypatch, length, slots, keep_checkpoints, calls
):
    recorded = recorded_scans(emulated, monkeypatch)
    inputs = scan_inputs(1, length, 1, 8, slots, 4)
    scan_gradients(partial(emulated.scan, keep_checkpoints=keep_checkpoints), inputs)
    assert recorded == calls


def test_chunkwise_backward_tiles_shrink_to_fit_threadgroup_memory(emulated):
    assert emulated._chunkwise_tiles(40) == 4
    assert emulated._chunkwise_backward_tiles(40, 64) == 4
    assert emulated._chunkwise_backward_tiles(40, 128) == 3
    assert emulated._chunkwise_backward_tiles(40, 176) == 1
    assert emulated._chunkwise_backward_tiles(40, 184) == 0


def scan_loss(scan):
    """A scalar loss of the reads and the final state, with cotangents that
    vary from token to token and column to column."""

    def loss(x, slot_weights, eta, state):
        reads, final_state = scan(x, slot_weights, eta, state)
        return (reads * mx.cos(reads)).sum() + 0.3 * (final_state * final_state).sum()

    return loss


@pytest.mark.parametrize("length,slots,top_k", [(1, 12, 12), (9, 12, 1), (13, 40, 10), (6, 64, 64)])
def test_scan_gradients_match_chunked(emulated, length, slots, top_k):
    inputs = scan_inputs(2, length, 2, 20, slots, top_k)
    arguments = (0, 1, 2, 3)
    grads = mx.grad(scan_loss(emulated.scan), argnums=arguments)(*inputs)
    expected = mx.grad(scan_loss(ops.fm_chunked), argnums=arguments)(*inputs)
    for name, grad, expected_grad in zip(("x", "slot_weights", "eta", "state"), grads, expected):
        assert grad.shape == expected_grad.shape, name
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE, name


@pytest.mark.parametrize("length,slots,top_k", [(9, 12, 1), (6, 64, 64)])
def test_inference_scan_gradients_recompute_the_checkpoints(emulated, length, slots, top_k):
    inputs = scan_inputs(2, length, 2, 20, slots, top_k)
    arguments = (0, 1, 2, 3)
    inference_scan = partial(emulated.scan, keep_checkpoints=False)
    grads = mx.grad(scan_loss(inference_scan), argnums=arguments)(*inputs)
    expected = mx.grad(scan_loss(ops.fm_chunked), argnums=arguments)(*inputs)
    for name, grad, expected_grad in zip(("x", "slot_weights", "eta", "state"), grads, expected):
        assert relative_error(grad, expected_grad) < FLOAT32_TOLERANCE, name


# Gradients of 16-bit inputs are rounded to their type on both paths: one unit
# in the last place apart, relative to the largest.
GRADIENT_TOLERANCES = {mx.float32: FLOAT32_TOLERANCE, mx.float16: 2**-10, mx.bfloat16: 2**-7}


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("pair", ["step", "chunkwise"])
def test_mix_gradients_with_padding_match_ops(emulated, request, pair, dtype):
    kernels = emulated if pair == "step" else request.getfixturevalue("chunkwise_only")
    *arguments, state = mix_inputs(2, 9, 2, 20, 12, dtype=dtype)
    mask = mx.array([[True] * 9, [False] * 4 + [True] * 5])

    def loss(mix):
        def value(x, router_logits, update_logits, merge_logits, eta_bias, mu_bias, state):
            out, new_state = mix(
                x,
                router_logits,
                update_logits,
                merge_logits,
                eta_bias,
                mu_bias,
                top_k=4,
                temperature=0.7,
                state=state,
                mask=mask,
            )
            return (out * mx.sin(out)).sum() + (new_state * new_state).sum()

        return value

    arguments = (*arguments, state)
    argnums = tuple(range(len(arguments)))
    grads = mx.grad(loss(partial(ops.fm_mix, kernels=kernels)), argnums=argnums)(*arguments)
    expected = mx.grad(loss(ops.fm_mix), argnums=argnums)(*arguments)
    for index, (grad, expected_grad) in enumerate(zip(grads, expected)):
        assert grad.dtype == expected_grad.dtype, index
        assert relative_error(grad, expected_grad) < GRADIENT_TOLERANCES[grad.dtype], index


# --- dispatch -------------------------------------------------------------------


@pytest.mark.parametrize(
    "length,with_state,kernel",
    [
        (1, True, "decode"),
        (1, False, "scan"),
        (5, True, "scan"),
    ],
)
def test_fm_mix_runs_on_the_default_kernels_where_they_run(
    emulated, monkeypatch, length, with_state, kernel
):
    *arguments, state = mix_inputs(1, length, 2, 8, 12)
    state = state if with_state else None
    expected_out, expected_state = ops.fm_mix(*arguments, top_k=3, temperature=0.7, state=state)

    calls = []

    def recorded(name):
        original = getattr(emulated, name)

        def record(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)

        return record

    monkeypatch.setattr(metal, "use_kernels", lambda: True)
    monkeypatch.setattr(metal, "default_kernels", lambda: emulated)
    for name in ("decode", "scan"):
        monkeypatch.setattr(emulated, name, recorded(name))
    out, new_state = ops.fm_mix(*arguments, top_k=3, temperature=0.7, state=state)
    assert calls == [kernel]
    assert relative_error(out, expected_out) < FLOAT32_TOLERANCE
    assert relative_error(new_state, expected_state) < FLOAT32_TOLERANCE


def test_use_kernels_needs_metal_the_gpu_and_no_opt_out(monkeypatch):
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    monkeypatch.delenv("MLX_FM_OPS_ONLY")
    assert metal.use_kernels()
    monkeypatch.setenv("MLX_FM_OPS_ONLY", "1")
    assert not metal.use_kernels()
    monkeypatch.delenv("MLX_FM_OPS_ONLY")
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.cpu))
    assert not metal.use_kernels()
    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert not metal.use_kernels()
