"""The FM scan: step recurrence, chunked form and the fused C mix held to the same numbers."""

import os
import subprocess
import sys

from mlx_fm.ops import (
    fm_chunked,
    fm_mix,
    fm_mix_keeping,
    fm_recurrent,
    fm_step,
    fm_token,
    native,
    route,
)

import mlx.core as mx
import numpy as np
import pytest

from conftest import relative_error


def random_scan_inputs(
    batch,
    length,
    heads,
    width,
    slots,
    top_k,
    seed=0,
    logit_scale=3.0,
    temperature=0.5,
    eta_scale=3.0,
):
    mx.random.seed(seed)
    x = mx.random.normal((batch, length, heads, width))
    slot_weights = route(
        mx.random.normal((batch, length, heads, slots)) * logit_scale, temperature, top_k
    )
    eta = mx.sigmoid(mx.random.normal((batch, length, heads)) * eta_scale)
    state = mx.random.normal((batch, heads, slots, width))
    return x, slot_weights, eta, state


CASES = [  # (length, slots, top_k): T = 1, T < chunk, T not a multiple of the chunk, long T
    (1, 16, 16),
    (1, 16, 4),
    (37, 16, 16),
    (37, 12, 3),
    (200, 16, 16),
    (200, 20, 5),
    (4100, 16, 16),
    (4100, 16, 4),
]


