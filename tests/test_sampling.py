"""Token sampling (mamba_jax.generation.sampling) against numpy transcriptions of mamba_ssm's rules: top-k, top-p by
the ascending-cumsum rule, min-p as threshold = min_p * max probability, temperature, and the repetition penalty by
gather/scatter over previous ids; plus the empirical distribution of the draws and the argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax.generation.sampling import SamplingConfig, apply_repetition_penalty, filter_logits, sample_next
from tests.tolerances import assert_close

VOCAB = 23


def softmax(x):
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def keep_top_k(logits, k):
    out = np.full_like(logits, -np.inf)
    for row, src in zip(out, logits, strict=True):
        top = np.argsort(-src)[:k]
        row[top] = src[top]
    return out


def keep_min_p(logits, min_p):
    probs = softmax(logits)
    return np.where(probs >= min_p * probs.max(axis=-1, keepdims=True), logits, -np.inf)


def keep_top_p(logits, top_p):
    """mamba_ssm's rule: sort ascending, drop the tokens whose cumulative probability is <= 1 - top_p."""
    out = logits.copy()
    for row in out:
        order = np.argsort(row, kind="stable")
        cumulative = np.cumsum(softmax(row[order].astype(np.float64)))
        row[order[cumulative <= 1 - top_p]] = -np.inf
    return out


def repetition_penalty_reference(logits, previous_ids, penalty):
    """mamba_ssm's gather / where / scatter over the previous ids (repeats included)."""
    out = logits.copy()
    for row, ids in zip(out, previous_ids, strict=True):
        score = row[ids]
        row[ids] = np.where(score < 0, score * penalty, score / penalty)
    return out


def random_logits(seed, batch=4, vocab=VOCAB):
    return np.random.default_rng(seed).normal(0.0, 2.0, (batch, vocab)).astype(np.float32)


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(top_k=5),
        SamplingConfig(top_k=0, top_p=0.7),
        SamplingConfig(top_k=0, min_p=0.1),
        SamplingConfig(top_k=0, temperature=0.6),
        SamplingConfig(top_k=7, temperature=1.7, top_p=0.8),
        SamplingConfig(top_k=0, min_p=0.05, temperature=0.5, top_p=0.9),
        SamplingConfig(top_k=VOCAB + 5, top_p=0.3),  # top_k beyond the vocabulary keeps everything
    ],
)
def test_filters_match_reference(config):
    logits = random_logits(0)
    expected = logits.copy()
    if 1 < config.top_k < VOCAB:
        expected = keep_top_k(expected, config.top_k)
    if config.min_p > 0:
        expected = keep_min_p(expected, config.min_p)
    expected = expected / config.temperature
    if config.top_p < 1:
        expected = keep_top_p(expected, config.top_p)
    ours = np.asarray(jax.jit(filter_logits, static_argnums=1)(jnp.asarray(logits), config))
    # Logits are a distribution up to a constant per row: compare both from their largest.
    ours, expected = (x - x.max(axis=-1, keepdims=True) for x in (ours, expected))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    kept = ~np.isinf(expected)
    assert kept.any(axis=-1).all()
    assert_close(ours[kept], expected[kept], jnp.float32)


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (0, 0.9), (50, 1.0)])
def test_a_tiny_temperature_samples_the_argmax(top_k, top_p):
    """logits / 1e-40 would overflow to +-inf: the first +inf, or NaN probabilities under top-p, gave other tokens."""
    logits = jnp.asarray(random_logits(1))
    config = SamplingConfig(temperature=1e-40, top_k=top_k, top_p=top_p)
    seen = jnp.zeros(logits.shape, bool)
    for seed in range(3):
        got = sample_next(logits, seen, jax.random.key(seed), config)
        np.testing.assert_array_equal(got, np.argmax(np.asarray(logits), axis=-1))


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    for top_p, kept in [(0.5, 1), (0.51, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)]:
        ours = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(top_k=0, top_p=top_p)))
        assert np.isfinite(ours).sum() == kept, top_p


