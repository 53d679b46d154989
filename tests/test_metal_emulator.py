"""The CPU emulator of mx.fast.metal_kernel (mlx_fm.testing.metal_kernel).

mlx-lm's Metal kernels, written for the GPU by others, must match mlx-lm's
ops implementations when run through the emulator; the targeted kernels below
fail on an emulator that runs threads one after another, ignores barriers or
computes SIMD-group functions per thread.
"""

from mlx_fm.testing import metal_kernel as emulator
from mlx_fm.testing.metal_kernel import (
    MetalKernelCompileError,
    UnsupportedMetalFeature,
    metal_kernel,
)

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import gated_delta, ssm


def run(kernel, inputs, grid, threadgroup, outputs, **options):
    """Launches `kernel` with outputs given as [(shape, dtype), ...]."""
    return kernel(
        inputs=inputs,
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=[shape for shape, _ in outputs],
        output_dtypes=[dtype for _, dtype in outputs],
        **options,
    )


def lanes_and_counts(thread_count, threadgroup_size):
    """Lane of each thread of a 1-D grid and the size of its SIMD-group."""
    index = np.arange(thread_count)
    in_group = index % threadgroup_size
    group_size = np.minimum(threadgroup_size, thread_count - (index - in_group))
    simd_start = in_group - in_group % 32
    return in_group % 32, np.minimum(32, group_size - simd_start)


# --- mlx-lm's kernels ----------------------------------------------------------


