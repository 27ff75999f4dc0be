"""Generation: the cached decode path (prefill + compiled step loop) against the full-sequence forward, ragged batches
against single prompts, greedy output against transformers' ``generate()`` on the same random weights, EOS handling,
streaming, sampling and the argument checks.

Tiny float32 models; each ``generate`` configuration compiles once, so the tests reuse shapes where they can.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mamba_jax
from mamba_jax import MHA, MambaConfig, MambaLMHeadModel, generate
from mamba_jax.generation import loop, lower_generate
from tests.tolerances import assert_close

VOCAB = 61  # padded to 64: logits of the padding rows are never sampled

CONFIGS = {
    "mamba1": MambaConfig(d_model=32, n_layer=1, vocab_size=VOCAB, ssm_cfg={"d_state": 8, "d_conv": 3}),
    # dt_limit active, ngroups 2, chunks shorter than the prompts (chunk boundaries inside the prefill).
    "mamba2": MambaConfig(
        d_model=32,
        n_layer=1,
        vocab_size=VOCAB,
        ssm_cfg={
            "layer": "Mamba2",
            "d_state": 8,
            "headdim": 16,
            "ngroups": 2,
            "chunk_size": 4,
            "dt_limit": (0.01, 0.3),
        },
    ),
    # Mamba-2 without the gated norm (the scan applies silu(z)), an MHA layer with GQA, rotary, a conv over qkv and
    # its gated MLP, GatedMLP blocks, LayerNorm, the residual in the activation dtype, untied head.
    "hybrid": MambaConfig(
        d_model=32,
        n_layer=2,
        d_intermediate=48,
        vocab_size=VOCAB,
        ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4, "rmsnorm": False},
        attn_layer_idx=[1],
        attn_cfg={
            "num_heads": 4,
            "num_heads_kv": 2,
            "head_dim": 8,
            "causal": True,
            "rotary_emb_dim": 4,
            "d_conv": 3,
            "mlp_dim": 16,
        },
        rms_norm=False,
        residual_in_fp32=False,
        tie_embeddings=False,
    ),
}

PROMPT_LENGTHS = [7, 3, 1]
NEW_TOKENS = 6


def random_model(name: str, seed: int = 0) -> MambaLMHeadModel:
    """A model with every parameter random (so each one changes the logits), drawn with numpy into an abstract
    model: no initialisation to compile. Scales keep the dynamics sane: decay rates A in [-4, -1], step sizes dt in
    [0.01, 0.1], unit-scale embeddings so that greedy choices are not near-ties."""
    model = nnx.eval_shape(lambda: MambaLMHeadModel(CONFIGS[name], rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param):
            continue
        shape, name = variable.get_value().shape, ".".join(map(str, path))
        normal = rng.standard_normal(shape)
        if name.endswith("A_log"):
            value = np.log(rng.uniform(1.0, 4.0, shape))
        elif name.endswith(("dt_bias", "dt_proj.bias")):
            value = np.log(np.expm1(rng.uniform(0.01, 0.1, shape)))  # softplus^-1
        elif name.endswith((".D", "weight")):  # skip weights and norm weights around 1
            value = 1.0 + 0.2 * normal
        elif name.endswith("kernel"):
            value = normal / np.sqrt(shape[0])
        else:  # biases; the embedding
            value = (1.0 if name.endswith("embedding") else 0.2) * normal
        variable.set_value(jnp.asarray(value, variable.get_value().dtype))
    return model


def right_padded_prompts(lengths, seed=0, pad=VOCAB - 1):
    """int32 (b, max length) random prompts, right-padded with ``pad``."""
    ids = np.random.default_rng(seed).integers(0, VOCAB - 1, (len(lengths), max(lengths))).astype(np.int32)
    ids[np.arange(max(lengths))[None, :] >= np.asarray(lengths)[:, None]] = pad
    return ids


def full_forward_logits(model, prompts, lengths, tokens):
    """Logits (b, t, VOCAB) of one forward pass over each prompt followed by its generated tokens, at the positions
    that predict those tokens (the rows right-padded to a common length: the model is causal)."""
    batch, steps = tokens.shape
    total = max(lengths) + steps
    sequences = np.zeros((batch, total), np.int32)
    for row, length in enumerate(lengths):
        sequences[row, : length + steps] = np.concatenate([prompts[row, :length], tokens[row]])
    logits = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(sequences)))[..., :VOCAB]
    return np.stack([logits[row, length - 1 : length - 1 + steps] for row, length in enumerate(lengths)])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_matches_full_forward_and_single_prompts(name):
    """Scores of the cached path (ragged prefill + steps) equal the full forward's logits (teacher forcing with the
    generated tokens), greedy picks their arg-max, and a row decoded alone gives the same tokens."""
    model = random_model(name)
    prompts = right_padded_prompts(PROMPT_LENGTHS)
    tokens, scores = generate(
        model, prompts, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS, return_scores=True
    )
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert tokens.shape == (3, NEW_TOKENS) and tokens.dtype == np.int32
    assert scores.shape == (3, NEW_TOKENS, VOCAB) and scores.dtype == np.float32
    assert_close(scores, full_forward_logits(model, prompts, PROMPT_LENGTHS, tokens), jnp.float32)
    np.testing.assert_array_equal(tokens, scores.argmax(-1))
    # Without scores greedy decoding takes the arg-max from greedy_step (no logits): the same tokens.
    without_scores = generate(model, prompts, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS)
    np.testing.assert_array_equal(without_scores, tokens)

    if name == "hybrid":  # every kind of layer (compiling a batch of one costs time: once is enough)
        alone = generate(model, prompts[2:, :1], max_new_tokens=NEW_TOKENS)
        np.testing.assert_array_equal(alone, tokens[2:])


@pytest.mark.parametrize("name", ["mamba1", "hybrid"])  # a tied head and an untied one
def test_greedy_step_is_the_arg_max_of_step(name, monkeypatch):
    """greedy_step returns the arg-max of step's logits over the real vocabulary (not the padding) and the same
    cache; generate calls it for greedy decoding without scores or a repetition penalty, and only then."""
    model = random_model(name, seed=6)
    cache = model.init_cache(3, 4)
    _, cache = model.prefill(jnp.asarray([[1, 2], [3, 4], [5, 6]]), cache)
    tokens = jnp.asarray([7, 8, 9])
    # Row r's largest logit put in padding column VOCAB + r (the head's row or column along its hidden state), so
    # that reading the padding would be caught.
    hidden = model.backbone.step(tokens, cache)[0]
    along = 1e3 * hidden / jnp.linalg.norm(hidden, axis=1, keepdims=True)  # (3, d)
    if model.config.tie_embeddings:
        table = model.backbone.embedding.embedding
        table[...] = table[...].at[VOCAB : VOCAB + 3].set(along)
    else:
        model.lm_head.kernel[...] = model.lm_head.kernel[...].at[:, VOCAB : VOCAB + 3].set(along.T)
    logits, want_cache = model.step(tokens, cache)
    np.testing.assert_array_equal(np.asarray(logits).argmax(-1), VOCAB + np.arange(3))
    got, got_cache = model.greedy_step(tokens, cache)
    np.testing.assert_array_equal(got, np.asarray(logits)[:, :VOCAB].argmax(-1))
    for a, b in zip(jax.tree.leaves(got_cache), jax.tree.leaves(want_cache), strict=True):
        np.testing.assert_array_equal(a, b)

    calls = []
    original = type(model).greedy_step
    monkeypatch.setattr(type(model), "greedy_step", lambda self, *a: calls.append(1) or original(self, *a))
    prompts = np.asarray([[1, 2, 3]])
    generate(model, prompts, max_new_tokens=3, return_scores=True)
    generate(model, prompts, max_new_tokens=3, repetition_penalty=1.2)
    assert not calls
    generate(model, prompts, max_new_tokens=3)
    assert calls


def test_chunked_prefill_and_steps_match_full_forward():
    """Prefill in two ragged chunks (the second continues from a non-empty cache: conv windows, SSM states and
    key/value positions), then single steps, against the forward pass."""
    model = random_model("hybrid", seed=3)
    ids = np.random.default_rng(1).integers(0, VOCAB, (2, 9)).astype(np.int32)
    expected = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, jnp.asarray(ids)))

    prefill = nnx.jit(lambda m, ids, cache, lengths: m.prefill(ids, cache, lengths))
    step = nnx.jit(lambda m, tokens, cache: m.step(tokens, cache))
    cache = model.init_cache(2, 9)
    # Row 0 takes 4 then 3 tokens, row 1 takes 2 then 5; both continue token by token from position 7.
    first, second = np.array([4, 2]), np.array([3, 5])
    chunk1 = np.stack([ids[0, :5], ids[1, :5]])
    chunk2 = np.stack([ids[0, 4:9], ids[1, 2:7]])
    logits, cache = prefill(model, jnp.asarray(chunk1), cache, jnp.asarray(first))
    assert_close(logits, expected[[0, 1], first - 1], jnp.float32)
    logits, cache = prefill(model, jnp.asarray(chunk2), cache, jnp.asarray(second))
    assert_close(logits, expected[:, 6], jnp.float32)
    for position in (7, 8):
        logits, cache = step(model, jnp.asarray(ids[:, position]), cache)
        assert_close(logits, expected[:, position], jnp.float32)
    assert cache[1].length.tolist() == [9, 9]  # the attention layer's filled positions


def test_prefill_without_lengths_is_prefill_with_full_lengths():
    """lengths None (every row full: nothing masked or gathered per row, what generate passes for prompts of one
    length) gives the logits and caches of explicit full lengths, from an empty cache and from a filled one."""
    model = random_model("hybrid", seed=4)
    ids = jnp.asarray(np.random.default_rng(3).integers(0, VOCAB, (2, 7)).astype(np.int32))
    expected = np.asarray(nnx.jit(lambda m, ids: m(ids))(model, ids))
    prefill = nnx.jit(lambda m, ids, cache, lengths: m.prefill(ids, cache, lengths))
    results = {}
    for lengths in ("none", "full"):
        cache = model.init_cache(2, 7)
        outs = []
        for chunk in (ids[:, :1], ids[:, 1:]):  # 1 < d_conv - 1 = 2 inputs first: a window spanning both chunks
            full = jnp.full((2,), chunk.shape[1], jnp.int32)
            logits, cache = prefill(model, chunk, cache, None if lengths == "none" else full)
            outs.append(logits)
        results[lengths] = (outs, cache)
        assert_close(outs[0], expected[:, 0], jnp.float32)
        assert_close(outs[1], expected[:, 6], jnp.float32)
    for got, want in zip(jax.tree.leaves(results["none"]), jax.tree.leaves(results["full"]), strict=True):
        assert_close(got, want, jnp.float32)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_16_bit_state_stays_16_bit_and_near_the_float32_state(name):
    """init_cache(state_dtype=bfloat16): prefill and steps keep the SSM states in bfloat16 (the compiled loop needs a
    carry of one dtype), and teacher-forced logits stay within bfloat16's tolerance of the float32 state's; generate
    takes the same option."""
    model = random_model(name, seed=5)
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 9)).astype(np.int32)
    lengths = jnp.asarray([6, 4])
    prefill = nnx.jit(lambda m, ids, cache, lengths: m.prefill(ids, cache, lengths))
    step = nnx.jit(lambda m, tokens, cache: m.step(tokens, cache))
    logits = {}
    for state_dtype in (jnp.float32, jnp.bfloat16):
        out, cache = prefill(model, jnp.asarray(ids[:, :6]), model.init_cache(2, 9, state_dtype=state_dtype), lengths)
        steps = [out]
        for position in (6, 7, 8):
            out, cache = step(model, jnp.asarray(ids[:, position]), cache)
            steps.append(out)
        states = [layer.ssm_state for layer in cache if hasattr(layer, "ssm_state")]
        assert states and all(state.dtype == state_dtype for state in states)
        logits[state_dtype] = np.stack(steps)
    assert_close(logits[jnp.bfloat16], logits[jnp.float32], jnp.bfloat16)
    tokens = generate(model, ids[:, :6], max_new_tokens=NEW_TOKENS, state_dtype="bfloat16")
    assert tokens.shape == (2, NEW_TOKENS)


def test_non_causal_attention_prefill_sees_each_whole_prompt():
    """A non-causal MHA (mamba_ssm's default) decodes as mamba_ssm's inference does: the prefill attends over every
    valid position of the row's prompt, as the full forward over that prompt alone."""
    mha = MHA(16, 2, head_dim=8, causal=False, rotary_emb_dim=4, d_conv=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, 16))
    out, cache = mha.prefill(x, mha.init_cache(2, 8), jnp.array([5, 3]))
    assert_close(out[0], mha(x[:1])[0], jnp.float32)
    assert_close(out[1, :3], mha(x[1:, :3])[0], jnp.float32)
    assert cache.length.tolist() == [5, 3]


