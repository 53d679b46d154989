import subprocess
import sys

import mlx_fm  # noqa: F401  (loads the fast BLAS before mlx.core)
from mlx_fm import Model, ModelArgs, save_pretrained
from mlx_fm.tokenizer import BYTE_VOCAB_SIZE, byte_tokenizer

import mlx.core as mx
import pytest

TINY = dict(
    vocab_size=BYTE_VOCAB_SIZE + 1,
    hidden_size=32,
    num_hidden_layers=2,
    num_heads=2,
    num_slots=8,
    top_k=3,
    intermediate_size=48,
    tie_word_embeddings=False,
)


def tiny_model(seed=0, **overrides):
    mx.random.seed(seed)
    model = Model(ModelArgs(**(TINY | overrides)))
    # Non-zero biases, so that η and μ differ across heads.
    for layer in model.layers:
        layer.mixer.eta_bias = mx.random.normal(layer.mixer.eta_bias.shape)
        layer.mixer.mu_bias = mx.random.normal(layer.mixer.mu_bias.shape)
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    save_pretrained(path, tiny_model(), byte_tokenizer())
    return path


@pytest.fixture(params=["vector build", "portable build"])
def c_build(request):
    """The test, with fm_cpu.c's loops as built for this CPU's vector units where it has them,
    and as built for any CPU of its kind (what a CPU without AVX2 runs)."""
    from mlx_fm.ops import native

    if not native.available():
        pytest.skip(f"no C path here: {native.status()}")
    native.portable_only(request.param == "portable build")
    yield
    native.portable_only(False)


def relative_error(actual, expected) -> float:
    """max |actual − expected| / max |expected|, in float32 (mx or numpy arrays)."""
    actual, expected = mx.array(actual).astype(mx.float32), mx.array(expected).astype(mx.float32)
    return (mx.abs(actual - expected).max() / mx.abs(expected).max()).item()


def run_cli(module: str, *args, stdin=None, env=None, timeout: float = 600):
    """`python -m module args` in a new process (for what only a real process shows)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
