"""Time to first token of mlx_fm.server: cold, against a request sharing a long prefix.

    python benchmarks/server_prefix_ttft.py [--model PATH] [--prefix-tokens 2000]

Starts `mlx_fm.server` on 127.0.0.1, then for a few fresh prefixes: a chat request whose
system prompt is the prefix (cold), a second one with the same system prompt and another
question (shared), a text completion of a new prefix (cold) and of that prefix plus a
sentence (shared). Also prints the bytes of one FM state snapshot for this model and for
mlx_fm.benchmark's default (20M-parameter) FM model.
"""

import argparse
import contextlib
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from typing import Iterator

from mlx_fm import load
from mlx_fm.benchmark import build_parser as benchmark_parser
from mlx_fm.benchmark import fm_model
from mlx_fm.utils import parameter_count

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

HOST = "127.0.0.1"
WORDS = "the of and to in a that he was his it with for as had you not be her on at by".split()


@contextlib.contextmanager
def running_server(model: str) -> Iterator[int]:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "mlx_fm.server", "--port", str(port), "--log-level", "ERROR"]
    process = subprocess.Popen(command + (["--model", model] if model else []))
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                connection = http.client.HTTPConnection(HOST, port, timeout=5)
                connection.request("GET", "/health")
                if connection.getresponse().status == 200:
                    break
            time.sleep(0.2)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=30)


def first_token_seconds(port: int, path: str, body: dict) -> tuple[float, int]:
    """(seconds to the first streamed token, prompt tokens served from the prefix cache)."""
    body = body | {"max_tokens": 4, "temperature": 0, "stream": True}
    body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection(HOST, port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", path, json.dumps(body).encode())
    response = connection.getresponse()
    first = None
    for line in response:
        if line.startswith(b"data: {") and first is None:
            first = time.perf_counter() - start
        if b'"usage"' in line:
            usage = json.loads(line.removeprefix(b"data: "))["usage"]
    return first, usage["prompt_tokens_details"]["cached_tokens"]


def text_of_tokens(tokenizer, count: int, seed: int) -> str:
    rng = random.Random(seed)
    words = []
    while len(tokenizer.encode(" ".join(words))) < count:
        words += [rng.choice(WORDS) for _ in range(50)]
    while len(tokenizer.encode(" ".join(words))) > count:
        words.pop()
    return " ".join(words)


def snapshot_bytes(model) -> int:
    cache = make_prompt_cache(model)
    model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    return sum(c.extract(0).nbytes for c in cache)  # the stored form: no undo states


def report(name: str, results: list[tuple[float, int]]) -> None:
    seconds = statistics.median(t for t, _ in results)
    cached = [c for _, c in results]
    print(f"{name:<34} TTFT median {seconds * 1000:8.1f} ms   cached tokens {cached}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = load(args.model)
    results = {name: [] for name in ("chat cold", "chat shared", "text cold", "text shared")}
    with running_server(args.model) as port:
        first_token_seconds(port, "/v1/completions", {"prompt": "Warm up."})
        for seed in range(args.repeats):
            system = text_of_tokens(tokenizer, args.prefix_tokens, seed)
            for name, question in (("chat cold", "Who?"), ("chat shared", "And where?")):
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]
                results[name].append(
                    first_token_seconds(port, "/v1/chat/completions", {"messages": messages})
                )
            prefix = text_of_tokens(tokenizer, args.prefix_tokens, 1000 + seed)
            for name, prompt in (("text cold", prefix), ("text shared", prefix + " And then?")):
                results[name].append(
                    first_token_seconds(port, "/v1/completions", {"prompt": prompt})
                )
    print(f"{args.prefix_tokens}-token prefix, {args.model or 'the bundled model'}:")
    for name, measured in results.items():
        report(name, measured)
    benchmark_args = benchmark_parser().parse_args([])
    big = fm_model(benchmark_args, benchmark_args.fm_layers)
    print(f"one state snapshot: this model {snapshot_bytes(model) / 1024:.0f} KiB")
    print(
        f"one state snapshot: mlx_fm.benchmark's FM ({parameter_count(big) / 1e6:.1f}M "
        f"parameters) {snapshot_bytes(big) / 1024:.0f} KiB"
    )


if __name__ == "__main__":
    main()
