"""``generate``: prefill the prompts, then decode every new token inside one compiled loop (a ``lax.while_loop``
that stops at EOS, or without an EOS a ``lax.fori_loop`` of a fixed count).

The model is any pytree (flax NNX modules are) with the decode protocol of ``MambaLMHeadModel``:

- ``config.vocab_size``: the real vocabulary (logits beyond it are vocab padding and never sampled);
- ``init_cache(batch, max_len, state_dtype=...)`` -> an empty cache for ``max_len`` positions per row, its SSM
  states in ``state_dtype``;
- ``prefill(input_ids (b, l), cache, lengths (b,) or None)`` -> (logits (b, v) float32 at each row's last prompt
  token, cache): the whole prompt at once, with the parallel scan; lengths None when every prompt fills all l
  positions;
- ``step(tokens (b,), cache)`` -> (logits (b, v) float32, cache): one token per row, O(1) in the sequence length;
- optionally ``greedy_step(tokens (b,), cache)`` -> (the arg-max of step's logits over the real vocabulary, int32
  (b,), cache), which greedy decoding without scores or a repetition penalty calls instead of ``step``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.generation.sampling import SamplingConfig, python_scalar, sample_next

STATE_DTYPES = tuple(map(jnp.dtype, (jnp.float32, jnp.bfloat16, jnp.float16)))
# XLA options of the program with an EOS: its while loop (and conditionals) inside CUDA graphs too (XLA's default
# command-buffer types, plus CONDITIONAL and WHILE), so that the loop's condition is evaluated on the device instead
# of being copied to the host after every token. Generation on an H100 with an EOS that no row emits: Mamba-1 130m
# batch 1 53.6 against 54.6-55.4 ms, 1.4b 213.6 against 216.2-216.8, 130m batch 64 90.6 against 91.9-92.6: as fast
# as the program without an EOS, whose fixed-count loop has no such check (and which these options made 0.3-1.5%
# slower; benchmarks/RESULTS.md). Options of the GPU compiler, ignored elsewhere; an XLA that does not know them
# compiles the loop without them (``_while_graphs``).
WHILE_GRAPHS = {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,CONDITIONAL,WHILE",
    "xla_gpu_graph_min_graph_size": 1,
}
STATIC = ("max_new_tokens", "vocab_size", "sampling", "return_scores", "callback", "state_dtype", "stops")


def generate(
    model: nnx.Module,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    prompt_lengths=None,
    rng: jax.Array | int | None = None,
    return_scores: bool = False,
    callback: Callable[[np.ndarray], None] | None = None,
    state_dtype=jnp.float32,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
      model: a ``MambaLMHeadModel`` (or any model with the decode protocol in the module docstring).
      input_ids: int (b, l) prompts, right-padded when their lengths differ.
      max_new_tokens: how many tokens to generate per row, >= 1.
      temperature, top_k, top_p, min_p, repetition_penalty: see ``mamba_jax.generation.sampling``. The default
        ``top_k=1`` is greedy decoding.
      eos_token_id: a row is finished once it has produced this id; decoding stops when every row is finished.
      pad_token_id: fills a finished row's later positions (default: ``eos_token_id``). Without
        ``prompt_lengths``, also marks the prompts' right padding: a row's length is l minus its trailing run of
        ``pad_token_id``.
      prompt_lengths: int (b,) number of prompt tokens of each row, in [1, l]. Default: see ``pad_token_id``, else l.
      rng: a ``jax.random.key`` (or an int seed) for sampling; default ``jax.random.key(0)``. Unused when greedy.
      return_scores: also return the logits each token was chosen from.
      callback: called on the host with the int32 (b,) tokens of each position as soon as it is produced (for
        streaming), from inside the compiled loop. It is a static argument: pass the same function object each call,
        or every call compiles anew.
      state_dtype: the dtype the SSM states are kept in between tokens: float32 (default), or bfloat16 / float16 as
        mamba_ssm keeps them in a 16-bit model (half the bytes each step reads and writes, which matters at large
        batch; the update runs in float32 and its result is rounded at every token).

    Returns:
      tokens int32 (b, t): the new tokens only, t <= max_new_tokens (less when every row finished early); and with
      ``return_scores`` also scores float32 (b, t, config.vocab_size): the raw logits at each position (before the
      repetition penalty and the filters), as mamba_ssm's ``scores``.

    Rows are independent: in a batch of ragged prompts each row gets the logits it would get alone, up to float
    rounding (other shapes sum in other orders), so greedy tokens agree unless two logits tie within that rounding.
    Sampled draws depend on the row's place in the batch. The whole decode runs on the device in one compiled
    function, compiled once per shape, sampling setting, ``callback`` and whether an ``eos_token_id`` is given (the
    decode loop's form depends on it: ``_decode``); token ids (the EOS id's value included) and ``rng`` are traced. Each
    call walks the whole model (host time, ~1-5 ms at the presets' sizes); ``Generator(model)`` walks it once for
    repeated calls.
    """
    leaves, treedef = jax.tree.flatten(_check_protocol(model))
    sampling = SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty)
    args, static = _arguments(
        leaves,
        model.config.vocab_size,
        input_ids,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        prompt_lengths=prompt_lengths,
        rng=rng,
        return_scores=return_scores,
        callback=callback,
        state_dtype=state_dtype,
    )
    return _run(_program(treedef), args, static)


