"""The decode cache of an FM layer, which can be rewound by a few tokens (speculative decoding).

An `FMCache` holds what mlx-lm's `ArraysCache` holds for FM, [FM state (B, H, m, P) float32,
last K−1 conv inputs], plus what it takes to go back before each of the last `max_undo` tokens,
so that `trim(n)` restores exactly the cache of n tokens ago: the contents before a token, as a
forward on MLX ops made them (MLX arrays are immutable: they are kept alive, not copied), or,
after a decode step in C, what that step overwrote (`Overwritten`).

A decode step in C (native.DecodeStep) updates the contents in place, rather than copying them
every token: `writable_contents` gives it arrays that no one else was given. Whoever reads
`cache` (or `state`, or copies the cache) may hold on to those arrays, so the next step in C
works on a copy of them.
"""

from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import ArraysCache

DEFAULT_MAX_UNDO = 16  # enough for speculative decoding with up to 15 draft tokens

Contents = list[Optional[mx.array]]


class Overwritten(NamedTuple):
    """What a decode step in C overwrote in a layer's contents, to undo it by: the step's
    record of every layer's (native.StepOverwrites), and this layer's index in it."""

    step: object
    layer: int

    @property
    def nbytes(self) -> int:
        return self.step.layer_nbytes


class FMCache(ArraysCache):
    def __init__(
        self, size: int, left_padding: Optional[list[int]] = None, max_undo: int = DEFAULT_MAX_UNDO
    ) -> None:
        super().__init__(size, left_padding)
        self.max_undo = max_undo
        # Before each of the last tokens, oldest first: the contents then, or what its decode
        # step in C overwrote.
        self.undo: list[Contents | Overwritten] = []

    @property
    def cache(self) -> Contents:
        """The contents. The caller may keep them: a decode step in C no longer updates them
        in place, but a copy."""
        self._writable = False
        return self._contents

    @cache.setter
    def cache(self, contents: Contents) -> None:
        self._contents, self._writable = contents, False

    def holds_contents(self) -> bool:
        """Whether there is a state (and conv inputs) for every row: a decode step's input."""
        return self._writable or all(a is not None for a in self._contents)

    def holds_float32(self) -> bool:
        return self._writable or all(a.dtype == mx.float32 for a in self._contents if a is not None)

    def writable_contents(self) -> Contents:
        """The contents, for a decode step in C to update in place (then `record_overwritten`):
        float32 arrays, evaluated and contiguous, that no one else was given; copies of the
        contents, the first time after someone read them."""
        if not self._writable:
            self._contents = _copies(self._contents)
            self._writable = True
        return self._contents

    def record_overwritten(self, overwritten: Optional[Overwritten]) -> None:
        """After a decode step in C updated `writable_contents` in place: what it overwrote,
        None if it kept nothing (then this cache can no longer be rewound)."""
        if overwritten is None or not self.snapshots_for(1):
            self.undo = []
            return
        self.undo.append(overwritten)
        if len(self.undo) > self.max_undo:
            del self.undo[0]

    def snapshots_for(self, length: int) -> int:
        """For how many of a forward's last `length` tokens to keep the contents before them:
        none while rows are right-padded to different lengths (each row ends elsewhere)."""
        return 0 if self.lengths is not None else min(length, self.max_undo)

    def record(self, contents: list[Contents], length: int) -> None:
        """After a forward of `length` tokens: `contents` are the contents before each of its
        last len(contents) − 1 tokens, then after the last one."""
        before = contents[:-1]
        if len(before) < length:  # older snapshots are no longer adjacent to these
            self.undo = before
        else:
            self.undo = self.undo + before
        del self.undo[: max(len(self.undo) - self.max_undo, 0)]
        self.cache = contents[-1]

    def is_trimmable(self) -> bool:
        """Whether this cache can be rewound at all: by up to `max_undo` tokens, as many as it
        holds snapshots for (`trimmable_tokens`)."""
        return self.max_undo > 0

    @property
    def trimmable_tokens(self) -> int:
        return len(self.undo)

    def trim(self, n: int) -> int:
        """Rewind by `n` tokens, exactly; a ValueError if fewer are kept."""
        if n > len(self.undo):
            raise ValueError(
                f"an FM cache can rewind at most {len(self.undo)} tokens now (it keeps the "
                f"states of the last {self.max_undo}), not {n}"
            )
        for before in reversed(self.undo[len(self.undo) - n :]):
            if isinstance(before, Overwritten):
                _undo(self.writable_contents(), before)
            else:
                self.cache = before
        del self.undo[len(self.undo) - n :]
        return n

    @property
    def state(self):
        return self.cache, self.left_padding, self.lengths, list(self._snapshots()), self.max_undo

    @state.setter
    def state(self, value) -> None:
        self.cache, self.left_padding, self.lengths, undo, self.max_undo = value
        # A saved cache with no snapshots comes back without the empty list.
        self.undo = undo if isinstance(undo, list) else []

    def _snapshots(self) -> list[Contents]:
        """`undo` as the contents before each token (those of decode steps in C, rebuilt)."""
        if not any(isinstance(before, Overwritten) for before in self.undo):
            return self.undo
        contents, snapshots = self._contents, []
        for before in reversed(self.undo):
            if isinstance(before, Overwritten):
                contents = _copies(contents)
                _undo(contents, before)
            else:
                contents = before
            snapshots.append(contents)
        self.undo = snapshots[::-1]
        return self.undo

    def filter(self, batch_indices) -> None:
        self.undo = [_rows(contents, batch_indices) for contents in self._snapshots()]
        super().filter(batch_indices)

    def extend(self, other: ArraysCache) -> None:
        """Append the rows of `other`; the rows' pasts differ, so no snapshots are kept."""
        super().extend(other)
        self.undo = []

    def extract(self, idx: int) -> "FMCache":
        """Row `idx` alone, without snapshots: a cache to store, not to rewind."""
        cache = FMCache(len(self._contents), max_undo=0)
        cache.cache = _rows(self.cache, slice(idx, idx + 1))
        return cache

    @property
    def batch_size(self) -> int:
        rows = [a.shape[0] for a in self._contents if a is not None]
        return rows[0] if rows else super().batch_size

    def empty(self) -> bool:
        return self._contents[0] is None

    @property
    def nbytes(self) -> int:
        held = [self._contents] + [[b] if isinstance(b, Overwritten) else b for b in self.undo]
        return sum(a.nbytes for arrays in held for a in arrays if a is not None)

    def __getstate__(self) -> dict:
        # A copy (copy.copy, copy.deepcopy) shares the arrays' memory with this cache, and
        # has a list of its own.
        self._writable = False
        return self.__dict__ | {"undo": list(self.undo)}


def _copies(contents: Contents) -> Contents:
    """Float32 copies of `contents`, evaluated, in memory of their own."""
    return [None if a is None else mx.array(np.array(a, dtype=np.float32)) for a in contents]


def _undo(contents: Contents, overwritten: Overwritten) -> None:
    """Undo, in place in writable contents, a decode step that overwrote `overwritten`."""
    slots, slot_rows, left_conv_input = overwritten.step.of_layer(overwritten.layer)
    state = np.asarray(contents[0])
    rows, heads = np.ogrid[: state.shape[0], : state.shape[1]]
    state[rows[..., None], heads[..., None], slots] = slot_rows
    if left_conv_input is not None:
        conv_inputs = np.asarray(contents[1])
        conv_inputs[:, 1:] = conv_inputs[:, :-1].copy()
        conv_inputs[:, 0] = left_conv_input


def _rows(contents: Contents, rows) -> Contents:
    return [None if a is None else a[rows] for a in contents]


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
mlx_lm_cache.FMCache = FMCache
