"""Run MLX custom Metal kernels on the CPU, for tests on machines without Metal.

``metal_kernel`` is a drop-in stand-in for ``mx.fast.metal_kernel``: it builds
the kernel source the way MLX does (signature, template parameters, shape and
stride parameters, Metal thread attributes, inputs of fewer than 8 elements
in the ``constant`` address space), compiles it as C++ with g++ on top of
``metal_compat.h`` and runs it with Metal's execution model: the grid counts
threads, edge threadgroups are cut to the grid, the threads of a threadgroup
run as cooperative fibers that meet at ``threadgroup_barrier`` and at SIMD-group
functions (width 32; the lanes at the same call site are the active lanes),
and ``threadgroup`` variables are shared by the threads of one threadgroup.
``simdgroup_matrix<T, 8, 8>`` (float, half, bfloat) is spread over the lanes of
a SIMD group, two elements each; ``simdgroup_load``, ``simdgroup_store``,
``simdgroup_multiply`` and ``simdgroup_multiply_accumulate`` are SIMD-group
functions that each lane computes from the elements the others pass, and that
fail unless every lane of the SIMD group calls them, loads and stores with
one matrix origin, row length and transposition (``matrix_origin`` is the
(column, row) of the matrix's first element in the source, either way).

What a GPU would punish is reported rather than run by luck:
- races: every launch runs under several schedules (threads, SIMD groups and
  threadgroups in index order, in reverse, then in random orders; SIMD groups
  progress independently between barriers) and `ScheduleDependentResult` is
  raised where the outputs differ;
- barrier rules (`MetalKernelError`): every thread of a threadgroup must reach
  the same barrier call the same number of times, and a barrier without
  ``mem_threadgroup`` is refused in a kernel with threadgroup memory;
- memory: device buffers are guarded: each lies between two 1 GiB
  inaccessible regions (reserved address space, no memory), at the end of its
  pages in even schedules and at their start in odd ones, so that reads and
  writes up to 1 GiB past either end fault (writes within the pages' slack are
  reported after the launch); inputs are read-only; private and threadgroup
  arrays are bounds checked (``-fsanitize=bounds``); errors name the buffer or
  the source line and the index; threadgroup memory is poisoned (NaN) for each
  threadgroup and limited to Metal's 32 KB; threadgroups above
  ``max_threads_per_threadgroup`` (896 by default, as a register-heavy
  pipeline's limit may be) are refused;
- the language (`MetalLanguageError`, checked when a launch first
  instantiates the kernel, as MLX compiles it; see `metal_language`): a
  deny-list with a message for each construct (``std::``, ``double``, the C
  library, C's suffixed and Metal's missing math functions, static locals,
  recursion, pointers without an address space, initialized threadgroup
  variables), then an allow-list: every function called and type declared
  with must be defined in the kernel's header or source, be a template
  parameter, input, output or thread attribute, or belong to the Metal
  Standard Library or MLX's prelude; a compile error from a static assertion
  or g++ for variable-length arrays, atomics and SIMD reductions of types
  Metal lacks; ``constant`` pointers do not convert to ``device`` ones;
  ``min``/``max`` of floats ignore a NaN as Metal's do.

MLX's prelude (``mlx/backend/metal/kernels/utils.h`` and the files it
includes) is emulated whole: ``Limits``, ``WorkPerThread``, ``elem_to_loc``
and its variants, ``LoopedElemToLoc``, ``ceildiv``, ``log1p`` and ``hypot``
(computed as MLX does), 64-bit, bool and complex SIMD shuffles,
``complex64_t``, ``cast_to``, ``ConditionalType``, ``schedule_row_tile``.

Differences from the GPU that remain: calls run eagerly (not inside
``mx.compile``) on one CPU thread; math functions are the correctly rounded CPU
ones; outputs without ``init_value`` start as NaN (floating types) or all-ones
bits (integers) so that unwritten elements stand out; threads switch only at
barriers and SIMD-group functions, so a race inside one read-modify-write
(``out[0] += x`` from many threads) shows only where the order of the updates
changes the result; accesses more than 1 GiB out of bounds (they may reach
another buffer), reads within a page of an end with a single schedule, and
pointers derived from a `constant` input through a cast are not checked; the
language check reads names, not types: it does not see a member function
Metal lacks, a constant (``M_PI``) that g++ defines and Metal does not, or a
type named only inside a template argument; Metal's packed vectors, matrix
types and pack functions are refused as unsupported; outputs of
``atomic_outputs`` kernels are not compared between schedules; simdgroup
matrices are 8x8 only, without ``thread_elements()`` (their lane layout is not
Apple's), and their products accumulate in float in index order; every
SIMD-group function orders memory among its lanes, so a missing
``simdgroup_barrier`` between lanes' threadgroup writes and a
``simdgroup_load`` of them goes unnoticed.

Compiled kernels are cached under ``$XDG_CACHE_HOME/mlx_fm/metal_emulator``
(default ``~/.cache``), keyed by a hash of the generated source, the header,
the compiler flags and the compiler's path and version; ``$CXX`` names the
compiler (default g++).
"""

