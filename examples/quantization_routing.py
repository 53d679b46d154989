"""How quantization changes FM's routing: top-k slot agreement and logit error vs float.

    python examples/quantization_routing.py [--train-steps 200 --seed 0]

Trains a small byte-level FM model briefly on this repository's own text (with
--train-steps 0 the weights stay random), then quantizes it at 4 and 8 bits in
three ways: the converter's default (the routing-critical in_proj, embedding and
lm_head at 8 bits below 8 bits, in float at 8 bits), only in_proj kept in
float, and naive (everything at the same bits). For held-out text it prints the fraction of
(token, layer, head) whose top-k slot set is the float model's, and the
relative logit error ‖q − f‖ / ‖f‖.
"""

import argparse
import time
from pathlib import Path

import mlx_fm
from mlx_fm.tokenizer import BYTE_VOCAB_SIZE

import mlx.core as mx  # noqa: E402  (after mlx_fm, which loads the fast BLAS)
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.utils import compute_bits_per_weight, quantize_model  # noqa: E402

from mlx_fm_convert.checkpoint import routing_safe_predicate  # noqa: E402

REPOSITORY = Path(__file__).resolve().parents[1]
GROUP_SIZE = 64


def corpus() -> bytes:
    files = sorted(REPOSITORY.glob("**/*.py")) + sorted(REPOSITORY.glob("**/*.md"))
    return b"\n".join(path.read_bytes() for path in files if ".git" not in path.parts)


def batches(data: mx.array, batch_size: int, length: int):
    while True:
        starts = mx.random.randint(0, data.size - length - 1, (batch_size,))
        rows = starts[:, None] + mx.arange(length + 1)
        window = data[rows]
        yield window[:, :-1], window[:, 1:]


def train(model, data, steps, batch_size=8, length=128):
    optimizer = optim.AdamW(learning_rate=3e-3)

    def loss_fn(model, inputs, targets):
        return nn.losses.cross_entropy(model(inputs), targets, reduction="mean")

    step = nn.value_and_grad(model, loss_fn)
    for index, (inputs, targets) in zip(range(steps), batches(data, batch_size, length)):
        loss, grads = step(model, inputs, targets)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state, loss)
        if index % 50 == 0 or index == steps - 1:
            print(f"step {index:4d}  loss {loss.item():.3f}")


def routing_and_logits(model, tokens):
    """Top-k slot indices (layers, B, T, H, k), sorted, and the logits."""
    args = model.args
    h = model.backbone.embeddings(tokens)
    top_slots = []
    for layer in model.layers:
        mixer = layer.mixer
        router_logits = mx.split(mixer.in_proj(layer.norm(h)), mixer.splits, axis=-1)[2]
        router_logits = router_logits.reshape(*tokens.shape, args.num_heads, args.num_slots)
        top = mx.argpartition(-router_logits, kth=args.top_k - 1, axis=-1)[..., : args.top_k]
        top_slots.append(mx.sort(top, axis=-1))
        h = layer(h)
    logits = (
        model.lm_head(model.backbone.norm_f(h))
        if "lm_head" in model
        else model.backbone.embeddings.as_linear(model.backbone.norm_f(h))
    )
    return mx.stack(top_slots), logits


def quantized_copy(model, bits, predicate):
    copy = mlx_fm.Model(model.args)
    copy.load_weights(tree_flatten(model.parameters()))
    copy, _ = quantize_model(copy, {}, GROUP_SIZE, bits, quant_predicate=predicate)
    return copy


def in_proj_float_only(bits):
    return lambda path, module: not path.endswith("mixer.in_proj")


def default_predicate(bits):
    return routing_safe_predicate(bits, GROUP_SIZE, "affine")


def naive(bits):
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    mx.random.seed(args.seed)
    data = mx.array(list(corpus()), dtype=mx.int32)
    held_out = int(data.size * 0.9)
    model = mlx_fm.Model(
        mlx_fm.ModelArgs(
            vocab_size=BYTE_VOCAB_SIZE + 1,
            hidden_size=128,
            num_hidden_layers=4,
            num_heads=4,
            num_slots=32,
            top_k=8,
            intermediate_size=256,
            tie_word_embeddings=False,
        )
    )
    started = time.perf_counter()
    train(model, data[:held_out], args.train_steps)
    print(
        f"trained {args.train_steps} steps in {time.perf_counter() - started:.0f} s; "
        f"model: 4 layers, D=128, H=4, m=32, k=8"
    )

    evaluation = data[held_out:][: 8 * 256].reshape(8, 256)
    float_slots, float_logits = routing_and_logits(model, evaluation)
    variants = {
        "default (routing-safe)": default_predicate,
        "in_proj float, rest quantized": in_proj_float_only,
        "naive (all quantized)": naive,
    }
    rows = []
    for bits in (4, 8):
        for name, make_predicate in variants.items():
            quantized = quantized_copy(model, bits, make_predicate(bits))
            slots, logits = routing_and_logits(quantized, evaluation)
            unchanged = mx.all(slots == float_slots, axis=-1).mean().item()
            error = (mx.linalg.norm(logits - float_logits) / mx.linalg.norm(float_logits)).item()
            quantized.set_dtype(mx.float16)  # bits/weight as a float16 checkpoint stores them
            rows.append(
                f"| {bits} | {name} | {compute_bits_per_weight(quantized):.2f} | "
                f"{unchanged:.2%} | {error:.4f} |"
            )
    print("\n| bits | quantization | bits/weight | top-k set unchanged | relative logit error |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
