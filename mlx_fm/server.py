"""Serve an FM model over mlx-lm's OpenAI-compatible HTTP API: `mlx_fm.server [--model PATH]`.

mlx-lm's server (its request handler, batching and generation loop) with what FM needs: a
prompt cache of FM state snapshots keyed by the tokens they have seen, so that a request
sharing a prefix with an earlier one (a system prompt, the earlier turns of a conversation)
runs only its new tokens through the model.
"""

import argparse
import functools
import io
import json
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Hashable, Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import _BaseCache, make_prompt_cache
from mlx_lm.server import APIHandler, ModelProvider, ResponseGenerator, get_system_fingerprint
from mlx_lm.utils import load as mlx_lm_load

from . import load
from .cli import (
    add_model_argument,
    fail_cleanly,
    non_negative_float,
    non_negative_int,
    positive_int,
    positive_probability,
    probability,
)
from .layout import MODEL_TYPE, read_config
from .tokenizer import with_plain_chat_template
from .utils import resolve_model_path

DEFAULT_PROMPT_CACHE_BYTES = 1 << 30
DEFAULT_MAX_REQUEST_BYTES = 16 << 20
COMPLETION_PATHS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")


def snapshot(prompt_cache: list, copy_arrays: bool = False) -> list:
    """A copy of each cache that the original's later updates leave unchanged, sharing its
    arrays (MLX arrays are immutable, and caches update by rebinding them in their lists),
    or with copies of them (`copy_arrays`: a row extracted from a batch is a view that keeps
    the whole batch's buffer alive)."""
    copy = mx.array if copy_arrays else _same
    return [_with_containers_copied(cache, copy) for cache in prompt_cache]


def _same(array: mx.array) -> mx.array:
    return array


def _with_containers_copied(value: Any, copy: Callable[[mx.array], mx.array]) -> Any:
    if isinstance(value, mx.array):
        return copy(value)
    if isinstance(value, list):
        return [_with_containers_copied(item, copy) for item in value]
    if isinstance(value, tuple):
        return tuple(_with_containers_copied(item, copy) for item in value)
    if isinstance(value, dict):
        return {key: _with_containers_copied(item, copy) for key, item in value.items()}
    if isinstance(value, _BaseCache):  # CacheList holds caches
        cache = value.__class__.__new__(value.__class__)
        cache.__dict__ = _with_containers_copied(vars(value), copy)
        return cache
    return value


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return min(len(a), len(b))


def _nbytes(prompt_cache: list) -> int:
    return sum(cache.nbytes for cache in prompt_cache)


@dataclass
class _Snapshot:
    prompt_cache: list
    nbytes: int


