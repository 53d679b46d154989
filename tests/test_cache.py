"""FMCache: rewinding by up to max_undo tokens restores the exact cache of then, whether its
tokens were decoded in C (in place, keeping what each step overwrote) or on MLX ops."""

import copy

from mlx_fm.cache import DEFAULT_MAX_UNDO, FMCache, Overwritten
from mlx_fm.ops import native

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import (
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from conftest import relative_error, tiny_model


def tokens(length, seed=1):
    mx.random.seed(seed)
    return mx.random.randint(0, 257, (1, length))


def contents(cache):
    """Copies of each layer's contents, in memory of their own."""
    return [[None if a is None else mx.array(np.array(a)) for a in c.cache] for c in cache]


# In eval mode a decode step runs in C on the CPU; in training mode on MLX ops (a compiled step).
DECODES = {"decode in C": False, "decode on MLX ops": True}


def model_decoding(decode, **overrides):
    model = tiny_model(**overrides)
    model.train(DECODES[decode])
    return model


def assert_same_contents(cache, expected):
    for layer, want in zip(cache, expected):
        for got, array in zip(layer.cache, want):
            assert (got is None) == (array is None)
            if array is not None:
                assert mx.array_equal(got, array)


def assert_close_contents(cache, expected):
    """Equal up to rounding (a different batch or chunking rounds differently)."""
    for got, want in zip(cache, expected):
        assert all(relative_error(a, b) < 1e-5 for a, b in zip(got.cache, want.cache))


def run(model, prompt, chunks, cache):
    """Feed `prompt` to `model` in forwards of `chunks` tokens; the cache contents after each."""
    after, start = [], 0
    for size in chunks:
        model(prompt[:, start : start + size], cache=cache)
        start += size
        after.append((start, contents(cache)))
    return after


CONVS = [{}, {"conv_kernel": 1}, {"conv_kernel": 0}]
CHUNKS = [[20, 1, 1, 1, 5], [3, 4], [1] * 7, [40], [2, 17]]


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("overrides", CONVS)
@pytest.mark.parametrize("chunks", CHUNKS)
def test_trim_restores_the_exact_cache_of_n_tokens_ago(overrides, chunks, decode):
    model = model_decoding(decode, **overrides)
    prompt = tokens(sum(chunks))
    total = sum(chunks)
    ends = [(0, contents(make_prompt_cache(model)))] + run(
        model, prompt, chunks, make_prompt_cache(model)
    )
    reachable = [(end, snapshot) for end, snapshot in ends if total - end <= DEFAULT_MAX_UNDO]
    for end, snapshot in reachable:
        cache = make_prompt_cache(model)
        run(model, prompt, chunks, cache)
        assert trim_prompt_cache(cache, total - end) == total - end
        assert_same_contents(cache, snapshot)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_trim_within_a_forward_equals_a_forward_of_the_shorter_prompt(chunks):
    model = tiny_model()
    prompt = tokens(sum(chunks))
    total = sum(chunks)
    for n in range(1, min(total - 1, DEFAULT_MAX_UNDO) + 1):
        cache, shorter = make_prompt_cache(model), make_prompt_cache(model)
        run(model, prompt, chunks, cache)
        cache_n = trim_prompt_cache(cache, n)
        model(prompt[:, : total - n], cache=shorter)
        assert cache_n == n
        assert_close_contents(cache, shorter)


@pytest.mark.parametrize("overrides", CONVS)
def test_decode_steps_in_c_rewind_in_place_to_the_exact_cache_of_then(overrides):
    """Decoded without anyone reading its contents, a cache is updated in place; rewound, it
    is what a cache read after every step held then (a read makes the next step copy)."""
    model = model_decoding("decode in C", **overrides)
    prompt, steps = tokens(9), tokens(12, seed=5)
    read, unread = make_prompt_cache(model), make_prompt_cache(model)
    model(prompt, cache=read)
    model(prompt, cache=unread)
    then = [contents(read)]
    for t in range(steps.shape[1]):
        model(steps[:, t : t + 1], cache=read)
        then.append(contents(read))
        model(steps[:, t : t + 1], cache=unread)
    assert isinstance(unread[0].undo[-1], Overwritten) == native.decodes_here()
    trim_prompt_cache(unread, 5)
    assert_same_contents(unread, then[7])
    for n in range(8):
        rewound = copy.deepcopy(unread)
        trim_prompt_cache(rewound, n)
        assert_same_contents(rewound, then[7 - n])
    for n in (9, 11):  # back into the prompt's snapshots
        rewound, shorter = copy.deepcopy(unread), make_prompt_cache(model)
        trim_prompt_cache(rewound, n)
        model(prompt[:, : 16 - n], cache=shorter)
        assert_close_contents(rewound, shorter)


READS = {
    "cache": lambda cache: [c.cache for c in cache],
    "state": lambda cache: [c.state[0] for c in cache],
    "extract": lambda cache: [c.extract(0).cache for c in cache],
    "deepcopy": lambda cache: [c.cache for c in copy.deepcopy(cache)],
}


@pytest.mark.parametrize("read", READS)
def test_arrays_read_from_a_cache_stay_as_they_were_while_it_decodes_in_c(read):
    model = model_decoding("decode in C")
    cache = make_prompt_cache(model)
    for chunk in (tokens(6), tokens(1, seed=2), tokens(1, seed=3)):  # the last one in place
        model(chunk, cache=cache)
    before = contents(cache)
    held = READS[read](cache)
    for seed in range(4):
        model(tokens(1, seed=seed), cache=cache)
    for got, want in zip(held, before):
        assert all(mx.array_equal(a, b) for a, b in zip(got, want))


def test_a_copy_of_a_cache_and_the_cache_decode_apart():
    model = model_decoding("decode in C")
    cache = make_prompt_cache(model)
    for chunk in (tokens(6), tokens(1, seed=2), tokens(1, seed=3)):
        model(chunk, cache=cache)
    copied = copy.deepcopy(cache)
    before = contents(copied)
    model(tokens(1, seed=4), cache=cache)
    assert_same_contents(copied, before)
    after = contents(cache)
    model(tokens(1, seed=5), cache=copied)
    assert_same_contents(cache, after)


@pytest.mark.parametrize("decode", DECODES)
def test_decoding_after_a_trim_equals_decoding_without_the_trimmed_tokens(decode):
    model = model_decoding(decode)
    prompt, detour = tokens(30), tokens(6, seed=2)
    straight = make_prompt_cache(model)
    model(prompt, cache=straight)
    expected = model(prompt[:, -3:], cache=straight)

    rewound = make_prompt_cache(model)
    model(prompt, cache=rewound)
    model(detour, cache=rewound)
    trim_prompt_cache(rewound, 6)
    assert mx.array_equal(model(prompt[:, -3:], cache=rewound), expected)


def test_trimming_beyond_the_snapshots_says_how_far_it_can_go():
    model = tiny_model()
    cache = model.make_cache(max_undo=4)
    model(tokens(10), cache=cache)
    assert [c.trimmable_tokens for c in cache] == [4, 4]
    with pytest.raises(ValueError, match="at most 4 tokens"):
        cache[0].trim(5)
    assert cache[0].trim(4) == 4
    with pytest.raises(ValueError, match="at most 0 tokens"):
        cache[0].trim(1)


def test_is_trimmable_is_false_only_for_a_cache_that_keeps_no_snapshots():
    model = tiny_model()
    assert can_trim_prompt_cache(make_prompt_cache(model))
    assert not can_trim_prompt_cache(model.make_cache(max_undo=0))
    cache = make_prompt_cache(model)
    model(tokens(5), cache=cache)
    extracted = [c.extract(0) for c in cache]
    assert not can_trim_prompt_cache(extracted)


@pytest.mark.parametrize("decode", DECODES)
def test_snapshots_cost_memory_bounded_by_max_undo(decode):
    """Snapshots of whole contents, or less: what each decode step in C overwrote (k of m
    slots and one conv input)."""
    model = model_decoding(decode)
    cache = model.make_cache(max_undo=3)
    model(tokens(4), cache=cache)
    size = sum(c.nbytes for c in cache)
    model(tokens(50), cache=cache)
    assert sum(c.nbytes for c in cache) == size
    for _ in range(5):
        model(tokens(1), cache=cache)
    in_c = decode == "decode in C" and native.decodes_here()
    assert (sum(c.nbytes for c in cache) < size) == in_c
    assert sum(c.nbytes for c in cache) <= size
    assert cache[0].trimmable_tokens == 3


@pytest.mark.parametrize("decode", DECODES)
def test_save_and_load_keep_the_snapshots(tmp_path, decode):
    model = model_decoding(decode)
    prompt = tokens(12)
    cache = model.make_cache(max_undo=5)
    model(prompt[:, :9], cache=cache)
    for t in range(9, 12):
        model(prompt[:, t : t + 1], cache=cache)
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    assert all(isinstance(c, FMCache) and c.max_undo == 5 for c in loaded)
    for c in (cache, loaded):
        trim_prompt_cache(c, 5)
    assert_same_contents(loaded, contents(cache))
    assert mx.array_equal(model(prompt[:, :2], cache=loaded), model(prompt[:, :2], cache=cache))


def test_a_fresh_cache_saves_and_loads(tmp_path):
    cache = tiny_model().make_cache()
    save_prompt_cache(str(tmp_path / "cache.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "cache.safetensors"))
    assert all(c.empty() and c.trimmable_tokens == 0 for c in loaded)


@pytest.mark.parametrize("decode", DECODES)
def test_filter_keeps_the_snapshots_of_the_kept_rows(decode):
    model = model_decoding(decode)
    mx.random.seed(3)
    batch = mx.random.randint(0, 257, (3, 9))
    cache, alone = make_prompt_cache(model), make_prompt_cache(model)
    for chunk in (batch[:, :6], batch[:, 6:7], batch[:, 7:8], batch[:, 8:]):
        model(chunk, cache=cache)
        model(chunk[2:], cache=alone)
    for c in cache:
        c.filter(mx.array([2]))
    trim_prompt_cache(cache, 4)
    trim_prompt_cache(alone, 4)
    assert_close_contents(cache, alone)


def test_merge_and_extend_batch_caches_without_snapshots():
    model = tiny_model()
    first, second = make_prompt_cache(model), make_prompt_cache(model)
    model(tokens(5), cache=first)
    model(tokens(7, seed=4), cache=second)
    merged = [FMCache.merge([a, b]) for a, b in zip(first, second)]
    assert merged[0].batch_size == 2 and merged[0].trimmable_tokens == 0
    for a, b in zip(first, second):
        a.extend(b)
    assert first[0].batch_size == 2 and first[0].trimmable_tokens == 0
    for got, want in zip(merged, first):
        assert all(mx.array_equal(x, y) for x, y in zip(got.cache, want.cache))