@pytest.fixture(scope="module")
def emulated_mlx_lm_kernels():
    """mlx-lm's kernel builders run with Metal reported available and
    mx.fast.metal_kernel replaced by the emulator."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mx.metal, "is_available", lambda: True)
        patch.setattr(mx.fast, "metal_kernel", metal_kernel)
        return {
            "ssm": ssm.make_ssm_kernel(),
            "gated_delta": gated_delta._make_gated_delta_kernel(has_mask=False, vectorized=False),
            "gated_delta_masked": gated_delta._make_gated_delta_kernel(
                has_mask=True, vectorized=False
            ),
            "gated_delta_vec": gated_delta._make_gated_delta_kernel(
                has_mask=False, vectorized=True
            ),
            "gated_delta_vec_masked": gated_delta._make_gated_delta_kernel(
                has_mask=True, vectorized=True
            ),
            "gated_delta_xtree": gated_delta._make_gated_delta_kernel_xtree(),
            "gated_delta_packed": gated_delta._make_gated_delta_packed_kernel(),
        }


def max_error(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def test_mlx_lm_ssm_decode_kernel_matches_ssm_attn(emulated_mlx_lm_kernels, monkeypatch):
    monkeypatch.setattr(ssm, "_ssm_kernel", emulated_mlx_lm_kernels["ssm"])
    mx.random.seed(1)
    batch, heads, groups, head_dim, state_dim = (
        2,
        4,
        2,
        20,
        64,
    )  # head_dim 20: edge threadgroups in y
    x = mx.random.normal((batch, 1, heads, head_dim))
    A_log = mx.random.normal((heads,)) * 0.5
    # Scaled so that outputs are O(1), where 1e-5 is about 100 float32 ulps.
    B = mx.random.normal((batch, 1, groups, state_dim)) * state_dim**-0.5
    C = mx.random.normal((batch, 1, groups, state_dim)) * state_dim**-0.5
    D = mx.random.normal((heads,))
    dt = mx.random.normal((batch, 1, heads))
    dt_bias = mx.random.normal((heads,)) * 0.1
    state = mx.random.normal((batch, heads, head_dim, state_dim))
    limits = (0.001, 100.0)

    y, new_state = ssm.ssm_update_kernel(x, A_log, B, C, D, dt, dt_bias, state, limits)
    y_ref, state_ref = ssm.ssm_attn(x, A_log, B, C, D, dt, dt_bias, state, limits)

    assert y.shape == y_ref.shape and new_state.shape == state_ref.shape
    assert max_error(y, y_ref) < 1e-5
    assert max_error(new_state, state_ref) < 1e-5


def gated_delta_inputs(
    *,
    vectorized_gate,
    masked,
    batch=2,
    steps=5,
    key_heads=2,
    value_heads=4,
    key_dim=64,
    value_dim=24,
):
    mx.random.seed(2)
    q = mx.random.normal((batch, steps, key_heads, key_dim)) * key_dim**-0.5
    k = mx.random.normal((batch, steps, key_heads, key_dim)) * key_dim**-0.5
    v = mx.random.normal((batch, steps, value_heads, value_dim))
    gate_shape = (
        (batch, steps, value_heads, key_dim) if vectorized_gate else (batch, steps, value_heads)
    )
    g = mx.random.uniform(0.5, 1.0, gate_shape)
    beta = mx.random.uniform(0.0, 1.0, (batch, steps, value_heads))
    state = mx.random.normal((batch, value_heads, value_dim, key_dim)) * 0.1
    mask = (mx.random.uniform(shape=(batch, steps)) > 0.3) if masked else None
    return q, k, v, g, beta, state, mask


@pytest.mark.parametrize("vectorized_gate", [False, True], ids=["scalar_gate", "vector_gate"])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_mlx_lm_gated_delta_kernels_match_ops(
    emulated_mlx_lm_kernels, monkeypatch, vectorized_gate, masked
):
    for name in ("", "_masked", "_vec", "_vec_masked"):
        monkeypatch.setattr(
            gated_delta, f"_gated_delta_kernel{name}", emulated_mlx_lm_kernels[f"gated_delta{name}"]
        )
    q, k, v, g, beta, state, mask = gated_delta_inputs(
        vectorized_gate=vectorized_gate, masked=masked
    )

    y, new_state = gated_delta.gated_delta_kernel_unpacked(q, k, v, g, beta, state, mask)
    y_ref, state_ref = gated_delta.gated_delta_ops(q, k, v, g, beta, state, mask)

    if masked:
        # The kernel writes zeros for masked steps; the ops still compute y.
        steps = np.array(mask)
        assert not steps.all() and (np.array(y)[~steps] == 0).all()
        y, y_ref = mx.array(np.array(y)[steps]), mx.array(np.array(y_ref)[steps])
    assert max_error(y, y_ref) < 1e-5
    assert max_error(new_state, state_ref) < 1e-5


def test_mlx_lm_packed_gated_delta_kernel_matches_its_comparators_bitwise(
    emulated_mlx_lm_kernels, monkeypatch
):
    # mlx-lm documents the packed kernel as bitwise equal to the explicit
    # butterfly kernel, and that one as bitwise equal to the simd_sum kernel
    # on Apple GPUs, whose simd_sum is the same ascending butterfly.
    for name in ("", "_xtree", "_packed"):
        monkeypatch.setattr(
            gated_delta, f"_gated_delta_kernel{name}", emulated_mlx_lm_kernels[f"gated_delta{name}"]
        )
    inputs = gated_delta_inputs(vectorized_gate=False, masked=False, key_dim=128, value_dim=16)[:-1]

    packed = gated_delta.gated_delta_kernel(*inputs)
    xtree = gated_delta.gated_delta_kernel_xtree(*inputs)
    simd_sum = gated_delta.gated_delta_kernel_unpacked(*inputs)
    reference = gated_delta.gated_delta_ops(*inputs)

    for ours, theirs in zip(packed, xtree):
        assert mx.array_equal(ours, theirs).item()
    for ours, theirs in zip(xtree, simd_sum):
        assert mx.array_equal(ours, theirs).item()
    for ours, theirs in zip(packed, reference):
        assert max_error(ours, theirs) < 1e-5


# --- SIMD-group functions --------------------------------------------------------

SIMD_SOURCE = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    float v = float(lane);
    sums[i] = simd_sum(v);
    inclusive[i] = simd_prefix_inclusive_sum(v);
    exclusive[i] = simd_prefix_exclusive_sum(v);
    products[i] = simd_prefix_inclusive_product(lane < 5 ? v + 1.0f : 1.0f) + simd_product(lane < 4 ? 2.0f : 1.0f);
    extremes[i] = simd_max(v) * 100.0f + simd_min(v + 3.0f);
    float butterfly = v;
    for (ushort mask = 1; mask < 32; mask <<= 1) {
      butterfly += simd_shuffle_xor(butterfly, mask);
    }
    butterflies[i] = butterfly;
    shuffles[i] = simd_shuffle(v, (lane + 3) % 32) * 10000.0f + simd_shuffle_up(v, 1) * 100.0f
                  + simd_shuffle_down(v, 2);
    broadcasts[i] = simd_broadcast(v, 5) * 100.0f + simd_broadcast_first(v + 7.0f);
    votes[i] = int(simd_all(lane < 32)) + 2 * int(simd_any(lane == 6)) + 4 * int(simd_all(lane != 1))
               + 8 * int(simd_is_first());
    quads[i] = quad_sum(v) * 100.0f + quad_shuffle_xor(v, 1);
"""
SIMD_OUTPUTS = [
    "sums",
    "inclusive",
    "exclusive",
    "products",
    "extremes",
    "butterflies",
    "shuffles",
    "broadcasts",
    "votes",
    "quads",
]