class PrefixStateCache:
    """FM state snapshots keyed by (model, the tokens they have seen): an LRU bounded in
    count and bytes, with the interface of mlx-lm's `LRUPromptCache` that its server uses.

    mlx-lm's own cache assumes that a longer cache can be trimmed back to a prefix, and so
    drops the prefixes of a trimmable cache; an FM state cannot go back further than the
    states it keeps, so every snapshot is kept until the LRU evicts it."""

    def __init__(self, max_size: int, max_bytes: int) -> None:
        self.max_size, self.max_bytes = max_size, max_bytes
        self._snapshots: OrderedDict[tuple[Hashable, tuple[int, ...]], _Snapshot] = OrderedDict()
        self._nbytes = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._snapshots)

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def fetch_nearest_cache(
        self, model: Hashable, tokens: list[int]
    ) -> tuple[Optional[list], list[int]]:
        """(a copy of the snapshot of the longest cached prefix, the tokens after it), or
        (None, tokens). At least the last token is left: its logits start the generation."""
        key = self._longest_prefix(model, tuple(tokens[:-1]))
        if key is None:
            return None, tokens
        self._snapshots.move_to_end(key)
        cached = len(key[1])
        self.reused_tokens += cached
        return snapshot(self._snapshots[key].prompt_cache), tokens[cached:]

    def _longest_prefix(self, model: Hashable, tokens: tuple[int, ...]):
        best = None
        for key in self._snapshots:
            key_model, prefix = key
            if (
                key_model == model
                and 0 < len(prefix) <= len(tokens)
                and (best is None or len(prefix) > len(best[1]))
                and tokens[: len(prefix)] == prefix
            ):
                best = key
        return best

    def fork_point(self, model: Hashable, tokens: list[int]) -> Optional[int]:
        """Where `tokens` leave the longest token sequence cached before them, when no snapshot
        is there yet: a snapshot there serves every later request that shares this prefix."""
        cached = self._longest_prefix(model, tuple(tokens[:-1]))
        cached_length = len(cached[1]) if cached is not None else 0
        shared = max(
            (_common_prefix_length(tokens, prefix) for m, prefix in self._snapshots if m == model),
            default=0,
        )
        return shared if cached_length < shared < len(tokens) - 1 else None

    def insert_cache(
        self,
        model: Hashable,
        tokens: list[int],
        prompt_cache: list,
        *,
        cache_type: str = "assistant",
    ) -> None:
        """Keep a snapshot of `prompt_cache`, the state after `tokens` (`cache_type`, mlx-lm's
        system/user/assistant eviction classes, is not used: one LRU)."""
        if not tokens:
            return
        key = (model, tuple(tokens))
        if key in self._snapshots:
            self._nbytes -= self._snapshots.pop(key).nbytes
        entry = _Snapshot(snapshot(prompt_cache, copy_arrays=True), _nbytes(prompt_cache))
        self._snapshots[key] = entry
        self._nbytes += entry.nbytes
        self.trim_to(n_sequences=self.max_size, n_bytes=self.max_bytes)

    def trim_to(self, *, n_sequences: Optional[int] = None, n_bytes: Optional[int] = None) -> None:
        """Evict the least recently used snapshots down to these bounds."""
        while self._snapshots and (
            (n_sequences is not None and len(self._snapshots) > n_sequences)
            or (n_bytes is not None and self._nbytes > n_bytes)
        ):
            _, evicted = self._snapshots.popitem(last=False)
            self._nbytes -= evicted.nbytes


def _split_segments(
    segments: list[list[int]], segment_types: list[str], position: int
) -> tuple[list[list[int]], list[str]]:
    """`segments` (a prompt cut into parts, each snapshotted where it ends) also cut at
    `position` of the prompt."""
    start = 0
    for index, segment in enumerate(segments):
        if start < position < start + len(segment):
            cut = position - start
            kind = segment_types[index]
            return (
                segments[:index] + [segment[:cut], segment[cut:]] + segments[index + 1 :],
                segment_types[:index] + [kind, kind] + segment_types[index + 1 :],
            )
        start += len(segment)
    return segments, segment_types


def load_draft(path_or_hf_repo: str):
    """(model, tokenizer) of a draft model: FM through `mlx_fm.load`, any other mlx-lm
    architecture through mlx-lm's `load` (without running code from the checkpoint)."""
    path = resolve_model_path(path_or_hf_repo)
    if read_config(path).get("model_type") == MODEL_TYPE:
        return load(path)
    return mlx_lm_load(str(path))


class FMModelProvider(ModelProvider):
    """mlx-lm's model provider, loading with `mlx_fm.load` (FM checkpoints only, one-line
    errors, the plain chat template when the tokenizer has none)."""

    def _load(self, model_path, adapter_path=None, draft_model_path=None) -> None:
        # Unlike mlx-lm's, the model served so far stays until the new one has loaded: a
        # request naming a model that fails to load leaves the server as it was.
        model, tokenizer = load(
            model_path, tokenizer_config=self._tokenizer_config, adapter_path=adapter_path
        )
        draft_model = None
        if draft_model_path is not None:
            draft_model, draft_tokenizer = load_draft(draft_model_path)
            if draft_tokenizer.vocab_size != tokenizer.vocab_size:
                raise ValueError(
                    f"the draft model's vocabulary ({draft_tokenizer.vocab_size} tokens) is not "
                    f"the model's ({tokenizer.vocab_size})"
                )
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.model, self.tokenizer = model, with_plain_chat_template(tokenizer)
        self.draft_model = draft_model
        self.is_batchable = draft_model is None and all(
            hasattr(cache, "merge") for cache in make_prompt_cache(model)
        )


