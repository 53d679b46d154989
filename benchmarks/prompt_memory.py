"""Peak memory of prompt processing against prompt length, for a small FM model.

    python benchmarks/prompt_memory.py [--lengths 2048 8192 32768]

Two ways of processing a prompt: one forward call over the whole prompt (the
backbone's hidden states, no logits), and mlx-lm's prefill in steps of 2048
tokens as `mlx_lm.generate` does it. Memory should grow about linearly with the
length in the first and stay flat in the second.
"""

import argparse
import functools

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

STEP = 2048


def small_model():
    mx.random.seed(0)
    model = mlx_fm.Model(
        mlx_fm.ModelArgs(
            vocab_size=8192,
            hidden_size=256,
            num_hidden_layers=4,
            num_heads=8,
            num_slots=64,
            top_k=16,
            intermediate_size=512,
        )
    )
    mx.eval(model.parameters())
    return model


def peak_gb(run):
    mx.clear_cache()
    mx.reset_peak_memory()
    baseline = mx.get_active_memory()
    run()
    return (mx.get_peak_memory() - baseline) / 1e9


def one_call(model, tokens):
    cache = make_prompt_cache(model)
    mx.eval(model.backbone(tokens, cache), [c.state for c in cache])


def in_steps(model, tokens):
    cache = make_prompt_cache(model)
    for start in range(0, tokens.shape[1], STEP):
        model(tokens[:, start : start + STEP], cache=cache)
        mx.eval([c.state for c in cache])
        mx.clear_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    args = parser.parse_args()
    model = small_model()
    print(f"{'tokens':>8} {'one call GB':>12} {'GB / 1K tok':>12} {'in steps GB':>12}")
    for length in args.lengths:
        tokens = mx.random.randint(0, 8192, (1, length))
        whole = peak_gb(functools.partial(one_call, model, tokens))
        stepped = peak_gb(functools.partial(in_steps, model, tokens))
        print(f"{length:8d} {whole:12.3f} {whole / length * 1024:12.4f} {stepped:12.3f}")


if __name__ == "__main__":
    main()