def test_eos_stops_rows_pads_them_and_streams():
    model = random_model("mamba1", seed=5)
    prompts = right_padded_prompts(PROMPT_LENGTHS, seed=2)
    free = np.asarray(generate(model, prompts, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS))
    eos, pad = int(free[0, 1]), VOCAB - 1
    expected = np.full_like(free, pad)
    finished = []
    for row in range(3):
        hits = np.flatnonzero(free[row] == eos)
        stop = hits[0] + 1 if hits.size else NEW_TOKENS
        expected[row, :stop] = free[row, :stop]
        finished.append(hits.size > 0)
    if all(finished):  # decoding stops once every row has finished
        expected = expected[:, : max(np.flatnonzero(row == eos)[0] + 1 for row in free)]

    streamed = []
    tokens = generate(
        model,
        prompts,
        max_new_tokens=NEW_TOKENS,
        prompt_lengths=PROMPT_LENGTHS,
        eos_token_id=eos,
        pad_token_id=pad,
        callback=streamed.append,
    )
    jax.effects_barrier()
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(np.stack(streamed, axis=1), expected)

    # Early stop: with every row finishing at once the output is one token long.
    first = free[:, 0]
    same = generate(model, np.repeat(prompts[:1], 3, 0), max_new_tokens=NEW_TOKENS, eos_token_id=int(first[0]))
    assert np.asarray(same).shape == (3, 1)