class FMResponseGenerator(ResponseGenerator):
    """mlx-lm's generation loop over a `PrefixStateCache`, cutting each prompt where it
    leaves a cached sequence so that a snapshot is taken there."""

    def _tokenize(self, tokenizer, request, args):
        prompt, segments, segment_types, initial_state, vision = super()._tokenize(
            tokenizer, request, args
        )
        if not prompt:
            raise ValueError("the prompt is empty")
        position = self.prompt_cache.fork_point(self.model_provider.model_key, prompt)
        if position is not None and vision is None:
            segments, segment_types = _split_segments(segments, segment_types, position)
        return prompt, segments, segment_types, initial_state, vision

    def _log_cache_stats(self) -> None:
        cache = self.prompt_cache
        logging.info(
            f"Prefix cache: {len(cache)} snapshots, {cache.nbytes / 1e6:.2f} MB, "
            f"{cache.reused_tokens} prompt tokens reused so far"
        )


def _json_error(text: str) -> bytes:
    return json.dumps({"error": text}).encode()


class FMAPIHandler(APIHandler):
    """mlx-lm's request handler, which first turns away, with a 4xx and a one-line reason,
    the bodies that would stall it (too large, a wrong length) or fail inside the generation
    loop (a prompt or stop words of the wrong kind), and lists the served model alone."""

    timeout = 60  # seconds a client may leave a request half-sent

    def __init__(self, *args, max_request_bytes: int, **kwargs) -> None:
        self.max_request_bytes = max_request_bytes  # before mlx-lm's __init__ serves the request
        super().__init__(*args, **kwargs)

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if self.path in COMPLETION_PATHS and length is not None:
            if not length.isdigit():
                return self._refuse(400, f"invalid Content-Length {length!r}")
            if int(length) > self.max_request_bytes:
                self.close_connection = True  # the body is left unread
                return self._refuse(
                    413,
                    f"request body of {length} bytes is over the limit of "
                    f"{self.max_request_bytes} (--max-request-bytes)",
                )
            body = self.rfile.read(int(length))
            vocab_size = self.response_generator.model_provider.model.args.vocab_size
            if problem := _body_problem(self.path, body, vocab_size):
                return self._refuse(400, problem)
            self.rfile = io.BytesIO(body)  # for mlx-lm's handler, which reads it again
        try:
            super().do_POST()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            logging.info("client disconnected (or stopped reading) during the response")

    def log_message(self, format: str, *args) -> None:
        logging.info(f"{self.address_string()} {format % args}")  # under --log-level

    def _refuse(self, status: int, reason: str) -> None:
        self._set_completion_headers(status)
        self.end_headers()
        self.wfile.write(_json_error(reason))

    def handle_models_request(self) -> None:
        self._set_completion_headers(200)
        self.end_headers()
        model = {"id": self.response_generator.cli_args.model, "object": "model"}
        response = {"object": "list", "data": [model | {"created": self.created}]}
        self.wfile.write(json.dumps(response).encode())


def _body_problem(path: str, body: bytes, vocab_size: int) -> Optional[str]:
    """Why a completion request's body cannot be served, or None."""
    try:
        request = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        return "the request body is not UTF-8"
    except json.JSONDecodeError as error:
        return f"invalid JSON in request body: {error}"
    if not isinstance(request, dict):
        return "the request body must be a JSON object"
    stop = request.get("stop")
    if not (stop is None or isinstance(stop, str) or _strings(stop)):
        return "stop must be a string or a list of strings"
    bias = request.get("logit_bias")
    if not (bias is None or isinstance(bias, dict) and all(_token_id(k, vocab_size) for k in bias)):
        # An index past the logits would be written out of bounds, killing the server.
        return f"logit_bias must map token ids (0 to {vocab_size - 1}) to numbers"
    if path == COMPLETION_PATHS[0]:
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return "prompt must be a non-empty string"
    else:
        messages = request.get("messages")
        if not (isinstance(messages, list) and messages and all(map(_is_message, messages))):
            return "messages must be a non-empty list of objects with a role"
    return None


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _token_id(text: str, vocab_size: int) -> bool:
    return text.isdigit() and int(text) < vocab_size


def _is_message(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("role"), str)


