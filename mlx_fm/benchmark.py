"""Speed and memory of FM against mlx-lm's Llama and Mamba-2 of the same size.

    mlx_fm.benchmark [--contexts 1024 4096 16384] [--models fm llama mamba2]

All models get random weights and run in this one process, one after another,
so the ratios hold even on a noisy machine. For each context length: prompt
tokens/s (prefill in mlx-lm's steps), decode tokens/s right after that prompt,
and peak memory. Llama and Mamba-2 get as many layers as brings their parameter
count closest to the FM model's.

Noise on a shared machine only ever slows a run down, so a decode rate is that of the
fastest window of its tokens in about a second (sixteen windows at least; four seconds where its
windows alternate with the decode floor's, below), a prompt's that of
the fastest of three runs (one run from 8,192 tokens on), and training that of the fastest
of its runs.

Each model is also held against this machine's limits, measured in the same run and in the
same conditions: the decode floor (a batch-1 decode step must stream every weight matrix
once: the model's matrix-vector products alone, timed in windows that alternate with the
decode's) and the prompt bound (about 2 × parameters FLOPs a token, at the GEMM speed of a
prompt segment, timed before each run of the prompt and after the last). Each is the
fastest of its timings, as the rate held against it is.

With --train-seq-len, each model's training speed too: tokens/s of mlx_fm.train's own
step (forward, backward, AdamW) on random windows. With --batch N, decode tokens/s of
mlx-lm's batch_generate over N prompts against the same over one. With --bits N, the FM
model quantized to N bits (its own weights, groups of 64), and its rates over its float self's,
their prompt runs and decode windows taken in turn.
"""

import argparse
import gc
import time
from dataclasses import dataclass, field
from functools import partial
from types import SimpleNamespace
from typing import Callable, Optional

import mlx_fm  # noqa: F401  (optimized BLAS before mlx.core)

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import batch_generate
from mlx_lm.models import llama, mamba2
from mlx_lm.models.cache import make_prompt_cache

from .cli import fail_cleanly
from .ops import native
from .training.config import TrainConfig
from .training.optimizer import build_optimizer
from .training.trainer import make_train_step
from .utils import freed_buffers_kept_for_training, parameter_count

PREFILL_STEP = 2048
DECODE_WINDOWS = 16  # decode and its floor are timed in at least this many windows of tokens,
DECODE_SECONDS = 1.0  # and for about this long, and the fastest window counts
DECODES_IN_TURN_SECONDS = 4.0  # decode windows taken in turn with others' run this long
BOUND_SECONDS = 0.25  # the prompt bound's GEMM is timed this long before each prompt run and after
PROMPT_RUNS = 3  # a prompt is timed this many times, each on a fresh cache, and the fastest counts
ONE_PROMPT_RUN_FROM = 8192  # tokens: longer prompts are timed once (Llama's 16K takes minutes)
BATCH_PROMPT_TOKENS = 128


def fm_model(args, layers):
    return mlx_fm.Model(
        mlx_fm.ModelArgs(
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            num_hidden_layers=layers,
            expand=2,
            num_heads=2 * args.hidden_size // args.head_dim,
            num_slots=args.slots,
            top_k=args.top_k,
            intermediate_size=args.fm_intermediate_size,
        )
    )


def llama_model(args, layers):
    return llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=args.hidden_size,
            num_hidden_layers=layers,
            intermediate_size=8 * args.hidden_size // 3,
            num_attention_heads=args.hidden_size // 64,
            num_key_value_heads=args.hidden_size // 64,
            rms_norm_eps=1e-5,
            vocab_size=args.vocab_size,
            tie_word_embeddings=True,
        )
    )


def mamba2_model(args, layers):
    return mamba2.Model(
        mamba2.ModelArgs(
            model_type="mamba2",
            num_heads=2 * args.hidden_size // args.head_dim,
            head_dim=args.head_dim,
            vocab_size=args.vocab_size,
            hidden_size=args.hidden_size,
            intermediate_size=2 * args.hidden_size,
            state_size=128,
            num_hidden_layers=layers,
            layer_norm_epsilon=1e-5,
            conv_kernel=4,
            n_groups=1,
            use_bias=False,
            use_conv_bias=True,
            tie_word_embeddings=True,
            time_step_limit=(0.0, float("inf")),
            time_step_rank="auto",
        )
    )


