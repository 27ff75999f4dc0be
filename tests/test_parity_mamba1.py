"""Whole-model parity of MambaLMHeadModel against transformers' MambaForCausalLM (torch, CPU, its pure-torch path)
on tiny random models: float32 logits within PARITY_REL_ERR_FP32, bfloat16 compute within twice the error
transformers' own bfloat16 run shows against its float32 run."""

import copy
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from tests.tolerances import PARITY_REL_ERR_FP32, rel_err
from tests.torch_weights import load_torch_mamba, torch_source

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BATCH = 2
SEQLENS = (1, 9)  # one token; longer than every d_conv below

# transformers MambaConfig arguments; each case differs in what it exercises.
CASES = {
    # d_model not a multiple of 16 (dt_rank auto = 3), vocab 100 -> padded 104, tied.
    "auto_rank_tied": dict(hidden_size=40, state_size=8, conv_kernel=4, time_step_rank="auto", vocab_size=100),
    # explicit dt_rank, in/out_proj biases, no conv bias, untied head, expand 3, residual in the activation dtype.
    "biases_untied": dict(
        hidden_size=24,
        state_size=4,
        conv_kernel=3,
        expand=3,
        time_step_rank=5,
        use_bias=True,
        use_conv_bias=False,
        tie_word_embeddings=False,
        residual_in_fp32=False,
        vocab_size=97,
    ),
    # mamba_ssm's mixer defaults (n 16, w 4, expand 2) at d_model 64, vocab already a multiple of 8.
    "defaults": dict(hidden_size=64, vocab_size=96),
}


def torch_model(case: str, seed: int = 0):
    """A random MambaForCausalLM with every parameter perturbed off its init (norm weights, D, A_log, biases), so
    each one matters to the logits."""
    torch.manual_seed(seed)
    config = transformers.MambaConfig(num_hidden_layers=2, **CASES[case])
    model = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", "A_log")):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".D") or (name.endswith("bias") and "dt_proj" not in name):
                p.copy_(0.5 * torch.randn_like(p))
    return model


def our_model(reference, *, dtype=None, param_dtype=jnp.float32, implementation="chunked"):
    """Our model with ``reference``'s weights, padding the vocab to a multiple of 8 (transformers does not pad)."""
    config = MambaConfig.from_dict(reference.config.to_dict())
    config = dataclasses.replace(config, pad_vocab_size_multiple=8)
    model = nnx.eval_shape(
        lambda: MambaLMHeadModel(
            config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, scan_implementation=implementation
        )
    )
    load_torch_mamba(model, reference)
    return model


forward = nnx.jit(lambda model, input_ids: model(input_ids))


def torch_logits(model, input_ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids).long(), use_cache=False).logits
    return logits.float().numpy()


def random_ids(vocab_size: int, seqlen: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (BATCH, seqlen), dtype=np.int32)


# Every case with the default CPU scan ("chunked"), one also with the sequential reference.
@pytest.mark.parametrize(
    ("case", "implementation"), [(case, "chunked") for case in sorted(CASES)] + [("auto_rank_tied", "reference")]
)
def test_float32_logits_match_transformers(case, implementation):
    reference = torch_model(case)
    model = our_model(reference, implementation=implementation)
    vocab = reference.config.vocab_size
    for seqlen in SEQLENS:
        ids = random_ids(vocab, seqlen)
        expected = torch_logits(reference, ids)
        logits = np.asarray(forward(model, jnp.asarray(ids)))
        assert logits.dtype == np.float32
        assert logits.shape == (BATCH, seqlen, model.config.padded_vocab_size)
        err = rel_err(logits[..., :vocab], expected)
        assert err <= PARITY_REL_ERR_FP32, f"{case} seqlen {seqlen}: relative error {err:.2e}"
        # Padded vocab rows are zero, so their logits are exactly zero.
        np.testing.assert_array_equal(logits[..., vocab:], 0.0)


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_bfloat16_compute_within_transformers_bfloat16_error(param_dtype):
    reference = torch_model("defaults")
    ids = random_ids(reference.config.vocab_size, 9)
    expected = torch_logits(reference, ids)
    torch_bf16_err = rel_err(torch_logits(copy.deepcopy(reference).to(torch.bfloat16), ids), expected)

    model = our_model(reference, dtype=jnp.bfloat16, param_dtype=param_dtype)
    logits = np.asarray(forward(model, jnp.asarray(ids)))
    ours_err = rel_err(logits[..., : reference.config.vocab_size], expected)
    assert logits.dtype == np.float32
    assert 0 < ours_err <= 2 * torch_bf16_err, f"ours {ours_err:.2e}, transformers bf16 {torch_bf16_err:.2e}"


def test_float32_gradients_match_transformers():
    """d(sum(logits * w)) / d(every parameter) against torch autograd, on the case with biases and an untied head."""
    reference = torch_model("biases_untied")
    model = our_model(reference)
    vocab = reference.config.vocab_size
    ids = random_ids(vocab, 9)
    weights = np.random.default_rng(2).standard_normal((BATCH, 9, vocab)).astype(np.float32)

    reference.zero_grad()
    logits = reference(torch.from_numpy(ids).long(), use_cache=False).logits
    (logits * torch.from_numpy(weights)).sum().backward()
    expected = {name: p.grad.numpy() for name, p in reference.named_parameters()}

    def loss(m, ids):
        return jnp.sum(m(ids)[..., :vocab] * weights)

    grads = nnx.jit(nnx.grad(loss))(model, jnp.asarray(ids))
    for path, grad in nnx.iter_graph(grads):
        if not isinstance(grad, nnx.Param):
            continue
        name = ".".join(map(str, path))
        _, want = torch_source(name, expected)
        got = np.asarray(grad[...])[tuple(slice(0, n) for n in want.shape)]  # drop padded vocab rows / columns
        err = rel_err(got, want)
        assert err <= PARITY_REL_ERR_FP32, f"gradient of {name}: relative error {err:.2e}"
