"""The chunked LM loss (``next_token_loss(..., loss_chunk)``): the same loss and gradients as the whole-sequence
loss, and a smaller compiled working set."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel, head_product
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


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_product_gradients(dtype):
    """The LM head's product: float32 logits from operands in the compute dtype; its backward's products take the
    cotangent in that dtype. In float32 it is the plain product's gradient; in bfloat16 it is the float32 gradient of
    the same bfloat16 operands, within one bfloat16 rounding, for an odd shape."""
    keys = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(keys[0], (3, 7, 24)).astype(dtype)
    head = (0.2 * jax.random.normal(keys[1], (24, 37))).astype(dtype)
    weights = jax.random.normal(keys[2], (3, 7, 37))

    def loss(product, hidden, head):
        return jnp.sum(weights * jnp.tanh(product(hidden, head)))

    def reference(hidden, head):
        return jnp.einsum("...d,dv->...v", hidden.astype(jnp.float32), head.astype(jnp.float32))

    logits = head_product(hidden, head)
    assert logits.dtype == jnp.float32
    assert_close(logits, reference(hidden, head), jnp.float32)
    grads = jax.grad(lambda *args: loss(head_product, *args), argnums=(0, 1))(hidden, head)
    expected = jax.grad(lambda *args: loss(reference, *args), argnums=(0, 1))(hidden, head)
    for name, got, want in zip(("hidden", "head"), grads, expected, strict=True):
        assert got.dtype == dtype, name
        assert_close(got, want, dtype, err_msg=name)
