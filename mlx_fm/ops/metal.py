"""The FM mixer's fused Metal kernels (sources and cost model in metal/).

Building blocks of `mlx_fm.ops.fm_mix`, with the contracts of the ops they
stand in for, against which they are tested:

- `FMKernels.decode`: one token, fused: routing (softmax with temperature,
  top-k, renormalization), gates, the write to the k selected slots, the read
  and the merge (fm_decode.metal).
- `FMKernels.scan`: the scan over T tokens at the level of `fm_chunked` (x,
  slot weights α̃, η with padding already zeroed, initial state),
  differentiable through `mx.custom_function`. The forward kernel
  (fm_scan_forward.metal) runs the step recurrence with each head's state in
  registers and saves the state entering every chunk of `scan_chunk` tokens;
  the backward kernel (fm_scan_backward.metal) walks the chunks in reverse,
  recomputing each from its saved state. From `CHUNKWISE_MIN_LENGTH` tokens,
  where their threadgroup memory fits, the chunkwise-parallel pair takes over:
  fm_scan_chunkwise.metal (8 × 8 simdgroup_matrix products per chunk of 8
  tokens, saving the state entering each chunk) and
  fm_scan_chunkwise_backward.metal (the chunks in reverse, as matrix products
  too). With `keep_checkpoints=False` the forward is the same source built
  without the checkpoints; a gradient reruns the checkpointing forward first.
  Routing and gates stay MLX ops, so their gradients are MLX's.

`use_kernels()` says whether `fm_mix` runs on them; `default_kernels()` are the
ones it runs on.
"""

import os
from collections.abc import Callable
from functools import cache, cached_property
from importlib import resources

import mlx.core as mx

__all__ = ["FMKernels", "default_kernels", "use_kernels"]

# A built kernel, called as MLX's custom kernels are (inputs, grid, threadgroup, ...).
KernelLauncher = Callable[..., list[mx.array]]
# `mx.fast.metal_kernel` or a stand-in (name, input_names, output_names, source).
KernelBuilder = Callable[..., KernelLauncher]

SCAN_CHUNK = 32  # tokens between the states the forward saves for the backward
SIMD_WIDTH = 32
DECODE_THREADS = 256
FORWARD_COLUMNS = 8  # SIMD groups, one per value column, per threadgroup
BACKWARD_COLUMNS = 16
# The backward's threadgroup scratch is 2 · columns · m floats: at most 16 KB.
BACKWARD_SCRATCH_FLOATS = 4096
THREADGROUP_MEMORY_BYTES = 32 * 1024  # Metal's limit
# MLX refuses a threadgroup above the pipeline's own limit (1024 at most,
# lower for register-heavy kernels) when the graph is evaluated, too late to
# fall back; the kernels stay at or below this many threads, and
# `FMKernels(max_threads=...)` lowers it.
MAX_THREADS = 512
# The chunkwise scan (fm_scan_chunkwise.metal): chunks of 8 tokens, tiles of 8
# value columns, up to this many tiles (SIMD groups) per threadgroup.
CHUNKWISE_COLUMN_TILES = 4
CHUNKWISE_CHUNK = 8  # tokens per chunk: one matrix tile
# Scans from this many tokens (8 chunks) take the chunkwise kernels, forward
# and backward, where they fit. Basis (a count of dependent steps, not a
# measurement): see the threshold in metal/README.md.
CHUNKWISE_MIN_LENGTH = 64


def use_kernels() -> bool:
    """True where the Metal kernels run: Metal present, the GPU the default
    device, and MLX_FM_OPS_ONLY not set to 1."""
    return (
        os.environ.get("MLX_FM_OPS_ONLY") != "1"
        and mx.metal.is_available()
        and mx.default_device() == mx.gpu
    )


def _source(name: str) -> str:
    return (resources.files("mlx_fm.metal") / f"{name}.metal").read_text()


