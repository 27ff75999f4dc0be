"""Choosing the next token from logits: repetition penalty, greedy, top-k, min-p, temperature, top-p.

The order and meaning follow mamba_ssm's ``utils/generation.py`` (``sample``, ``modify_logit_for_repetition_penalty``):

1. repetition penalty, over every id already in the row (prompt and generated): a negative logit is multiplied by
   the penalty, a positive one divided by it;
2. ``top_k == 1`` (or ``temperature == 0``): greedy, the arg-max (the remaining steps do not apply);
3. ``top_k > 1``: keep the k largest logits (ties at the k-th value are kept too); ``top_k == 0``: keep all;
4. ``min_p > 0``: drop tokens whose probability is below ``min_p`` times the largest probability;
5. divide by ``temperature``;
6. ``top_p < 1``: keep the smallest set of most probable tokens whose probability reaches ``top_p``;
7. draw from the softmax of what is left.

min-p is a deliberate fix: mamba_ssm compares the logits with ``min_p`` itself (and takes the logit of token 0 as
"max_prob" without using it), so its filter is not the published min-p rule. We use threshold = min_p * max
probability, i.e. keep logit >= max logit + log(min_p). mamba_ssm applies min-p only when ``top_k == 0`` and then
skips top-p; here every filter that is switched on applies, in the order above, which agrees with mamba_ssm on every
combination it supports.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens (see the module docstring). Hashable: a static argument of the compiled loop."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        # Python, NumPy and 0-d JAX numbers are all accepted and stored as Python ones (the config is hashed).
        top_k = python_scalar(self.top_k, integer=True)
        if top_k is None or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0: no top-k filter, 1: greedy), found {self.top_k!r}")
        object.__setattr__(self, "top_k", top_k)
        _check_number(self, "temperature", "a number >= 0 (0 means greedy)", lambda t: t >= 0)
        _check_number(self, "top_p", "a number in (0, 1]", lambda p: 0 < p <= 1)
        _check_number(self, "min_p", "a number in [0, 1]", lambda p: 0 <= p <= 1)
        _check_number(self, "repetition_penalty", "a number > 0", lambda r: r > 0)

    @property
    def greedy(self) -> bool:
        return self.top_k == 1 or self.temperature == 0


def python_scalar(value, *, integer: bool) -> int | float | None:
    """``value`` as a Python int (``integer``) or float when it is a real number of that kind (Python, NumPy, or a
    0-d NumPy / JAX array; an int counts as a float too), else None. bool is not a number here."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, np.ndarray | jax.Array) and value.shape == ():
        kinds = [jnp.integer] if integer else [jnp.integer, jnp.floating]
        is_number = any(jnp.issubdtype(value.dtype, kind) for kind in kinds)
    else:
        is_number = isinstance(value, int | np.integer) or (not integer and isinstance(value, float | np.floating))
    if not is_number:
        return None
    return int(value) if integer else float(value)


def _check_number(config: SamplingConfig, name: str, expected: str, ok) -> None:
    """Store config.name as a Python float, or raise if it is not a finite number for which ``ok`` holds."""
    value = getattr(config, name)
    number = python_scalar(value, integer=False)
    if number is None or not math.isfinite(number) or not ok(number):
        raise ValueError(f"{name} must be {expected}, found {value!r}")
    object.__setattr__(config, name, number)


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """logits (b, v) float32, seen bool (b, v) -> logits with the penalty applied to the seen ids."""
    if penalty == 1.0:
        return logits
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalized, logits)


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Steps 3-6 of the module docstring: logits (b, v) float32 -> (b, v) with dropped tokens at -inf, divided by
    the temperature. Every row keeps at least its most probable token."""
    neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
    vocab = logits.shape[-1]
    if 1 < config.top_k < vocab:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if config.min_p > 0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
        threshold = jnp.max(logits, axis=-1, keepdims=True) + math.log(config.min_p)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    if config.temperature != 1.0:
        # From the largest logit down, that one at 0: a tiny temperature (even one that float32 flushes to 0) then
        # sends the rest to -inf, where logits / temperature would overflow to +-inf (and top-p's softmax to NaN).
        top = jnp.max(logits, axis=-1, keepdims=True)
        logits = jnp.where(logits == top, 0.0, (logits - top) / config.temperature)
    if config.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)  # most probable first; a stable sort keeps ties in id order
        sorted_probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep a token while the tokens more probable than it have not yet reached top_p (the first always stays).
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < config.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, neg_inf)
    return logits


def sample_next(logits: jax.Array, seen: jax.Array, key: jax.Array, config: SamplingConfig) -> jax.Array:
    """The next token of every row: logits (b, v) float32, seen bool (b, v), key -> int32 (b,)."""
    logits = apply_repetition_penalty(logits.astype(jnp.float32), seen, config.repetition_penalty)
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, config), axis=-1).astype(jnp.int32)
