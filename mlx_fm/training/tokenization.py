"""The tokenizer of a run: the byte tokenizer, a given one, or sentencepiece trained on the data.

Whatever its source, it becomes a Hugging Face tokenizer, saved into every
checkpoint so that `mlx_fm.load` (and mlx-lm's tokenizer wrapper) load it.
"""

import io
import os
import tempfile
from pathlib import Path

import numpy as np

from ..tokenizer import byte_tokenizer

BYTES = "bytes"
# End-of-text tokens of common tokenizers, for a bare tokenizer.json that does not name one.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>")
_MAX_SENTENCES = 2_000_000  # lines sampled to train sentencepiece


def resolve_tokenizer(config, documents, group):
    """The tokenizer `config` asks for (default: bytes); it must have an EOS token."""
    if config.vocab_size is not None:
        model = None
        if group.rank() == 0:
            model = train_sentencepiece(documents, config.vocab_size, config.seed)
        tokenizer = sentencepiece_tokenizer(broadcast_bytes(model, group))
    elif config.tokenizer in (None, BYTES):
        tokenizer = byte_tokenizer()
    else:
        tokenizer = load_tokenizer_file(Path(config.tokenizer))
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer {config.tokenizer} has no end-of-text (EOS) token")
    return tokenizer


def load_tokenizer_file(path: Path):
    """A sentencepiece .model file, a Hugging Face tokenizer directory, or a tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not path.exists():
        raise ValueError(
            f"tokenizer not found: {path} (use 'bytes', a sentencepiece .model, "
            "a Hugging Face tokenizer directory or a tokenizer.json)"
        )
    try:
        if path.suffix == ".model":
            return sentencepiece_tokenizer(path.read_bytes())
        if path.is_dir():
            return AutoTokenizer.from_pretrained(str(path))
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except (OSError, ValueError, RuntimeError, TypeError) as error:
        raise ValueError(f"cannot load the tokenizer {path}: {error}") from error
    vocab = tokenizer.get_vocab()
    eos = next((token for token in _EOS_CANDIDATES if token in vocab), None)
    if eos is not None:
        tokenizer.eos_token = eos
    return tokenizer


def load_saved_tokenizer(path: Path):
    """The tokenizer saved in a checkpoint."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # it warns that it does not know model_type
    try:
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        transformers_logging.set_verbosity(verbosity)


def train_sentencepiece(documents, vocab_size: int, seed: int) -> bytes:
    """A BPE sentencepiece model (byte fallback, text kept as is) trained on the documents'
    lines."""
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    lines = (line for document in documents for line in document.splitlines() if line.strip())
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines,
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            input_sentence_size=_MAX_SENTENCES,
            shuffle_input_sentence=True,
            max_sentence_length=1 << 16,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        raise ValueError(
            f"cannot train a sentencepiece tokenizer of vocab_size {vocab_size}: "
            f"{str(error).splitlines()[-1]}"
        ) from error
    return model.getvalue()


def sentencepiece_tokenizer(model: bytes):
    """A sentencepiece model as a Hugging Face fast tokenizer that encodes as sentencepiece does.

    (transformers converts BPE and unigram models alike, normalizer included.)
    """
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "tokenizer.model").write_bytes(model)
        return AutoTokenizer.from_pretrained(folder)


def broadcast_bytes(data, group) -> bytes:
    """Rank 0's bytes on every rank (the others pass None)."""
    import mlx.core as mx

    if group.size() == 1:
        return data
    mine = np.frombuffer(data, np.uint8) if group.rank() == 0 else np.zeros(0, np.uint8)
    size = int(mx.distributed.all_sum(mx.array([mine.size]), group=group).item())
    buffer = np.zeros(size, np.int32)
    buffer[: mine.size] = mine
    summed = mx.distributed.all_sum(mx.array(buffer), group=group)
    return np.array(summed).astype(np.uint8).tobytes()