class Generator:
    """``generate`` bound to one model, for repeated calls (serving, samples during training).

    ``Generator(model)(input_ids, **kwargs)`` takes and returns what ``generate(model, input_ids, **kwargs)`` does.
    Building one walks the model once: its modules, their static attributes and its Variables (host time that
    every ``generate`` call pays: ~1-5 ms at the presets' sizes, benchmarks/RESULTS.md). A call then reads only the
    Variables' current values, so values updated in place (``nnx.update``, an optimizer step, ``variable[...] = x``)
    are used, but a change of structure after that (a submodule or Variable replaced, a static attribute such as
    ``step_implementation`` set) is not seen: build a new Generator. Generators of models with the same structure
    share their compiled programs.
    """

    def __init__(self, model: nnx.Module):
        self.model = _check_protocol(model)
        leaves, treedef = jax.tree.flatten(model)
        self._program = _program(treedef)
        # What holds each leaf: a Variable (read again at each call) or the leaf itself (an array set on a module
        # directly, or any leaf of a model that is not an NNX module). A Variable holding more than one leaf makes
        # every call flatten the whole model instead.
        holders = jax.tree.leaves(model, is_leaf=lambda x: isinstance(x, nnx.Variable))
        simple = len(holders) == len(leaves) and all(
            h.get_raw_value() is leaf if isinstance(h, nnx.Variable) else h is leaf
            for h, leaf in zip(holders, leaves, strict=True)
        )
        self._holders = holders if simple else None

    def params(self) -> list[jax.Array]:
        """The model's current leaves, in the order of its pytree (the compiled program's first argument)."""
        if self._holders is None:
            return jax.tree.leaves(self.model)
        return [h.get_raw_value() if isinstance(h, nnx.Variable) else h for h in self._holders]

    def __call__(
        self,
        input_ids,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int = 1,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        prompt_lengths=None,
        rng: jax.Array | int | None = None,
        return_scores: bool = False,
        callback: Callable[[np.ndarray], None] | None = None,
        state_dtype=jnp.float32,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        args, static = _arguments(
            self.params(),
            self.model.config.vocab_size,
            input_ids,
            max_new_tokens=max_new_tokens,
            sampling=SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty),
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            prompt_lengths=prompt_lengths,
            rng=rng,
            return_scores=return_scores,
            callback=callback,
            state_dtype=state_dtype,
        )
        return _run(self._program, args, static)


class GenerateArgs(NamedTuple):
    """The traced arguments of the compiled generate program (see ``lower_generate``). The small ones stay numpy
    arrays: jit moves them to the device with the call, cheaper than a ``jnp.asarray`` each."""

    params: list[jax.Array]  # the model's leaves, ``jax.tree.leaves(model)``
    ids: np.ndarray  # int32 (b, l), padding set to 0
    lengths: np.ndarray | None  # int32 (b,), or None where every prompt fills all l positions
    key: jax.Array
    eos: np.ndarray  # int32 scalar, -1 when there is no EOS token
    fill: np.ndarray  # int32 scalar, the id written after a row finished