class Counter(nnx.Module):
    """The decode protocol without weights: each token is the one before plus 1 (mod VOCAB), the first the last
    prompt token's successor, so that a token's position is known from its id."""

    def __init__(self):
        self.config = CONFIGS["mamba1"]

    def init_cache(self, batch, max_len, state_dtype=jnp.float32):
        return jnp.zeros((batch,), jnp.int32)

    def prefill(self, ids, cache, lengths):
        last = ids[:, -1] if lengths is None else ids[jnp.arange(ids.shape[0]), lengths - 1]
        return self.step(last, cache)

    def step(self, tokens, cache):
        return 10.0 * jax.nn.one_hot((tokens + 1) % VOCAB, VOCAB), cache


def test_both_forms_of_the_decode_loop_stop_at_the_right_position():
    """Without an EOS the loop is one of a fixed count, with one a while loop that stops after the token where
    every row has finished: each gives the tokens of a token-by-token loop, and streams only those."""
    check_both_forms_of_the_decode_loop()


@pytest.mark.gpu
def test_the_while_loop_in_cuda_graphs_on_gpu():
    """On a GPU the program with an EOS runs its while loop inside CUDA graphs (WHILE_GRAPHS): it stops where it
    should, streams, and with an EOS that no row emits gives the fixed-count program's tokens (the step kernels
    inside the graphs)."""
    assert jax.default_backend() == "gpu"
    check_both_forms_of_the_decode_loop()
    model = random_model("mamba1", seed=3)
    prompts = right_padded_prompts(PROMPT_LENGTHS, seed=5)
    free = np.asarray(generate(model, prompts, max_new_tokens=40, prompt_lengths=PROMPT_LENGTHS))
    unused = next(i for i in range(VOCAB) if i not in free)
    stops = generate(model, prompts, max_new_tokens=40, prompt_lengths=PROMPT_LENGTHS, eos_token_id=unused)
    np.testing.assert_array_equal(stops, free)