@pytest.fixture(scope="module")
def simd_kernel():
    return metal_kernel("simd_functions", [], SIMD_OUTPUTS, SIMD_SOURCE)


@pytest.mark.parametrize("thread_count, threadgroup_size", [(96, 64), (40, 32)])
def test_simd_functions_combine_the_lanes_of_a_simdgroup(
    simd_kernel, thread_count, threadgroup_size
):
    outputs = [
        ((thread_count,), mx.int32 if name == "votes" else mx.float32) for name in SIMD_OUTPUTS
    ]
    result = dict(
        zip(
            SIMD_OUTPUTS,
            map(
                np.array,
                run(simd_kernel, [], (thread_count, 1, 1), (threadgroup_size, 1, 1), outputs),
            ),
        )
    )
    lane, count = lanes_and_counts(thread_count, threadgroup_size)
    lane_sum = count * (count - 1) / 2  # 496 in a full SIMD-group

    np.testing.assert_array_equal(result["sums"], lane_sum)
    assert result["sums"][0] == 496
    full = count == 32  # a butterfly over a partial SIMD-group reads absent lanes
    np.testing.assert_array_equal(result["butterflies"][full], 496)
    np.testing.assert_array_equal(result["inclusive"], lane * (lane + 1) / 2)
    np.testing.assert_array_equal(result["exclusive"], lane * (lane - 1) / 2)
    factorial = np.array([1, 2, 6, 24, 120])[np.minimum(lane, 4)]
    np.testing.assert_array_equal(result["products"], factorial + 2.0 ** np.minimum(count, 4))
    np.testing.assert_array_equal(result["extremes"], (count - 1) * 100 + 3)
    # Reading a lane outside a partial SIMD-group is undefined on the GPU.
    source_lane, down = (lane + 3) % 32, lane + 2
    defined = (source_lane < count) & ((down < count) | (down >= 32))
    up = np.where(lane >= 1, lane - 1, lane)
    down = np.where(down < 32, down, lane)
    expected_shuffles = source_lane * 10000 + up * 100 + down
    np.testing.assert_array_equal(result["shuffles"][defined], expected_shuffles[defined])
    np.testing.assert_array_equal(result["broadcasts"], 5 * 100 + 7)
    expected_votes = 1 + 2 * (count > 6) + 4 * (count <= 1) + 8 * (lane == 0)
    np.testing.assert_array_equal(result["votes"], expected_votes)
    np.testing.assert_array_equal(result["quads"], (4 * (lane // 4) * 4 + 6) * 100 + (lane ^ 1))


# --- threadgroup memory and barriers -------------------------------------------

ROTATE_SOURCE = """
    threadgroup float shared[128 * 2];  // the * in the extent is no pointer
    uint t = thread_index_in_threadgroup;
    uint n = threads_per_threadgroup.x;
    threadgroup float* mine = shared + t;
    float value = inp[thread_position_in_grid.x];
    for (int round = 0; round < 3; ++round) {
      *mine = value;
      threadgroup_barrier(mem_flags::mem_threadgroup);
      value = shared[(t + 1) % n];
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = value;
"""


# --- simdgroup_matrix -----------------------------------------------------------

SIMDGROUP_MATMUL = """
    // Two SIMD groups, each computing its own 8 x 8 block of out (8 x 16):
    // out[:, 8g:8g+8] = a[:, 8g:8g+8] @ b^T + 2 * c, with a (8 x 16), b (8 x 8).
    const uint group = simdgroup_index_in_threadgroup;
    simdgroup_matrix<T, 8, 8> left, right, twice_c, product;
    simdgroup_load(left, a, 16, ulong2(8 * group, 0));
    simdgroup_load(right, b, 8, ulong2(0, 0), true);
    simdgroup_load(twice_c, c);
    simdgroup_multiply(twice_c, simdgroup_matrix<T, 8, 8>(T(2)), twice_c);
    simdgroup_multiply_accumulate(product, left, right, twice_c);
    threadgroup T staged[64 * 2];
    simdgroup_store(product, staged + 64 * group, 8);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    const uint lane = thread_index_in_simdgroup;
    for (uint i = lane; i < 64; i += 32) {
      out[(i / 8) * 16 + 8 * (1 - group) + i % 8] = staged[64 * (1 - group) + i];
    }
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float", "half"])
def test_simdgroup_matrix_products_match_numpy(dtype):
    kernel = metal_kernel("simdgroup_matmul", ["a", "b", "c"], ["out"], SIMDGROUP_MATMUL)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(shape).astype(np.float32) for shape in [(8, 16), (8, 8), (8, 8)])
    (out,) = run(
        kernel,
        [mx.array(a).astype(dtype), mx.array(b).astype(dtype), mx.array(c).astype(dtype)],
        (32, 2, 1),
        (32, 2, 1),
        [((8, 16), dtype)],
        template=[("T", dtype)],
    )
    rounded = [np.array(mx.array(v).astype(dtype).astype(mx.float32)) for v in (a, b, c)]
    expected = np.concatenate(
        [block @ rounded[1].T + 2 * rounded[2] for block in np.split(rounded[0], 2, axis=1)], axis=1
    )
    tolerance = 1e-5 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(
        np.array(out.astype(mx.float32)), expected, rtol=tolerance, atol=tolerance
    )


@pytest.mark.parametrize(
    "source, message",
    [
        (
            "simdgroup_float8x8 m; if (thread_index_in_simdgroup < 16) { simdgroup_load(m, x, 8); }",
            r"simdgroup_load at simdgroup_lanes:source:1 is called by lanes 0x0000ffff .* every lane",
        ),
        (
            "simdgroup_float8x8 m; simdgroup_load(m, x, 8, ulong2(thread_index_in_simdgroup % 2, 0));",
            r"simdgroup_load at simdgroup_lanes:source:1: lanes 0 and 1 pass different pointers",
        ),
        (
            "simdgroup_float8x8 m = make_filled_simdgroup_matrix<float, 8, 8>(1.0f);"
            " if (thread_index_in_simdgroup != 3) { simdgroup_multiply(m, m, m); }",
            r"simdgroup_multiply .* lanes 0xfffffff7",
        ),
    ],
    ids=["divergent", "lane_dependent_origin", "one_lane_missing"],
)
def test_simdgroup_matrix_functions_need_the_whole_simdgroup_and_one_matrix(source, message):
    kernel = metal_kernel("simdgroup_lanes", ["x"], ["out"], source + " out[0] = 0;")
    with pytest.raises(emulator.MetalKernelError, match=message):
        run(kernel, [mx.zeros((80,))], (32, 1, 1), (32, 1, 1), [((1,), mx.float32)])


def test_threadgroup_memory_is_exchanged_across_barriers():
    kernel = metal_kernel("rotate_in_threadgroup", ["inp"], ["out"], ROTATE_SOURCE)
    values = mx.arange(200).astype(mx.float32)
    (out,) = run(kernel, [values], (200, 1, 1), (64, 1, 1), [((200,), mx.float32)])

    # Each round reads the neighbour's slot: a rotation by 3 within each
    # threadgroup, the last of which holds 200 - 3 * 64 = 8 threads.
    expected = np.concatenate(
        [np.roll(np.arange(start, min(start + 64, 200)), -3) for start in range(0, 200, 64)]
    )
    np.testing.assert_array_equal(np.array(out), expected)


EDGE_SOURCE = """
    uint2 position = uint2(thread_position_in_grid.x, thread_position_in_grid.y);
    uint index = position.y * threads_per_grid.x + position.x;
    sizes[index] = threads_per_threadgroup.x * 10 + threads_per_threadgroup.y;
    linear[index] = thread_index_in_threadgroup;
    simd_sizes[index] = simd_sum(1u);
    groups[index] = threadgroup_position_in_grid.x * 10 + threadgroup_position_in_grid.y
                    + 100 * threadgroups_per_grid.x + 1000 * threadgroups_per_grid.y;
"""


def test_edge_threadgroups_are_cut_to_the_grid():
    kernel = metal_kernel(
        "edge_threadgroups", [], ["sizes", "linear", "simd_sizes", "groups"], EDGE_SOURCE
    )
    width, height = 70, 3
    outputs = [((height, width), mx.uint32)] * 4
    sizes, linear, simd_sizes, groups = map(
        np.array, run(kernel, [], (width, height, 1), (32, 2, 1), outputs)
    )

    x, y = np.meshgrid(np.arange(width), np.arange(height))
    group_width = np.where(x >= 64, 6, 32)
    group_height = np.where(y >= 2, 1, 2)
    np.testing.assert_array_equal(sizes, group_width * 10 + group_height)
    expected_linear = (y % 2) * group_width + x % 32
    np.testing.assert_array_equal(linear, expected_linear)
    threads_in_group = group_width * group_height
    np.testing.assert_array_equal(
        simd_sizes, np.minimum(32, threads_in_group - expected_linear // 32 * 32)
    )
    np.testing.assert_array_equal(groups, (x // 32) * 10 + y // 2 + 100 * 3 + 1000 * 2)


def test_atomic_outputs_start_from_init_value():
    source = """
        uint i = thread_position_in_grid.x;
        atomic_fetch_add_explicit(&counts[i % 4], 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&total[0], float(i) * 0.5f, memory_order_relaxed);
        atomic_fetch_max_explicit(&largest[0], int(i), memory_order_relaxed);
    """
    kernel = metal_kernel(
        "atomics", [], ["counts", "total", "largest"], source, atomic_outputs=True
    )
    outputs = [((4,), mx.int32), ((1,), mx.float32), ((1,), mx.int32)]
    counts, total, largest = run(kernel, [], (1000, 1, 1), (128, 1, 1), outputs, init_value=5)

    np.testing.assert_array_equal(np.array(counts), 5 + 250)
    assert total.item() == 5 + 0.5 * 999 * 1000 / 2
    assert largest.item() == 999


def test_outputs_without_init_value_read_as_nan_where_unwritten():
    kernel = metal_kernel(
        "write_even",
        [],
        ["out"],
        "if (thread_position_in_grid.x % 2 == 0) out[thread_position_in_grid.x] = 1.0f;",
    )
    (out,) = run(kernel, [], (8, 1, 1), (8, 1, 1), [((8,), mx.float32)])
    np.testing.assert_array_equal(np.isnan(np.array(out)), [False, True] * 4)


# --- types and parameters --------------------------------------------------------

DTYPE_SOURCE = """
    uint i = thread_position_in_grid.x;
    converted[i] = static_cast<T>(wide[i]);
    T h = narrow[i];
    arithmetic[i] = h * h + h;
    widened[i] = h * 0.5f;
"""


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_template_dtypes_round_like_mlx(dtype):
    kernel = metal_kernel(
        "small_floats", ["wide", "narrow"], ["converted", "arithmetic", "widened"], DTYPE_SOURCE
    )
    mx.random.seed(3)
    specials = mx.array(
        [
            0.0,
            -0.0,
            1e-6,
            -3e-8,
            65504.0,
            65519.0,
            65520.0,
            7e4,
            3.4e38,
            float("inf"),
            -float("inf"),
            float("nan"),
            1.00048828125,
            1.0009765625,
            2.0**-24 * 1.5,
            2.0**-25,
        ]
    )
    wide = mx.concatenate([specials, mx.random.normal((240,)) * 300])
    narrow = (mx.random.normal((256,)) * 20).astype(dtype)
    outputs = [((256,), dtype), ((256,), dtype), ((256,), mx.float32)]
    converted, arithmetic, widened = run(
        kernel, [wide, narrow], (256, 1, 1), (64, 1, 1), outputs, template=[("T", dtype)]
    )

    assert mx.array_equal(converted, wide.astype(dtype), equal_nan=True).item()
    not_nan = ~np.isnan(np.array(wide))
    bits, expected_bits = (np.array(a.view(mx.uint16)) for a in (converted, wide.astype(dtype)))
    np.testing.assert_array_equal(bits[not_nan], expected_bits[not_nan])  # signed zeros too
    assert mx.array_equal(arithmetic, narrow * narrow + narrow).item()
    assert mx.array_equal(widened, narrow.astype(mx.float32) * 0.5).item()


def test_scalar_inputs_are_passed_by_constant_reference(capsys):
    source = "out[thread_position_in_grid.x] = flag ? x[thread_position_in_grid.x] * scale + offset : 0.0f;"
    kernel = metal_kernel("scalars", ["x", "scale", "offset", "flag"], ["out"], source)
    x = mx.arange(10).astype(mx.float32)
    (out,) = run(
        kernel,
        [x, 2.5, 3, mx.array(True)],
        (10, 1, 1),
        (16, 1, 1),
        [((10,), mx.float32)],
        verbose=True,
    )

    np.testing.assert_array_equal(np.array(out), np.arange(10) * 2.5 + 3)
    printed = capsys.readouterr().out
    assert "const device float* x [[buffer(0)]]" in printed
    assert "const constant float& scale [[buffer(1)]]" in printed
    assert "const constant int32_t& offset [[buffer(2)]]" in printed
    assert "const constant bool& flag [[buffer(3)]]" in printed
    assert "device float* out [[buffer(4)]]" in printed
    assert "uint3 thread_position_in_grid [[thread_position_in_grid]]" in printed
    assert "thread_index_in_simdgroup" not in printed and "_shape" not in printed


STRIDED_SOURCE = """
    uint elem = thread_position_in_grid.x;
    uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
    out[elem] = inp[loc];
    dims[elem] = inp_ndim * 100 + inp_shape[0] * 10 + inp_strides[1];
"""


@pytest.mark.parametrize("ensure_row_contiguous", [False, True])
def test_shape_strides_and_ndim_describe_the_input(ensure_row_contiguous, capsys):
    kernel = metal_kernel(
        "strided_copy",
        ["inp"],
        ["out", "dims"],
        STRIDED_SOURCE,
        ensure_row_contiguous=ensure_row_contiguous,
    )
    transposed = mx.arange(12).astype(mx.float32).reshape(3, 4).T  # shape (4, 3), strides (1, 4)
    out, dims = run(
        kernel,
        [transposed],
        (12, 1, 1),
        (32, 1, 1),
        [((4, 3), mx.float32), ((4, 3), mx.int32)],
        verbose=True,
    )

    np.testing.assert_array_equal(np.array(out), np.arange(12).reshape(3, 4).T)
    column_stride = 1 if ensure_row_contiguous else 4
    np.testing.assert_array_equal(np.array(dims), 2 * 100 + 4 * 10 + column_stride)
    printed = capsys.readouterr().out
    assert "const constant int* inp_shape [[buffer(1)]]" in printed
    assert "const constant int64_t* inp_strides [[buffer(2)]]" in printed
    assert "const constant int& inp_ndim [[buffer(3)]]" in printed


def test_vector_types_and_math():
    source = """
        uint i = thread_position_in_grid.x;
        float4 v = float4(inp[4 * i], inp[4 * i + 1], float2(inp[4 * i + 2], inp[4 * i + 3]));
        float4 w = metal::exp(v * 0.5f) + fast::tanh(v);
        out[i] = dot(v, w) + max(v.x, v.w) - metal::rsqrt(abs(v.z) + 1.0f) + fma(v.y, 2.0f, 1.0f);
    """
    kernel = metal_kernel("vectors", ["inp"], ["out"], source)
    mx.random.seed(4)
    inputs = mx.random.normal((64,))
    (out,) = run(kernel, [inputs], (16, 1, 1), (16, 1, 1), [((16,), mx.float32)])

    v = np.array(inputs, np.float64).reshape(16, 4)
    w = np.exp(v * 0.5) + np.tanh(v)
    expected = (
        (v * w).sum(1)
        + np.maximum(v[:, 0], v[:, 3])
        - 1 / np.sqrt(np.abs(v[:, 2]) + 1)
        + v[:, 1] * 2
        + 1
    )
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)


def test_a_hundred_thousand_threads_with_barriers_reuse_the_compiled_kernel(monkeypatch):
    source = """
        threadgroup float partial[8];
        float v = inp[thread_position_in_grid.x];
        float s = simd_sum(v);
        if (thread_index_in_simdgroup == 0) partial[simdgroup_index_in_threadgroup] = s;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float total = 0.0f;
        for (uint g = 0; g < simdgroups_per_threadgroup; ++g) total += partial[g];
        out[thread_position_in_grid.x] = total;
    """
    kernel = metal_kernel("block_sums", ["inp"], ["out"], source)
    inputs = mx.ones((100_000,))
    run(kernel, [inputs], (100_000, 1, 1), (256, 1, 1), [((100_000,), mx.float32)])  # compiles

    # A second launch runs the loaded library: no compiling, not even a look at the disk cache.
    monkeypatch.setattr(emulator, "_shared_library", lambda *args: pytest.fail("recompiled"))
    (out,) = run(kernel, [inputs], (100_000, 1, 1), (256, 1, 1), [((100_000,), mx.float32)])

    expected = np.full(100_000, 256.0)
    expected[-(100_000 % 256) :] = 100_000 % 256
    np.testing.assert_array_equal(np.array(out), expected)


# --- rejections ------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, feature",
    [
        ("imageblock<float> block;", "imageblocks"),
        ("texture2d<float> t;", "textures"),
        ("half y = 1.5h;", "half literals"),
    ],
)
def test_unsupported_kernel_features_are_named(source, feature):
    with pytest.raises(UnsupportedMetalFeature, match=feature):
        metal_kernel("unsupported", ["x"], ["out"], source)


def test_unsupported_launches_are_rejected():
    kernel = metal_kernel(
        "copy", ["x"], ["out"], "out[thread_position_in_grid.x] = x[thread_position_in_grid.x];"
    )
    x = mx.zeros((4,))
    output = [((4,), mx.float32)]
    with pytest.raises(UnsupportedMetalFeature, match="dtype"):
        run(kernel, [x.astype(mx.complex64)], (4, 1, 1), (4, 1, 1), output)
    with pytest.raises(UnsupportedMetalFeature, match="dtype"):
        run(kernel, [x], (4, 1, 1), (4, 1, 1), [((4,), mx.float64)])
    with pytest.raises(UnsupportedMetalFeature, match=r"Thread group size \(2048\)"):
        run(kernel, [x], (4, 1, 1), (1024, 2, 1), output)
    with pytest.raises(UnsupportedMetalFeature, match="grid must be three positive sizes"):
        run(kernel, [x], (4, 1), (4, 1, 1), output)
    with pytest.raises(UnsupportedMetalFeature, match="threadgroup must be three positive sizes"):
        run(kernel, [x], (4, 1, 1), (0, 1, 1), output)
    with pytest.raises(ValueError, match="Expected `inputs` to have size 1"):
        run(kernel, [x, x], (4, 1, 1), (4, 1, 1), output)
    with pytest.raises(UnsupportedMetalFeature, match="template argument 'N'"):
        run(kernel, [x], (4, 1, 1), (4, 1, 1), output, template=[("N", 1.5)])


def test_compile_errors_carry_the_compiler_message():
    kernel = metal_kernel("broken", [], ["out"], "out[0] = undefined_name;")
    with pytest.raises(MetalKernelCompileError, match="undefined_name"):
        run(kernel, [], (1, 1, 1), (1, 1, 1), [((1,), mx.float32)])


def test_compiled_kernels_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(emulator, "_launchers", {})
    source = "out[thread_position_in_grid.x] = 2.0f * x[thread_position_in_grid.x] + 0.25f;"

    def launch():
        kernel = metal_kernel("cached", ["x"], ["out"], source)
        return run(
            kernel, [mx.arange(3).astype(mx.float32)], (3, 1, 1), (3, 1, 1), [((3,), mx.float32)]
        )[0]

    launch()
    cache = tmp_path / "mlx_fm" / "metal_emulator"
    assert [path.suffix for path in cache.iterdir()] == [".so"]  # no build leftovers

    # A new process (here: an empty in-memory table) loads it without g++.
    monkeypatch.setattr(emulator, "_launchers", {})
    monkeypatch.setattr(
        emulator.subprocess, "run", lambda *args, **kwargs: pytest.fail("recompiled")
    )
    np.testing.assert_array_equal(np.array(launch()), [0.25, 2.25, 4.25])
