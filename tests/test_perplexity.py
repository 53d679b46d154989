"""mlx_fm.perplexity (streamed losses, the position table, the plot, bad input) and
the parsers of examples/fetch_books.py."""

import importlib.util
import json
import math
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import mlx_fm
from mlx_fm import perplexity as ppl
from mlx_fm.training.data import read_documents

import mlx.core as mx
import numpy as np
import pytest

from conftest import tiny_model

TEXT = "It is a truth universally acknowledged, that a single man in possession " * 4


def full_forward_losses(model, tokens) -> np.ndarray:
    """Cross-entropy of each next token from one forward pass over the whole sequence."""
    logits = np.array(model(mx.array(tokens)[None])[0].astype(mx.float32), dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
    targets = np.asarray(tokens[1:])
    return log_z[:-1] - logits[np.arange(len(targets)), targets]


@pytest.mark.parametrize("segment", [1, 37, 64, 10_000])
def test_streamed_losses_equal_one_forward(segment):
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 256, 300).astype(np.int32)
    streamed = ppl.token_losses(model, tokens, segment=segment)
    assert streamed.dtype == np.float32 and streamed.shape == (299,)
    np.testing.assert_allclose(streamed, full_forward_losses(model, tokens), atol=1e-4)


def test_cli_perplexity_is_exp_of_mean_loss(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "book.txt"
    data.write_text(TEXT)
    ppl.main(["--model", str(tiny_model_dir), "--data", str(data), "--segment", "50"])
    printed = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    tokens = list(TEXT.encode())
    expected = math.exp(full_forward_losses(tiny_model(), tokens).mean())
    assert printed == pytest.approx(expected, rel=1e-4)


def test_jsonl_documents_are_joined_with_eos_and_truncated(tiny_model_dir, tmp_path):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "cd"}) + "\n")
    _, tokenizer = mlx_fm.load(tiny_model_dir)
    eos = tokenizer.eos_token_id
    documents = read_documents([data])
    assert ppl.text_tokens(documents, tokenizer).tolist() == [97, 98, eos, 99, 100]
    assert ppl.text_tokens(documents, tokenizer, max_tokens=3).tolist() == [97, 98, eos]


def test_position_table_on_hand_made_losses():
    losses = np.arange(1, 41, dtype=np.float32)  # the loss at position p is p
    rows = ppl.loss_by_position(losses, first_position=4)
    assert [(r.position, r.loss_so_far, r.bucket_start, r.bucket_loss) for r in rows] == [
        (4, 2.5, 2, 2.5),
        (8, 4.5, 4, 5.5),
        (16, 8.5, 8, 11.5),
        (32, 16.5, 16, 23.5),
    ]
    assert ppl.bucket_means(losses) == [
        (1, 1.0),
        (2, 2.5),
        (4, 5.5),
        (8, 11.5),
        (16, 23.5),
        (32, 36.0),
    ]
    table = ppl.format_table(ppl.loss_by_position(np.ones(4096), first_position=1024))
    assert [line.split()[0] for line in table.splitlines()] == ["position", "1K", "2K", "4K"]
    assert "[2K, 4K)" in table


