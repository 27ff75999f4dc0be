"""``head_argmax`` as XLA ops: the logits in float32, then their arg-max. The reference every implementation is
tested against, and the path off a GPU."""

import jax
import jax.numpy as jnp


def head_logits(hidden: jax.Array, head: jax.Array, rows: bool) -> jax.Array:
    """hidden (b, d) @ the head -> float32 logits (b, V): products in the operands' dtype, accumulated in float32.
    head (V, d) where ``rows`` (a tied embedding), else (d, V) (an ``lm_head`` kernel)."""
    spec = "bd,vd->bv" if rows else "bd,dv->bv"
    return jnp.einsum(spec, hidden, head, preferred_element_type=jnp.float32)


def head_argmax_reference(hidden: jax.Array, head: jax.Array, vocab_size: int, rows: bool) -> jax.Array:
    """int32 (b,): the first index of the largest of each row's logits among the first ``vocab_size``."""
    logits = head_logits(hidden, head, rows)[:, :vocab_size]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
