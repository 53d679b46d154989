"""mlx_fm.server as a real process on 127.0.0.1, through a real HTTP client: its answers are
mlx-lm's generation's, and a request sharing a prefix with an earlier one reuses its state."""

import contextlib
import gc
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from mlx_fm import load
from mlx_fm.server import PrefixStateCache, snapshot
from mlx_fm.tokenizer import PLAIN_CHAT_TEMPLATE
from mlx_fm.utils import DEFAULT_MODEL_PATH

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import ArraysCache, make_prompt_cache

HOST = "127.0.0.1"
MAX_REQUEST_BYTES = 64 * 1024
STARTUP_SECONDS = 60
REQUEST_SECONDS = 60
SYSTEM = "You answer in verse, briefly, and never mention the weather or the sea. " * 3


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_until_serving(process: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited"
        try:
            connection = http.client.HTTPConnection(HOST, port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"the server did not answer within {STARTUP_SECONDS} s")


@contextlib.contextmanager
def running_server(*args: str, log: Optional[Path] = None) -> Iterator[int]:
    """The port of a running `mlx_fm.server args` (its stderr in `log`), stopped on leaving."""
    port = free_port()
    command = [sys.executable, "-m", "mlx_fm.server", "--port", str(port), *args]
    stderr = open(log, "w") if log else subprocess.DEVNULL
    process = subprocess.Popen(command, stderr=stderr)
    try:
        wait_until_serving(process, port)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log:
            stderr.close()


@pytest.fixture(scope="module")
def server_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server") / "stderr.txt"


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_log):
    limit = ["--max-request-bytes", str(MAX_REQUEST_BYTES)]
    with running_server("--model", str(tiny_model_dir), *limit, log=server_log) as port:
        yield port


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The greedy tokens of mlx-lm's generation loop, in this process."""
    model, tokenizer = load(tiny_model_dir)

    def greedy(prompt_tokens: list[int], max_tokens: int) -> list[int]:
        steps = generate_step(mx.array(prompt_tokens), model, max_tokens=max_tokens)
        return [token for token, _ in steps]

    return tokenizer, greedy


def post(port: int, path: str, body, headers=None) -> tuple[int, dict]:
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_SECONDS)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, data, {"Content-Type": "application/json"} | (headers or {}))
    response = connection.getresponse()
    return response.status, json.loads(response.read())


def complete(port: int, prompt: str, max_tokens: int = 8) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": True}
    status, answer = post(port, "/v1/completions", body)
    assert status == 200, answer
    return answer


def chat(port: int, messages: list, max_tokens: int = 8) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "logprobs": True}
    status, answer = post(port, "/v1/chat/completions", body)
    assert status == 200, answer
    return answer


def tokens_of(answer: dict) -> list[int]:
    return [entry["id"] for entry in answer["choices"][0]["logprobs"]["content"]]


def cached_tokens(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def text_prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text)


def chat_prompt(tokenizer, messages: list) -> list[int]:
    return tokenizer.apply_chat_template(
        messages, chat_template=PLAIN_CHAT_TEMPLATE, add_generation_prompt=True
    )


def serves_correctly(port: int, reference) -> bool:
    tokenizer, greedy = reference
    prompt = "Still serving?"
    return tokens_of(complete(port, prompt)) == greedy(text_prompt(tokenizer, prompt), 8)


def test_completions_equal_mlx_lm_generation(server, reference):
    tokenizer, greedy = reference
    for prompt, max_tokens in [("Once upon a time", 12), ("x", 3), ("The end. " * 40, 20)]:
        answer = complete(server, prompt, max_tokens)
        expected = greedy(text_prompt(tokenizer, prompt), max_tokens)
        assert tokens_of(answer) == expected
        assert answer["usage"]["completion_tokens"] == max_tokens
        assert answer["choices"][0]["text"] == tokenizer.decode(expected)


def test_chat_equals_mlx_lm_generation_with_the_plain_template(server, reference):
    tokenizer, greedy = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    answer = chat(server, messages, 10)
    assert tokens_of(answer) == greedy(chat_prompt(tokenizer, messages), 10)
    assert answer["object"] == "chat.completion"


def test_a_shared_prefix_runs_only_the_new_tokens(server, reference):
    tokenizer, greedy = reference
    story = "In a hole in the ground there lived a creature of some kind, quiet and old. " * 4
    first = complete(server, story)
    assert cached_tokens(first) == 0
    # The prompt's snapshot is taken before its last token, which starts the generation.
    longer = story + "It was a comfortable hole."
    second = complete(server, longer)
    assert cached_tokens(second) == len(text_prompt(tokenizer, story)) - 1
    assert tokens_of(second) == greedy(text_prompt(tokenizer, longer), 8)


