"""Chat with an FM model: `mlx_fm.chat --model PATH`.

The recurrent state carries the conversation, so each turn feeds the model only
the tokens that are new since the last one, and the state has the same size after
ten turns as after one. It can be saved to a file and loaded later.

Commands typed at the prompt: /reset, /save FILE, /load FILE, /tokens, /quit. A saved
state is a .safetensors file (the suffix is added to FILE when it is missing).
"""

import argparse
import copy
import json
import os
from pathlib import Path
from typing import Optional

from . import load
from .cache import FMCache
from .cli import (
    add_adapter_argument,
    add_model_argument,
    add_sampling_arguments,
    escape_undecodable_stdin,
    fail_cleanly,
    one_line,
    valid_utf8,
)
from .tokenizer import PLAIN_CHAT_TEMPLATE, PLAIN_USER
from .utils import written_file_atomically

STATE_SUFFIX = ".safetensors"  # mlx reads a saved state by its file name's suffix
COMMANDS = "/reset, /save FILE, /load FILE, /tokens, /quit"


def state_file(path) -> Path:
    """Where `/save path` writes and `/load path` reads: `path`, with STATE_SUFFIX if missing."""
    path = Path(path).expanduser()
    return path if path.suffix == STATE_SUFFIX else path.with_name(path.name + STATE_SUFFIX)