import ctypes
import hashlib
import mmap
import os
import re
import shutil
import subprocess
import tempfile
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from mlx_fm.testing.metal_language import (
    MetalLanguageError,
    blank_comments,
    check_metal_language,
    declarator_after,
    is_pointer_or_reference,
)

import mlx.core as mx
import numpy as np

__all__ = [
    "metal_kernel",
    "MetalKernelEmulator",
    "UnsupportedMetalFeature",
    "MetalKernelCompileError",
    "MetalLanguageError",
    "MetalKernelError",
    "ScheduleDependentResult",
]

# Metal's hard limit; a pipeline's own limit (MLX checks it at launch) is
# often lower for register-heavy kernels, hence the emulator's default.
METAL_MAX_THREADS_PER_THREADGROUP = 1024
DEFAULT_MAX_THREADS_PER_THREADGROUP = 896
# Launches run under this many schedules (see `metal_kernel`).
DEFAULT_SCHEDULES = 3
# MLX passes inputs with fewer elements in the constant address space.
_MAX_CONSTANT_ARRAY_SIZE = 8
_COMPAT_HEADER = Path(__file__).with_name("metal_compat.h")
_COMPILE_FLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    # Metal has no double: unsuffixed literals such as 0.5 are float.
    "-fsingle-precision-constant",
    "-fno-math-errno",
    # Indexing past the end of a private or threadgroup array is reported
    # (handler in metal_compat.h); variable-length arrays are not Metal.
    "-fsanitize=bounds",
    "-Werror=vla",
    "-Wno-attributes",  # Metal's [[buffer(i)]] and the like
)


class UnsupportedMetalFeature(ValueError):
    """The kernel or its launch uses something the emulator does not support."""


class MetalKernelCompileError(RuntimeError):
    """g++ rejected the generated kernel source."""


class MetalKernelError(RuntimeError):
    """A launch broke a rule of Metal's execution model, or faulted."""


class ScheduleDependentResult(MetalKernelError):
    """Two schedules of one launch wrote different outputs: a race."""


@dataclass(frozen=True)
class _DtypeInfo:
    metal_type: str
    buffer_dtype: np.dtype


_DTYPES = {
    mx.bool_: _DtypeInfo("bool", np.dtype(np.bool_)),
    mx.uint8: _DtypeInfo("uint8_t", np.dtype(np.uint8)),
    mx.uint16: _DtypeInfo("uint16_t", np.dtype(np.uint16)),
    mx.uint32: _DtypeInfo("uint32_t", np.dtype(np.uint32)),
    mx.uint64: _DtypeInfo("uint64_t", np.dtype(np.uint64)),
    mx.int8: _DtypeInfo("int8_t", np.dtype(np.int8)),
    mx.int16: _DtypeInfo("int16_t", np.dtype(np.int16)),
    mx.int32: _DtypeInfo("int32_t", np.dtype(np.int32)),
    mx.int64: _DtypeInfo("int64_t", np.dtype(np.int64)),
    mx.float16: _DtypeInfo("float16_t", np.dtype(np.float16)),
    # numpy has no bfloat16: its buffers travel as raw 16-bit words.
    mx.bfloat16: _DtypeInfo("bfloat16_t", np.dtype(np.uint16)),
    mx.float32: _DtypeInfo("float", np.dtype(np.float32)),
}

# Metal thread attributes in MLX's order, with their types; MLX adds a
# parameter for each one whose name appears in the kernel source.
_METAL_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
# Attributes that are another attribute's value under a second name.
_ATTRIBUTE_ALIASES = {
    "grid_size": "threads_per_grid",
    "thread_execution_width": "threads_per_simdgroup",
}

