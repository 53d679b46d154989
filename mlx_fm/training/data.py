"""Training data: documents from text/jsonl files, tokenized, packed into windows.

Documents are concatenated, each followed by EOS, and cut into windows of
seq_len + 1 tokens (inputs are a window's first seq_len tokens, targets its
last seq_len); consecutive windows share one token, so every token is a target.
A seeded, fixed fraction of the windows is held out for validation. The order
in which training windows are visited is a pure function of (seed, epoch), so a
run can resume anywhere from the number of windows it has seen.
"""

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, List

import numpy as np

TEXT_SUFFIXES = (".txt", ".jsonl")
_SPLIT_STREAM = 1 << 31  # keeps the split's random stream apart from the epochs'


def data_files(paths) -> List[Path]:
    """The files named, and the *.txt / *.jsonl files under the directories named, in order."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
            if not found:
                raise ValueError(f"no .txt or .jsonl files under {path}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"data path not found: {path}")
    return files


def read_documents(paths, what: str = "the data") -> List[str]:
    """Every non-empty document of the data_files of `paths`: a whole text file, or the "text"
    of each jsonl line. `what` names the data in the error raised when there is none."""
    documents = []
    for file in data_files(paths):
        reader = _jsonl_texts if file.suffix == ".jsonl" else _file_text
        documents.extend(text for text in reader(file) if text)
    if not documents:
        raise ValueError(f"{what} is empty: no text in {', '.join(map(str, paths))}")
    return documents


def _file_text(path: Path) -> Iterator[str]:
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{path} is not UTF-8 text: {error.reason} at byte {error.start}"
        ) from None


def _jsonl_texts(path: Path) -> Iterator[str]:
    with open(path, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{number}: not UTF-8 text: {error.reason}") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: malformed JSON line: {error.msg} (column {error.colno})"
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{number}: expected an object with a string "text" field')
            yield record["text"]


def token_stream(documents, tokenizer, eos_token_id: int, batch: int = 256) -> np.ndarray:
    """All documents' tokens, each document followed by EOS, as one int32 array.

    Documents are encoded as mlx-lm encodes prompts (with the tokenizer's own
    special tokens, e.g. a BOS), so a trained model sees at inference what it
    saw in training.
    """
    pieces = []
    for start in range(0, len(documents), batch):
        for ids in tokenizer(documents[start : start + batch])["input_ids"]:
            if not ids or ids[-1] != eos_token_id:
                ids = [*ids, eos_token_id]
            pieces.append(np.asarray(ids, dtype=np.int32))
    return np.concatenate(pieces)


@dataclass
class PackedData:
    train: np.ndarray  # (N, seq_len + 1) int32
    validation: np.ndarray  # (V, seq_len + 1) int32, V may be 0


def pack(stream: np.ndarray, seq_len: int, val_fraction: float, seed: int) -> PackedData:
    """Cut the token stream into windows and hold out a seeded `val_fraction` of them."""
    count = (len(stream) - 1) // seq_len
    if count < 1:
        raise ValueError(
            f"the data has {len(stream)} tokens, too few for one sequence of "
            f"seq_len {seq_len} (that needs {seq_len + 1}); lower --seq-len"
        )
    starts = np.arange(count) * seq_len
    windows = stream[starts[:, None] + np.arange(seq_len + 1)]
    held_out = round(count * val_fraction)
    if val_fraction > 0 and count > 1:
        held_out = max(held_out, 1)
    if held_out >= count:
        raise ValueError(
            f"the data makes {count} sequence(s) of seq_len {seq_len}: none left for "
            f"training after holding out val_fraction {val_fraction}"
        )
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(count)
    return PackedData(
        train=windows[np.sort(order[held_out:])], validation=windows[np.sort(order[:held_out])]
    )


class WindowOrder:
    """Which training window comes n-th: epoch by epoch, a permutation seeded by (seed, epoch)."""

    def __init__(self, num_windows: int, seed: int):
        self.num_windows, self.seed = num_windows, seed

    @lru_cache(maxsize=2)  # noqa: B019 (one order per run, kept for the run)
    def _epoch(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)

    def indices(self, start: int, count: int) -> np.ndarray:
        """Indices of windows start, start + 1, ..., start + count − 1 of the run."""
        positions = np.arange(start, start + count)
        epochs, offsets = np.divmod(positions, self.num_windows)
        return np.array([self._epoch(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)