class ChatSession:
    """A conversation whose whole history lives in the model's recurrent state."""

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: Optional[str] = None,
        max_tokens: int = 256,
        sampler=None,
        prefill_step_size: int = 2048,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_tokens, self.sampler = system_prompt, max_tokens, sampler
        self.prefill_step_size = prefill_step_size
        self.plain = not tokenizer.has_chat_template  # then PLAIN_CHAT_TEMPLATE formats it
        self.reset()

    def reset(self):
        self.cache = self.model.make_cache(max_undo=0)  # a chat never rewinds
        self.messages = (
            []
            if self.system_prompt is None
            else [{"role": "system", "content": self.system_prompt}]
        )
        self.consumed = ""  # the text the state has seen, as the template renders it
        self.last_prompt_tokens = 0

    def _render(self, messages) -> str:
        # Passed only when needed: a chat template of mlx-lm's own may not take the argument.
        template = {"chat_template": PLAIN_CHAT_TEMPLATE} if self.plain else {}
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **template
        )

    def _new_tokens(self, rendered: str) -> list:
        """Tokens of the part of `rendered` that the state has not seen yet."""
        shared = len(os.path.commonprefix([self.consumed, rendered]))
        text = rendered[shared:] or "\n"
        special = not self.consumed and self.plain
        return self.tokenizer.encode(text, add_special_tokens=special)

    def send(self, text: str):
        """Generate the reply to `text`, yielding it piece by piece.

        The session takes the turn in only once the reply is complete: a turn that fails
        (or is not read to the end) leaves the conversation as it was.
        """
        from mlx_lm.generate import stream_generate

        if not text.strip():
            raise ValueError("the message is empty")
        messages = [*self.messages, {"role": "user", "content": text}]
        rendered = self._render(messages)
        tokens = self._new_tokens(rendered)
        cache = copy.deepcopy(self.cache)  # generation updates the cache it is given in place
        stop = f"\n{PLAIN_USER.strip()}"
        reply = ""
        for response in stream_generate(
            self.model,
            self.tokenizer,
            tokens,
            max_tokens=self.max_tokens,
            sampler=self.sampler,
            prompt_cache=cache,
            prefill_step_size=self.prefill_step_size,
        ):
            reply += response.text
            if self.plain and stop in reply:
                reply = reply.split(stop)[0]
                yield response.text.split(stop)[0]
                break
            yield response.text
        self.cache, self.consumed, self.last_prompt_tokens = cache, rendered + reply, len(tokens)
        self.messages = [*messages, {"role": "assistant", "content": reply}]

    def reply(self, text: str) -> str:
        return "".join(self.send(text))

    @property
    def state_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def save(self, path) -> Path:
        """Write the state and the conversation to `state_file(path)`, atomically."""
        from mlx_lm.models.cache import save_prompt_cache

        path = state_file(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no directory {path.parent}")
        metadata = {"messages": json.dumps(self.messages), "consumed": self.consumed}
        with written_file_atomically(path, suffix=STATE_SUFFIX) as staging:
            save_prompt_cache(str(staging), self.cache, metadata)
        return path

    def load(self, path) -> Path:
        """Continue the conversation saved in `state_file(path)`."""
        from mlx_lm.models.cache import load_prompt_cache

        path = state_file(path)
        if not path.is_file():
            raise FileNotFoundError(f"no saved chat {path}")
        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
            messages, consumed = json.loads(metadata["messages"]), metadata["consumed"]
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise ValueError(f"{path} is not a saved mlx_fm chat: {error}") from error
        args = self.model.args
        state_shape = (args.num_heads, args.num_slots, args.head_dim)
        if len(cache) != len(self.cache) or any(
            c[0] is None or tuple(c[0].shape[1:]) != state_shape for c in cache
        ):
            raise ValueError(f"{path} was saved from a different model")
        if not all(isinstance(c, FMCache) for c in cache):
            raise ValueError(f"{path} was saved by an older mlx_fm: start a new conversation")
        self.cache, self.messages, self.consumed = cache, messages, consumed
        return path


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.chat", description=__doc__.split("\n")[0])
    add_model_argument(parser)
    parser.add_argument("--system-prompt", default=None)
    add_adapter_argument(parser)
    add_sampling_arguments(parser, max_tokens=256)
    parser.add_argument("--load-state", default=None, help="Continue a saved conversation")
    parser.add_argument(
        "--show-tokens", action="store_true", help="Show how many prompt tokens each turn processed"
    )
    return parser


def run_session(session: ChatSession, show_tokens: bool = False) -> None:
    """Answer the lines of stdin until /quit or its end; no line ends the conversation."""
    escape_undecodable_stdin()
    print(f"[chat: {COMMANDS}]")
    while True:
        try:
            line = input(">> ")
        except EOFError:
            break
        if line.strip() in ("/quit", "/exit"):
            break
        try:
            show_tokens = _answer(session, valid_utf8(line, "that line"), show_tokens)
        except Exception as error:  # whatever went wrong, the conversation so far is kept
            print(f"[error: {one_line(error)}; the conversation is as it was before]")


def _answer(session: ChatSession, line: str, show_tokens: bool) -> bool:
    """Reply to a message or run a /command; return the new show_tokens setting."""
    if line.startswith("/"):
        return _command(session, line.strip(), show_tokens)
    if line.strip():
        try:
            for piece in session.send(line):
                print(piece, end="", flush=True)
        finally:
            print()
        if show_tokens:
            print(
                f"[{session.last_prompt_tokens} prompt tokens this turn, "
                f"state {session.state_bytes} bytes]"
            )
    return show_tokens


def _command(session: ChatSession, line: str, show_tokens: bool) -> bool:
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name == "/reset":
        session.reset()
        print("[conversation reset]")
    elif name in ("/save", "/load") and not argument:
        print(f"[usage: {name} FILE]")
    elif name in ("/save", "/load"):
        path = getattr(session, name[1:])(argument)
        done = "saved" if name == "/save" else "loaded"
        print(
            f"[{done} {path}: state of {session.state_bytes} bytes, "
            f"{len(session.messages)} messages]"
        )
    elif name == "/tokens":
        show_tokens = not show_tokens
        print(f"[prompt token counts {'on' if show_tokens else 'off'}]")
    else:
        print(f"[commands: {COMMANDS}]")
    return show_tokens


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    system_prompt = args.system_prompt and valid_utf8(args.system_prompt, "--system-prompt")
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    session = ChatSession(
        model, tokenizer, system_prompt, args.max_tokens, sampler, args.prefill_step_size
    )
    if args.load_state:
        session.load(args.load_state)
    run_session(session, args.show_tokens)


if __name__ == "__main__":
    main()