_UNSUPPORTED_FEATURES = (
    (
        re.compile(r"\b(texture(1d|2d|3d|cube|_buffer)\w*|depth(2d|cube)\w*|sampler)\b"),
        "textures and samplers",
    ),
    (re.compile(r"\bimageblock\b"), "imageblocks"),
    (re.compile(r"\b(raytracing|intersector|acceleration_structure)\b"), "ray tracing"),
    (re.compile(r"\b\d+(\.\d*)?h\b"), "half literals with the 'h' suffix"),
    (
        re.compile(
            r"\bpacked_(?:vec\b|(?:bool|u?char|u?short|u?int|u?long|half|float|bfloat)[234]\b)"
        ),
        "packed vectors",
    ),
    (re.compile(r"\bmatrix\s*<|\b(?:float|half|bfloat)[234]x[234]\b"), "matrix types"),
    (re.compile(r"\b(?:pack_(?:float|half)_to|unpack_\w+_to_(?:float|half))\w*"), "pack functions"),
)
# The parameters MLX adds for an input `x` whose name appears in the source.
_SHAPE_SUFFIXES = ("_shape", "_strides", "_ndim")
_METAL_INCLUDE = re.compile(r"^\s*#\s*include\s*<metal_\w+>\s*$", re.MULTILINE)
_CONSTANT_QUALIFIER = re.compile(r"\bconstant\b")
_THREADGROUP_DECLARATION = re.compile(r"\bthreadgroup\b([^;]*);")
_DECLARED_NAME = re.compile(r"([A-Za-z_]\w*)\s*(?:\[|$)")
_ARRAY_EXTENT = re.compile(r"\[[^\]]*\]")

# What a kernel input may be: an array, or a Python scalar MLX turns into one.
ArrayLike = mx.array | bool | int | float
TemplateArgument = bool | int | mx.Dtype
# A template argument as emitted: (name, parameter kind, C++ text of the value).
TemplateParameter = tuple[str, str, str]


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
    compile_options: dict[str, str] | None = None,
    *,
    schedules: int = DEFAULT_SCHEDULES,
    max_threads_per_threadgroup: int = DEFAULT_MAX_THREADS_PER_THREADGROUP,
) -> "MetalKernelEmulator":
    """Drop-in for ``mx.fast.metal_kernel`` that runs the kernel on the CPU.

    ``compile_options`` is accepted for compatibility; the CPU math is always
    the precise one. Each launch runs under ``schedules`` schedules (thread
    and threadgroup order: index, reverse, then random) and fails with
    `ScheduleDependentResult` where their outputs differ (outputs of
    ``atomic_outputs`` kernels are not compared). Threadgroups larger than
    ``max_threads_per_threadgroup`` are refused, as a Metal pipeline with
    that limit would.
    """
    return MetalKernelEmulator(
        name,
        input_names,
        output_names,
        source,
        header,
        ensure_row_contiguous,
        atomic_outputs,
        schedules=schedules,
        max_threads_per_threadgroup=max_threads_per_threadgroup,
    )


@dataclass(frozen=True)
class _InputSlot:
    """How one input array is passed: its buffer and optional shape info."""

    name: str
    metal_type: str
    is_scalar: bool
    in_constant_space: bool
    passes_shape: bool
    passes_strides: bool
    passes_ndim: bool


