"""Chat with an FM model: `mlx_fm.chat --model PATH`.

The recurrent state carries the conversation, so each turn feeds the model only
the tokens that are new since the last one, and the state has the same size after
ten turns as after one. It can be saved to a file and loaded later.

Commands typed at the prompt: /reset, /save FILE, /load FILE, /tokens, /quit.
"""

import argparse
import json
import os
from typing import Optional

from . import load
from .cli import fail_cleanly
from .utils import written_file_atomically

PLAIN_USER, PLAIN_ASSISTANT = "User: ", "Assistant: "


class ChatSession:
    """A conversation whose whole history lives in the model's recurrent state."""

    def __init__(self, model, tokenizer, system_prompt: Optional[str] = None,
                 max_tokens: int = 256, sampler=None):
        self.model, self.tokenizer = model, tokenizer
        self.system_prompt, self.max_tokens, self.sampler = system_prompt, max_tokens, sampler
        self.reset()

    def reset(self):
        from mlx_lm.models.cache import make_prompt_cache

        self.cache = make_prompt_cache(self.model)
        self.messages = [] if self.system_prompt is None else [
            {"role": "system", "content": self.system_prompt}]
        self.consumed = ""  # the text the state has seen, as the template renders it
        self.last_prompt_tokens = 0

    def _render(self, messages) -> str:
        if self.tokenizer.has_chat_template:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
        lines = []
        for message in messages:
            speaker = {"user": PLAIN_USER, "assistant": PLAIN_ASSISTANT}.get(message["role"], "")
            lines.append(f"{speaker}{message['content']}\n")
        return "".join(lines) + PLAIN_ASSISTANT

    def _new_tokens(self, rendered: str) -> list:
        """Tokens of the part of `rendered` that the state has not seen yet."""
        shared = len(os.path.commonprefix([self.consumed, rendered]))
        text = rendered[shared:] or "\n"
        special = not self.consumed and not self.tokenizer.has_chat_template
        return self.tokenizer.encode(text, add_special_tokens=special)

    def send(self, text: str):
        """Generate the reply to `text`, yielding it piece by piece."""
        from mlx_lm.generate import stream_generate

        if not text.strip():
            raise ValueError("the message is empty")
        self.messages.append({"role": "user", "content": text})
        rendered = self._render(self.messages)
        tokens = self._new_tokens(rendered)
        self.last_prompt_tokens = len(tokens)
        reply = ""
        for response in stream_generate(self.model, self.tokenizer, tokens,
                                        max_tokens=self.max_tokens, sampler=self.sampler,
                                        prompt_cache=self.cache):
            reply += response.text
            if not self.tokenizer.has_chat_template and f"\n{PLAIN_USER.strip()}" in reply:
                reply = reply.split(f"\n{PLAIN_USER.strip()}")[0]
                yield response.text.split(f"\n{PLAIN_USER.strip()}")[0]
                break
            yield response.text
        self.consumed = rendered + reply
        self.messages.append({"role": "assistant", "content": reply})

    def reply(self, text: str) -> str:
        return "".join(self.send(text))

    @property
    def state_bytes(self) -> int:
        return sum(c.nbytes for c in self.cache)

    def save(self, path):
        """Write the state and the conversation to a .safetensors file, atomically."""
        from mlx_lm.models.cache import save_prompt_cache

        metadata = {"messages": json.dumps(self.messages), "consumed": self.consumed}
        with written_file_atomically(path, suffix=".safetensors") as staging:
            save_prompt_cache(str(staging), self.cache, metadata)

    def load(self, path):
        from mlx_lm.models.cache import load_prompt_cache

        try:
            cache, metadata = load_prompt_cache(str(path), return_metadata=True)
            messages, consumed = json.loads(metadata["messages"]), metadata["consumed"]
        except (OSError, KeyError, ValueError, RuntimeError) as error:
            raise ValueError(f"{path} is not a saved mlx_fm chat: {error}") from error
        args = self.model.args
        state_shape = (args.num_heads, args.num_slots, args.head_dim)
        if len(cache) != len(self.cache) or any(
                c[0] is None or tuple(c[0].shape[1:]) != state_shape for c in cache):
            raise ValueError(f"{path} was saved from a different model")
        self.cache, self.messages, self.consumed = cache, messages, consumed


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.chat", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="Model directory or Hugging Face repo id (default: the bundled model)")
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--max-tokens", "-m", type=int, default=256)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--load-state", default=None, help="Continue a saved conversation")
    parser.add_argument("--show-tokens", action="store_true",
                        help="Show how many prompt tokens each turn processed")
    return parser


def _command(session: ChatSession, line: str, show_tokens: bool) -> bool:
    """Run a /command; return the new show_tokens setting."""
    name, _, argument = line.partition(" ")
    if name == "/reset":
        session.reset()
        print("[conversation reset]")
    elif name in ("/save", "/load"):
        if not argument.strip():
            print(f"[usage: {name} FILE]")
        else:
            try:
                getattr(session, name[1:])(argument.strip())
                done = "saved" if name == "/save" else "loaded"
                print(f"[{done} {argument.strip()}: state of {session.state_bytes} bytes, "
                      f"{len(session.messages)} messages]")
            except (ValueError, OSError) as error:
                print(f"[error: {error}]")
    elif name == "/tokens":
        show_tokens = not show_tokens
        print(f"[prompt token counts {'on' if show_tokens else 'off'}]")
    else:
        print("[commands: /reset, /save FILE, /load FILE, /tokens, /quit]")
    return show_tokens


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load(args.model)
    session = ChatSession(model, tokenizer, args.system_prompt, args.max_tokens,
                          make_sampler(args.temp, args.top_p))
    if args.load_state:
        session.load(args.load_state)
    show_tokens = args.show_tokens
    print("[chat: /reset, /save FILE, /load FILE, /tokens, /quit]")
    while True:
        try:
            line = input(">> ")
        except EOFError:
            break
        if line.strip() in ("/quit", "/exit"):
            break
        if line.startswith("/"):
            show_tokens = _command(session, line.strip(), show_tokens)
            continue
        if not line.strip():
            continue
        for piece in session.send(line):
            print(piece, end="", flush=True)
        print()
        if show_tokens:
            print(f"[{session.last_prompt_tokens} prompt tokens this turn, "
                  f"state {session.state_bytes} bytes]")


if __name__ == "__main__":
    main()