def lower_generate(
    model: nnx.Module,
    input_ids,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    prompt_lengths=None,
    rng: jax.Array | int | None = None,
    return_scores: bool = False,
    state_dtype=jnp.float32,
) -> tuple[jax.stages.Lowered, GenerateArgs]:
    """``generate``'s program, lowered ahead of time for benchmarks and compile-time studies.

    Takes ``generate``'s arguments (``model`` may be abstract, from ``nnx.eval_shape``: lowering reads only shapes)
    and returns the lowered program and its arguments. ``lowered.compile(compiler_options)(*args)`` runs it and
    returns (tokens int32 (b, max_new_tokens), scores float32 (b, max_new_tokens, vocab_size) or None, the number of
    positions produced): tokens past that number hold the fill id. Swap fields with
    ``args._replace(params=jax.tree.leaves(model))`` (a concrete model of the same structure) or, in a program
    lowered with an ``eos_token_id``, ``eos=np.int32(id)``: they are traced, so no recompilation. (Without an
    ``eos_token_id`` the program has no early stop, so a swapped ``eos`` only pads the rows that emit it.)
    """
    leaves, treedef = jax.tree.flatten(_check_protocol(model))
    args, static = _arguments(
        leaves,
        model.config.vocab_size,
        input_ids,
        max_new_tokens=max_new_tokens,
        sampling=SamplingConfig(temperature, top_k, top_p, min_p, repetition_penalty),
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        prompt_lengths=prompt_lengths,
        rng=rng,
        return_scores=return_scores,
        callback=None,
        state_dtype=state_dtype,
    )
    return _program(treedef).lower(*args, **static), args


def _check_protocol(model):
    for name in ("init_cache", "prefill", "step", "config"):
        if not hasattr(model, name):
            raise ValueError(f"generate: model must have init_cache, prefill, step and config; {name} is missing")
    return model


def _arguments(
    params,
    vocab_size: int,
    input_ids,
    *,
    max_new_tokens,
    sampling,
    eos_token_id,
    pad_token_id,
    prompt_lengths,
    rng,
    return_scores,
    callback,
    state_dtype,
) -> tuple[GenerateArgs, dict]:
    """Check ``generate``'s arguments -> (traced arguments, static arguments) of the compiled program."""
    count = python_scalar(max_new_tokens, integer=True)
    if count is None or count < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, found {max_new_tokens!r}")
    max_new_tokens = count
    eos_token_id = _check_token_id("eos_token_id", eos_token_id, vocab_size)
    pad_token_id = _check_token_id("pad_token_id", pad_token_id, vocab_size)
    ids, lengths = _check_prompts(input_ids, prompt_lengths, pad_token_id, vocab_size)
    key = _check_rng(rng)
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable or None, found {type(callback).__name__}")
    try:
        state = jnp.dtype(state_dtype)
    except TypeError:
        state = None
    if state not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be float32, bfloat16 or float16, found {state_dtype!r}")

    # Token ids are traced, not static, so changing them does not recompile; -1 never matches a token. Whether there
    # is an EOS at all is static ("stops"): the decode loop's form depends on it (``_decode``).
    eos = -1 if eos_token_id is None else eos_token_id
    fill = pad_token_id if pad_token_id is not None else max(eos, 0)
    args = GenerateArgs(params, ids, lengths, key, np.int32(eos), np.int32(fill))
    static = {
        "max_new_tokens": int(max_new_tokens),
        "vocab_size": vocab_size,
        "sampling": sampling,
        "return_scores": bool(return_scores),
        "callback": callback,
        "state_dtype": state,
        "stops": eos_token_id is not None,
    }
    return args, static


def _run(program, args: GenerateArgs, static: dict):
    """Run the compiled program; trim the positions after an early stop."""
    tokens, scores, produced = program(*args, **static)
    produced = int(produced)
    if produced < static["max_new_tokens"]:
        tokens = tokens[:, :produced]
        scores = None if scores is None else scores[:, :produced]
    return (tokens, scores) if static["return_scores"] else tokens


