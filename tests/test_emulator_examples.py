"""The emulator (mlx_fm.testing.metal_kernel) on kernels written by others:
MLX's documented custom-kernel examples (docs/src/dev/custom_metal_kernels.rst
in ml-explore/mlx), every custom kernel mlx-lm ships, and MLX's prelude
(mlx/backend/metal/kernels/utils.h), which MLX puts before each kernel."""

import importlib
import importlib.util
import re
import sys
from pathlib import Path

from mlx_fm.testing import metal_kernel as emulator
from mlx_fm.testing.metal_kernel import MetalKernelError, metal_kernel
from mlx_fm.testing.metal_language import check_metal_language

import mlx.core as mx
import mlx_lm
import mlx_lm.utils
import numpy as np
import pytest

# --- MLX's documented examples -------------------------------------------------

EXP_SOURCE = """
    uint elem = thread_position_in_grid.x;
    T tmp = inp[elem];
    out[elem] = metal::exp(tmp);
"""
EXP_STRIDED_SOURCE = """
    uint elem = thread_position_in_grid.x;
    // Utils from `mlx/backend/metal/kernels/utils.h` are automatically included
    uint loc = elem_to_loc(elem, inp_shape, inp_strides, inp_ndim);
    T tmp = inp[loc];
    // Output arrays are always row contiguous
    out[elem] = metal::exp(tmp);
"""


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "strided"])
def test_mlx_docs_exp_elementwise(strided):
    kernel = metal_kernel(
        name="myexp_strided" if strided else "myexp",
        input_names=["inp"],
        output_names=["out"],
        source=EXP_STRIDED_SOURCE if strided else EXP_SOURCE,
        ensure_row_contiguous=not strided,
    )
    mx.random.seed(0)
    a = mx.random.normal(shape=(4, 16)).astype(mx.float16)
    if strided:
        a = a[::2]
    (b,) = kernel(
        inputs=[a],
        template=[("T", mx.float32)],
        grid=(a.size, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[a.shape],
        output_dtypes=[a.dtype],
    )
    assert mx.allclose(b, mx.exp(a)).item()


GRID_SAMPLE_SOURCE = """
    uint elem = thread_position_in_grid.x;
    int H = x_shape[1];
    int W = x_shape[2];
    int C = x_shape[3];
    int gH = grid_shape[1];
    int gW = grid_shape[2];

    int w_stride = C;
    int h_stride = W * w_stride;
    int b_stride = H * h_stride;

    uint grid_idx = elem / C * 2;
    float ix = ((grid[grid_idx] + 1) * W - 1) / 2;
    float iy = ((grid[grid_idx + 1] + 1) * H - 1) / 2;

    int ix_nw = floor(ix);
    int iy_nw = floor(iy);

    int ix_ne = ix_nw + 1;
    int iy_ne = iy_nw;

    int ix_sw = ix_nw;
    int iy_sw = iy_nw + 1;

    int ix_se = ix_nw + 1;
    int iy_se = iy_nw + 1;

    T nw = (ix_se - ix)    * (iy_se - iy);
    T ne = (ix    - ix_sw) * (iy_sw - iy);
    T sw = (ix_ne - ix)    * (iy    - iy_ne);
    T se = (ix    - ix_nw) * (iy    - iy_nw);

    int batch_idx = elem / C / gH / gW * b_stride;
    int channel_idx = elem % C;
    int base_idx = batch_idx + channel_idx;

    T I_nw = x[base_idx + iy_nw * h_stride + ix_nw * w_stride];
    T I_ne = x[base_idx + iy_ne * h_stride + ix_ne * w_stride];
    T I_sw = x[base_idx + iy_sw * h_stride + ix_sw * w_stride];
    T I_se = x[base_idx + iy_se * h_stride + ix_se * w_stride];

    I_nw = iy_nw >= 0 && iy_nw <= H - 1 && ix_nw >= 0 && ix_nw <= W - 1 ? I_nw : 0;
    I_ne = iy_ne >= 0 && iy_ne <= H - 1 && ix_ne >= 0 && ix_ne <= W - 1 ? I_ne : 0;
    I_sw = iy_sw >= 0 && iy_sw <= H - 1 && ix_sw >= 0 && ix_sw <= W - 1 ? I_sw : 0;
    I_se = iy_se >= 0 && iy_se <= H - 1 && ix_se >= 0 && ix_se <= W - 1 ? I_se : 0;

    out[elem] = nw * I_nw + ne * I_ne + sw * I_sw + se * I_se;
"""
GRID_SAMPLE_VJP_SOURCE = """
    uint elem = thread_position_in_grid.x;
    int H = x_shape[1];
    int W = x_shape[2];
    int C = x_shape[3];
    // Pad C to the nearest larger simdgroup size multiple
    int C_padded = ceildiv(C, threads_per_simdgroup) * threads_per_simdgroup;

    int gH = grid_shape[1];
    int gW = grid_shape[2];

    int w_stride = C;
    int h_stride = W * w_stride;
    int b_stride = H * h_stride;

    uint grid_idx = elem / C_padded * 2;
    float ix = ((grid[grid_idx] + 1) * W - 1) / 2;
    float iy = ((grid[grid_idx + 1] + 1) * H - 1) / 2;

    int ix_nw = floor(ix);
    int iy_nw = floor(iy);

    int ix_ne = ix_nw + 1;
    int iy_ne = iy_nw;

    int ix_sw = ix_nw;
    int iy_sw = iy_nw + 1;

    int ix_se = ix_nw + 1;
    int iy_se = iy_nw + 1;

    T nw = (ix_se - ix)    * (iy_se - iy);
    T ne = (ix    - ix_sw) * (iy_sw - iy);
    T sw = (ix_ne - ix)    * (iy    - iy_ne);
    T se = (ix    - ix_nw) * (iy    - iy_nw);

    int batch_idx = elem / C_padded / gH / gW * b_stride;
    int channel_idx = elem % C_padded;
    int base_idx = batch_idx + channel_idx;

    T gix = T(0);
    T giy = T(0);
    if (channel_idx < C) {
        int cot_index = elem / C_padded * C + channel_idx;
        T cot = cotangent[cot_index];
        if (iy_nw >= 0 && iy_nw <= H - 1 && ix_nw >= 0 && ix_nw <= W - 1) {
            int offset = base_idx + iy_nw * h_stride + ix_nw * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], nw * cot, memory_order_relaxed);

            T I_nw = x[offset];
            gix -= I_nw * (iy_se - iy) * cot;
            giy -= I_nw * (ix_se - ix) * cot;
        }
        if (iy_ne >= 0 && iy_ne <= H - 1 && ix_ne >= 0 && ix_ne <= W - 1) {
            int offset = base_idx + iy_ne * h_stride + ix_ne * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], ne * cot, memory_order_relaxed);

            T I_ne = x[offset];
            gix += I_ne * (iy_sw - iy) * cot;
            giy -= I_ne * (ix - ix_sw) * cot;
        }
        if (iy_sw >= 0 && iy_sw <= H - 1 && ix_sw >= 0 && ix_sw <= W - 1) {
            int offset = base_idx + iy_sw * h_stride + ix_sw * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], sw * cot, memory_order_relaxed);

            T I_sw = x[offset];
            gix -= I_sw * (iy - iy_ne) * cot;
            giy += I_sw * (ix_ne - ix) * cot;
        }
        if (iy_se >= 0 && iy_se <= H - 1 && ix_se >= 0 && ix_se <= W - 1) {
            int offset = base_idx + iy_se * h_stride + ix_se * w_stride;
            atomic_fetch_add_explicit(&x_grad[offset], se * cot, memory_order_relaxed);

            T I_se = x[offset];
            gix += I_se * (iy - iy_nw) * cot;
            giy += I_se * (ix - ix_nw) * cot;
        }
    }

    T gix_mult = W / 2;
    T giy_mult = H / 2;

    // Reduce across each simdgroup first.
    // This is much faster than relying purely on atomics.
    gix = simd_sum(gix);
    giy = simd_sum(giy);

    if (thread_index_in_simdgroup == 0) {
        atomic_fetch_add_explicit(&grid_grad[grid_idx], gix * gix_mult, memory_order_relaxed);
        atomic_fetch_add_explicit(&grid_grad[grid_idx + 1], giy * giy_mult, memory_order_relaxed);
    }
"""


def grid_sample_reference(x, grid):
    """MLX's grid_sample_ref from the docs, with indices clipped before the
    gathers (their values are masked out) so that none is out of range."""
    N, H_in, W_in, _ = x.shape
    ix = ((grid[..., 0] + 1) * W_in - 1) / 2
    iy = ((grid[..., 1] + 1) * H_in - 1) / 2
    ix_nw = mx.stop_gradient(mx.floor(ix)).astype(mx.int32)
    iy_nw = mx.stop_gradient(mx.floor(iy)).astype(mx.int32)
    corners = {
        "nw": (ix_nw, iy_nw, (ix_nw + 1 - ix) * (iy_nw + 1 - iy)),
        "ne": (ix_nw + 1, iy_nw, (ix - ix_nw) * (iy_nw + 1 - iy)),
        "sw": (ix_nw, iy_nw + 1, (ix_nw + 1 - ix) * (iy - iy_nw)),
        "se": (ix_nw + 1, iy_nw + 1, (ix - ix_nw) * (iy - iy_nw)),
    }
    output = 0
    for column, row, weight in corners.values():
        inside = (row >= 0) & (row <= H_in - 1) & (column >= 0) & (column <= W_in - 1)
        rows, columns = mx.clip(row, 0, H_in - 1), mx.clip(column, 0, W_in - 1)
        values = x[mx.arange(N)[:, None, None], rows, columns, :] * inside[..., None]
        output = output + weight[..., None] * values
    return output


def grid_sample_inputs(grid_range):
    mx.random.seed(5)
    x = mx.random.normal((2, 6, 8, 5))
    grid = mx.random.uniform(-grid_range, grid_range, (2, 3, 4, 2))
    return x, grid


def grid_sample_forward(x, grid):
    kernel = metal_kernel(
        name="grid_sample",
        input_names=["x", "grid"],
        output_names=["out"],
        source=GRID_SAMPLE_SOURCE,
    )
    out_shape = (x.shape[0], grid.shape[1], grid.shape[2], x.shape[3])
    (out,) = kernel(
        inputs=[x, grid],
        template=[("T", x.dtype)],
        output_shapes=[out_shape],
        output_dtypes=[x.dtype],
        grid=(int(np.prod(out_shape)), 1, 1),
        threadgroup=(256, 1, 1),
    )
    return out


def test_mlx_docs_grid_sample_forward_matches_the_ops_reference():
    # Inside the image's centres, where the kernel reads only within x.
    x, grid = grid_sample_inputs(grid_range=0.7)
    np.testing.assert_allclose(
        np.array(grid_sample_forward(x, grid)),
        np.array(grid_sample_reference(x, grid)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_mlx_docs_grid_sample_forward_reads_outside_x_at_the_border():
    # The documented kernel loads all four corners before masking them: at
    # the first pixel's corner, that is x[-C - 1], before the buffer.
    x, grid = grid_sample_inputs(grid_range=0.7)
    grid = mx.concatenate([mx.full((1, 3, 4, 2), -1.0), grid[1:]])
    with pytest.raises(MetalKernelError, match="access before the start of `x`"):
        grid_sample_forward(x, grid)


def test_mlx_docs_grid_sample_vjp_matches_the_gradient_of_the_ops_reference():
    x, grid = grid_sample_inputs(grid_range=1.0)  # corners outside the image too
    kernel = metal_kernel(
        name="grid_sample_grad",
        input_names=["x", "grid", "cotangent"],
        output_names=["x_grad", "grid_grad"],
        source=GRID_SAMPLE_VJP_SOURCE,
        atomic_outputs=True,
    )
    cotangent = mx.random.normal((2, 3, 4, 5))
    B, _, _, C = x.shape
    _, gN, gM, _ = grid.shape
    simdgroup_size = 32
    C_padded = (C + simdgroup_size - 1) // simdgroup_size * simdgroup_size
    x_grad, grid_grad = kernel(
        inputs=[x, grid, cotangent],
        template=[("T", x.dtype)],
        output_shapes=[x.shape, grid.shape],
        output_dtypes=[x.dtype, x.dtype],
        grid=(B * gN * gM * C_padded, 1, 1),
        threadgroup=(256, 1, 1),
        init_value=0,
    )

    _, (x_grad_ref, grid_grad_ref) = mx.vjp(
        lambda x, grid: grid_sample_reference(x, grid), [x, grid], [cotangent]
    )
    np.testing.assert_allclose(np.array(x_grad), np.array(x_grad_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.array(grid_grad), np.array(grid_grad_ref), rtol=1e-4, atol=1e-4)


# --- mlx-lm's kernels --------------------------------------------------------------


def mlx_lm_kernels():
    """Every kernel mlx-lm builds with mx.fast.metal_kernel, as the keyword
    arguments it passes, with the template parameter names its module uses:
    each module that builds one is run again, as a copy, with Metal reported
    available and mx.fast.metal_kernel recording its arguments."""
    root = Path(mlx_lm.__file__).parent
    paths = [
        path for path in sorted(root.rglob("*.py")) if "mx.fast.metal_kernel" in path.read_text()
    ]
    for path in paths:  # imported as usual first, so that the copies import them as they are
        importlib.import_module(module_name(root, path))
    kernels = []

    def record(name, input_names, output_names, source, header="", **options):
        kernels.append(
            dict(name=name, inputs=input_names, outputs=output_names, source=source, header=header)
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mx.fast, "metal_kernel", record)
        patch.setattr(mx.metal, "is_available", lambda: True)
        patch.setattr(mlx_lm.utils, "can_run_metal", lambda: True)
        for path in paths:
            first = len(kernels)
            run_module_copy(module_name(root, path), path)
            templates = set(re.findall(r"\(\s*\"(\w+)\"\s*,", path.read_text()))
            for kernel in kernels[first:]:
                kernel["templates"] = templates
    return kernels


def module_name(root, path):
    return ".".join(path.relative_to(root.parent).with_suffix("").parts)


def run_module_copy(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    original = sys.modules[name]
    sys.modules[name] = module  # for its dataclasses and relative imports
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules[name] = original


def test_every_mlx_lm_kernel_is_metal_to_the_language_check():
    kernels = mlx_lm_kernels()
    names = {kernel["name"] for kernel in kernels}
    assert {"ssm_kernel", "gated_delta_step", "wkv7_kernel", "qk_norm", "kl_forward"} <= names
    for kernel in kernels:
        parameters = [
            f"{name}{suffix}"
            for name in kernel["inputs"]
            for suffix in ("", "_shape", "_strides", "_ndim")
        ]
        attributes = [attribute for attribute, _ in emulator._METAL_ATTRIBUTES]
        known = [*kernel["templates"], *parameters, *kernel["outputs"], *attributes]
        check_metal_language(kernel["name"], kernel["header"], kernel["source"], known)


# --- MLX's prelude -------------------------------------------------------------------

PRELUDE_SOURCE = """
    uint i = thread_position_in_grid.x;
    uint lane = thread_index_in_simdgroup;
    // Offsets of element (row, column) = (i / 4 % 3, i % 4) of a through its strides.
    uint3 position = uint3(i % 4, (i / 4) % 3, 0);
    vec<int64_t, 2> both = elem_to_loc_2_nd(position, a_shape, a_strides, a_strides, a_ndim);
    vec<int64_t, 3> all3 =
        elem_to_loc_3_nd(position, a_shape, a_strides, a_strides, a_strides, a_ndim);
    int64_t loc = elem_to_loc(position, a_shape, a_strides, a_ndim);
    int64_t loc2 = elem_to_loc_2(uint2(position.x, position.y), a_strides);
    int64_t loc1 = elem_to_loc_1(i, a_strides[1]);
    offsets[i] = float(loc * 1000 + both.y * 100 + all3.z * 10 + loc2) + float(loc1) * 0.5f;
    LoopedElemToLoc<2, int64_t> looper(a_ndim);
    for (uint k = 0; k < i % 12; ++k) looper.next(a_shape, a_strides);
    looped[i] = float(looper.location());

    float limit_values[7] = {
        Limits<float>::max, Limits<half>::finite_max, float(Limits<int>::min),
        float(Limits<bool>::max), Limits<bfloat16_t>::finite_min, Limits<float>::min,
        float(Limits<uint8_t>::max)};
    limits[i] = limit_values[i % 7];

    complex64_t z = complex64_t(1.0f, 2.0f) * complex64_t(3.0f, -1.0f) + 1.0f;  // 6 + 5i
    complex64_t q = z / complex64_t(0.0f, 1.0f);  // 5 - 6i
    complexes[i] = z.real * 10 + z.imag + q.real * 100 - q.imag * 1000;

    uint64_t wide = (uint64_t(lane) << 40) | 7;
    bool odd = simd_shuffle(bool(lane & 1), 3);
    complex64_t next = simd_shuffle_down(complex64_t(float(lane), -float(lane)), 1);
    shuffled[i] = float(simd_shuffle_down(wide, 1) >> 40) + float(odd) * 100
                  + (next.real - next.imag) * 1000;

    logs[i] = log1p(1e-7f) * 1e7f + hypot(3.0f, 4.0f) * 10 + float(log1p(bfloat16_t(1.0f))) * 100;

    ConditionalType<true, float, int>::type kept = 0.25f;
    counts[i] = float(ceildiv(int(i) + 1, 4) + WorkPerThread<half>::n) + kept
                + float(cast_to<bool>(-0.0f)) + float(cast_to<bool>(2.0f)) * 10
                + float(bfloat16_to_uint16(uint16_to_bfloat16(0x3f80)));
"""
PRELUDE_OUTPUTS = ["offsets", "looped", "limits", "complexes", "shuffled", "logs", "counts"]


def test_mlx_prelude_helpers_compute_what_mlx_defines():
    kernel = metal_kernel(
        "prelude", ["a"], PRELUDE_OUTPUTS, PRELUDE_SOURCE, ensure_row_contiguous=False
    )
    a = mx.arange(12).astype(mx.float32).reshape(4, 3).T  # (3, 4), strides (1, 3)
    threads = 32
    outputs = kernel(
        inputs=[a],
        grid=(threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(threads,)] * len(PRELUDE_OUTPUTS),
        output_dtypes=[mx.float32] * len(PRELUDE_OUTPUTS),
    )
    result = dict(zip(PRELUDE_OUTPUTS, map(np.array, outputs)))

    i = np.arange(threads)
    row, column = (i // 4) % 3, i % 4
    np.testing.assert_array_equal(result["offsets"], (row + column * 3) * 1111 + i * 1.5)
    flat = i % 12
    np.testing.assert_array_equal(result["looped"], flat // 4 + (flat % 4) * 3)
    bfloat_max = float(mx.finfo(mx.bfloat16).max)
    limits = [np.inf, 65504.0, -(2.0**31), 1.0, -bfloat_max, -np.inf, 255.0]
    np.testing.assert_array_equal(result["limits"], np.float32(limits)[i % 7])
    np.testing.assert_array_equal(result["complexes"], 6565.0)
    below = np.where(i < 31, i + 1, i)  # the last lane keeps its own value
    np.testing.assert_array_equal(result["shuffled"], below + 100 + below * 2000)
    bfloat_log2 = float(mx.array(np.log(2.0)).astype(mx.bfloat16).item())
    np.testing.assert_allclose(result["logs"], 1 + 50 + bfloat_log2 * 100, rtol=1e-5)
    np.testing.assert_array_equal(result["counts"], np.ceil((i + 1) / 4) + 4 + 0.25 + 10 + 0x3F80)