BUILDERS = {"fm": fm_model, "llama": llama_model, "mamba2": mamba2_model}
NAMES = {"fm": "FM", "llama": "Llama", "mamba2": "Mamba-2"}


def layers_to_match(build, args, target: int) -> int:
    """The layer count whose parameter count is closest to `target`."""
    one, two = (parameter_count(build(args, n)) for n in (1, 2))
    per_layer = two - one
    return max(1, round((target - (one - per_layer)) / per_layer))


def decode_window(decode_tokens: int) -> int:
    """Tokens in one timed decode window (the decode floor is timed in windows as long)."""
    return max(decode_tokens // DECODE_WINDOWS, 1)


def measure(model, context: int, decode_tokens: int, vocab_size: int, resident: float = 0.0):
    """(prompt tokens/s, decode tokens/s, peak GB) for one prompt of `context` tokens (the
    fastest of its runs) and the tokens after it (the fastest window of `decode_window` tokens
    in DECODE_SECONDS, and DECODE_WINDOWS windows at least: at least `decode_tokens`). The peak
    is `resident` GB (the model's own: see `resident_gb`) plus the most the two added to it."""
    return _measure(model, context, decode_tokens, vocab_size, resident, limits=False)[0]


def measure_against_limits(
    model, context: int, decode_tokens: int, vocab_size: int, resident: float = 0.0
):
    """`measure`'s rates, and (the prompt bound, the decode floor) they are held against, each
    timed in its rate's conditions: the bound before each run of the prompt and after the
    last, the floor in windows that alternate with the decode's."""
    return _measure(model, context, decode_tokens, vocab_size, resident, limits=True)


def _measure(
    model, context: int, decode_tokens: int, vocab_size: int, resident: float, limits: bool
) -> tuple[tuple, Optional[tuple]]:
    tokens = mx.random.randint(0, vocab_size, (1, context))
    bound = prompt_bound(model) if limits else None
    mx.clear_cache()
    active_before = mx.get_active_memory()
    mx.reset_peak_memory()
    bounds, peaks, prompt_seconds = [], [], []

    def time_bound():  # its GEMM's memory is left out of the peak
        peaks.append(mx.get_peak_memory())
        bounds.append(bound())
        mx.reset_peak_memory()

    window = decode_window(decode_tokens)
    for _ in range(prompt_runs(context)):
        if limits:
            time_bound()
        decode = None  # the last run's cache goes before this run's is made
        seconds, decode = prompt_run(model, tokens, window)
        prompt_seconds.append(seconds)
    prompt_rate = context / min(prompt_seconds)
    if limits:
        time_bound()
        decode_rate, floor = timed_rates(
            [decode, floor_window(model, window)], window, DECODES_IN_TURN_SECONDS, DECODE_WINDOWS
        )
    else:
        decode_rate = timed_rate(decode, window, DECODE_SECONDS, DECODE_WINDOWS)
    peak = resident + (max(peaks + [mx.get_peak_memory()]) - active_before) / 1e9
    return (prompt_rate, decode_rate, peak), ((max(bounds), floor) if limits else None)


def prompt_runs(context: int) -> int:
    return 1 if context >= ONE_PROMPT_RUN_FROM else PROMPT_RUNS


def prompt_run(model, tokens: mx.array, window: int) -> tuple[float, Callable[[], None]]:
    """Seconds for one run of the prompt `tokens` (1, T) on a fresh cache, in mlx-lm's prefill
    steps up to the first token generated, and a function that decodes `window` tokens greedily
    after it (then as many more each call)."""
    context = tokens.shape[1]
    cache = make_prompt_cache(model)
    start = time.perf_counter()
    for begin in range(0, context - 1, PREFILL_STEP):
        model(tokens[:, begin : min(begin + PREFILL_STEP, context - 1)], cache=cache)
        mx.eval([c.state for c in cache])
    token = mx.argmax(model(tokens[:, -1:], cache=cache)[:, -1], axis=-1, keepdims=True)
    mx.eval(token)
    seconds = time.perf_counter() - start

    def decode():
        nonlocal token
        for _ in range(window):
            token = mx.argmax(model(token, cache=cache)[:, -1], axis=-1, keepdims=True)
            mx.async_eval(token)
        mx.eval(token)

    return seconds, decode


def rates_in_turn(models: list, context: int, decode_tokens: int, vocab_size: int) -> list:
    """(prompt tokens/s, decode tokens/s) of each of `models` (e.g. a quantized model and its
    float self), their prompt runs and decode windows taken in turn, so that noise meets them
    alike: for ratios between them."""
    tokens = mx.random.randint(0, vocab_size, (1, context))
    window = decode_window(decode_tokens)
    seconds, decoders = [[] for _ in models], [None] * len(models)
    for _ in range(prompt_runs(context)):
        for i, model in enumerate(models):
            decoders[i] = None  # the last run's cache goes before this run's is made
            taken, decoders[i] = prompt_run(model, tokens, window)
            seconds[i].append(taken)
    decode_rates = timed_rates(decoders, window, DECODES_IN_TURN_SECONDS, DECODE_WINDOWS)
    return [(context / min(taken), rate) for taken, rate in zip(seconds, decode_rates)]


def resident_gb(build, vocab_size: int) -> tuple:
    """(the model `build()` returns, warmed up; the memory it holds in GB: its weights, and a
    quantized FM model's float copies), measured whatever else is resident."""
    gc.collect()  # arrays no longer referenced but not yet collected would go mid-measurement
    mx.clear_cache()
    before = mx.get_active_memory()
    model = build()
    model.eval()  # for inference, as mlx_fm.load and mlx_lm.load return models
    mx.eval(model.parameters())
    measure(model, 64, 2, vocab_size)  # warm-up: compile, allocate, float copies
    mx.clear_cache()
    return model, (mx.get_active_memory() - before) / 1e9


def training_rate(model, seq_len: int, batch_size: int, vocab_size: int) -> float:
    """Tokens/s of mlx_fm.train's compiled step (forward, backward, AdamW, clipping), the
    fastest of at least three steps."""
    model.train()  # as mlx_fm.train trains it
    config = TrainConfig(data=["random"], output="unused", seq_len=seq_len, batch_size=batch_size)
    step = make_train_step(model, build_optimizer(config), config, mx.distributed.init())
    windows = mx.random.randint(0, vocab_size, (batch_size, seq_len + 1))
    with freed_buffers_kept_for_training():  # as mlx_fm.train keeps them
        return timed_rate(lambda: step(windows), batch_size * seq_len, seconds=2.0, runs=3)


def batch_decode_rate(model, prompts: int, decode_tokens: int, vocab_size: int) -> float:
    """Generated tokens/s of mlx-lm's batch_generate over `prompts` random prompts."""
    tokens = mx.random.randint(0, vocab_size, (prompts, BATCH_PROMPT_TOKENS)).tolist()
    no_text = SimpleNamespace(eos_token_ids=[], decode=lambda ids: "")
    batch_generate(model, no_text, tokens, max_tokens=2)  # warm-up: compile for this batch
    response = batch_generate(model, no_text, tokens, max_tokens=decode_tokens)
    return response.stats.generation_tps


def weight_matrices(model: nn.Module) -> list[mx.array]:
    """The matrices a decode step multiplies by: every Linear's, and the embedding when it
    doubles as the output layer."""
    matrices = [m.weight for _, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not any(name.endswith("lm_head") for name, _ in model.named_modules()):
        matrices += [m.weight for _, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return matrices


def timed_rates(works: list, count: int, seconds: float, runs: int = 1) -> list[float]:
    """Units of `count` per second of the fastest run of each of `works` (each evaluates), run
    in turn for about `seconds`, and at least `runs` times each: so that noise on the machine
    meets them alike."""
    for work in works:
        work()
    durations = [[] for _ in works]
    start = time.perf_counter()
    while len(durations[0]) < runs or time.perf_counter() - start < seconds:
        for work, taken in zip(works, durations):
            run_start = time.perf_counter()
            work()
            taken.append(time.perf_counter() - run_start)
    return [count / min(taken) for taken in durations]


def timed_rate(work, count: int, seconds: float = 0.5, runs: int = 1) -> float:
    """Units of `count` per second of the fastest run of `work()` in about `seconds`, and at
    least `runs` of them."""
    return timed_rates([work], count, seconds, runs)[0]


def floor_window(model: nn.Module, steps: int):
    """A window of `steps` decode-floor steps: the model's matrix-vector products alone, batch
    1, each weight matrix streamed once a step."""
    matrices = weight_matrices(model)
    vectors = [mx.ones((1, w.shape[1]), dtype=w.dtype) for w in matrices]

    def window():
        for _ in range(steps):
            mx.eval([v @ w.T for v, w in zip(vectors, matrices)])

    return window


def prompt_bound(model: nn.Module) -> Callable[[], float]:
    """A timer of the prompt bound: tokens/s at 2 × parameters FLOPs a token and the GEMM speed
    of a prompt segment, that GEMM timed for BOUND_SECONDS each call."""
    hidden_size = model.args.hidden_size
    a = mx.random.normal((PREFILL_STEP, hidden_size))
    b = mx.random.normal((hidden_size, 4 * hidden_size))
    mx.eval(a, b)
    tokens = PREFILL_STEP * hidden_size * 4 * hidden_size / parameter_count(model)
    return lambda: timed_rate(lambda: mx.eval(a @ b), tokens, BOUND_SECONDS)


def build_parser():
    parser = argparse.ArgumentParser(prog="mlx_fm.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), default=list(BUILDERS))
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=32,
        help="decode is timed in windows of a sixteenth as many tokens, 16 at least (about 1 s)",
    )
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--fm-layers", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--fm-intermediate-size", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--train-seq-len", type=int, default=0, help="also time training on windows this long"
    )
    parser.add_argument("--train-batch", type=int, default=8, help="windows per training step")
    parser.add_argument(
        "--batch", type=int, default=0, help="also time batch_generate over this many prompts"
    )
    parser.add_argument(
        "--bits", type=int, default=0, help="also time the FM model quantized to this many bits"
    )
    return parser


@dataclass
class Measured:
    """One model's figures: per context (prompt tok/s, decode tok/s, peak GB) and (prompt
    bound, decode floor), or for a quantized model (its rates timed in turn with its float
    self's: `rates_in_turn`) the ratios of its rates to those; and if asked, training tok/s and
    (batch_generate tok/s over --batch prompts, over one prompt)."""

    contexts: dict = field(default_factory=dict)
    limits: dict = field(default_factory=dict)
    against_float: dict = field(default_factory=dict)
    training: Optional[float] = None
    batch_decode: Optional[tuple] = None


def quantized_copy(model: nn.Module, args, bits: int) -> nn.Module:
    """The FM model with its own weights, quantized to `bits` in groups of 64."""
    quantized = fm_model(args, args.fm_layers)
    quantized.update(model.parameters())
    nn.quantize(quantized, group_size=64, bits=bits)
    mx.eval(quantized.parameters())
    return quantized


def run(args) -> dict:
    """{model name: Measured}, printed as it goes, with each rate's fraction of the prompt bound
    or the decode floor, measured with it (`measure_against_limits`): on a noisy machine a
    limit measured minutes away would not share the rate's conditions."""
    mx.random.seed(0)
    target = parameter_count(fm_model(args, args.fm_layers))
    results = {}
    for key in args.models:
        layers = args.fm_layers if key == "fm" else layers_to_match(BUILDERS[key], args, target)
        model, resident = resident_gb(partial(BUILDERS[key], args, layers), args.vocab_size)
        print(
            f"{NAMES[key]}: {layers} layers, {parameter_count(model) / 1e6:.1f}M parameters "
            "(in brackets, each rate against the prompt bound or decode floor measured with it)"
        )
        measured = results[NAMES[key]] = Measured()
        quantized = None
        if key == "fm" and args.bits:
            quantized, quantized_resident = resident_gb(
                partial(quantized_copy, model, args, args.bits), args.vocab_size
            )
            quantized_measured = results[f"FM {args.bits}-bit"] = Measured()
        for context in args.contexts:
            result, limits = measure_against_limits(
                model, context, args.decode_tokens, args.vocab_size, resident
            )
            measured.contexts[context], measured.limits[context] = result, limits
            print(
                f"  {context:6d} tokens: prompt {result[0]:9.1f} tok/s "
                f"({result[0] / limits[0]:4.0%} of {limits[0]:.0f}), decode {result[1]:7.1f} tok/s "
                f"({result[1] / limits[1]:4.0%} of {limits[1]:.0f}), peak {result[2]:6.3f} GB",
                flush=True,
            )
            if quantized is not None:
                peak = measure(
                    quantized, context, args.decode_tokens, args.vocab_size, quantized_resident
                )[2]
                rates, float_rates = rates_in_turn(
                    [quantized, model], context, args.decode_tokens, args.vocab_size
                )
                ratios = tuple(q / f for q, f in zip(rates, float_rates))
                quantized_measured.contexts[context] = (*rates, peak)
                quantized_measured.against_float[context] = ratios
                print(
                    f"  {args.bits:>6d}-bit: prompt {rates[0]:9.1f} tok/s ({ratios[0]:.2f}x "
                    f"float), decode {rates[1]:7.1f} tok/s ({ratios[1]:.2f}x float), peak "
                    f"{peak:6.3f} GB: rates timed in turn with the float model's",
                    flush=True,
                )
        if args.batch:
            measured.batch_decode = tuple(
                batch_decode_rate(model, n, args.decode_tokens, args.vocab_size)
                for n in (args.batch, 1)
            )
            batched, single = measured.batch_decode
            print(
                f"  batch_generate: {batched:.1f} tok/s over {args.batch} prompts, "
                f"{single:.1f} over 1 ({batched / single:.2f}x)",
                flush=True,
            )
        if args.train_seq_len:
            measured.training = training_rate(
                model, args.train_seq_len, args.train_batch, args.vocab_size
            )
            print(
                f"  training: {measured.training:.0f} tok/s "
                f"({args.train_batch} x {args.train_seq_len} tokens a step)",
                flush=True,
            )
        del model, quantized
    return results


RATE_NAMES = ("prompt", "decode")


def print_ratios(results: dict):
    others = {name: m for name, m in results.items() if not name.startswith("FM")}
    if "FM" not in results or not others:
        return
    fm = results["FM"]
    print(
        f"\n{'context':>8} "
        + " ".join(f"{'FM/' + name + ' ' + what:>22}" for name in others for what in RATE_NAMES)
    )
    for context, (fm_prompt, fm_decode, _) in fm.contexts.items():
        cells = []
        for measured in others.values():
            prompt, decode, _ = measured.contexts[context]
            cells += [f"{fm_prompt / prompt:21.2f}x", f"{fm_decode / decode:21.2f}x"]
        print(f"{context:8d} " + " ".join(cells))
    if fm.training is not None:
        print(
            "training "
            + " ".join(f"FM/{name} {fm.training / m.training:.2f}x" for name, m in others.items())
        )


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    if min(args.contexts) < 2 or args.decode_tokens < 1:
        raise ValueError("contexts must be at least 2 tokens and --decode-tokens at least 1")
    blas = mlx_fm.blas_info()
    print(f"BLAS: {blas['library']}; matrix-vector products: {blas['matrix_vector']}")
    print(f"FM's prompt mixer on the CPU: {native.status()}")
    print(f"FM's decode step on the CPU: {native.decode_status()}")
    print_ratios(run(args))


if __name__ == "__main__":
    main()