_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def byte_size(text: str) -> int:
    """A number of bytes, with an optional K, M or G (binary units): 512M, 2G."""
    text = text.strip()
    scale = _SIZE_UNITS.get(text[-1:].upper())
    try:
        size = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        size = -1
    if not 0 <= size < float(1 << 63):
        raise argparse.ArgumentTypeError(f"must be a size in bytes such as 512M, got {text!r}")
    return int(size)


def port_number(text: str) -> int:
    port = non_negative_int(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"must be a port number (0 to 65535), got {text!r}")
    return port


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlx_fm.server", description=__doc__.split("\n")[0])
    add_model_argument(parser)
    parser.add_argument("--adapter-path", default=None, help="LoRA/DoRA adapters to apply")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on")
    parser.add_argument("--port", type=port_number, default=8080, help="Port (0: any free)")
    parser.add_argument(
        "--allowed-origins",
        type=lambda text: text.split(","),
        default=["*"],
        help="Comma-separated CORS origins (default: *)",
    )
    parser.add_argument("--draft-model", default=None, help="A model for speculative decoding")
    parser.add_argument("--num-draft-tokens", type=positive_int, default=3)
    parser.add_argument("--chat-template", default="", help="A chat template to use instead")
    parser.add_argument(
        "--chat-template-args",
        type=json.loads,
        default={},
        help="JSON arguments of the chat template, e.g. '{\"enable_thinking\": false}'",
    )
    parser.add_argument("--temp", type=non_negative_float, default=0.0, help="Default temperature")
    parser.add_argument("--top-p", type=positive_probability, default=1.0)
    parser.add_argument("--top-k", type=non_negative_int, default=0, help="0: no top-k")
    parser.add_argument("--min-p", type=probability, default=0.0)
    parser.add_argument("--max-tokens", type=positive_int, default=512, help="Default maximum")
    parser.add_argument(
        "--decode-concurrency", type=positive_int, default=32, help="Requests decoded together"
    )
    parser.add_argument(
        "--prompt-concurrency", type=positive_int, default=8, help="Prompts processed together"
    )
    parser.add_argument(
        "--prefill-step-size", type=positive_int, default=2048, help="Prompt tokens per pass"
    )
    parser.add_argument(
        "--prompt-cache-size",
        type=positive_int,
        default=1024,
        help="Most FM state snapshots kept for prefix reuse (default 1024)",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=byte_size,
        default=DEFAULT_PROMPT_CACHE_BYTES,
        help="Most bytes of FM state snapshots kept for prefix reuse (default 1G)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=byte_size,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help="Largest request body accepted; larger ones get HTTP 413 (default 16M)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
    )
    return parser


def _mlx_lm_arguments(args: argparse.Namespace) -> argparse.Namespace:
    """`args` plus mlx-lm's server options that do not apply to FM, at their off values."""
    fixed = dict(
        trust_remote_code=False,  # FM checkpoints load through mlx_fm, never their own code
        use_default_chat_template=False,
        pipeline=False,
        kv_bits=None,  # FM has no KV cache to quantize
        kv_group_size=64,
        quantized_kv_start=0,
    )
    return argparse.Namespace(**vars(args), **fixed)


def serve(provider: FMModelProvider, host: str, port: int, max_request_bytes: int) -> None:
    """Answer HTTP requests on host:port until interrupted."""
    family, _, _, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
    handler = functools.partial(
        FMAPIHandler,
        max_request_bytes=max_request_bytes,
        system_fingerprint=get_system_fingerprint(),
    )
    cli_args = provider.cli_args
    prompt_cache = PrefixStateCache(cli_args.prompt_cache_size, cli_args.prompt_cache_bytes)
    generator = FMResponseGenerator(provider, prompt_cache)
    try:
        with server_class(address, functools.partial(handler, generator)) as httpd:
            url = f"http://{host}:{httpd.server_address[1]}"
            print(f"mlx_fm.server: listening on {url}", flush=True)
            httpd.serve_forever()
    finally:
        generator.stop_and_join()


@fail_cleanly
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s - %(levelname)s - %(message)s"
    )
    args.model = str(resolve_model_path(args.model).resolve())
    provider = FMModelProvider(_mlx_lm_arguments(args))
    provider.load("default_model", None, "default_model")  # now: a bad model fails here
    serve(provider, args.host, args.port, args.max_request_bytes)


if __name__ == "__main__":
    main()
