"""Hostile input to every command: one `mlx_fm: error:` line, a non-zero exit, no traceback,
and no file created or changed but those the command owns.

Each command runs in this process (`main(argv)`), with tmp_path as working directory.
"""

import importlib
import importlib.metadata
import io
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

from mlx_fm.utils import TOKENIZER_FILES

import mlx.core as mx
import pytest

TEXT_LINES = '{"text": "the cat sat on the mat"}\n' * 4


@dataclass
class Case:
    command: str  # the module under mlx_fm
    args: str  # shell words; {model}, {bare_model} (no tokenizer) and {tmp} are filled in
    message: str  # in the error line
    files: Tuple[Tuple[str, str], ...] = ()  # (path under tmp_path, text) written beforehand
    stdin: bytes = b""
    creates: Tuple[str, ...] = ()  # what the command owns, and keeps even though it fails


def case(name, command, args, message, files=None, **kwargs):
    return pytest.param(
        Case(command, args, message, tuple((files or {}).items()), **kwargs),
        id=f"{command}: {name}",
    )


BAD_YAML = {"bad.yaml": "steps: 10\nmodel: [1, 2\nseq_len: 3\n"}
CORPUS = {"corpus.txt": "the cat sat on the mat. " * 200}
LORA_DATA = {"data/train.jsonl": TEXT_LINES, "data/valid.jsonl": TEXT_LINES}
LORA = "--model {model} --train --iters 2 --adapter-path adapters"

