"""Mamba-2 language-model parity: a random transformers ``Mamba2ForCausalLM`` (torch, CPU, float32) copied into our
``MambaLMHeadModel`` gives the same logits (relative error <= PARITY_REL_ERR_FP32).

Configs cover ngroups 1 and > 1, seqlen shorter than, equal to and not a multiple of chunk_size, and tied / untied
embeddings. (transformers has no D_has_hdim; that option is checked against a reference in test_mamba2.py.)
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.verify import transformers_norms_per_group
from mamba_jax import MambaConfig, MambaLMHeadModel
from tests.tolerances import PARITY_REL_ERR_FP32, rel_err
from tests.torch_weights import load_torch_mamba

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CHUNK = 8


def random_torch_mamba2(seed: int, *, n_groups: int, tie: bool):
    """A tiny Mamba2ForCausalLM whose D, dt_bias and norm weights are random too (their init is constant)."""
    torch.manual_seed(seed)
    config = transformers.Mamba2Config(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        expand=2,
        head_dim=16,
        num_heads=4,
        n_groups=n_groups,
        conv_kernel=4,
        chunk_size=CHUNK,
        tie_word_embeddings=tie,
    )
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith(("mixer.D", "dt_bias", "norm.weight", "norm_f.weight")):
                tensor.add_(0.3 * torch.randn_like(tensor))
    return model


@pytest.mark.parametrize(
    ("n_groups", "tie", "seqlen"),
    [(1, True, 5), (2, False, CHUNK), (4, True, 2 * CHUNK + 3), (2, True, 1)],
)
def test_logits_match_transformers(n_groups, tie, seqlen):
    if n_groups > 1 and not transformers_norms_per_group():
        pytest.skip(f"transformers {transformers.__version__} normalises Mamba-2's gated norm across groups (a bug)")
    torch_model = random_torch_mamba2(n_groups + seqlen, n_groups=n_groups, tie=tie)
    config = MambaConfig.from_dict(torch_model.config.to_dict())
    assert config.ssm_layer == "Mamba2" and config.tie_embeddings == tie
    model = nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0)))
    load_torch_mamba(model, torch_model)

    ids = np.random.default_rng(seqlen).integers(0, 99, size=(2, seqlen))
    with torch.no_grad():
        expected = torch_model(torch.from_numpy(ids)).logits.float().numpy()
    ours = np.asarray(model(jnp.asarray(ids, jnp.int32)))[..., :99]
    err = rel_err(ours, expected)
    assert err <= PARITY_REL_ERR_FP32, err