class _Program(NamedTuple):
    """The compiled generate program for models of this pytree structure: params (the leaves), ids (b, l), lengths
    (b,), key, eos and fill int32 scalars, then the STATIC arguments. Taking the leaves, not the model, keeps the
    model's Python-level flattening (slow for an NNX module: ~5 us a leaf) out of every call. Called, or lowered,
    it takes the jitted function of its form of the decode loop (``_jitted``)."""

    treedef: object

    def __call__(self, *args, **static):
        return _jitted(self.treedef, static["stops"])(*args, **static)

    def lower(self, *args, **static) -> jax.stages.Lowered:
        return _jitted(self.treedef, static["stops"]).lower(*args, **static)


@functools.lru_cache(maxsize=32)
def _program(treedef) -> _Program:
    return _Program(treedef)


@functools.lru_cache(maxsize=64)
def _jitted(treedef, stops: bool) -> Callable:
    """``_Program``'s jitted function; with an EOS (``stops``) compiled with WHILE_GRAPHS where XLA knows them."""

    def run(params, ids, lengths, key, eos, fill, **static):
        return _decode(jax.tree.unflatten(treedef, params), ids, lengths, key, eos, fill, **static)

    return jax.jit(run, static_argnames=tuple(STATIC), compiler_options=_while_graphs() if stops else None)