class FMKernels:
    """The FM kernels, each built on first use by `metal_kernel`
    (`mx.fast.metal_kernel` unless given, e.g. the CPU emulator in tests)."""

    def __init__(
        self,
        metal_kernel: KernelBuilder | None = None,
        scan_chunk: int = SCAN_CHUNK,
        max_threads: int = MAX_THREADS,
    ) -> None:
        if max_threads < SIMD_WIDTH:
            raise ValueError(f"max_threads must be at least {SIMD_WIDTH}, got {max_threads}")
        self._metal_kernel = metal_kernel or mx.fast.metal_kernel
        self.scan_chunk = scan_chunk
        self.max_threads = max_threads

    def _build(
        self,
        name: str,
        input_names: list[str],
        output_names: list[str],
        source: str | None = None,
        header: str = "",
    ) -> KernelLauncher:
        return self._metal_kernel(
            name=name,
            input_names=input_names,
            output_names=output_names,
            source=_source(source or name),
            header=header,
        )

    @cached_property
    def _decode_kernel(self) -> KernelLauncher:
        return self._build(
            "fm_decode",
            [
                "x",
                "router_logits",
                "update_logits",
                "merge_logits",
                "eta_bias",
                "mu_bias",
                "temperature",
                "state",
                "mask",
            ],
            ["out", "new_state"],
        )

    def _build_scan(self, name: str, source: str, checkpoints: bool) -> KernelLauncher:
        """A forward scan source built with or without the checkpoints its backward reads
        (FM_SCAN_CHECKPOINTS); each build has its own name, as MLX caches a library by name."""
        return self._build(
            name,
            ["x", "slot_weights", "eta", "state"],
            ["reads", "final_state", *(["checkpoints"] if checkpoints else [])],
            source=source,
            header=f"#define FM_SCAN_CHECKPOINTS {int(checkpoints)}\n",
        )

    @cached_property
    def _forward_kernel(self) -> KernelLauncher:
        return self._build_scan("fm_scan_forward", "fm_scan_forward", checkpoints=True)

    @cached_property
    def _inference_forward_kernel(self) -> KernelLauncher:
        return self._build_scan("fm_scan_forward_inference", "fm_scan_forward", checkpoints=False)

    @cached_property
    def _chunkwise_kernel(self) -> KernelLauncher:
        return self._build_scan("fm_scan_chunkwise", "fm_scan_chunkwise", checkpoints=False)

    @cached_property
    def _chunkwise_checkpointing_kernel(self) -> KernelLauncher:
        return self._build_scan(
            "fm_scan_chunkwise_checkpoints", "fm_scan_chunkwise", checkpoints=True
        )

    @cached_property
    def _chunkwise_backward_kernel(self) -> KernelLauncher:
        return self._build(
            "fm_scan_chunkwise_backward",
            ["x", "slot_weights", "eta", "checkpoints", "d_reads", "d_final_state"],
            ["d_x", "d_slot_weights_partial", "d_eta_partial", "d_state"],
        )

    @cached_property
    def _backward_kernel(self) -> KernelLauncher:
        return self._build(
            "fm_scan_backward",
            ["x", "slot_weights", "eta", "checkpoints", "d_reads", "d_final_state"],
            ["d_x", "d_slot_weights_partial", "d_eta_partial", "d_state"],
        )

    def decode(
        self,
        x: mx.array,
        router_logits: mx.array,
        update_logits: mx.array,
        merge_logits: mx.array,
        eta_bias: mx.array,
        mu_bias: mx.array,
        state: mx.array,
        *,
        top_k: int,
        temperature: float,
        mask: mx.array | None = None,
    ) -> tuple[mx.array, mx.array]:
        """One token: x (B, H, P), router_logits (B, H, m), update_logits and
        merge_logits (B, H), state (B, H, m, P), mask (B,) or None.

        Returns o = μ·r + (1 − μ)·x̄ (B, H, P) float32 and the new state.
        """
        batch, heads, width = x.shape
        slots = router_logits.shape[-1]
        if mask is None:
            mask = mx.ones((batch,), mx.bool_)
        threads = min(DECODE_THREADS, self.max_threads)
        columns = min(width, threads)
        row_groups = max(1, min(slots, threads // columns))
        _check_threadgroup_memory("decode", (2 * slots + columns * row_groups) * 4, slots)
        out, new_state = self._decode_kernel(
            inputs=[
                x,
                router_logits,
                update_logits,
                merge_logits,
                eta_bias,
                mu_bias,
                mx.array(temperature, mx.float32),
                state.astype(mx.float32),
                mask,
            ],
            template=[
                ("M", slots),
                ("K", min(top_k, slots)),
                ("COLUMNS", columns),
                ("ROW_GROUPS", row_groups),
            ],
            grid=(columns, row_groups, batch * heads),
            threadgroup=(columns, row_groups, 1),
            output_shapes=[x.shape, state.shape],
            output_dtypes=[mx.float32, mx.float32],
        )
        return out, new_state

    def scan(
        self,
        x: mx.array,
        slot_weights: mx.array,
        eta: mx.array,
        state: mx.array | None = None,
        *,
        keep_checkpoints: bool = True,
    ) -> tuple[mx.array, mx.array]:
        """The scan over T tokens, as `fm_chunked`: x (B, T, H, P),
        slot_weights (B, T, H, m), eta (B, T, H), state (B, H, m, P) or None.

        Returns the reads r (B, T, H, P) and the final state, float32.
        Differentiable either way: `keep_checkpoints` saves the backward's
        checkpoints in the forward (training); without, the forward writes
        none and a gradient recomputes them (inference, and prompts).
        """
        batch, _, heads, width = x.shape
        if state is None:
            state = mx.zeros((batch, heads, slot_weights.shape[-1], width), mx.float32)
        arguments = (
            x,
            slot_weights.astype(mx.float32),
            eta.astype(mx.float32),
            state.astype(mx.float32),
        )
        if keep_checkpoints:
            reads, final_state, _ = self._scan_with_checkpoints(*arguments)
        else:
            reads, final_state = self._scan_recomputing_checkpoints(*arguments)
        return reads, final_state

    def _custom_scan(
        self,
        forward: Callable[..., list[mx.array]],
        checkpoints_of: Callable[[tuple[mx.array, ...], tuple[mx.array, ...]], mx.array],
    ) -> Callable[..., list[mx.array]]:
        """`forward` made differentiable: its vector-Jacobian product runs the backward
        on the checkpoints that `checkpoints_of(primals, outputs)` gives, which
        `_forward_with_checkpoints` wrote. (The callers pass lambdas so that each
        call looks the kernels up anew.)"""

        @mx.custom_function
        def scan(
            x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
        ) -> list[mx.array]:
            return forward(x, slot_weights, eta, state)

        @scan.vjp
        def scan_vjp(
            primals: tuple[mx.array, ...],
            cotangents: tuple[mx.array, ...],
            outputs: tuple[mx.array, ...],
        ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
            x, slot_weights, eta, _ = primals
            d_reads, d_final_state = cotangents[:2]
            d_x, d_slot_weights, d_eta, d_state = self._backward(
                x, slot_weights, eta, checkpoints_of(primals, outputs), d_reads, d_final_state
            )
            return d_x.astype(x.dtype), d_slot_weights, d_eta, d_state

        return scan

    @cached_property
    def _scan_with_checkpoints(self) -> Callable[..., list[mx.array]]:
        """The forward, saving the checkpoints its backward reads (training)."""
        return self._custom_scan(
            lambda *arrays: self._forward_with_checkpoints(*arrays), lambda _, out: out[2]
        )

    @cached_property
    def _scan_recomputing_checkpoints(self) -> Callable[..., list[mx.array]]:
        """The inference forward, writing no checkpoints; a gradient reruns the
        forward with checkpoints, then the backward."""
        return self._custom_scan(
            lambda *arrays: self._scan_forward_inference(*arrays),
            lambda primals, _: self._forward_with_checkpoints(*primals)[2],
        )

    def _takes_chunkwise(self, x: mx.array, slot_weights: mx.array, *, gradient: bool) -> bool:
        """The dispatch rule: the chunkwise kernels from `CHUNKWISE_MIN_LENGTH`
        tokens where their threadgroup memory fits (for a gradient, the
        backward's too), else the step kernels."""
        width, slots = x.shape[-1], slot_weights.shape[-1]
        forward_bytes = _chunkwise_threadgroup_bytes(slots, self._chunkwise_tiles(width))
        return (
            x.shape[1] >= CHUNKWISE_MIN_LENGTH
            and forward_bytes <= THREADGROUP_MEMORY_BYTES
            and (not gradient or self._chunkwise_backward_tiles(width, slots) > 0)
        )

    def _scan_forward_inference(
        self, x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
    ) -> list[mx.array]:
        if self._takes_chunkwise(x, slot_weights, gradient=False):
            return self._scan_chunkwise(x, slot_weights, eta, state)
        return self._scan_sequential_inference(x, slot_weights, eta, state)

    def _forward_with_checkpoints(
        self, x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
    ) -> list[mx.array]:
        if self._takes_chunkwise(x, slot_weights, gradient=True):
            return self._scan_chunkwise(x, slot_weights, eta, state, checkpoints=True)
        return self._scan_forward(x, slot_weights, eta, state)

    def _backward(
        self,
        x: mx.array,
        slot_weights: mx.array,
        eta: mx.array,
        checkpoints: mx.array,
        d_reads: mx.array,
        d_final_state: mx.array,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        """The backward matching `_forward_with_checkpoints` (same rule, same shapes)."""
        backward = (
            self._scan_chunkwise_backward
            if self._takes_chunkwise(x, slot_weights, gradient=True)
            else self._scan_backward
        )
        return backward(x, slot_weights, eta, checkpoints, d_reads, d_final_state)

    def _chunkwise_tiles(self, width: int) -> int:
        return min(-(-width // 8), CHUNKWISE_COLUMN_TILES, self.max_threads // SIMD_WIDTH)

    def _chunkwise_backward_tiles(self, width: int, slots: int) -> int:
        """The most tiles (up to the forward's) whose backward fits Metal's
        threadgroup memory; 0 where none does."""
        tiles = self._chunkwise_tiles(width)
        while tiles and _chunkwise_backward_threadgroup_bytes(slots, tiles) > (
            THREADGROUP_MEMORY_BYTES
        ):
            tiles -= 1
        return tiles

    def _scan_chunkwise(
        self,
        x: mx.array,
        slot_weights: mx.array,
        eta: mx.array,
        state: mx.array,
        checkpoints: bool = False,
    ) -> list[mx.array]:
        """The chunkwise forward; with `checkpoints`, also the state entering
        each chunk, (B, H, ⌈T / 8⌉, m, P), for its backward."""
        batch, length, heads, width = x.shape
        slots = slot_weights.shape[-1]
        tiles = self._chunkwise_tiles(width)
        _check_threadgroup_memory(
            "chunkwise scan", _chunkwise_threadgroup_bytes(slots, tiles), slots
        )
        kernel, output_shapes = self._chunkwise_kernel, [x.shape, state.shape]
        if checkpoints:
            kernel = self._chunkwise_checkpointing_kernel
            chunks = -(-length // CHUNKWISE_CHUNK)
            output_shapes.append((batch, heads, chunks, slots, width))
        return kernel(
            inputs=[x, slot_weights, eta, state],
            template=_chunkwise_template(slots, tiles),
            grid=(SIMD_WIDTH, -(-width // (8 * tiles)) * tiles, batch * heads),
            threadgroup=(SIMD_WIDTH, tiles, 1),
            output_shapes=output_shapes,
            output_dtypes=[mx.float32] * len(output_shapes),
        )

    def _scan_chunkwise_backward(
        self,
        x: mx.array,
        slot_weights: mx.array,
        eta: mx.array,
        checkpoints: mx.array,
        d_reads: mx.array,
        d_final_state: mx.array,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        batch, _, heads, width = x.shape
        slots = slot_weights.shape[-1]
        tiles = self._chunkwise_backward_tiles(width, slots)
        _check_threadgroup_memory(
            "chunkwise scan backward",
            _chunkwise_backward_threadgroup_bytes(slots, max(tiles, 1)),
            slots,
        )
        all_tiles = -(-width // (8 * tiles)) * tiles
        return _run_backward(
            self._chunkwise_backward_kernel,
            [x, slot_weights, eta, checkpoints, d_reads, d_final_state],
            blocks=all_tiles,
            template=_chunkwise_template(slots, tiles),
            grid=(SIMD_WIDTH, all_tiles, batch * heads),
            threadgroup=(SIMD_WIDTH, tiles, 1),
        )

    def _scan_sequential_inference(
        self, x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
    ) -> list[mx.array]:
        batch, _, heads, width = x.shape
        return self._inference_forward_kernel(
            inputs=[x, slot_weights, eta, state],
            template=[("M", slot_weights.shape[-1])],
            grid=(SIMD_WIDTH, width, batch * heads),
            threadgroup=self._forward_threadgroup(width),
            output_shapes=[x.shape, state.shape],
            output_dtypes=[mx.float32] * 2,
        )

    def _forward_threadgroup(self, width: int) -> tuple[int, int, int]:
        return (SIMD_WIDTH, min(width, FORWARD_COLUMNS, self.max_threads // SIMD_WIDTH), 1)

    def _scan_forward(
        self, x: mx.array, slot_weights: mx.array, eta: mx.array, state: mx.array
    ) -> list[mx.array]:
        batch, length, heads, width = x.shape
        slots = slot_weights.shape[-1]
        chunks = -(-length // self.scan_chunk)
        return self._forward_kernel(
            inputs=[x, slot_weights, eta, state],
            template=[("M", slots), ("CHUNK", self.scan_chunk)],
            grid=(SIMD_WIDTH, width, batch * heads),
            threadgroup=self._forward_threadgroup(width),
            output_shapes=[x.shape, state.shape, (batch, heads, chunks, width, slots)],
            output_dtypes=[mx.float32] * 3,
        )

    def _scan_backward(
        self,
        x: mx.array,
        slot_weights: mx.array,
        eta: mx.array,
        checkpoints: mx.array,
        d_reads: mx.array,
        d_final_state: mx.array,
    ) -> tuple[mx.array, mx.array, mx.array, mx.array]:
        batch, _, heads, width = x.shape
        slots = slot_weights.shape[-1]
        columns = max(
            1,
            min(
                width,
                BACKWARD_COLUMNS,
                self.max_threads // SIMD_WIDTH,
                BACKWARD_SCRATCH_FLOATS // (2 * slots),
            ),
        )
        _check_threadgroup_memory("scan backward", (2 * columns * slots + 2 * columns) * 4, slots)
        return _run_backward(
            self._backward_kernel,
            [x, slot_weights, eta, checkpoints, d_reads, d_final_state],
            blocks=-(-width // columns),
            template=[("M", slots), ("CHUNK", self.scan_chunk), ("COLUMNS", columns)],
            grid=(SIMD_WIDTH, width, batch * heads),
            threadgroup=(SIMD_WIDTH, columns, 1),
        )


def _run_backward(
    kernel: KernelLauncher, inputs: list[mx.array], *, blocks: int, **launch
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """A backward kernel on [x, slot_weights, eta, checkpoints, d_reads, d_final_state]:
    d_x, d_slot_weights, d_eta, d_state, the middle two summed over the `blocks` of value
    columns that each wrote its own partial sums."""
    x, slot_weights, d_final_state = inputs[0], inputs[1], inputs[-1]
    batch, length, heads, _ = x.shape
    d_x, d_slot_weights_partial, d_eta_partial, d_state = kernel(
        inputs=inputs,
        output_shapes=[
            x.shape,
            (batch, length, heads, blocks, slot_weights.shape[-1]),
            (batch, length, heads, blocks),
            d_final_state.shape,
        ],
        output_dtypes=[mx.float32] * 4,
        **launch,
    )
    return d_x, d_slot_weights_partial.sum(axis=-2), d_eta_partial.sum(axis=-1), d_state


def _chunkwise_template(slots: int, tiles: int) -> list[tuple[str, int]]:
    return [("M", slots), ("SLOTS", -(-slots // 8) * 8), ("COLUMN_TILES", tiles)]


def _chunkwise_threadgroup_bytes(slots: int, tiles: int) -> int:
    """Five 8 × m tiles, the 8 × 8 scores, and two 8 × 8 tiles per SIMD group."""
    padded = -(-slots // 8) * 8
    return (40 * padded + 64 + 128 * tiles) * 4


def _chunkwise_backward_threadgroup_bytes(slots: int, tiles: int) -> int:
    """The forward's five 8 × m tiles, the scores and η, and per SIMD group four
    8 × 8 tiles and the column sums of a window of 32 slots (2 · 32 × 8 + 32)."""
    padded = -(-slots // 8) * 8
    return (40 * padded + 72 + 800 * tiles) * 4


def _check_threadgroup_memory(kernel: str, size: int, slots: int) -> None:
    if size > THREADGROUP_MEMORY_BYTES:
        raise ValueError(
            f"the FM {kernel} kernel needs {size} bytes of threadgroup memory for {slots} slots; "
            f"Metal allows {THREADGROUP_MEMORY_BYTES} (run with MLX_FM_OPS_ONLY=1 for this model)"
        )


@cache
def default_kernels() -> FMKernels:
    """The kernels on `mx.fast.metal_kernel`, built once."""
    return FMKernels()
