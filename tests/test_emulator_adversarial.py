"""Adversarial kernels for the Metal emulator (mlx_fm.testing.metal_kernel):
each breaks a rule of Metal, or is legal Metal the emulator must run as a GPU
does. A case is `flagged` (an error naming the rule), `exposed` (the
schedules disagree: ScheduleDependentResult), or `runs` (the expected output)."""

import re
from dataclasses import dataclass, field

from mlx_fm.testing.metal_kernel import (
    MetalKernelCompileError,
    MetalKernelError,
    MetalLanguageError,
    ScheduleDependentResult,
    UnsupportedMetalFeature,
    metal_kernel,
)

import mlx.core as mx
import numpy as np
import pytest

THREADS = 64


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    outcome: str  # "flagged", "exposed" or "runs"
    match: str = ""  # for flagged: a regular expression the error must match
    expected: list[float] | None = None  # for runs: the first elements of `out`
    header: str = ""
    threads: int = THREADS
    threadgroup: int = THREADS
    input_size: int = THREADS
    output_size: int = THREADS
    options: dict = field(default_factory=dict)  # launch options, as init_value or template


CASES = [
    # --- schedules: races a lucky order hides --------------------------------------
    Case(
        "missing barrier, the last thread reads",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        shared[i] = x[i];
        out[i] = shared[(i + 63) % 64];""",
        "exposed",
    ),
    Case(
        "missing barrier, the first thread reads",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        shared[i] = x[i];
        out[i] = shared[(i + 1) % 64];""",
        "exposed",
    ),
    Case(
        "threadgroup reads another threadgroup's device writes",
        """uint i = thread_position_in_grid.x;
        out[i] = x[i];
        if (i >= 32) { out[i] += out[i - 32]; }""",
        "exposed",
        threadgroup=32,
    ),
    Case(
        "non-atomic += from every thread",
        """out[0] += x[thread_position_in_grid.x];""",
        "exposed",
        output_size=1,
        options={"init_value": 0.0},
    ),
    Case(
        "simdgroup_barrier where a threadgroup exchange needs threadgroup_barrier",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        shared[i] = x[i];
        simdgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = shared[63 - i];""",
        "exposed",
    ),
    # --- barrier discipline ----------------------------------------------------------
    Case(
        "barrier after an early return",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        if (i >= 48) { return; }
        shared[i] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = shared[47 - i];""",
        "flagged",
        match=r"returned without reaching it",
    ),
    Case(
        "barriers in both branches of a divergent if",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        shared[i] = x[i];
        if (i % 2 == 0) {
          threadgroup_barrier(mem_flags::mem_threadgroup);
          out[i] = shared[i + 1];
        } else {
          threadgroup_barrier(mem_flags::mem_threadgroup);
          out[i] = shared[i - 1];
        }""",
        "flagged",
        match=r"divergent threadgroup_barrier.*:source:5.*:source:8",
    ),
    Case(
        "barrier in a loop with a thread-dependent trip count",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        float total = 0.0f;
        for (uint step = 0; step < i % 3; ++step) {
          shared[i] = x[i] + total;
          threadgroup_barrier(mem_flags::mem_threadgroup);
          total += shared[(i + 1) % 64];
        }
        out[i] = total;""",
        "flagged",
        match=r"threadgroup_barrier at .*:source:6",
    ),
    Case(
        "mem_none barrier in a templated kernel",
        """threadgroup float shared[M];
        uint i = thread_position_in_grid.x;
        shared[i] = x[i];
        threadgroup_barrier(mem_flags::mem_none);
        out[i] = shared[M - 1 - i];""",
        "flagged",
        match=r"without mem_flags::mem_threadgroup",
        options={"template": [("M", 64)]},
    ),
    Case(
        "64 KB of threadgroup memory in a templated kernel",
        """threadgroup float big[M];
        uint i = thread_position_in_grid.x;
        big[i] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = big[i];""",
        "flagged",
        match=r"65536 bytes of threadgroup memory; Metal allows 32768",
        options={"template": [("M", 16384)]},
    ),
    Case(
        "mem_none barrier for a threadgroup exchange",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        shared[i] = x[i];
        threadgroup_barrier(mem_flags::mem_none);
        out[i] = shared[63 - i];""",
        "flagged",
        match=r"without mem_flags::mem_threadgroup",
    ),
    # --- memory -------------------------------------------------------------------------
    Case(
        "device read one past the end",
        """uint i = thread_position_in_grid.x;
        out[i] = x[i + 1];""",
        "flagged",
        match=r"past the end of `x` \(64 elements, at element 64\)",
    ),
    Case(
        "device read far past the end",
        """uint i = thread_position_in_grid.x;
        out[i] = x[i + 2048];""",
        "flagged",
        match=r"past the end of `x`",
    ),
    Case(
        "device read one before the start",
        """int i = int(thread_position_in_grid.x);
        out[i] = x[i - 1];""",
        "flagged",
        match=r"access before the start of `x` \(64 elements, at element -1\)",
    ),
    Case(
        "device write one before the start",
        """int i = int(thread_position_in_grid.x);
        out[i - 1] = x[i];""",
        "flagged",
        match=r"wrote before the start of output `out`",
    ),
    Case(
        "device read 1 MB past the end",
        """uint i = thread_position_in_grid.x;
        out[i] = x[i + 262144];""",
        "flagged",
        match=r"access past the end of `x` \(64 elements, at element 262144\)",
    ),
    Case(
        "device write 100 MB past the end",
        """uint i = thread_position_in_grid.x;
        out[i + 26214400] = x[i];""",
        "flagged",
        match=r"write past the end of `out` \(64 elements, at element 26214400\)",
    ),
    Case(
        "device read through a negative index 16 MB before the start",
        """int i = int(thread_position_in_grid.x);
        out[i] = x[i - 4000000];""",
        "flagged",
        match=r"access before the start of `x` \(64 elements, at element -4000000\)",
    ),
    Case(
        "device write one past the end",
        """uint i = thread_position_in_grid.x;
        out[i + 1] = x[i];""",
        "flagged",
        match=r"write past the end of `out`",
    ),
    Case(
        "write to an input",
        """uint i = thread_position_in_grid.x;
        const_cast<device float*>(x)[i] = 0.0f;
        out[i] = 1.0f;""",
        "flagged",
        match=r"write to the input `x`",
    ),
    Case(
        "private array indexed past its end",
        """float values[4];
        uint i = thread_position_in_grid.x;
        for (uint j = 0; j <= 4; ++j) { values[j] = x[i] * j; }
        out[i] = values[i % 4];""",
        "flagged",
        match=r"index 4 out of bounds for type 'float \[4\]' at \S+:source:3",
    ),
    Case(
        "threadgroup array indexed past its end",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        shared[i + 1] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = shared[i];""",
        "flagged",
        match=r"index 64 out of bounds for type 'float \[64\]'",
    ),
    Case(
        "uninitialised threadgroup memory is poisoned",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        if (i > 0) { shared[i] = x[i]; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = shared[0];""",
        "runs",
        expected=[float("nan")],
    ),
    # --- limits ----------------------------------------------------------------------------
    Case(
        "64 KB of threadgroup memory",
        """threadgroup float big[16384];
        uint i = thread_position_in_grid.x;
        big[i] = x[i];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = big[i];""",
        "flagged",
        match=r"65536 bytes of threadgroup memory; Metal allows 32768",
    ),
    Case(
        "threadgroup above the pipeline limit",
        """out[thread_position_in_grid.x] = 1.0f;""",
        "flagged",
        match=r"greater than the maximum allowed threads per threadgroup \(896\)",
        threads=1024,
        threadgroup=1024,
        output_size=1024,
    ),
    # --- not Metal ---------------------------------------------------------------------------
    *[
        Case(f"not Metal: {label}", body, "flagged", match=rule)
        for label, body, rule in [
            ("erf", "out[0] = erf(x[0]);", "not a function of the Metal standard library"),
            ("expm1", "out[0] = expm1(x[0]);", "not a function of the Metal standard library"),
            ("lgamma", "out[0] = lgamma(x[0]);", "not a function of the Metal standard library"),
            ("expf", "out[0] = expf(x[0]);", "suffixed math functions"),
            ("std::exp", "out[0] = std::exp(x[0]);", r"std::"),
            ("printf", 'printf("%f", x[0]);', "C library functions"),
            ("strlen", 'out[0] = float(strlen("abc"));', "C library functions"),
            ("erfc", "out[0] = erfc(x[0]);", "not a function of the Metal standard library"),
            ("cbrt", "out[0] = cbrt(x[0]);", "not a function of the Metal standard library"),
            ("std::min", "out[0] = std::min(x[0], x[1]);", r"std::"),
            *[
                (label, body, rf"source:1: neither defined in the kernel .*: `{re.escape(name)}`")
                for label, body, name in [
                    ("atof", 'out[0] = atof("1.5");', "atof"),
                    ("an unknown function", "out[0] = frobnicate(x[0]);", "frobnicate"),
                    (
                        "a g++ builtin",
                        "out[0] = float(__builtin_popcount(7u));",
                        "__builtin_popcount",
                    ),
                    ("metal:: of a function Metal lacks", "out[0] = metal::sinc(x[0]);", "sinc"),
                    ("a C type", "int_fast32_t n = 3; out[0] = float(n);", "int_fast32_t"),
                    ("a C++ template", "out[0] = bit_cast<float>(0x3f800000u);", "bit_cast"),
                ]
            ],
            ("double", "double y = x[0]; out[0] = float(y * 2);", "no double"),
            ("malloc", "float* p = (float*)malloc(4); out[0] = p[0];", "address space|C library"),
            ("static local", "static float cache = 0.0f; out[0] = cache;", "static local"),
            ("new", "out[0] = *(new float(1.0f));", "C\\+\\+ feature"),
            ("goto", "goto end; end: out[0] = 1.0f;", "C\\+\\+ feature"),
            ("unqualified pointer", "float* p = out; p[0] = 1.0f;", "address space"),
            (
                "threadgroup variable with an initializer",
                "threadgroup float shared[2] = {1.0f, 2.0f}; out[0] = shared[0];",
                "cannot have initializers",
            ),
        ]
    ],
    Case(
        "not Metal: recursion",
        "out[thread_position_in_grid.x] = factorial(3);",
        "flagged",
        match="recursion",
        header="float factorial(int n) { return n <= 1 ? 1.0f : n * factorial(n - 1); }\n",
    ),
    Case(
        "not Metal: variable-length array",
        """int n = int(x_shape[0]); float values[n]; values[0] = 1.0f; out[0] = values[0];""",
        "flagged",
        match="vla|variable length",
    ),
    Case(
        "not Metal: atomic<half>",
        """threadgroup atomic<half> total; out[0] = 1.0f;""",
        "flagged",
        match="Metal atomics hold",
    ),
    Case(
        "not Metal: 64-bit simd_sum",
        """out[thread_position_in_grid.x] = float(simd_sum(long(thread_position_in_grid.x)));""",
        "flagged",
        match="SIMD-group reductions take",
    ),
    # --- Metal semantics ------------------------------------------------------------------------
    Case(
        "Metal functions beyond C's: math, integer, geometric",
        """int exponent;
        float mantissa = frexp(8.0f, exponent);
        float whole, cosine;
        float fraction = modf(2.75f, whole);
        float sine = sincos(0.0f, cosine);
        out[0] = acosh(1.0f) + sinpi(0.5f) + cospi(1.0f);
        out[1] = fdim(5.0f, 3.0f) + fmax3(1.0f, 7.0f, 3.0f) + median3(4, 9, 6);
        out[2] = smoothstep(0.0f, 2.0f, 1.0f) + ldexp(1.5f, 3) + mantissa * exponent;
        out[3] = float(mulhi(0x80000000u, 4u)) + float(popcount(255)) + float(clz(ushort(1)));
        out[4] = float(absdiff(3, 10)) + float(addsat(ushort(65535), ushort(9)));
        out[5] = float(extract_bits(0xF0, 4u, 4u)) + float(rotate(uchar(0x81), uchar(1)));
        out[6] = float(reverse_bits(1u)) + float(insert_bits(0u, 5u, 4u, 3u));
        out[7] = length(float3(3.0f, 4.0f, 12.0f)) + cross(float3(1, 0, 0), float3(0, 1, 0)).z;
        out[8] = float(nextafter(half(1.0f), half(2.0f))) + fraction + whole + sine + cosine;""",
        "runs",
        expected=[
            0.0,
            15.0,
            14.5,
            2 + 8 + 15,
            7 + 65535,
            -1 + 3,
            2**31 + 80,
            14,
            1.0009765625 + 3.75,
        ],
        output_size=9,
        threads=1,
        threadgroup=1,
    ),
    Case(
        "simd_shuffle_and_fill_down reads the filling past the SIMD group's end",
        """uint lane = thread_index_in_simdgroup;
        out[lane] = simd_shuffle_and_fill_down(float(lane), 100.0f + lane, 2);
        out[32 + lane] = simd_shuffle_and_fill_up(float(lane), 100.0f + lane, 1, 8);""",
        "runs",
        expected=[
            *range(2, 32),
            100,
            101,
            *[107 + lane if lane % 8 == 0 else lane - 1 for lane in range(32)],
        ],
        output_size=64,
        threads=32,
        threadgroup=32,
    ),
    Case(
        "max and min ignore a NaN argument",
        """out[0] = max(NAN, 1.0f); out[1] = min(2.0f, NAN); out[2] = clamp(NAN, 3.0f, 4.0f);""",
        "runs",
        expected=[1.0, 2.0, 3.0],
        output_size=3,
        threads=1,
        threadgroup=1,
    ),
    Case(
        "simd_sum in divergent branches reduces the active lanes",
        """uint lane = thread_index_in_simdgroup;
        float result;
        if (lane < 8) { result = simd_sum(1.0f); } else { result = simd_sum(2.0f); }
        out[thread_position_in_grid.x] = result;""",
        "runs",
        expected=[8.0] * 8 + [48.0] * 24,
    ),
    Case(
        "simd_sum in a branch, then a barrier",
        """threadgroup float shared[64];
        uint i = thread_position_in_grid.x;
        float value = x[i];
        if (thread_index_in_simdgroup < 4) { value = simd_sum(value); }
        shared[i] = value;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[i] = shared[i % 4 == 0 ? i : i - i % 4];""",
        "runs",
        expected=[4.0, 4.0, 4.0, 4.0, 1.0, 1.0, 1.0, 1.0],
    ),
    Case(
        "small inputs are constant buffers: no device pointer to them",
        """const device float* values = x; out[0] = values[0];""",
        "flagged",
        match="constant|invalid conversion|discards",
        input_size=4,
        threads=1,
        threadgroup=1,
        output_size=1,
    ),
    Case(
        "small inputs are constant buffers: auto and constant pointers work",
        """auto values = x; const constant float* same = x; out[0] = values[1] + same[2];""",
        "runs",
        expected=[2.0],
        input_size=4,
        threads=1,
        threadgroup=1,
        output_size=1,
    ),
]


def launch(case: Case) -> np.ndarray:
    """Runs the case on x: ones where an output is expected, else random values
    (so that a different order of additions changes the rounding)."""
    kernel = metal_kernel(
        "adversarial_" + re.sub(r"\W+", "_", case.name), ["x"], ["out"], case.source, case.header
    )
    x = (
        mx.ones((case.input_size,))
        if case.outcome == "runs"
        else mx.random.normal((case.input_size,))
    )
    (out,) = kernel(
        inputs=[x],
        output_shapes=[(case.output_size,)],
        output_dtypes=[mx.float32],
        grid=(case.threads, 1, 1),
        threadgroup=(case.threadgroup, 1, 1),
        **case.options,
    )
    return np.array(out)


FLAGGED_ERRORS = (
    MetalKernelError,
    MetalLanguageError,
    MetalKernelCompileError,
    UnsupportedMetalFeature,
)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_adversarial_kernel_is_flagged_exposed_or_run_as_on_a_gpu(case):
    mx.random.seed(0)
    if case.outcome == "runs":
        out = launch(case)
        np.testing.assert_array_equal(out[: len(case.expected)], np.float32(case.expected))
    elif case.outcome == "exposed":
        with pytest.raises(ScheduleDependentResult, match="depends on the schedule"):
            launch(case)
    else:
        with pytest.raises(FLAGGED_ERRORS, match=case.match) as raised:
            launch(case)
        assert not isinstance(raised.value, ScheduleDependentResult)