CASES = [
    case("missing model", "generate", "--model {tmp}/nowhere -p hi", "model path not found"),
    case("not a model", "generate", "--model {tmp}/data -p hi", "config.json", LORA_DATA),
    case(
        "model without tokenizer", "generate", "--model {bare_model} -p hi", "no tokenizer files in"
    ),
    case("empty prompt", "generate", "--model {model} -p ''", "the prompt is empty"),
    case("empty stdin", "generate", "--model {model} -p -", "the prompt is empty"),
    case("max-tokens 0", "generate", "--model {model} -p hi --max-tokens 0", "--max-tokens"),
    case("max-tokens -1", "generate", "--model {model} -p hi --max-tokens -1", "--max-tokens"),
    case("max-tokens many", "generate", "--model {model} -p hi -m many", "must be an integer"),
    case("temp < 0", "generate", "--model {model} -p hi --temp -1", "--temp"),
    case("top-p 0", "generate", "--model {model} -p hi --top-p 0", "--top-p"),
    case("top-p > 1", "generate", "--model {model} -p hi --top-p 1.5", "--top-p"),
    case("top-k < 0", "generate", "--model {model} -p hi --top-k -1", "--top-k"),
    case("min-p > 1", "generate", "--model {model} -p hi --min-p 2", "--min-p"),
    case(
        "prefill 0",
        "generate",
        "--model {model} -p hi --prefill-step-size 0",
        "--prefill-step-size",
    ),
    case("unknown option", "generate", "--model {model} -p hi --bogus", "unrecognized arguments"),
    case(
        "missing adapters",
        "generate",
        "--model {model} -p hi --adapter-path {tmp}/nowhere",
        "adapter path does not exist",
    ),
    case(
        "missing draft model",
        "generate",
        "--model {model} -p hi --draft-model {tmp}/nowhere",
        "model path not found",
    ),
    case(
        "num-draft-tokens 0",
        "generate",
        "--model {model} -p hi --draft-model {model} --num-draft-tokens 0",
        "--num-draft-tokens",
    ),
    case("verbose maybe", "generate", "--model {model} -p hi --verbose maybe", "true or false"),
    case("missing adapters", "chat", "--model {model} --adapter-path {tmp}/nowhere", "adapter"),
    case("missing model", "chat", "--model {tmp}/nowhere", "model path not found"),
    case("max-tokens -1", "chat", "--model {model} --max-tokens -1", "--max-tokens"),
    case("max-tokens 0", "chat", "--model {model} --max-tokens 0", "--max-tokens"),
    case("temp < 0", "chat", "--model {model} --temp -0.5", "--temp"),
    case("top-p > 1", "chat", "--model {model} --top-p 2", "--top-p"),
    case("min-p < 0", "chat", "--model {model} --min-p -0.1", "--min-p"),
    case("missing state", "chat", "--model {model} --load-state {tmp}/nothing", "no saved chat"),
    case(
        "junk state",
        "chat",
        "--model {model} --load-state {tmp}/junk.safetensors",
        "not a saved mlx_fm chat",
        {"junk.safetensors": "not a state"},
    ),
    case("missing source", "convert", "--hf-path {tmp}/nowhere --mlx-path out", "not found"),
    case(
        "quantize and dequantize",
        "convert",
        "--hf-path {model} -q --dequantize",
        "either --quantize or --dequantize",
    ),
    case(
        "upload of --to-hf",
        "convert",
        "--hf-path {model} --to-hf --upload-repo me/fm",
        "--upload-repo uploads MLX models",
    ),
    case("shard size 0", "convert", "--hf-path {model} --max-shard-size 0", "must be positive"),
    case(
        "upload offline",
        "convert",
        "--hf-path {model} --mlx-path out --upload-repo me/fm",
        "out was written, but uploading it to me/fm failed",
        creates=("out",),
    ),
    case(
        "broken YAML",
        "train",
        "--config bad.yaml --data corpus.txt --output run",
        "bad.yaml, line 3: not valid YAML",
        BAD_YAML,
    ),
    case(
        "YAML wrong value",
        "train",
        "--config c.yaml --data corpus.txt --output run",
        "seq_len must be a positive integer",
        {"c.yaml": "seq_len: many\n"},
    ),
    case(
        "YAML unknown key",
        "train",
        "--config c.yaml --data corpus.txt --output run",
        "unknown option(s)",
        {"c.yaml": "stepz: 3\n"},
    ),
    case(
        "steps 0",
        "train",
        "--data corpus.txt --output run --steps 0",
        "steps must be a positive integer",
    ),
    case("no output", "train", "--data corpus.txt", "no output directory"),
    case(
        "missing data",
        "train",
        "--data {tmp}/nowhere.txt --output run --steps 2 --warmup-steps 0",
        "not found",
    ),
    case(
        "malformed JSON line",
        "train",
        "--data bad.jsonl --output run --seq-len 32",
        "bad.jsonl:3: malformed JSON",
        {"bad.jsonl": '{"text": "fine"}\n{"text": "also fine"}\n{"text": oops}\n'},
    ),
    case(
        "empty data",
        "train",
        "--data empty.txt blank.jsonl --output run --seq-len 32",
        "training data is empty",
        {"empty.txt": "", "blank.jsonl": "\n\n"},
    ),
    case(
        "too little data",
        "train",
        "--data short.txt --output run --seq-len 32",
        "too few for one sequence of seq_len 32",
        {"short.txt": "too short for a sequence"},
    ),
    case(
        "output under a file",
        "train",
        "--data corpus.txt --output a_file/run",
        "cannot write to the output directory",
        {"a_file": "in the way", **CORPUS},
    ),
    case(
        "someone else's model/",
        "train",
        "--data corpus.txt --output run",
        "already exists (pass --force",
        {"run/model/notes.txt": "mine", **CORPUS},
    ),
    case(
        "missing model",
        "lora",
        "--model {tmp}/nowhere --train --data data",
        "model path not found",
        LORA_DATA,
    ),
    case("missing data", "lora", f"{LORA} --data nowhere", "data directory not found"),
    case(
        "data is a file",
        "lora",
        f"{LORA} --data data/train.jsonl",
        "must be a directory",
        LORA_DATA,
    ),
    case(
        "no train.jsonl",
        "lora",
        f"{LORA} --data data",
        "no train.jsonl in",
        {"data/valid.jsonl": TEXT_LINES},
    ),
    case(
        "empty train.jsonl",
        "lora",
        f"{LORA} --data data",
        "train.jsonl is empty",
        {"data/train.jsonl": ""},
    ),
    case(
        "malformed JSON",
        "lora",
        f"{LORA} --data data",
        "train.jsonl, line 3: not valid JSON",
        {"data/train.jsonl": '{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n'},
    ),
    case(
        "empty line",
        "lora",
        f"{LORA} --data data",
        "valid.jsonl, line 2: an empty line",
        {**LORA_DATA, "data/valid.jsonl": '{"text": "a"}\n\n'},
    ),
    case(
        "mixed formats",
        "lora",
        f"{LORA} --data data",
        "line 2: no 'completion'",
        {"data/train.jsonl": '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n'},
    ),
    case(
        "unknown format",
        "lora",
        f"{LORA} --data data",
        "line 1: no data format's keys",
        {"data/train.jsonl": '{"question": "a"}\n'},
    ),
    case(
        "broken YAML",
        "lora",
        f"{LORA} --data data -c bad.yaml",
        "bad.yaml, line 3: not valid YAML",
        {**LORA_DATA, **BAD_YAML},
    ),
    case(
        "batch size 0",
        "lora",
        f"{LORA} --data data --batch-size 0",
        "batch_size must be a positive integer",
        LORA_DATA,
    ),
    case(
        "too many layers", "lora", f"{LORA} --data data --num-layers 9", "--num-layers", LORA_DATA
    ),
    case(
        "batch larger than the data",
        "lora",
        f"{LORA} --data data --batch-size 64",
        "batch_size=64",
        LORA_DATA,
    ),
    case(
        "neither train nor test",
        "lora",
        "--model {model} --data data",
        "give --train, --test or both",
        LORA_DATA,
    ),
    case(
        "unknown fine-tune type",
        "lora",
        f"{LORA} --data data --fine-tune-type half",
        "invalid choice",
        LORA_DATA,
    ),
    case(
        "missing model",
        "fuse",
        "--model {tmp}/nowhere --adapter-path adapters",
        "model path not found",
    ),
    case(
        "not a model",
        "fuse",
        "--model {tmp}/data --adapter-path adapters",
        "no config.json in",
        LORA_DATA,
    ),
    case(
        "non-empty destination",
        "fuse",
        "--model {model} --adapter-path adapters --save-path out",
        "already exists (pass --force",
        {"out/notes.txt": "mine"},
    ),
    case(
        "missing adapters",
        "fuse",
        "--model {model} --adapter-path {tmp}/nowhere",
        "adapter path does not exist",
    ),
    case(
        "missing data",
        "perplexity",
        "--model {model} --data {tmp}/nowhere.txt",
        "data file not found",
    ),
    case(
        "empty data",
        "perplexity",
        "--model {model} --data book.txt",
        "no text in",
        {"book.txt": ""},
    ),
    case(
        "max-tokens 1",
        "perplexity",
        "--model {model} --data book.txt --max-tokens 1",
        "--max-tokens must be at least 2",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "segment 0",
        "perplexity",
        "--model {model} --data book.txt --segment 0",
        "--segment",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "missing data",
        "inspect",
        "--model {model} --data {tmp}/nowhere.txt",
        "data file not found",
    ),
    case(
        "empty data", "inspect", "--model {model} --data book.txt", "no text in", {"book.txt": ""}
    ),
    case(
        "max-tokens 1",
        "inspect",
        "--model {model} --data book.txt --max-tokens 1",
        "--max-tokens must be at least 2",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "plot directory under a file",
        "inspect",
        "--model {model} --data book.txt --plot a_file/plots",
        "cannot make the plot directory",
        {"a_file": "in the way", "book.txt": "Once upon a time."},
    ),
    case(
        "plot directory is a file",
        "inspect",
        "--model {model} --data book.txt --plot book.txt",
        "cannot make the plot directory",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "JSON in a missing directory",
        "inspect",
        "--model {model} --data book.txt --json no/stats.json",
        "no directory for the JSON file",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "map layer out of range",
        "inspect",
        "--model {model} --data book.txt --map-layer 2",
        "--map-layer 2: the model has 2 layers",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "map head out of range",
        "inspect",
        "--model {model} --data book.txt --map-head 5",
        "--map-head 5: the model has 2 heads",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "map start past the text",
        "inspect",
        "--model {model} --data book.txt --map-start 17",
        "--map-start 17: the text has 17 tokens",
        {"book.txt": "Once upon a time."},
    ),
    case(
        "negative map head",
        "inspect",
        "--model {model} --data book.txt --map-head -1",
        "must be an integer of at least 0",
        {"book.txt": "Once upon a time."},
    ),
    case("context 1", "benchmark", "--contexts 1 --models fm", "contexts must be at least 2"),
    case("unknown model", "benchmark", "--models gpt", "invalid choice"),
    case("missing model", "server", "--model {tmp}/nowhere", "model path not found"),
    case("model without tokenizer", "server", "--model {bare_model}", "no tokenizer files in"),
    case(
        "missing draft model",
        "server",
        "--model {model} --draft-model {tmp}/nowhere",
        "model path not found",
    ),
    case("port too large", "server", "--model {model} --port 70000", "--port"),
    case("port not a number", "server", "--model {model} --port http", "--port"),
    case("max-tokens 0", "server", "--model {model} --max-tokens 0", "--max-tokens"),
    case("temp < 0", "server", "--model {model} --temp -1", "--temp"),
    case(
        "cache bytes not a size",
        "server",
        "--model {model} --prompt-cache-bytes lots",
        "--prompt-cache-bytes",
    ),
    case(
        "request bytes < 0",
        "server",
        "--model {model} --max-request-bytes -1",
        "--max-request-bytes",
    ),
    case(
        "template args not JSON",
        "server",
        "--model {model} --chat-template-args {{bad",
        "--chat-template-args",
    ),
    case("unknown option", "server", "--model {model} --bogus", "unrecognized arguments"),
]


