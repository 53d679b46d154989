"""The bundled default model: found without --model, trained, and writing English."""

import json

import mlx_fm
from mlx_fm import utils
from mlx_fm.perplexity import perplexity, text_tokens, token_losses

import pytest

from conftest import run_cli

# Not in the training data (a 19th-century English text outside the books the model saw).
PASSAGE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it "
    "was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness, it was the "
    "spring of hope, it was the winter of despair, we had everything before us, we had "
    "nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way."
)
COMMON_WORDS = {
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "that",
    "i",
    "he",
    "was",
    "it",
    "his",
    "her",
    "not",
    "be",
    "with",
    "is",
    "for",
    "as",
    "had",
    "you",
    "my",
    "she",
    "but",
    "him",
    "have",
    "me",
    "so",
    "all",
    "by",
    "which",
    "they",
    "shall",
    "unto",
    "at",
    "on",
    "this",
    "their",
    "no",
    "would",
    "or",
    "what",
    "from",
    "were",
    "will",
}


@pytest.fixture(scope="module")
def default_model():
    return mlx_fm.load()


def test_the_card_describes_the_shipped_weights(default_model):
    model, tokenizer = default_model
    card = json.loads((utils.DEFAULT_MODEL_PATH / "card.json").read_text())
    assert card["tokens_seen"] > 1e6 and card["variant"] in card["variants"]
    assert model.args.vocab_size == len(tokenizer._tokenizer) == 4096
    size = sum(f.stat().st_size for f in utils.DEFAULT_MODEL_PATH.iterdir())
    assert size < 40e6


def test_the_card_records_two_passes_and_a_quantization_within_one_percent(default_model):
    model, _ = default_model
    card = json.loads((utils.DEFAULT_MODEL_PATH / "card.json").read_text())
    float32, shipped = (
        card["variants"][name]["val_perplexity"] for name in ("float32", card["variant"])
    )
    assert card["passes"] >= 2
    assert shipped <= 1.01 * float32
    assert shipped < card["replaced_model_val_perplexity"]
    assert len(card["routing"]["layers"]) == model.args.num_hidden_layers


def test_it_predicts_unseen_english_far_better_than_chance(default_model):
    model, tokenizer = default_model
    losses = token_losses(model, text_tokens([PASSAGE], tokenizer))
    # Uniform guessing is perplexity 4096; the first few words have no context.
    assert perplexity(losses) < 150  # 84 measured (the replaced model: 90); untrained ~4000


@pytest.mark.slow
def test_generate_without_model_writes_english():
    result = run_cli(
        "mlx_fm.generate",
        "--prompt",
        "It is a truth universally",
        "--max-tokens",
        "40",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    words = result.stdout.lower().replace(",", " ").replace(".", " ").replace(";", " ").split()
    assert len(words) >= 15
    assert sum(w.strip("'\"!?:") in COMMON_WORDS for w in words) >= len(words) // 5
    assert sum(w.strip("'\"!?:-").isalpha() for w in words) >= 0.9 * len(words)


def test_a_missing_default_model_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(utils, "DEFAULT_MODEL_PATH", tmp_path / "gone")
    with pytest.raises(mlx_fm.ModelLoadError, match="bundled default model is missing"):
        mlx_fm.load()
