"""Generate text with an FM model: `mlx_fm.generate [--model PATH] --prompt TEXT`.

Mirrors `mlx_lm.generate`, on top of mlx-lm's generation loop.
"""

import argparse
import sys

from . import load
from .cli import (
    add_adapter_argument,
    add_model_argument,
    add_sampling_arguments,
    add_verbose_argument,
    escape_undecodable_stdin,
    fail_cleanly,
    positive_int,
    valid_utf8,
)
from .layout import read_config
from .models.factorization_memory import MODEL_TYPE
from .utils import ModelLoadError, resolve_model_path


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.generate", description=__doc__.split("\n")[0])
    add_model_argument(parser)
    parser.add_argument("--prompt", "-p", default="", help="Prompt text, or - to read stdin")
    add_sampling_arguments(parser, max_tokens=100)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--ignore-chat-template", action="store_true")
    add_adapter_argument(parser)
    parser.add_argument(
        "--draft-model",
        default=None,
        help="A small model with the same vocabulary (FM or any mlx-lm model) that proposes "
        "tokens for the model to verify: speculative decoding",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=positive_int,
        default=3,
        help="Tokens the draft model proposes at a time (default 3)",
    )
    add_verbose_argument(parser)
    return parser


def load_draft_model(path: str, tokenizer):
    """The draft model at `path` (FM, or any model mlx-lm loads), which must share the
    vocabulary of `tokenizer`."""
    from mlx_lm.utils import load as mlx_lm_load

    model_path = resolve_model_path(path)
    if read_config(model_path).get("model_type") == MODEL_TYPE:
        draft_model, draft_tokenizer = load(model_path)
    else:
        draft_model, draft_tokenizer = mlx_lm_load(str(model_path))
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise ModelLoadError(
            f"the draft model's vocabulary ({draft_tokenizer.vocab_size} tokens) is not the "
            f"model's ({tokenizer.vocab_size})"
        )
    return draft_model


def format_prompt(tokenizer, prompt, system_prompt=None, ignore_chat_template=False):
    """Token ids for `prompt`, through the chat template when the tokenizer has one."""
    if ignore_chat_template or not tokenizer.has_chat_template:
        text = prompt if system_prompt is None else f"{system_prompt}\n\n{prompt}"
        return tokenizer.encode(text)
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def read_prompt(prompt: str) -> str:
    """The prompt text, from stdin when it is "-"."""
    if prompt == "-":
        escape_undecodable_stdin()
        return valid_utf8(sys.stdin.read(), "the prompt on stdin")
    return valid_utf8(prompt, "the prompt")


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    prompt = read_prompt(args.prompt)
    if not prompt:
        raise ValueError("the prompt is empty")
    system_prompt = args.system_prompt and valid_utf8(args.system_prompt, "--system-prompt")
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path)
    draft = {}
    if args.draft_model is not None:
        draft_model = load_draft_model(args.draft_model, tokenizer)
        draft = {"draft_model": draft_model, "num_draft_tokens": args.num_draft_tokens}
    tokens = format_prompt(tokenizer, prompt, system_prompt, args.ignore_chat_template)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    response, drafted = None, 0
    for response in stream_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=args.max_tokens,
        sampler=sampler,
        prefill_step_size=args.prefill_step_size,
        **draft,
    ):
        print(response.text, end="", flush=True)
        drafted += response.from_draft
    print()
    if args.verbose and response is not None:
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        if draft:
            print(f"Draft: {drafted} of {response.generation_tokens} tokens accepted from it")
        print(f"Peak memory: {response.peak_memory:.3f} GB")


if __name__ == "__main__":
    main()