class MetalKernelEmulator:
    """The callable `metal_kernel` returns; calls take the keyword arguments
    of MLX's kernels (`stream` is accepted and ignored: it runs on the CPU)."""

    def __init__(
        self,
        name: str,
        input_names: Sequence[str],
        output_names: Sequence[str],
        source: str,
        header: str,
        ensure_row_contiguous: bool,
        atomic_outputs: bool,
        *,
        schedules: int = DEFAULT_SCHEDULES,
        max_threads_per_threadgroup: int = DEFAULT_MAX_THREADS_PER_THREADGROUP,
    ) -> None:
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        if not 1 <= max_threads_per_threadgroup <= METAL_MAX_THREADS_PER_THREADGROUP:
            raise ValueError(
                f"max_threads_per_threadgroup must be in 1..{METAL_MAX_THREADS_PER_THREADGROUP}"
            )
        _reject_unsupported_features(header + source)
        self.schedules = max(1, schedules)
        self.max_threads_per_threadgroup = max_threads_per_threadgroup
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self.attributes = [(attr, kind) for attr, kind in _METAL_ATTRIBUTES if attr in source]
        self._checked_template_names: set[tuple[str, ...]] = set()

    def __call__(
        self,
        *,
        inputs: Sequence[ArrayLike],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: Sequence[int],
        threadgroup: Sequence[int],
        template: Sequence[tuple[str, TemplateArgument]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: object = None,
    ) -> list[mx.array]:
        self._check_counts(inputs, output_shapes, output_dtypes)
        grid, threadgroup = _checked_launch_shape(
            grid, threadgroup, self.max_threads_per_threadgroup
        )
        arrays = [_as_mlx_array(x) for x in inputs]
        slots = [self._input_slot(name, x) for name, x in zip(self.input_names, arrays)]
        output_types = [_dtype_info(dtype).metal_type for dtype in output_dtypes]
        template_args = [_template_value(name, value) for name, value in (template or [])]
        self._check_language(tuple(name for name, _, _ in template_args))
        kernel_name = _kernel_name(self.name, template_args, slots, output_types)
        parameters = self._buffer_parameters(slots, output_types)
        kernel_source = self._metal_source(kernel_name, parameters, template_args)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{kernel_source}\n```")

        launch = _compiled_launcher(self._cpp_source(kernel_name, parameters, template_args))
        inputs_by_placement: dict[bool, list[_GuardedBuffer]] = {}
        results = []
        for schedule in range(self.schedules):
            # Odd schedules put buffers at the start of their pages, even ones
            # at the end, so that a read just past either end faults in one.
            at_page_start = schedule % 2 == 1
            if at_page_start not in inputs_by_placement:
                inputs_by_placement[at_page_start] = [
                    _GuardedBuffer.holding(name, self._input_buffer(x), at_page_start=at_page_start)
                    for name, x in zip(self.input_names, arrays)
                ]
            buffers = inputs_by_placement[at_page_start]
            outputs = [
                _GuardedBuffer.holding(
                    name,
                    _output_buffer(shape, dtype, init_value),
                    writable=True,
                    at_page_start=at_page_start,
                )
                for name, shape, dtype in zip(self.output_names, output_shapes, output_dtypes)
            ]
            launch(
                _pointer_table(slots, buffers, outputs),
                grid,
                threadgroup,
                schedule,
                buffers + outputs,
                self.name,
            )
            for output in outputs:
                output.check_slack(self.name)
            results.append([output.array for output in outputs])
            if not self.atomic_outputs:
                self._check_same_outputs(results[0], results[-1], schedule)
        return [_to_mlx(buffer, dtype) for buffer, dtype in zip(results[0], output_dtypes)]

    def _check_language(self, template_names: tuple[str, ...]) -> None:
        """The Metal compiler's verdict, as MLX meets it: when a launch first
        instantiates the kernel with these template parameters."""
        if template_names in self._checked_template_names:
            return
        parameters = [
            f"{name}{suffix}" for name in self.input_names for suffix in ("", *_SHAPE_SUFFIXES)
        ]
        known = [*template_names, *parameters, *self.output_names]
        check_metal_language(
            self.name, self.header, self.source, known + [attr for attr, _ in _METAL_ATTRIBUTES]
        )
        self._checked_template_names.add(template_names)

    def _check_same_outputs(
        self, first: list[np.ndarray], other: list[np.ndarray], schedule: int
    ) -> None:
        for name, a, b in zip(self.output_names, first, other):
            bits = np.dtype(f"u{a.itemsize}")
            differing = np.flatnonzero(a.reshape(-1).view(bits) != b.reshape(-1).view(bits))
            if differing.size:
                index = int(differing[0])
                raise ScheduleDependentResult(
                    f"[metal_kernel emulator] {self.name}: output `{name}` depends on the schedule: "
                    f"element {index} is {a.reshape(-1)[index]!r} in {_schedule_name(0)} and "
                    f"{b.reshape(-1)[index]!r} in {_schedule_name(schedule)} ({differing.size} "
                    "elements differ). Threads race: a missing threadgroup_barrier, threadgroups "
                    "reading each other's writes, or a non-atomic update from several threads."
                )

    def _check_counts(
        self,
        inputs: Sequence[ArrayLike],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
    ) -> None:
        for what, given, expected in (
            ("inputs", inputs, self.input_names),
            ("output_shapes", output_shapes, self.output_names),
            ("output_dtypes", output_dtypes, self.output_names),
        ):
            if len(given) != len(expected):
                raise ValueError(
                    f"[metal_kernel] Expected `{what}` to have size {len(expected)} but got size {len(given)}."
                )

    def _input_slot(self, name: str, array: mx.array) -> _InputSlot:
        return _InputSlot(
            name=name,
            metal_type=_dtype_info(array.dtype).metal_type,
            is_scalar=array.ndim == 0,
            in_constant_space=array.size < _MAX_CONSTANT_ARRAY_SIZE,
            passes_shape=array.ndim > 0 and f"{name}_shape" in self.source,
            passes_strides=array.ndim > 0 and f"{name}_strides" in self.source,
            passes_ndim=array.ndim > 0 and f"{name}_ndim" in self.source,
        )

    def _input_buffer(self, array: mx.array) -> np.ndarray:
        buffer_view = array.view(mx.uint16) if array.dtype == mx.bfloat16 else array
        buffer = np.asarray(buffer_view)
        return np.ascontiguousarray(buffer) if self.ensure_row_contiguous else buffer

    def _buffer_parameters(
        self, slots: list[_InputSlot], output_types: list[str]
    ) -> list["_BufferParameter"]:
        """The kernel's buffer parameters in MLX's order."""
        parameters = []
        for slot in slots:
            space = "constant" if slot.in_constant_space else "device"
            parameters.append(
                _BufferParameter(slot.name, f"const {space} ", slot.metal_type, slot.is_scalar)
            )
            if slot.passes_shape:
                parameters.append(
                    _BufferParameter(f"{slot.name}_shape", "const constant ", "int", False)
                )
            if slot.passes_strides:
                parameters.append(
                    _BufferParameter(f"{slot.name}_strides", "const constant ", "int64_t", False)
                )
            if slot.passes_ndim:
                parameters.append(
                    _BufferParameter(f"{slot.name}_ndim", "const constant ", "int", True)
                )
        for name, metal_type in zip(self.output_names, output_types):
            value_type = f"atomic<{metal_type}>" if self.atomic_outputs else metal_type
            parameters.append(_BufferParameter(name, "device ", value_type, False))
        return parameters

    def _metal_source(
        self,
        kernel_name: str,
        parameters: list["_BufferParameter"],
        template_args: list[TemplateParameter],
        line_markers: bool = False,
    ) -> str:
        """The kernel source exactly as MLX generates it for Metal; with
        `line_markers`, #line directives make compiler and emulator messages
        name lines as `NAME:header:LINE` and `NAME:source:LINE`."""
        declarations = [parameter.declaration(index) for index, parameter in enumerate(parameters)]
        declarations += [f"  {kind} {attr} [[{attr}]]" for attr, kind in self.attributes]

        def marker(part: str) -> str:
            return f'#line 1 "{self.name}:{part}"\n' if line_markers else ""

        text = marker("header") + self.header + ("\n" if line_markers else "") + marker("generated")
        if template_args:
            text += (
                "template <"
                + ", ".join(f"{kind} {name}" for name, kind, _ in template_args)
                + ">\n"
            )
        text += f"[[kernel]] void {kernel_name}(\n" + ",\n".join(declarations) + ") {\n"
        text += marker("source") + self.source + "\n" + marker("generated") + "}\n"
        if template_args:
            instance = kernel_name + _template_list(template_args)
            text += f'\ntemplate [[host_name("{kernel_name}")]] [[kernel]] decltype({instance}) {instance};\n'
        return text

    def _cpp_source(
        self,
        kernel_name: str,
        parameters: list["_BufferParameter"],
        template_args: list[TemplateParameter],
    ) -> str:
        """A C++ translation unit: the kernel plus an entry point that runs it.

        The header defines `device`, `constant`, `thread` and `threadgroup`
        away, so the code after the kernel must not use those words.
        """
        arguments = [parameter.argument(index) for index, parameter in enumerate(parameters)]
        arguments += [f"a.{_ATTRIBUTE_ALIASES.get(attr, attr)}" for attr, _ in self.attributes]
        call = kernel_name + (_template_list(template_args) if template_args else "")
        argument_text = ",\n      ".join(arguments)
        kernel_source = self._metal_source(kernel_name, parameters, template_args, True)
        return f"""#include "metal_compat.h"
namespace metal::kernel_scope {{
{_prepare_for_cpp(kernel_source)}
static void mlx_fm_invoke_kernel(void* context, const mlx_fm_emulator::ThreadAttributes& a) {{
  void** buffers = static_cast<void**>(context);
  {call}(
      {argument_text});
}}
}}  // namespace metal::kernel_scope

extern "C" __attribute__((visibility("default"))) int mlx_fm_launch(
    void** buffers, const uint32_t* grid, const uint32_t* group_size, int schedule,
    char* error, size_t error_size, mlx_fm_emulator::Fault* fault) {{
  return mlx_fm_emulator::launch(grid, group_size, schedule, &metal::kernel_scope::mlx_fm_invoke_kernel,
                                 buffers, error, error_size, fault);
}}
"""


@dataclass(frozen=True)
class _BufferParameter:
    """One `[[buffer(i)]]` parameter: a pointer, or a reference for scalars."""

    name: str
    qualifiers: str  # const-ness and address space, as in "const device "
    value_type: str
    by_reference: bool

    def declaration(self, index: int) -> str:
        return f"  {self.qualifiers}{self.value_type}{'&' if self.by_reference else '*'} {self.name} [[buffer({index})]]"

    def argument(self, index: int) -> str:
        const = "const " if self.qualifiers.startswith("const") else ""
        pointer = f"static_cast<{const}{self.value_type}*>(buffers[{index}])"
        return "*" + pointer if self.by_reference else pointer


def _reject_unsupported_features(code: str) -> None:
    for pattern, feature in _UNSUPPORTED_FEATURES:
        if pattern.search(code):
            raise UnsupportedMetalFeature(f"[metal_kernel emulator] {feature} not supported")


def _checked_launch_shape(
    grid: Sequence[int], threadgroup: Sequence[int], max_threads: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    for what, dims in (("grid", grid), ("threadgroup", threadgroup)):
        if len(dims) != 3 or any(int(d) < 1 for d in dims):
            raise UnsupportedMetalFeature(
                f"[metal_kernel emulator] {what} must be three positive sizes, got {tuple(dims)}"
            )
    threads = int(np.prod(threadgroup))
    if threads > max_threads:
        raise UnsupportedMetalFeature(
            f"[metal_kernel emulator] Thread group size ({threads}) is greater than the maximum allowed "
            f"threads per threadgroup ({max_threads})."
        )
    # As MLX does, a threadgroup larger than the grid shrinks to the grid.
    clamped = tuple(min(int(t), int(g)) for t, g in zip(threadgroup, grid))
    return tuple(int(g) for g in grid), clamped


def _as_mlx_array(value: ArrayLike) -> mx.array:
    return value if isinstance(value, mx.array) else mx.array(value)


def _dtype_info(dtype: mx.Dtype) -> _DtypeInfo:
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise UnsupportedMetalFeature(
            f"[metal_kernel emulator] unsupported dtype {dtype}"
        ) from None


def _template_value(name: str, value: TemplateArgument) -> TemplateParameter:
    """(name, parameter kind, C++ text of the argument) for one template arg."""
    if isinstance(value, bool):
        return name, "bool", str(int(value))
    if isinstance(value, int):
        return name, "int", str(value)
    if isinstance(value, mx.Dtype):
        return name, "typename", _dtype_info(value).metal_type
    raise UnsupportedMetalFeature(
        f"[metal_kernel emulator] template argument {name!r} must be an int, bool or mlx dtype, got {value!r}"
    )


def _template_list(template_args: list[TemplateParameter]) -> str:
    return "<" + ", ".join(text for _, _, text in template_args) + ">"


def _kernel_name(
    name: str,
    template_args: list[TemplateParameter],
    slots: list[_InputSlot],
    output_types: list[str],
) -> str:
    kernel_name = "custom_kernel_" + name
    if template_args:
        kernel_name += "_" + re.sub(r"<|>|, ", "_", _template_list(template_args))[:-1]
    for slot in slots:
        suffix = "s" if slot.is_scalar else ("c" if slot.in_constant_space else "")
        kernel_name += f"_{slot.metal_type}{suffix}"
    for metal_type in output_types:
        kernel_name += f"_{metal_type}"
    return kernel_name


def _prepare_for_cpp(code: str) -> str:
    """Turns Metal-only constructs into their emulated C++ form, line for line.

    Threadgroup variable declarations become static storage, which the
    fibers of the running threadgroup share, followed (on the same line) by a
    call that lets the runtime poison and measure it. A `constant` pointer or
    reference becomes
    `volatile`, so that, as in Metal, it does not convert to a `device` one
    (other uses of `threadgroup` and `constant` are dropped by the header's
    empty macros).
    """
    code = _METAL_INCLUDE.sub(lambda match: "\n" * match.group(0).count("\n"), code)
    # A comment mentioning threadgroup memory is not a declaration.
    code = blank_comments(code)

    def threadgroup(match: re.Match[str]) -> str:
        declarator = _ARRAY_EXTENT.sub("", match.group(1).split("=")[0])
        if is_pointer_or_reference(declarator):
            return match.group(0)
        name = _DECLARED_NAME.search(match.group(1).strip()).group(1)
        return (
            f"static{match.group(1)}; "
            f"::mlx_fm_emulator::threadgroup_variable(&{name}, sizeof({name}));"
        )

    code = _THREADGROUP_DECLARATION.sub(threadgroup, code)

    def constant(match: re.Match[str]) -> str:
        declarator, _ = declarator_after(code, match)
        return "volatile" if is_pointer_or_reference(declarator) else match.group(0)

    return _CONSTANT_QUALIFIER.sub(constant, code)


def _output_buffer(shape: Sequence[int], dtype: mx.Dtype, init_value: float | None) -> np.ndarray:
    info = _dtype_info(dtype)
    if init_value is not None:
        initial = mx.full(shape, init_value, dtype)
        return np.array(initial.view(mx.uint16) if dtype == mx.bfloat16 else initial, copy=True)
    if info.buffer_dtype == np.bool_:
        return np.ones(shape, np.bool_)
    # All-ones bits: NaN for every floating type, -1 or the maximum for integers.
    buffer = np.empty(shape, info.buffer_dtype)
    buffer.view(np.uint8).fill(0xFF)
    return buffer


class _Fault(ctypes.Structure):
    _fields_ = [
        ("address", ctypes.c_uint64),
        ("is_write", ctypes.c_uint64),
        ("happened", ctypes.c_uint64),
    ]


_PAGE = mmap.PAGESIZE
# Inaccessible address space on either side of each buffer, so that an index
# up to 1 GiB out of bounds faults instead of reaching other memory. Reserved,
# never backed: it costs no memory, and each buffer one mmap and one munmap.
_GUARD_BYTES = 1 << 30
_SLACK_BYTE = 0xA5
_PROT_NONE = 0
_MAP_PRIVATE, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x02, 0x20, 0x4000
_MAP_FAILED = ctypes.c_void_p(-1).value
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def _reserve(size: int) -> int:
    """`size` bytes of inaccessible address space, unmapped when the
    returned address is passed to `_release`."""
    flags = _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE
    address = _libc.mmap(None, size, _PROT_NONE, flags, -1, 0)
    if address in (None, _MAP_FAILED):
        raise OSError(ctypes.get_errno(), "could not reserve a guarded kernel buffer")
    return address


@dataclass
class _GuardedBuffer:
    """A kernel buffer in its own pages between two 1 GiB guards (so that
    accesses up to 1 GiB past either end fault), at the start or the end of
    its pages: at most 15 bytes of slack from the guard on that side, the
    rest of the pages on the other (writes to the slack are reported after
    the launch); inputs are read-only."""

    name: str
    array: np.ndarray
    writable: bool
    data_address: int  # the first byte the array spans
    data_bytes: int
    mapping_range: tuple[int, int]
    slack_before: np.ndarray
    slack_after: np.ndarray

    @classmethod
    def holding(
        cls, name: str, source: np.ndarray, writable: bool = False, at_page_start: bool = False
    ) -> "_GuardedBuffer":
        low, high = _byte_span(source)
        span = high - low
        padded = -(-span // 16) * 16
        data_bytes = max(1, -(-padded // _PAGE)) * _PAGE
        size = data_bytes + 2 * _GUARD_BYTES
        base = _reserve(size)
        data_pages = (ctypes.c_char * data_bytes).from_address(base + _GUARD_BYTES)
        weakref.finalize(data_pages, _libc.munmap, base, size)
        _protect(base + _GUARD_BYTES, data_bytes, mmap.PROT_READ | mmap.PROT_WRITE)
        data_offset = 0 if at_page_start else data_bytes - padded
        ctypes.memmove(base + _GUARD_BYTES + data_offset, source.ctypes.data + low, span)
        pages = np.frombuffer(data_pages, np.uint8)
        pages[:data_offset] = _SLACK_BYTE
        pages[data_offset + span :] = _SLACK_BYTE
        array = np.ndarray(
            source.shape,
            source.dtype,
            buffer=data_pages,
            offset=data_offset - low,
            strides=source.strides,
        )
        if not writable:
            _protect(base + _GUARD_BYTES, data_bytes, mmap.PROT_READ)
        data_address = base + _GUARD_BYTES + data_offset
        return cls(
            name,
            array,
            writable,
            data_address,
            span,
            (base, base + size),
            pages[:data_offset],
            pages[data_offset + span :],
        )

    def check_slack(self, kernel_name: str) -> None:
        for where, slack in (
            ("before the start", self.slack_before),
            ("past the end", self.slack_after),
        ):
            if np.any(slack != _SLACK_BYTE):
                raise MetalKernelError(
                    f"[metal_kernel emulator] {kernel_name}: wrote {where} of output `{self.name}`"
                )

    def describe(self, address: int, is_write: bool) -> str | None:
        """What an access to `address` is, if it falls in this buffer's mapping."""
        if not self.mapping_range[0] <= address < self.mapping_range[1]:
            return None
        access = "write" if is_write else "access"
        element = (address - self.data_address) // self.array.itemsize
        where = f"`{self.name}` ({self.array.size} elements, at element {element})"
        if address >= self.data_address + self.data_bytes:
            return f"{access} past the end of {where}"
        if address < self.data_address:
            return f"{access} before the start of {where}"
        return f"write to the input {where}"


def _protect(address: int, size: int, protection: int) -> None:
    if _libc.mprotect(address, size, protection) != 0:
        raise OSError(ctypes.get_errno(), "mprotect failed for an emulated kernel buffer")


def _byte_span(array: np.ndarray) -> tuple[int, int]:
    """Byte offsets, from the array's first element, of the memory it spans."""
    if array.size == 0:
        return 0, 0
    extents = [(n - 1) * stride for n, stride in zip(array.shape, array.strides)]
    low = sum(extent for extent in extents if extent < 0)
    return low, sum(extent for extent in extents if extent > 0) + array.itemsize


def _describe_fault(fault: _Fault, buffers: list[_GuardedBuffer]) -> str:
    for buffer in buffers:
        description = buffer.describe(fault.address, bool(fault.is_write))
        if description:
            return description
    return "outside every buffer (a wild pointer, or an index far out of bounds)"


def _schedule_name(schedule: int) -> str:
    if schedule < 2:
        return ("index order", "reverse order")[schedule]
    return f"random order (seed {schedule})"


def _pointer_table(
    slots: list[_InputSlot], buffers: list[_GuardedBuffer], outputs: list[_GuardedBuffer]
) -> ctypes.Array[ctypes.c_void_p]:
    """The kernel's buffer arguments in signature order, as void pointers.

    The numpy arrays created here are kept alive by the returned table.
    """
    pointers = []
    keep_alive = []
    for slot, buffer in zip(slots, buffers):
        array = buffer.array
        pointers.append(array.ctypes.data)
        extras = []
        if slot.passes_shape:
            extras.append(np.array(array.shape, np.int32))
        if slot.passes_strides:
            extras.append(np.array([s // array.itemsize for s in array.strides], np.int64))
        if slot.passes_ndim:
            extras.append(np.array(array.ndim, np.int32))
        keep_alive += extras
        pointers += [extra.ctypes.data for extra in extras]
    pointers += [output.array.ctypes.data for output in outputs]
    table = (ctypes.c_void_p * len(pointers))(*pointers)
    table.keep_alive = (keep_alive, buffers, outputs)
    return table


def _to_mlx(buffer: np.ndarray, dtype: mx.Dtype) -> mx.array:
    array = mx.array(buffer)
    return array.view(mx.bfloat16) if dtype == mx.bfloat16 else array


# --- compilation ---------------------------------------------------------------

_launchers: dict[str, "_Launcher"] = {}


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


@cache
def _compiler_identity(compiler: str) -> str:
    """The compiler's path and version, part of the cache key."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    except OSError:
        version = "unavailable"
    return f"{shutil.which(compiler) or compiler}\0{version}"


def _compiled_launcher(cpp_source: str) -> "_Launcher":
    compiler = _compiler()
    key = hashlib.sha256(
        "\0".join(
            (
                cpp_source,
                _COMPAT_HEADER.read_text(),
                " ".join(_COMPILE_FLAGS),
                _compiler_identity(compiler),
            )
        ).encode()
    ).hexdigest()[:40]
    if key not in _launchers:
        library = ctypes.CDLL(str(_shared_library(key, cpp_source, compiler)))
        entry = library.mlx_fm_launch
        entry.restype = ctypes.c_int
        entry.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.POINTER(_Fault),
        ]
        _launchers[key] = _Launcher(library, entry)
    return _launchers[key]


@dataclass
class _Launcher:
    library: ctypes.CDLL
    entry: Callable[..., int]
    # ctypes releases the GIL, and a library's scheduler state is global.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(
        self,
        buffer_table: ctypes.Array[ctypes.c_void_p],
        grid: tuple[int, ...],
        threadgroup: tuple[int, ...],
        schedule: int,
        buffers: list[_GuardedBuffer],
        kernel_name: str,
    ) -> None:
        error = ctypes.create_string_buffer(1024)
        fault = _Fault()
        with self.lock:
            status = self.entry(
                buffer_table,
                (ctypes.c_uint32 * 3)(*grid),
                (ctypes.c_uint32 * 3)(*threadgroup),
                schedule,
                error,
                len(error),
                ctypes.byref(fault),
            )
        if status != 0:
            message = error.value.decode(errors="replace")
            if fault.happened:
                message += ": " + _describe_fault(fault, buffers)
            raise MetalKernelError(
                f"[metal_kernel emulator] {kernel_name} ({_schedule_name(schedule)}): {message}"
            )


def _cache_directory() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    directory = Path(base) / "mlx_fm" / "metal_emulator"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return directory
    except OSError:
        directory = Path(tempfile.gettempdir()) / "mlx_fm_metal_emulator"
        directory.mkdir(parents=True, exist_ok=True)
        return directory


def _shared_library(key: str, cpp_source: str, compiler: str) -> Path:
    """Path of the compiled kernel, building it unless already cached.

    Builds go to unique temporary names and are renamed into place, so
    concurrent processes compiling the same kernel never see partial files.
    The object is linked without the sanitizer runtime: metal_compat.h
    defines the one handler -fsanitize=bounds calls.
    """
    directory = _cache_directory()
    library = directory / f"{key}.so"
    if library.exists():
        return library
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source_file = Path(scratch) / "kernel.cpp"
        source_file.write_text(cpp_source)
        built_object = Path(scratch) / "kernel.o"
        built = Path(scratch) / "kernel.so"
        for command in (
            [
                compiler,
                *_COMPILE_FLAGS,
                f"-I{_COMPAT_HEADER.parent}",
                "-c",
                str(source_file),
                "-o",
                str(built_object),
            ],
            [compiler, "-shared", str(built_object), "-o", str(built)],
        ):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise MetalKernelCompileError(
                    f"[metal_kernel emulator] {compiler} failed to compile the kernel:\n"
                    f"{result.stderr}\n--- generated source ---\n{cpp_source}"
                )
        os.replace(built, library)
    return library
