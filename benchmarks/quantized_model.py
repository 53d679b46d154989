"""A quantized model against its float copy: prompt and decode tokens/s, in one process.

    python benchmarks/quantized_model.py [--model PATH] [--prompt-tokens 6000] [--rounds 3]

The float copy has the quantized model's own weights, dequantized. The two are timed
alternately, each round one after the other, and the ratios of each round are printed with
their median: on a noisy machine only a ratio taken in the same conditions means much.
"""

import argparse
import statistics

import mlx_fm
from mlx_fm.benchmark import measure
from mlx_fm.cli import fail_cleanly

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import dequantize_model


def float_copy(path):
    model, _ = mlx_fm.load(path)
    return dequantize_model(model)


@fail_cleanly
def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a quantized model (default: bundled)")
    parser.add_argument("--prompt-tokens", type=int, default=6000)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    quantized, _ = mlx_fm.load(args.model)
    if not any(isinstance(m, nn.QuantizedLinear) for _, m in quantized.named_modules()):
        raise ValueError(f"{args.model or 'the bundled model'} is not quantized")
    models = {"quantized": quantized, "float": float_copy(args.model)}
    vocab_size = quantized.args.vocab_size
    for model in models.values():
        mx.eval(model.parameters())
        measure(model, 64, 2, vocab_size)  # warm-up: compile, allocate, float copies
    ratios = []
    for round_ in range(args.rounds):
        rates = {
            name: measure(model, args.prompt_tokens, args.decode_tokens, vocab_size)
            for name, model in models.items()
        }
        (q_prompt, q_decode, _), (f_prompt, f_decode, _) = rates["quantized"], rates["float"]
        ratios.append((q_prompt / f_prompt, q_decode / f_decode))
        print(
            f"round {round_ + 1}: quantized prompt {q_prompt:.0f} tok/s, decode {q_decode:.1f}; "
            f"float prompt {f_prompt:.0f}, decode {f_decode:.1f}; "
            f"ratios {ratios[-1][0]:.2f}x, {ratios[-1][1]:.2f}x",
            flush=True,
        )
    prompt, decode = (statistics.median(r[i] for r in ratios) for i in (0, 1))
    print(f"median: quantized/float prompt {prompt:.2f}x, decode {decode:.2f}x")


if __name__ == "__main__":
    main()
