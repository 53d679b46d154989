"""Prompt and decode speed of an FM model against an mlx-lm Mamba-2 of about the same size.

    python benchmarks/fm_vs_mamba2.py [--prompt-tokens 4096 --decode-tokens 64]

Both models have random weights and run in this one process, so the ratios hold
even on a noisy machine.
"""

import argparse
import time

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import mamba2
from mlx_lm.models.cache import make_prompt_cache

VOCAB, HIDDEN, INNER, HEAD_DIM = 8192, 512, 1024, 64


def fm_model(layers, slots, top_k):
    return mlx_fm.Model(mlx_fm.ModelArgs(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, expand=INNER // HIDDEN,
        num_heads=INNER // HEAD_DIM, num_slots=slots, top_k=top_k, conv_kernel=4,
    ))


def mamba2_model(layers):
    return mamba2.Model(mamba2.ModelArgs(
        model_type="mamba2", num_heads=INNER // HEAD_DIM, head_dim=HEAD_DIM, vocab_size=VOCAB,
        hidden_size=HIDDEN, intermediate_size=INNER, state_size=128, num_hidden_layers=layers,
        layer_norm_epsilon=1e-5, conv_kernel=4, n_groups=1, use_bias=False,
        use_conv_bias=True, tie_word_embeddings=True, time_step_limit=(0.0, float("inf")),
        time_step_rank="auto",
    ))


def parameter_count(model):
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def measure(model, prompt_tokens, decode_tokens, repeats):
    tokens = mx.random.randint(0, VOCAB, (1, prompt_tokens))
    best_prompt = best_decode = 0.0
    for _ in range(repeats):
        cache = make_prompt_cache(model)
        start = time.perf_counter()
        logits = model(tokens, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        best_prompt = max(best_prompt, prompt_tokens / (time.perf_counter() - start))
        token = mx.argmax(logits[:, -1:], axis=-1)
        mx.eval(token)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = mx.argmax(model(token, cache=cache)[:, -1:], axis=-1)
            mx.async_eval(token)
        mx.eval(token)
        best_decode = max(best_decode, decode_tokens / (time.perf_counter() - start))
    return best_prompt, best_decode


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fm-layers", type=int, default=8)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--mamba2-layers", type=int, default=9)
    args = parser.parse_args()

    mx.random.seed(0)
    models = {"FM": fm_model(args.fm_layers, args.slots, args.top_k),
              "Mamba-2": mamba2_model(args.mamba2_layers)}
    results = {}
    for name, model in models.items():
        mx.eval(model.parameters())
        measure(model, 256, 4, 1)  # warm-up: compile and allocate
        results[name] = measure(model, args.prompt_tokens, args.decode_tokens, args.repeats)
        print(f"{name:8s} {parameter_count(model) / 1e6:5.1f}M params  "
              f"prompt {results[name][0]:8.0f} tok/s  decode {results[name][1]:6.1f} tok/s")
    (fm_prompt, fm_decode), (m2_prompt, m2_decode) = results["FM"], results["Mamba-2"]
    print(f"FM / Mamba-2: prompt {fm_prompt / m2_prompt:.2f}x, decode {fm_decode / m2_decode:.2f}x")


if __name__ == "__main__":
    main()