def test_plot_writes_a_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from matplotlib.image import imread

    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(
        Figure,
        "savefig",
        lambda figure, *args, **kwargs: (figures.append(figure), savefig(figure, *args, **kwargs)),
    )
    path = tmp_path / "loss.png"
    losses = np.linspace(5, 2, 5000)
    ppl.plot_loss_by_position(
        {"a": losses, "b": losses + 1}, path, title="test", marks=[256], bucket_losses=losses
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary left behind
    assert path.stat().st_mode & 0o777 == 0o644
    axes = figures[0].axes[0]
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend == ["a", "b", "bucket mean [2^i, 2^(i+1))"]
    assert list(axes.get_lines()[-1].get_xdata()) == [256, 256]  # the mark
    assert axes.get_xscale() == "log"


def test_cli_plot_and_table(tiny_model_dir, tmp_path, capsys):
    data, plot = tmp_path / "book.txt", tmp_path / "out.png"
    data.write_text(TEXT * 4)  # 1,152 bytes: one table row, at 1K
    ppl.main(["--model", str(tiny_model_dir), "--data", str(data), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert re.search(r"^\s+1K\s+[0-9.]+\s+\[512, 1K\)\s+[0-9.]+$", out, re.M)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_matplotlib_is_imported_only_for_a_plot():
    code = "import sys, mlx_fm.perplexity; print('matplotlib' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def bad_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n')
    (tmp_path / "short.txt").write_text("a")
    (tmp_path / "ok.txt").write_text(TEXT)
    ok = ["--data", str(tmp_path / "ok.txt")]
    return {
        "missing": (["--data", str(tmp_path / "nope.txt")], "data file not found"),
        "empty": (["--data", str(tmp_path / "empty.txt")], "no text in"),
        "malformed jsonl": (["--data", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: malformed JSON"),
        "jsonl without text": (
            ["--data", str(tmp_path / "no_text.jsonl")],
            'no_text.jsonl:1: expected an object with a string "text"',
        ),
        "one token": (["--data", str(tmp_path / "short.txt")], "1 token(s)"),
        "max tokens": ([*ok, "--max-tokens", "1"], "--max-tokens must be at least 2"),
        "segment": ([*ok, "--segment", "0"], "--segment must be at least 1"),
        "plot directory": ([*ok, "--plot", str(tmp_path / "no" / "p.png")], "no directory"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "empty",
        "malformed jsonl",
        "jsonl without text",
        "one token",
        "max tokens",
        "segment",
        "plot directory",
    ],
)
def test_bad_input_is_one_line_and_exit_1(case, tiny_model_dir, tmp_path, capsys):
    argv, message = bad_inputs(tmp_path)[case]
    with pytest.raises(SystemExit) as exit_info:
        ppl.main(["--model", str(tiny_model_dir), *argv])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("mlx_fm: error: ") and message in err and err.count("\n") == 1


# ---- examples/fetch_books.py: its parsers, on small synthetic inputs (no network) -------------


def fetch_books():
    path = Path(__file__).parents[1] / "examples" / "fetch_books.py"
    spec = importlib.util.spec_from_file_location("fetch_books", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_strip_gutenberg_keeps_only_the_book():
    books = fetch_books()
    text = (
        "The Project Gutenberg EBook\r\n*** START OF THIS PROJECT GUTENBERG EBOOK EMMA ***\r\n"
        "\r\nEMMA\r\nChapter 1\r\n\r\n*** END OF THE PROJECT GUTENBERG EBOOK EMMA ***\r\nlicense"
    )
    assert books.strip_gutenberg(text) == "EMMA\nChapter 1\n"
    assert books.strip_gutenberg("\nHAMLET\n\nAct I\n\n") == "HAMLET\n\nAct I\n"


def test_bible_text_groups_verses_by_book():
    books = fetch_books()
    verses = [
        {"book": "Genesis", "chapter": 1, "verse": 1, "text": "In the beginning"},
        {"book": "Genesis", "chapter": 1, "verse": 2, "text": "And the earth"},
        {"book": "Exodus", "chapter": 1, "verse": 1, "text": "Now these"},
    ]
    lines = [json.dumps(v) + "\n" for v in verses]
    assert books.bible_text(lines) == (
        "Genesis\n\n1:1 In the beginning\n1:2 And the earth\n\nExodus\n\n1:1 Now these\n"
    )
    with pytest.raises(ValueError, match="kjv.jsonl:2"):
        books.bible_text([lines[0], '{"book": "Genesis"}\n'])


# R's XDR serialization, written by hand: version 3 header, then the object.
def r_int(value):
    return struct.pack(">i", value)


def r_chars(text, latin1=False):
    if text is None:
        return r_int(9) + r_int(-1)
    raw = text.encode("latin-1" if latin1 else "utf-8")
    return r_int(9 | ((4 if latin1 else 8) << 12)) + r_int(len(raw)) + raw


def r_strings(texts):
    return r_int(16) + r_int(len(texts)) + b"".join(r_chars(t) for t in texts)


def r_named_list(items, names_symbol):
    """A VECSXP with a names attribute; `names_symbol` is the symbol or a reference to it."""
    return (
        r_int(19 | 1 << 9)
        + r_int(len(items))
        + b"".join(items.values())
        + r_int(2 | 1 << 10)
        + names_symbol
        + r_strings(list(items))
        + r_int(254)
    )


def r_serialized(body):
    return b"X\n" + r_int(3) + r_int(0x40201) + r_int(0x30500) + r_int(5) + b"UTF-8" + body


def test_r_reader_reads_vectors_lists_and_references():
    books = fetch_books()
    # The inner list comes first in the stream, so it defines the symbol `names`.
    inner = r_named_list(
        {"n": r_int(13) + r_int(2) + r_int(7) + r_int(-3)}, r_int(1) + r_chars("names")
    )
    reference = r_int(255 | 1 << 8)  # to the first symbol
    data = r_serialized(r_named_list({"a": r_strings(["x", None, "é"]), "b": inner}, reference))
    assert books.RReader(data).read() == {"a": ["x", None, "é"], "b": {"n": [7, -3]}}
    latin1 = r_serialized(r_int(16) + r_int(1) + r_chars("café", latin1=True))
    assert books.RReader(latin1).read() == ["café"]
    with pytest.raises(ValueError, match="unsupported R object type 3"):
        books.RReader(r_serialized(r_int(3))).read()


def test_lazy_load_database_and_rda_file():
    books = fetch_books()
    novels = {"emma": ["EMMA", "", "CHAPTER I"], "persuasion": ["PERSUASION"]}
    rdb, positions = b"", {}
    for name, lines in novels.items():
        serialized = r_serialized(r_strings(lines))
        block = r_int(len(serialized)) + zlib.compress(serialized)
        positions[name] = r_int(13) + r_int(2) + r_int(len(rdb)) + r_int(len(block))
        rdb += block
    variables = r_named_list(positions, r_int(1) + r_chars("names"))
    index = r_named_list({"variables": variables}, r_int(255 | 1 << 8))
    rdx = zlib.compress(r_serialized(index), wbits=31)  # gzip, as R writes it
    assert books.lazy_load_objects(rdx, rdb) == novels

    rda = b"RDX3\n" + r_serialized(
        r_int(2 | 1 << 10) + r_int(1) + r_chars("emma") + r_strings(novels["emma"]) + r_int(254)
    )
    assert books.rda_objects(zlib.compress(rda, wbits=31)) == {"emma": novels["emma"]}


def test_data_path_is_mlx_lm_s_name_for_data():
    from mlx_fm.perplexity import build_parser

    assert build_parser().parse_args(["--data-path", "book.txt"]).data == "book.txt"