@functools.lru_cache(maxsize=1)
def _while_graphs() -> dict | None:
    """WHILE_GRAPHS where this jax's XLA takes them (a tiny program compiled with them, once), else None."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=WHILE_GRAPHS).lower(np.float32(0)).compile()
    except jax.errors.JaxRuntimeError as e:  # "No such compile option": an XLA that dropped or renamed them
        if "compile option" not in str(e):
            raise
        return None
    return WHILE_GRAPHS


def _decode(
    model,
    ids,
    lengths,
    key,
    eos,
    fill,
    *,
    max_new_tokens,
    vocab_size,
    sampling,
    return_scores,
    callback,
    state_dtype,
    stops,
):
    """The prefill + decode loop (traced): returns (tokens (b, T), scores (b, T, V) or None, how many positions were
    produced). With an EOS (``stops``) the loop is a while loop, which stops once every row has finished; without
    one its length is known, and it is a loop of a fixed count. By default XLA checks a while loop's condition on
    the host after every token (a copy from the device and a wait): ~15 us a token on an H100, which the fixed
    count saves (3% of Mamba-1 130m's batch-1 generation, benchmarks/RESULTS.md), and WHILE_GRAPHS for the while
    loop."""
    batch, seqlen = ids.shape
    rows = jnp.arange(batch)

    cache = model.init_cache(batch, seqlen + max_new_tokens, state_dtype=state_dtype)
    logits, cache = model.prefill(ids, cache, lengths)
    seen = None  # (b, V) bool: ids already in each row, for the repetition penalty
    if sampling.repetition_penalty != 1.0:
        in_prompt = jnp.ones(ids.shape, bool) if lengths is None else jnp.arange(seqlen)[None, :] < lengths[:, None]
        seen = jnp.zeros((batch, vocab_size), jnp.int32).at[rows[:, None], ids].add(in_prompt.astype(jnp.int32)) > 0

    def choose(position, logits, key, tokens, scores, done, seen):
        """Pick the token at ``position`` from ``logits`` (b, v) and record it."""
        logits = logits[:, :vocab_size]
        subkey = key
        if not sampling.greedy:  # greedy decoding needs no randomness: save the step its key split
            key, subkey = jax.random.split(key)
        token = sample_next(logits, seen, subkey, sampling)
        return record(position, token, logits, key, tokens, scores, done, seen)

    def record(position, token, logits, key, tokens, scores, done, seen):
        """Record ``token`` (b,) at ``position``, chosen from ``logits`` (b, v) (None where no scores are kept)."""
        if stops:  # without an EOS no row finishes early: nothing to fill (two kernels a token saved)
            token = jnp.where(done, fill, token)
            done = done | (token == eos)
        tokens = tokens.at[:, position].set(token)
        if return_scores:
            scores = scores.at[:, position].set(logits)
        if seen is not None:
            seen = seen.at[rows, token].set(True)
        if callback is not None:
            jax.debug.callback(callback, token, ordered=True)
        return token, key, tokens, scores, done, seen

    tokens = jnp.full((batch, max_new_tokens), fill, jnp.int32)
    scores = jnp.zeros((batch, max_new_tokens, vocab_size), jnp.float32) if return_scores else None
    done = jnp.zeros((batch,), bool)
    carry = (jnp.int32(1), *choose(0, logits, key, tokens, scores, done, seen), cache)

    def not_finished(carry):
        position, _, _, _, _, done, _, _ = carry
        return (position < max_new_tokens) & ~jnp.all(done)

    # Greedy decoding that needs nothing but the arg-max takes it from the model without the logits where the model
    # can (``MambaLMHeadModel.greedy_step``: one pass over the LM head instead of writing and reading the logits).
    argmax_only = sampling.greedy and sampling.repetition_penalty == 1.0 and not return_scores
    greedy_step = getattr(model, "greedy_step", None) if argmax_only else None

    def decode_one(carry):
        position, token, key, tokens, scores, done, seen, cache = carry
        if greedy_step is not None:
            token, cache = greedy_step(token, cache)
            return (position + 1, *record(position, token, None, key, tokens, scores, done, seen), cache)
        logits, cache = model.step(token, cache)
        return (position + 1, *choose(position, logits, key, tokens, scores, done, seen), cache)

    if stops:
        position, _, _, tokens, scores, _, _, _ = jax.lax.while_loop(not_finished, decode_one, carry)
    else:
        position, _, _, tokens, scores, _, _, _ = jax.lax.fori_loop(
            1, max_new_tokens, lambda _, c: decode_one(c), carry
        )
    return tokens, scores, position


def _check_token_id(name: str, value, vocab_size: int) -> int | None:
    if value is None:
        return None
    token = python_scalar(value, integer=True)
    if token is None or not 0 <= token < vocab_size:
        raise ValueError(f"{name} must be None or an int in [0, vocab_size={vocab_size}), found {value!r}")
    return token


def _check_prompts(input_ids, prompt_lengths, pad_token_id, vocab_size) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (ids int32 (b, l) with padding set to 0, lengths int32 (b,) or None where every prompt fills all l
    positions), or a ValueError. None compiles a program of its own, whose prefill masks nothing per row."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array of shape (batch, seqlen), found {ids.shape} {ids.dtype}")
    batch, seqlen = ids.shape
    if batch == 0 or seqlen == 0:
        raise ValueError(f"input_ids must hold at least one prompt of at least one token, found shape {ids.shape}")
    if prompt_lengths is not None:
        lengths = np.asarray(prompt_lengths)
        if lengths.shape != (batch,) or not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(
                f"prompt_lengths must be an integer array of shape (batch,) = ({batch},), "
                f"found {lengths.shape} {lengths.dtype}"
            )
    elif pad_token_id is not None:
        # Length = position after the last non-pad token.
        not_pad = ids != pad_token_id
        lengths = np.where(not_pad.any(axis=1), seqlen - np.argmax(not_pad[:, ::-1], axis=1), 0)
    else:
        lengths = np.full((batch,), seqlen)
    if np.any(lengths < 1) or np.any(lengths > seqlen):
        raise ValueError(f"every prompt needs between 1 and seqlen={seqlen} tokens, found lengths {lengths.tolist()}")
    valid = np.arange(seqlen)[None, :] < lengths[:, None]
    bad = valid & ((ids < 0) | (ids >= vocab_size))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"input_ids must be in [0, vocab_size={vocab_size}), found {ids[row, col]} at row {row}, position {col}"
        )
    if np.all(lengths == seqlen):
        return ids.astype(np.int32), None
    # The padding is never read by a valid position, but it still flows through the layers: keep it a real id.
    return np.where(valid, ids, 0).astype(np.int32), lengths.astype(np.int32)


@functools.lru_cache(maxsize=64)
def _seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)``, made once per seed (keys are immutable; making one is a device computation)."""
    return jax.random.key(seed)


def _check_rng(rng) -> jax.Array:
    if rng is None:
        return _seed_key(0)
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        if not -(2**63) <= rng < 2**63:  # what jax.random.key takes
            raise ValueError(f"rng: an int seed must be in [-2**63, 2**63), found {rng}")
        return _seed_key(int(rng))
    if isinstance(rng, jax.Array) and (
        (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.shape == ())
        or (rng.dtype == jnp.uint32 and rng.shape == (2,))
    ):
        return rng
    raise ValueError(f"rng must be None, an int seed or one jax.random.key, found {rng!r}")