@pytest.fixture(scope="module")
def bare_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model without its tokenizer files."""
    path = tmp_path_factory.mktemp("bare") / "model"
    shutil.copytree(
        tiny_model_dir, path, ignore=lambda _, names: [n for n in names if n in TOKENIZER_FILES]
    )
    return path


def snapshot(*roots: Path) -> Dict[str, bytes]:
    """Every file and directory under `roots`, with the files' contents."""
    return {
        str(path): path.read_bytes() if path.is_file() else b"<dir>"
        for root in roots
        for path in root.rglob("*")
    }


def offline_hub(*_args, **_kwargs):
    raise ConnectionError("[Errno -2] Name or service not known\n(while uploading)")


def run_main(command: str, argv, stdin: bytes, monkeypatch, capsys):
    """(exit status, stdout, stderr) of the installed command `mlx_fm.<command> argv`."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    (entry_point,) = importlib.metadata.entry_points(
        group="console_scripts", name=f"mlx_fm.{command}"
    )
    main = entry_point.load()
    try:
        main(argv)
        status = 0
    except SystemExit as exit:
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_leaves_nothing(
    case, tiny_model_dir, bare_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("mlx_lm.utils.upload_to_hub", offline_hub)
    for name, text in case.files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    argv = [
        word.format(model=tiny_model_dir, bare_model=bare_model_dir, tmp=tmp_path)
        for word in shlex.split(case.args)
    ]
    before = snapshot(tmp_path, tiny_model_dir)

    status, out, err = run_main(case.command, argv, case.stdin, monkeypatch, capsys)

    assert status not in (0, None), out
    assert "Traceback" not in out + err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_fm: error: "), err
    assert case.message in lines[0]
    owned = [str(tmp_path / name) for name in case.creates]
    after = {
        path: content
        for path, content in snapshot(tmp_path, tiny_model_dir).items()
        if not path.startswith(tuple(owned))
    }
    assert after == before
    assert all(Path(path).exists() for path in owned)


def generate_output(argv, stdin, monkeypatch, capsys):
    status, out, err = run_main("generate", argv, stdin, monkeypatch, capsys)
    assert status in (0, None), err
    return out, err


@pytest.mark.parametrize("source", ["argument", "stdin"])
def test_a_prompt_that_is_not_utf8_is_decoded_with_one_warning(
    source, tiny_model_dir, monkeypatch, capsys
):
    common = ["--model", str(tiny_model_dir), "--max-tokens", "4"]
    if source == "argument":  # sys.argv carries undecodable bytes as surrogate escapes
        out, err = generate_output([*common, "-p", "hi \udcff\udcfe"], b"", monkeypatch, capsys)
    else:
        out, err = generate_output([*common, "-p", "-"], b"hi \xff\xfe", monkeypatch, capsys)
    expected, _ = generate_output([*common, "-p", "hi \ufffd\ufffd"], b"", monkeypatch, capsys)
    assert out == expected
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlx_fm: warning: "), err
    assert "not valid UTF-8" in lines[0]


def chat(tiny_model_dir, lines: bytes, monkeypatch, capsys):
    status, out, err = run_main(
        "chat", ["--model", str(tiny_model_dir), "--max-tokens", "6"], lines, monkeypatch, capsys
    )
    assert status in (0, None) and "Traceback" not in out + err, err
    return out, err


def replies(out: str):
    """What followed each `>> ` prompt of a chat transcript."""
    return out.split(">> ")[1:]


def test_chat_survives_hostile_lines_and_saves_what_it_loads(
    tiny_model_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    script = (
        b"Hello\n\xff\xfe there\n/save conv\n/reset\n/load conv\n/load nothing\n"
        b"/save no/such/dir/conv\n/load\n/frobnicate\n"
    )
    out, err = chat(tiny_model_dir, script, monkeypatch, capsys)
    answers = replies(out)
    assert answers[2].startswith("[saved conv.safetensors:")
    assert answers[4].startswith("[loaded conv.safetensors:")
    assert "4 messages" in answers[4]  # both turns, the second one despite its bytes
    assert answers[5].startswith("[error: no saved chat")
    assert answers[6].startswith("[error: no directory")
    assert answers[7].startswith("[usage: /load FILE]")
    assert answers[8].startswith("[commands:")
    assert err.splitlines() == [
        "mlx_fm: warning: that line is not valid UTF-8: its "
        "undecodable bytes were replaced by U+FFFD"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["conv.safetensors"]


def session_after(tiny_model_dir, lines: bytes, monkeypatch, capsys):
    """A chat session of the tiny model after `lines`, and what it printed."""
    from mlx_fm import load
    from mlx_fm.chat import ChatSession, run_session

    from mlx_lm.sample_utils import make_sampler

    session = ChatSession(*load(tiny_model_dir), max_tokens=6, sampler=make_sampler(0.0))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines), encoding="utf-8"))
    run_session(session)
    return session, capsys.readouterr().out


def test_a_failed_turn_leaves_the_conversation_as_it_was(tiny_model_dir, monkeypatch, capsys):
    generation = importlib.import_module("mlx_lm.generate")  # `mlx_lm.generate` is a function
    real = generation.stream_generate

    def failing_on_boom(model, tokenizer, prompt, **kwargs):
        responses = real(model, tokenizer, prompt, **kwargs)
        yield next(responses)  # the prompt has gone through the state by then
        if "Boom" in tokenizer.decode(prompt):
            raise RuntimeError("generation failed")
        yield from responses

    reference, _ = session_after(tiny_model_dir, b"First\n", monkeypatch, capsys)
    monkeypatch.setattr(generation, "stream_generate", failing_on_boom)
    session, out = session_after(tiny_model_dir, b"First\nBoom\nSecond\n", monkeypatch, capsys)
    assert "[error: generation failed; the conversation is as it was before]" in replies(out)[1]
    assert [m["content"] for m in session.messages][::2] == ["First", "Second"]
    reference.reply("Second")
    assert session.messages == reference.messages and session.consumed == reference.consumed
    for ours, theirs in zip(session.cache, reference.cache):
        assert all(mx.array_equal(a, b).item() for a, b in zip(ours.cache, theirs.cache))


def test_a_converted_model_without_tokenizer_gets_one_warning(
    bare_model_dir, tmp_path, monkeypatch, capsys
):
    out_dir = tmp_path / "out"
    status, _, err = run_main(
        "convert",
        ["--hf-path", str(bare_model_dir), "--mlx-path", str(out_dir)],
        b"",
        monkeypatch,
        capsys,
    )
    assert status in (0, None), err
    assert err.splitlines() == [
        f"mlx_fm: warning: no tokenizer files in {out_dir}: copy the "
        f"tokenizer's files ({', '.join(TOKENIZER_FILES)}) into it "
        "(generating text needs them)"
    ]
    assert (out_dir / "model.safetensors").exists()