def check_both_forms_of_the_decode_loop():
    model, prompt = Counter(), np.array([[5, 9, 20]], np.int32)
    longest = 11
    expected = (21 + np.arange(longest)[None]) % VOCAB
    for length in (1, 2, longest):
        np.testing.assert_array_equal(generate(model, prompt, max_new_tokens=length), expected[:, :length])
    for position in (0, 1, 6, longest - 1):
        streamed = []
        tokens = generate(
            model, prompt, max_new_tokens=longest, eos_token_id=int(expected[0, position]), callback=streamed.append
        )
        jax.effects_barrier()
        np.testing.assert_array_equal(tokens, expected[:, : position + 1])
        np.testing.assert_array_equal(np.concatenate(streamed), expected[0, : position + 1])


def test_pad_token_id_marks_the_prompt_lengths():
    model = random_model("mamba1", seed=5)
    pad = VOCAB - 1
    prompts = right_padded_prompts(PROMPT_LENGTHS, seed=2, pad=pad)
    by_lengths = generate(model, prompts, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS)
    by_pad = generate(model, prompts, max_new_tokens=NEW_TOKENS, pad_token_id=pad)
    np.testing.assert_array_equal(by_pad, by_lengths)


def test_sampling_is_reproducible_and_respects_the_filters():
    model = random_model("mamba2", seed=7)
    prompts = right_padded_prompts(PROMPT_LENGTHS, seed=4)
    settings = dict(
        max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS, top_k=4, temperature=1.5, repetition_penalty=1.3
    )
    tokens, scores = generate(model, prompts, rng=jax.random.key(1), return_scores=True, **settings)
    again, _ = generate(model, prompts, rng=jax.random.key(1), return_scores=True, **settings)
    other, _ = generate(model, prompts, rng=jax.random.key(2), return_scores=True, **settings)
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, other)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    for row, length in enumerate(PROMPT_LENGTHS):
        history = list(prompts[row, :length])
        for t in range(NEW_TOKENS):
            logits = scores[row, t].copy()
            seen = np.unique(history)
            logits[seen] = np.where(logits[seen] < 0, logits[seen] * 1.3, logits[seen] / 1.3)
            assert tokens[row, t] in np.argsort(-logits)[:4]
            history.append(tokens[row, t])


