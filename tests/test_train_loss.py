"""The chunked LM loss (``next_token_loss(..., loss_chunk)``): the same loss and gradients as the whole-sequence
loss, and a smaller compiled working set."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.train import TrainConfig
from mamba_jax.train.loop import next_token_loss
from tests.tolerances import assert_close

CONFIG = MambaConfig(d_model=32, n_layer=2, vocab_size=509, pad_vocab_size_multiple=1)


def loss_and_grads(params, graphdef, tokens, loss_chunk):
    return jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens, loss_chunk))(params)


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("loss_chunk", [1, 4, 7, 13])  # 13 >= 12 positions: the unchunked path
def test_chunked_loss_matches(loss_chunk, tie_embeddings):
    config = MambaConfig(**{**CONFIG.to_dict(), "tie_embeddings": tie_embeddings})
    graphdef, params = nnx.split(MambaLMHeadModel(config, rngs=nnx.Rngs(1)))
    tokens = jax.random.randint(jax.random.key(2), (3, 13), 0, config.vocab_size)  # 12 predicted positions
    run = jax.jit(loss_and_grads, static_argnums=(1, 3))
    loss, grads = run(params, graphdef, tokens, 0)
    chunked_loss, chunked_grads = run(params, graphdef, tokens, loss_chunk)
    assert_close(chunked_loss, loss, jnp.float32)
    for (path, c), g in zip(jax.tree_util.tree_leaves_with_path(chunked_grads), jax.tree.leaves(grads), strict=True):
        assert_close(c, g, jnp.float32, err_msg=jax.tree_util.keystr(path))


def test_chunked_loss_keeps_fewer_logits():
    """XLA's temporary memory for loss + gradients with a large vocabulary: chunks of 64 of 512 positions hold about
    one chunk's float32 logits instead of all of them."""
    config = MambaConfig(d_model=16, n_layer=1, vocab_size=32768, pad_vocab_size_multiple=1)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0))))
    tokens = jax.ShapeDtypeStruct((2, 513), jnp.int32)
    logits_bytes = 2 * 512 * config.vocab_size * 4

    def temp_bytes(loss_chunk):
        lowered = jax.jit(loss_and_grads, static_argnums=(1, 3)).lower(params, graphdef, tokens, loss_chunk)
        return lowered.compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(64)
    assert whole >= logits_bytes
    assert chunked < whole - logits_bytes / 2


def test_loss_chunk_config_check():
    with pytest.raises(ValueError, match=r"TrainConfig.loss_chunk must be >= 0 \(0: no chunking\), got -1"):
        TrainConfig(loss_chunk=-1)