def test_a_continuation_reuses_the_state_after_the_answer(server, reference):
    tokenizer, greedy = reference
    # A prompt whose greedy answer is ASCII, so that the answer's text encodes to its tokens.
    prompts = [f"Go on. {word}" for word in ("The", "So", "And", "it", "We", "1 2", "a b")]
    answers = ((p, greedy(tokenizer.encode(p), 3)) for p in prompts)
    prompt, answer = next((p, a) for p, a in answers if max(a) < 128)
    assert tokens_of(complete(server, prompt, 3)) == answer
    continued = prompt + tokenizer.decode(answer) + " And then?"
    reply = complete(server, continued)
    assert cached_tokens(reply) == len(tokenizer.encode(prompt)) + len(answer)
    assert tokens_of(reply) == greedy(text_prompt(tokenizer, continued), 8)


def test_requests_that_fork_leave_a_snapshot_where_they_part(server, reference):
    tokenizer, greedy = reference
    shared = "Chapter one. The lighthouse keeper counted ships every night, "
    first, second, third = (shared + ending for ending in ("in winter.", "for pay.", "alone."))
    complete(server, first)
    assert cached_tokens(complete(server, second)) == 0
    answer = complete(server, third)
    assert cached_tokens(answer) == len(text_prompt(tokenizer, shared))
    assert tokens_of(answer) == greedy(text_prompt(tokenizer, third), 8)


def test_a_system_prompt_is_processed_once(server, reference):
    tokenizer, greedy = reference
    system = {"role": "system", "content": SYSTEM}
    chat(server, [system, {"role": "user", "content": "Tell me of stars."}])
    messages = [system, {"role": "user", "content": "And the moon?"}]
    answer = chat(server, messages)
    assert cached_tokens(answer) >= len(tokenizer.encode(SYSTEM))
    assert tokens_of(answer) == greedy(chat_prompt(tokenizer, messages), 8)


def stream_events(port: int, body: dict) -> list[dict]:
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_SECONDS)
    connection.request("POST", "/v1/chat/completions", json.dumps(body).encode())
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    lines = response.read().decode().splitlines()
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(event) for event in data[:-1]]


def test_streaming_sends_the_same_text_piece_by_piece(server):
    messages = [{"role": "user", "content": "Count with me: one, two,"}]
    whole = chat(server, messages, 12)["choices"][0]["message"]["content"]
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = stream_events(server, body)
    pieces = [e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]]
    assert len([piece for piece in pieces if piece]) > 1
    assert "".join(pieces) == whole
    assert events[-1]["usage"]["completion_tokens"] == 12


def test_concurrent_requests_each_get_their_own_answer(server, reference):
    tokenizer, greedy = reference
    prompts = [f"Request number {n} asks about {'cats ' * n}" for n in range(1, 5)]
    answers = {}

    def ask(prompt: str) -> None:
        answers[prompt] = tokens_of(complete(server, prompt, 10))

    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUEST_SECONDS)
    assert answers == {p: greedy(text_prompt(tokenizer, p), 10) for p in prompts}


def test_a_client_that_leaves_mid_stream_does_not_stop_the_server(server, server_log, reference):
    body = json.dumps({"prompt": "A very long story:", "max_tokens": 10**6, "stream": True})
    request = f"POST /v1/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    with socket.create_connection((HOST, server), timeout=REQUEST_SECONDS) as client:
        client.sendall(request.encode())
        received = b""
        while b"\ndata: " not in received:  # past the headers and keepalive comments
            chunk = client.recv(4096)
            assert chunk, received
            received += chunk
        assert received.startswith(b"HTTP/1.0 200")
    assert serves_correctly(server, reference)
    deadline = time.monotonic() + REQUEST_SECONDS
    while "client disconnected" not in server_log.read_text():
        assert time.monotonic() < deadline, "the server did not notice the client leave"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("/v1/completions", b'{"prompt": "hi", ', "invalid JSON"),
        ("/v1/completions", b'{"prompt": "\xff\xfe"}', "not UTF-8"),
        ("/v1/completions", b'["prompt", "hi"]', "JSON object"),
        ("/v1/completions", b'{"prompt": ""}', "prompt must be a non-empty string"),
        ("/v1/completions", b'{"prompt": "hi", "stop": 5}', "stop must be"),
        ("/v1/completions", b'{"prompt": "hi", "max_tokens": -3}', "max_tokens"),
        ("/v1/completions", b'{"prompt": "hi", "logit_bias": {"999999": 1}}', "logit_bias"),
        ("/v1/chat/completions", b'{"messages": []}', "messages must be"),
        ("/v1/chat/completions", b'{"messages": ["hi"]}', "messages must be"),
    ],
)
def test_malformed_requests_get_a_clear_400(server, reference, path, body, message):
    status, answer = post(server, path, body)
    assert status == 400
    assert message in answer["error"]
    assert serves_correctly(server, reference)