@pytest.mark.parametrize("length,slots,top_k", CASES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_step(length, slots, top_k, with_state):
    x, slot_weights, eta, state = random_scan_inputs(2, length, 2, 8, slots, top_k)
    state = state if with_state else None
    expected, expected_state = fm_recurrent(x, slot_weights, eta, state)
    actual, actual_state = fm_chunked(x, slot_weights, eta, state)
    assert relative_error(actual, expected) < 1e-4
    assert relative_error(actual_state, expected_state) < 1e-4


def test_chunk_sizes_do_not_change_the_result():
    x, slot_weights, eta, state = random_scan_inputs(1, 90, 2, 4, 8, 8)
    expected, _ = fm_recurrent(x, slot_weights, eta, state)
    for chunk_size, segment in [(1, 8), (8, 8), (16, 32), (32, 64), (64, 64), (128, 256)]:
        actual, _ = fm_chunked(x, slot_weights, eta, state, chunk_size, segment)
        assert relative_error(actual, expected) < 1e-4, chunk_size


def test_extreme_inputs_stay_finite():
    """Router logits of ±50 at τ = 0.05, η within float32 rounding of 1, a long sequence."""
    batch, length, heads, width, slots = 1, 2048, 2, 8, 16
    mx.random.seed(3)
    x = mx.random.normal((batch, length, heads, width)) * 10
    logits = mx.where(mx.random.uniform(shape=(batch, length, heads, slots)) > 0.5, 50.0, -50.0)
    for top_k in (1, 4, slots):
        slot_weights = route(logits, 0.05, top_k)
        eta = mx.sigmoid(mx.full((batch, length, heads), 40.0))
        expected, expected_state = fm_recurrent(x, slot_weights, eta)
        actual, state = fm_chunked(x, slot_weights, eta)
        for array in (actual, state):
            assert mx.isfinite(array).all().item()
        assert relative_error(actual, expected) < 1e-4
        assert relative_error(state, expected_state) < 1e-4


def test_route_sparse_keeps_exactly_top_k_and_renormalizes():
    mx.random.seed(0)
    logits = mx.random.normal((3, 5, 2, 12))
    dense = route(logits, 0.7, 12)
    sparse = route(logits, 0.7, 4)
    assert ((sparse > 0).sum(-1) == 4).all().item()
    assert mx.allclose(sparse.sum(-1), mx.ones((3, 5, 2)), atol=1e-6).item()
    kept = np.argsort(-np.array(dense), axis=-1)[..., :4]
    assert (np.take_along_axis(np.array(sparse), kept, -1) > 0).all()
    assert mx.allclose(dense, mx.softmax(logits / 0.7, axis=-1), atol=1e-6).item()


def test_one_token_layout_is_the_step_recurrence_bit_for_bit():
    x, slot_weights, eta, state = random_scan_inputs(2, 1, 3, 8, 16, 4)
    read, after = fm_token(x, slot_weights, eta, state)
    step_read, step_after = fm_step(x[:, 0], slot_weights[:, 0], eta[:, 0], state)
    assert np.array_equal(np.array(read[:, 0]), np.array(step_read))
    assert np.array_equal(np.array(after), np.array(step_after))


def test_unselected_slots_are_bit_for_bit_unchanged():
    x, slot_weights, eta, state = random_scan_inputs(2, 24, 3, 8, 16, 2)
    # One step: slots outside this token's top-k.
    _, after_step = fm_step(x[:, 0], slot_weights[:, 0], eta[:, 0], state)
    untouched = np.array(slot_weights[:, 0] == 0)
    assert untouched.sum() > 0
    assert np.array_equal(np.array(after_step)[untouched], np.array(state)[untouched])
    # One chunk: slots that no token of the chunk selected.
    _, after_chunk = fm_chunked(x, slot_weights, eta, state, chunk_size=32)
    untouched = np.array((slot_weights == 0).all(axis=1))
    assert untouched.sum() > 0
    assert np.array_equal(np.array(after_chunk)[untouched], np.array(state)[untouched])
    assert not np.array_equal(np.array(after_chunk)[~untouched], np.array(state)[~untouched])


def test_gradients_of_chunked_and_step_agree():
    x, slot_weights, eta, state = random_scan_inputs(1, 70, 2, 4, 8, 3, logit_scale=1.0)
    logits = mx.random.normal(slot_weights.shape)
    probe = mx.random.normal(x.shape)

    def loss(scan, x, logits, eta, state):
        read, final = scan(x, route(logits, 0.5, 3), eta, state)
        return (read * probe).sum() + final.sum()

    arguments = (x, logits, eta, state)
    expected = mx.grad(lambda *a: loss(fm_recurrent, *a), argnums=(0, 1, 2, 3))(*arguments)
    actual = mx.grad(lambda *a: loss(fm_chunked, *a), argnums=(0, 1, 2, 3))(*arguments)
    for got, want in zip(actual, expected):
        assert mx.isfinite(got).all().item()
        assert relative_error(got, want) < 1e-4


def test_mix_keeps_a_float32_state_for_low_precision_inputs():
    batch, length, heads, width, slots = 1, 20, 2, 8, 8
    mx.random.seed(1)
    x = mx.random.normal((batch, length, heads, width)).astype(mx.bfloat16)
    logits = mx.random.normal((batch, length, heads, slots)).astype(mx.bfloat16)
    gates = mx.random.normal((batch, length, heads)).astype(mx.bfloat16)
    bias = mx.zeros((heads,), mx.bfloat16)
    out, state = fm_mix(x, logits, gates, gates, bias, bias, top_k=4, temperature=1.0)
    assert state.dtype == mx.float32 and out.dtype == mx.float32
    # One token with a (zero) state takes the step recurrence: the first token of the scan.
    out_step, state_step = fm_mix(
        x[:, :1],
        logits[:, :1],
        gates[:, :1],
        gates[:, :1],
        bias,
        bias,
        top_k=4,
        temperature=1.0,
        state=mx.zeros_like(state),
    )
    _, state_first = fm_mix(
        x[:, :1], logits[:, :1], gates[:, :1], gates[:, :1], bias, bias, top_k=4, temperature=1.0
    )
    assert state_step.dtype == mx.float32 and out_step.dtype == mx.float32
    assert relative_error(out_step, out[:, :1]) < 1e-6
    assert relative_error(state_step, state_first) < 1e-6


def test_mix_masked_tokens_leave_the_state_untouched():
    batch, length, heads, width, slots = 2, 12, 2, 4, 8
    mx.random.seed(2)
    x = mx.random.normal((batch, length, heads, width))
    logits = mx.random.normal((batch, length, heads, slots))
    gates = mx.random.normal((batch, length, heads))
    bias = mx.zeros((heads,))
    mask = mx.array([[True] * length, [False] * 5 + [True] * (length - 5)])
    _, state = fm_mix(x, logits, gates, gates, bias, bias, top_k=8, temperature=1.0, mask=mask)
    _, state_unpadded = fm_mix(
        x[1:, 5:],
        logits[1:, 5:],
        gates[1:, 5:],
        gates[1:, 5:],
        bias,
        bias,
        top_k=8,
        temperature=1.0,
    )
    assert relative_error(state[1:], state_unpadded) < 1e-6


def mix_inputs(batch=2, length=40, heads=2, width=8, slots=8, seed=4, logit_scale=1.0):
    mx.random.seed(seed)
    x = mx.random.normal((batch, length, heads, width))
    logits = mx.random.normal((batch, length, heads, slots)) * logit_scale
    update, merge = (mx.random.normal((batch, length, heads)) for _ in range(2))
    eta_bias, mu_bias = (mx.random.normal((heads,)) for _ in range(2))
    return x, logits, update, merge, eta_bias, mu_bias


def needs_c():
    if not native.available():
        pytest.skip(f"no C mix here: {native.status()}")


@pytest.mark.parametrize("length,slots,top_k", CASES)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_c_mix_equals_the_mix_on_mlx_ops(length, slots, top_k, with_state, temperature, c_build):
    """keep_checkpoints=False on the CPU runs the mix in C; True (training) on MLX ops."""
    inputs = mix_inputs(length=length, slots=slots, logit_scale=3.0)
    state = mx.random.normal((2, 2, slots, 8)) if with_state else None
    for mask in (None, mx.random.uniform(shape=(2, length)) > 0.2):
        options = dict(top_k=top_k, temperature=temperature, state=state, mask=mask)
        expected, expected_state = fm_mix(*inputs, **options)
        actual, actual_state = fm_mix(*inputs, **options, keep_checkpoints=False)
        assert relative_error(actual, expected) < 1e-5
        assert relative_error(actual_state, expected_state) < 1e-5


@pytest.mark.parametrize("keep,with_state", [(5, True), (12, False), (12, True)])
def test_one_c_mix_keeps_the_states_before_its_last_tokens_as_mlx_ops_do(
    keep, with_state, c_build, monkeypatch
):
    """In C one call mixes the prompt and copies out the state before each of its last `keep`
    tokens (a cache's snapshots); on MLX ops those tokens are mixed one at a time."""
    calls = []
    monkeypatch.setattr(native, "fm_mix_native", counted(native.fm_mix_native, calls))
    inputs = mix_inputs(length=12, slots=8)
    state = mx.random.normal((2, 2, 8, 8)) if with_state else None
    options = dict(top_k=3, temperature=1.0, state=state, keep=keep)
    expected_out, expected = fm_mix_keeping(*inputs, **options)
    out, states = fm_mix_keeping(*inputs, **options, keep_checkpoints=False)
    assert len(calls) == 1 and len(states) == keep + 1
    assert relative_error(out, expected_out) < 1e-5
    for actual, wanted in zip(states, expected):
        assert (actual is None) == (wanted is None)  # None: before the first token of no state
        assert actual is None or relative_error(actual, wanted) < 1e-5


def counted(function, calls):
    def counting(*arguments, **options):
        calls.append(options.get("keep", 0))
        return function(*arguments, **options)

    return counting


@pytest.mark.parametrize("heads", [5, 9])
def test_c_mix_routes_any_number_of_heads_as_mlx_ops(heads, c_build):
    """C routes heads four at a time, each thread its share of them: 5 and 9 heads leave groups
    of every size from 1 to 4."""
    inputs = mix_inputs(length=20, heads=heads, slots=12, logit_scale=3.0)
    state = mx.random.normal((2, heads, 12, 8))
    options = dict(top_k=5, temperature=1.0, state=state)
    expected, expected_state = fm_mix(*inputs, **options)
    actual, actual_state = fm_mix(*inputs, **options, keep_checkpoints=False)
    assert relative_error(actual, expected) < 1e-5
    assert relative_error(actual_state, expected_state) < 1e-5


def test_the_c_mix_keeps_exactly_top_k_slots_and_leaves_the_others_bit_for_bit(c_build):
    x, logits, update, merge, eta_bias, mu_bias = mix_inputs(length=2, slots=16)
    logits = mx.zeros_like(logits)  # every slot tied: the lowest top_k are written
    state = mx.random.normal((2, 2, 16, 8))
    _, after = fm_mix(
        *(x, logits, update, merge, eta_bias, mu_bias),
        **dict(top_k=5, temperature=1.0, state=state, keep_checkpoints=False),
    )
    changed = np.array((after != state).any(axis=-1))
    assert changed[..., :5].all() and not changed[..., 5:].any()


def test_a_nan_router_logit_of_either_sign_makes_its_head_output_nan_in_c(c_build):
    x, logits, update, merge, eta_bias, mu_bias = mix_inputs(length=5, slots=8)
    logits = np.array(logits)
    logits[0, 2, 1, 3], logits[1, 1, 0, 5] = np.nan, -np.nan
    options = dict(top_k=3, temperature=1.0, keep_checkpoints=False)
    out, _ = fm_mix(x, mx.array(logits), update, merge, eta_bias, mu_bias, **options)
    assert np.isnan(np.array(out)[[0, 1], [2, 1], [1, 0]]).all()


def test_gradients_through_the_c_mix_are_those_of_the_mix_on_mlx_ops():
    needs_c()
    inputs = mix_inputs(length=50)
    probe = mx.random.normal(inputs[0].shape)
    state = mx.random.normal((2, 2, 8, 8))

    def loss(keep_checkpoints, *arrays):
        out, final = fm_mix(
            *arrays[:-1],
            top_k=3,
            temperature=1.0,
            state=arrays[-1],
            keep_checkpoints=keep_checkpoints,
        )
        return (out * probe).sum() + final.sum()

    arguments = (*inputs, state)
    argnums = tuple(range(len(arguments)))
    expected = mx.grad(lambda *a: loss(True, *a), argnums=argnums)(*arguments)
    actual = mx.grad(lambda *a: loss(False, *a), argnums=argnums)(*arguments)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < 1e-5


def test_inference_on_the_cpu_mixes_in_c_where_the_graph_can_be_evaluated(monkeypatch):
    needs_c()
    calls = []

    def counting(*arguments, **options):
        calls.append(arguments[0].shape)
        return mix_in_c(*arguments, **options)

    mix_in_c = native.fm_mix_native
    monkeypatch.setattr(native, "fm_mix_native", counting)
    inputs, options = mix_inputs(), dict(top_k=3, temperature=1.0)
    training_out, _ = fm_mix(*inputs, **options)
    assert calls == []
    fm_mix(*inputs, **options, keep_checkpoints=False)
    assert len(calls) == 1
    # mx.compile does not let a graph be evaluated while it traces: MLX ops there.
    compiled = mx.compile(lambda *a: fm_mix(*a, **options, keep_checkpoints=False))
    compiled_out, _ = compiled(*inputs)
    assert len(calls) == 1
    assert relative_error(compiled_out, training_out) < 1e-5
    monkeypatch.setenv("MLX_FM_OPS_ONLY", "1")
    fm_mix(*inputs, **options, keep_checkpoints=False)
    assert len(calls) == 1 and native.status() == "MLX ops (MLX_FM_OPS_ONLY=1)"


def test_without_a_c_compiler_the_mix_and_the_decode_step_stay_on_mlx_ops(tmp_path):
    environment = dict(os.environ, CC="/no/such/cc", XDG_CACHE_HOME=str(tmp_path))
    program = (
        "from mlx_fm.ops import native; import mlx.core as mx\n"
        "print(native.available()); print(native.status()); print(native.decode_status())"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], env=environment, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    available, status, decode_status = result.stdout.splitlines()
    assert available == "False"
    assert status.startswith("MLX ops (/no/such/cc could not build fm_cpu.c (")
    assert decode_status.startswith("one compiled MLX graph (/no/such/cc could not build")


def conv_silu_pair():
    from mlx_fm.models.factorization_memory import _causal_conv_silu

    shapes = ((2, 3, 27), (2, 50, 27), (27, 4, 1), (27,))  # 27: vectors of 8 and 4, and a rest
    return _causal_conv_silu, native.conv_silu, shapes


def gate_norm_pair():
    from mlx_fm.models.factorization_memory import _gate

    def on_ops(x, gate, weight):
        return mx.fast.rms_norm(_gate(x, gate), weight, 1e-5)

    def in_c(x, gate, weight):
        return native.gate_norm(x, gate, weight, 1e-5)

    return on_ops, in_c, ((2, 50, 27), (2, 50, 27), (27,))


@pytest.mark.parametrize("pair", [conv_silu_pair, gate_norm_pair])
def test_the_c_conv_and_gated_norm_equal_their_mlx_ops_with_their_gradients(pair, c_build):
    on_ops, in_c, shapes = pair()
    mx.random.seed(5)
    arguments = [mx.random.normal(shape) for shape in shapes]
    assert relative_error(in_c(*arguments), on_ops(*arguments)) < 1e-5
    probe = mx.random.normal(on_ops(*arguments).shape)
    fused = native.with_gradient_of(on_ops, in_c)
    argnums = tuple(range(len(arguments)))
    expected = mx.grad(lambda *a: (on_ops(*a) * probe).sum(), argnums=argnums)(*arguments)
    actual = mx.grad(lambda *a: (fused(*a) * probe).sum(), argnums=argnums)(*arguments)
    for got, want in zip(actual, expected):
        assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize("bits,group_size", [(2, 128), (4, 64), (4, 128), (8, 32), (8, 64)])
def test_c_dequantizes_bit_for_bit_as_mlx(bits, group_size):
    needs_c()
    if not native.takes_quantized("affine", bits, group_size):
        pytest.skip("no quantized products in C on this CPU")
    mx.random.seed(2)
    matrix = mx.quantize(mx.random.normal((37, 384)), group_size=group_size, bits=bits)
    expected = mx.dequantize(*matrix, group_size=group_size, bits=bits)
    assert mx.array_equal(native.dequantized(native.Quantized(*matrix, bits, group_size)), expected)


def test_the_c_mix_and_gated_norm_read_columns_of_a_wider_array_where_they_lie():
    """A prompt's router, update, merge and gate logits are columns of one projection: C reads
    them in place (a row stride), as it would read contiguous copies of them."""
    needs_c()
    x, logits, update, merge, eta_bias, mu_bias = mix_inputs(length=30, slots=8)
    gate, other = mx.random.normal((2, 30, 16)), mx.random.normal((2, 30, 5))
    wide = mx.concatenate([logits.reshape(2, 30, 16), update, merge, gate, other], axis=-1)
    mx.eval(wide)
    columns = (wide[..., :16].reshape(2, 30, 2, 8), wide[..., 16:18], wide[..., 18:20])
    rows, stride = native._rows_on_host(columns[0], 2)
    assert stride == wide.shape[-1] and np.shares_memory(rows, np.asarray(wide))
    options = dict(top_k=3, temperature=1.0, keep_checkpoints=False)
    from_columns = fm_mix(x, *columns, eta_bias, mu_bias, **options)
    contiguous = fm_mix(x, logits, update, merge, eta_bias, mu_bias, **options)
    for a, b in zip(from_columns, contiguous):
        assert mx.array_equal(a, b).item()
    norm_input, weight = from_columns[0].reshape(2, 30, 16), mx.random.normal((16,))
    from_column = native.gate_norm(norm_input, wide[..., 20:36], weight, 1e-5)
    assert mx.array_equal(from_column, native.gate_norm(norm_input, gate, weight, 1e-5)).item()
