"""The decode cache of an FM layer, which can be rewound by a few tokens (speculative decoding).

An `FMCache` holds what mlx-lm's `ArraysCache` holds for FM, [FM state (B, H, m, P) float32,
last K−1 conv inputs], plus those contents as they were before each of the last `max_undo`
tokens, so that `trim(n)` restores exactly the cache of n tokens ago. MLX arrays are
immutable: the snapshots are the arrays the forward passes made, kept alive, not copies.
"""

from typing import Optional

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import ArraysCache

DEFAULT_MAX_UNDO = 16  # enough for speculative decoding with up to 15 draft tokens

Contents = list[Optional[mx.array]]


class FMCache(ArraysCache):
    def __init__(
        self, size: int, left_padding: Optional[list[int]] = None, max_undo: int = DEFAULT_MAX_UNDO
    ) -> None:
        super().__init__(size, left_padding)
        self.max_undo = max_undo
        self.undo: list[Contents] = []  # the contents before each of the last tokens, oldest first

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
        if n > 0:
            self.cache = self.undo[-n]
            del self.undo[-n:]
        return n

    @property
    def state(self):
        return self.cache, self.left_padding, self.lengths, self.undo, self.max_undo

    @state.setter
    def state(self, value) -> None:
        self.cache, self.left_padding, self.lengths, undo, self.max_undo = value
        # A saved cache with no snapshots comes back without the empty list.
        self.undo = undo if isinstance(undo, list) else []

    def filter(self, batch_indices) -> None:
        super().filter(batch_indices)
        self.undo = [_rows(contents, batch_indices) for contents in self.undo]

    def extend(self, other: ArraysCache) -> None:
        """Append the rows of `other`; the rows' pasts differ, so no snapshots are kept."""
        super().extend(other)
        self.undo = []

    def extract(self, idx: int) -> "FMCache":
        """Row `idx` alone, without snapshots: a cache to store, not to rewind."""
        cache = FMCache(len(self.cache), max_undo=0)
        cache.cache = _rows(self.cache, slice(idx, idx + 1))
        return cache

    @property
    def nbytes(self) -> int:
        arrays = [a for contents in [self.cache, *self.undo] for a in contents if a is not None]
        return sum(a.nbytes for a in arrays)


def _rows(contents: Contents, rows) -> Contents:
    return [None if a is None else a[rows] for a in contents]


# mlx-lm's load_prompt_cache finds cache classes by name in its own module.
mlx_lm_cache.FMCache = FMCache