def test_a_model_that_fails_to_load_leaves_the_served_one(server, reference, tmp_path):
    status, answer = post(server, "/v1/completions", {"prompt": "hi", "model": str(tmp_path)})
    assert status == 404 and "config.json" in answer["error"]
    assert serves_correctly(server, reference)


def test_an_oversized_request_gets_413_unread(server, reference):
    connection = http.client.HTTPConnection(HOST, server, timeout=REQUEST_SECONDS)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Length", str(10**9))
    connection.endheaders()  # and no body: the server must answer without waiting for it
    response = connection.getresponse()
    assert response.status == 413
    assert "--max-request-bytes" in json.loads(response.read())["error"]
    assert serves_correctly(server, reference)


def model_ids(port: int) -> list[str]:
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_SECONDS)
    connection.request("GET", "/v1/models")
    response = connection.getresponse()
    assert response.status == 200
    return [model["id"] for model in json.loads(response.read())["data"]]


def test_models_lists_the_served_model(server, tiny_model_dir):
    assert model_ids(server) == [str(tiny_model_dir.resolve())]


def test_the_bundled_model_is_served_when_model_is_omitted():
    with running_server() as port:
        assert model_ids(port) == [str(DEFAULT_MODEL_PATH.resolve())]
        assert complete(port, "It is a truth", 4)["usage"]["completion_tokens"] == 4


def test_a_draft_model_gives_the_same_greedy_answers(tiny_model_dir, reference):
    tokenizer, greedy = reference
    if not make_prompt_cache(load(tiny_model_dir)[0])[0].is_trimmable():
        pytest.skip("speculative decoding needs a trimmable FM cache")
    model = str(tiny_model_dir)
    with running_server("--model", model, "--draft-model", model) as port:
        for prompt in ("Once upon a time", "The end. " * 10):
            answer = tokens_of(complete(port, prompt, 10))
            assert answer == greedy(text_prompt(tokenizer, prompt), 10)


def fm_cache(value: float) -> list[ArraysCache]:
    cache = ArraysCache(size=2)
    cache[0], cache[1] = mx.full((1, 2, 4, 8), value), mx.full((1, 3, 16), value)
    return [cache]


def test_a_snapshot_shares_arrays_and_ignores_later_updates():
    live = fm_cache(1.0)
    copy = snapshot(live)
    assert copy[0][0] is live[0][0]
    live[0][0] = mx.zeros((1, 2, 4, 8))
    assert copy[0][0].sum().item() == 64


def test_a_stored_row_of_a_batch_does_not_keep_the_batch_alive():
    before = mx.get_active_memory()
    batch = mx.zeros((16, 512, 1024)) + 1  # 32 MiB; a row is 2 MiB
    cache = ArraysCache(size=1)
    cache[0] = batch[3:4]
    mx.eval(cache[0])
    stored = PrefixStateCache(max_size=10, max_bytes=1 << 30)
    stored.insert_cache("m", [1, 2], [cache])
    mx.eval(stored.fetch_nearest_cache("m", [1, 2, 3])[0][0][0])
    del batch, cache
    gc.collect()
    assert stored.nbytes == 2 << 20
    assert mx.get_active_memory() - before < 8 << 20


def test_prefix_cache_serves_the_longest_prefix_and_evicts_by_bytes():
    one_snapshot = fm_cache(0.0)[0].nbytes
    cache = PrefixStateCache(max_size=100, max_bytes=2 * one_snapshot)
    cache.insert_cache("m", [1, 2], fm_cache(2.0))
    cache.insert_cache("m", [1, 2, 3, 4], fm_cache(4.0))
    state, rest = cache.fetch_nearest_cache("m", [1, 2, 3, 4, 5])
    assert rest == [5] and state[0][0].max().item() == 4.0
    state, rest = cache.fetch_nearest_cache("m", [1, 2, 3, 4])  # one token is left to run
    assert rest == [3, 4] and state[0][0].max().item() == 2.0
    assert cache.fetch_nearest_cache("other model", [1, 2, 3]) == (None, [1, 2, 3])
    cache.insert_cache("m", [7, 8], fm_cache(8.0))  # over the bytes: [1, 2, 3, 4] is the LRU
    assert len(cache) == 2 and cache.nbytes == 2 * one_snapshot
    assert cache.fetch_nearest_cache("m", [1, 2, 3, 4, 5])[1] == [3, 4, 5]
