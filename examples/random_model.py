"""Write a small FM model with random weights and a byte-level tokenizer.

    python examples/random_model.py OUT_DIR [--hidden-size 128 --layers 2 ...]

Useful to try the tools before a trained model is at hand (its text is noise).
"""

import argparse

import mlx_fm
from mlx_fm.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import mlx.core as mx

    mx.random.seed(args.seed)
    model = mlx_fm.Model(
        mlx_fm.ModelArgs(
            vocab_size=BYTE_VOCAB_SIZE + 1,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            num_heads=args.heads,
            num_slots=args.slots,
            top_k=args.top_k,
            intermediate_size=args.intermediate_size,
        )
    )
    mlx_fm.save_pretrained(args.out_dir, model, byte_tokenizer())
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