def test_greedy_matches_transformers_mamba1():
    parity = pytest.importorskip("tests.test_parity_mamba1")
    reference = parity.torch_model("auto_rank_tied", seed=3)
    check_greedy_against_transformers(reference, parity.our_model(reference))


def test_greedy_matches_transformers_mamba2():
    parity = pytest.importorskip("tests.test_parity_mamba2")
    reference = parity.random_torch_mamba2(11, n_groups=2, tie=False)
    config = MambaConfig.from_dict(reference.config.to_dict())
    model = nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0)))
    from tests.torch_weights import load_torch_mamba

    load_torch_mamba(model, reference)
    check_greedy_against_transformers(reference, model)


def check_greedy_against_transformers(reference, model):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = reference.config.vocab_size
    assert model.config.vocab_size == vocab
    prompts = np.random.default_rng(0).integers(0, vocab, (2, 6))
    steps = 10
    config = transformers.GenerationConfig(
        max_new_tokens=steps, min_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    with torch.no_grad():
        expected = reference.generate(torch.from_numpy(prompts), generation_config=config).numpy()[:, 6:]
    ours = generate(model, prompts.astype(np.int32), max_new_tokens=steps)
    np.testing.assert_array_equal(ours, expected)


def test_lower_generate_from_an_abstract_model_runs_like_generate():
    """The ahead-of-time program, lowered from shapes alone and compiled with explicit options, gives generate's
    tokens (untrimmed: the positions after an early stop hold the fill id) for the concrete model."""
    model = random_model("mamba2", seed=4)
    prompts = right_padded_prompts(PROMPT_LENGTHS, seed=6)
    expected = np.asarray(generate(model, prompts, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS))
    abstract = nnx.eval_shape(lambda: MambaLMHeadModel(CONFIGS["mamba2"], rngs=nnx.Rngs(0)))
    lowered, args = lower_generate(abstract, prompts, max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS)
    compiled = lowered.compile({"xla_cpu_enable_fast_math": False})
    tokens, scores, produced = compiled(*args._replace(params=jax.tree.leaves(model)))
    assert scores is None and int(produced) == NEW_TOKENS
    np.testing.assert_array_equal(tokens, expected)

    # eos is traced: a program lowered with one stops after the first token when every row emits the swapped id.
    same = np.repeat(prompts[:1], 3, 0)
    first = int(np.asarray(generate(model, same, max_new_tokens=2))[0, 0])
    lowered, args = lower_generate(abstract, same, max_new_tokens=NEW_TOKENS, eos_token_id=(first + 1) % VOCAB)
    tokens, _, produced = lowered.compile()(*args._replace(params=jax.tree.leaves(model), eos=np.int32(first)))
    assert int(produced) == 1
    np.testing.assert_array_equal(tokens[:, 0], first)


def test_generate_is_exported():
    assert mamba_jax.generate is mamba_jax.generation.generate


def test_generator_reads_values_set_in_place_and_shares_programs():
    """Generator(model) walks the model once: its calls give generate's tokens, see parameters updated in place
    afterwards (nnx.update, as an optimizer step does), and models of one structure share a compiled program."""
    model, other = random_model("mamba1", seed=1), random_model("mamba1", seed=2)
    prompts = right_padded_prompts(PROMPT_LENGTHS, seed=3)
    options = dict(max_new_tokens=NEW_TOKENS, prompt_lengths=PROMPT_LENGTHS, top_k=0, rng=5, return_scores=True)
    generator = mamba_jax.Generator(model)
    tokens, scores = generator(prompts, **options)
    expected_tokens, expected_scores = generate(model, prompts, **options)
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(generator(prompts, **options)[1], scores)  # a second call: the same

    nnx.update(model, nnx.state(other))
    after_tokens, after_scores = generator(prompts, **options)
    expected_tokens, expected_scores = generate(other, prompts, **options)
    np.testing.assert_array_equal(after_tokens, expected_tokens)
    np.testing.assert_array_equal(after_scores, expected_scores)
    assert not np.allclose(after_scores, scores)
    assert mamba_jax.Generator(other)._program is generator._program
    assert mamba_jax.Generator(random_model("mamba2"))._program is not generator._program


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(input_ids=np.zeros((1, 0), np.int32)), "at least one prompt of at least one token"),
        (dict(input_ids=np.zeros((0, 3), np.int32)), "at least one prompt of at least one token"),
        (dict(input_ids=np.zeros(3, np.int32)), r"shape \(batch, seqlen\), found \(3,\)"),
        (dict(input_ids=np.zeros((1, 3), np.float32)), "integer array"),
        (dict(input_ids=np.array([[1, VOCAB, 2]])), rf"\[0, vocab_size={VOCAB}\), found {VOCAB} at row 0, position 1"),
        (dict(input_ids=np.array([[1, -1]])), "found -1 at row 0, position 1"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, found 0"),
        (dict(state_dtype=jnp.int32), "state_dtype must be float32, bfloat16 or float16"),
        (dict(state_dtype="float64"), "state_dtype must be float32, bfloat16 or float16, found 'float64'"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1"),
        (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be a number in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature must be a number >= 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty must be a number > 0"),
        (dict(prompt_lengths=[3]), r"prompt_lengths must be an integer array of shape \(batch,\) = \(2,\)"),
        (dict(prompt_lengths=[3, 0]), r"between 1 and seqlen=3 tokens, found lengths \[3, 0\]"),
        (dict(prompt_lengths=[4, 1]), "between 1 and seqlen=3"),
        # with pad_token_id and no prompt_lengths, a prompt made only of padding is empty
        (dict(pad_token_id=5, input_ids=np.array([[5, 5, 5], [2, 3, 4]])), r"found lengths \[0, 3\]"),
        (dict(eos_token_id=VOCAB), rf"eos_token_id must be None or an int in \[0, vocab_size={VOCAB}\)"),
        (dict(pad_token_id=-1), "pad_token_id must be None or an int"),
        (dict(rng="seed"), "rng must be None, an int seed or one jax.random.key"),
        (dict(rng=jax.random.split(jax.random.key(0), 2)), "rng must be None, an int seed or one jax.random.key"),
        (dict(rng=2**63), r"rng: an int seed must be in \[-2\*\*63, 2\*\*63\), found 9223372036854775808"),
        (dict(callback=3), "callback must be callable"),
        (dict(eos_token_id=np.float32(1)), "eos_token_id must be None or an int"),
        (dict(max_new_tokens=np.array([2])), "max_new_tokens must be an int >= 1"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = nnx.eval_shape(lambda: MambaLMHeadModel(CONFIGS["mamba1"], rngs=nnx.Rngs(0)))
    arguments = dict(input_ids=np.ones((2, 3), np.int32), max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        generate(model, arguments.pop("input_ids"), **arguments)


def test_model_without_the_decode_protocol():
    with pytest.raises(ValueError, match="init_cache, prefill, step and config; init_cache is missing"):
        generate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), np.ones((1, 2), np.int32), max_new_tokens=1)


def test_while_graphs_are_dropped_where_xla_does_not_know_them(monkeypatch):
    """An XLA without the command-buffer options compiles the loop with its defaults instead of failing."""
    monkeypatch.setattr(loop, "WHILE_GRAPHS", {"xla_no_such_option_for_this_test": 1})
    loop._while_graphs.cache_clear()
    try:
        assert loop._while_graphs() is None
    finally:
        monkeypatch.undo()
        loop._while_graphs.cache_clear()
    assert loop._while_graphs() == loop.WHILE_GRAPHS  # the real options, which this XLA knows