def test_min_p_threshold_is_relative_to_the_max_probability():
    # probabilities 0.6, 0.25, 0.1, 0.05: with min_p 0.2 the threshold is 0.12, so 0.6 and 0.25 stay.
    logits = np.log(np.array([[0.6, 0.25, 0.1, 0.05]], np.float32)) + 3.0
    ours = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(top_k=0, min_p=0.2)))
    np.testing.assert_array_equal(np.isfinite(ours), [[True, True, False, False]])


def test_repetition_penalty_matches_reference():
    logits = random_logits(1)
    previous = np.random.default_rng(2).integers(0, VOCAB, (4, 9))  # repeats included
    seen = np.zeros((4, VOCAB), bool)
    np.put_along_axis(seen, previous, True, axis=1)
    ours = apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.7)
    assert_close(ours, repetition_penalty_reference(logits, previous, 1.7), jnp.float32)
    np.testing.assert_array_equal(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.0), logits)


def test_greedy_takes_the_argmax_after_the_penalty():
    logits = random_logits(3)
    seen = np.zeros((4, VOCAB), bool)
    seen[np.arange(4), logits.argmax(-1)] = True
    key = jax.random.key(0)
    plain = sample_next(jnp.asarray(logits), None, key, SamplingConfig())
    np.testing.assert_array_equal(plain, logits.argmax(-1))
    penalized = sample_next(jnp.asarray(logits), jnp.asarray(seen), key, SamplingConfig(repetition_penalty=100.0))
    expected = repetition_penalty_reference(logits, logits.argmax(-1)[:, None], 100.0).argmax(-1)
    np.testing.assert_array_equal(penalized, expected)
    # temperature 0 is greedy whatever top_k says
    np.testing.assert_array_equal(sample_next(jnp.asarray(logits), None, key, SamplingConfig(0.0, top_k=0)), plain)


def test_draws_follow_the_filtered_distribution():
    config = SamplingConfig(top_k=6, temperature=0.8, top_p=0.9)
    logits = random_logits(4, batch=1)[0]
    draws = 20000
    keys = jax.random.split(jax.random.key(5), draws)
    batch = jnp.broadcast_to(jnp.asarray(logits), (draws, VOCAB))
    # One row per draw, each with its own key.
    tokens = jax.jit(jax.vmap(lambda k, row: sample_next(row[None], None, k, config)[0]))(keys, batch)
    frequencies = np.bincount(np.asarray(tokens), minlength=VOCAB) / draws
    expected = softmax(keep_top_p(keep_top_k(logits[None], 6) / 0.8, 0.9))[0]
    assert np.all(frequencies[expected == 0] == 0)
    # binomial standard error at 20000 draws is <= 0.0036; 5 sigma
    np.testing.assert_allclose(frequencies, expected, atol=0.018)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(top_k=-1), "top_k must be an int >= 0"),
        (dict(top_k=2.0), "top_k must be an int"),
        (dict(temperature=-0.5), "temperature must be a number >= 0"),
        (dict(temperature=float("nan")), "temperature must be"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
        (dict(min_p=-0.1), r"min_p must be a number in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a number > 0"),
        (dict(repetition_penalty=-2.0), "repetition_penalty must be a number > 0"),
        (dict(top_k=True), "top_k must be an int"),
        (dict(top_k=np.float32(2)), "top_k must be an int"),
        (dict(top_p=np.array([0.5])), r"top_p must be a number in \(0, 1\]"),
        (dict(temperature=np.float32("nan")), "temperature must be"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_numpy_and_jax_scalars_are_python_numbers_in_the_config():
    """A setting computed with NumPy or JAX (np.float32, a 0-d array) means the same as the Python number: the
    config holds Python numbers, so it hashes and compares as the plain one (no second compilation)."""
    config = SamplingConfig(np.float32(0.5), np.int64(5), jnp.asarray(0.75), np.array(0.125), jnp.int32(2))
    plain = SamplingConfig(0.5, 5, 0.75, 0.125, 2.0)
    assert config == plain and hash(config) == hash(plain)
    assert type(config.top_k) is int and all(type(v) is float for v in (config.top_p, config.min_p, config.temperature))
