"""MHA: the attention layers of the hybrid Mamba/attention models (mamba_ssm ``modules/mha.py``).

Data flow (extra legend: ``a`` query heads, ``k`` key/value heads, ``e`` head_dim, ``m`` = mlp_dim rounded up to a
multiple of 256):

    in_proj(x) -> [q (a*e), k (k*e), v (k*e), mlp_up (m/2), mlp_gate (m/2)]
    qkv = conv1d(qkv)                               only when d_conv > 0 (no activation)
    q, k = rotary(q), rotary(k)                     on the first rotary_emb_dim dims of each head, positions 0..l-1
    ctx = softmax(q k^T * scale [+ causal mask]) v  query head i reads key/value head i // (a / k); float32 softmax
    out = out_proj([ctx (a*e), mlp_up * silu(mlp_gate) (m/2)])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers import CausalConv1d, linear, with_axes


def rotary_cos_sin(seqlen: int, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (l, rotary_dim / 2) in float32 of angle t * base**(-2i / rotary_dim) at positions t = 0..l-1."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = jnp.arange(seqlen, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate the first 2 * cos.shape[-1] dims of each head, in float32; the rest pass through.

    x (b, l, heads, e); cos, sin (l, r/2). Non-interleaved (GPT-NeoX) pairs dim i with i + r/2; interleaved (GPT-J)
    pairs 2i with 2i + 1.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half].astype(jnp.float32), x[..., 2 * half :]
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    y1, y2 = x1 * cos - x2 * sin, x1 * sin + x2 * cos
    rotated = jnp.stack([y1, y2], axis=-1).reshape(rot.shape) if interleaved else jnp.concatenate([y1, y2], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), rest], axis=-1)


class MHA(nnx.Module):
    """Multi-head self-attention with optional GQA, rotary, short conv and a gated MLP folded into in_proj.

    x (b, l, embed_dim) -> (b, l, embed_dim). Arguments and parameter names are mamba_ssm's. Parameters: in_proj
    kernel (embed_dim, (a + 2k) * e + m) [+ bias]; conv1d kernel (d_conv, (a + 2k) * e), bias, when d_conv > 0;
    out_proj kernel (a * e + m/2, embed_dim) [+ bias]. ``mlp_dim`` is rounded up to a multiple of 256 as in mamba_ssm.
    ``softmax_scale`` defaults to head_dim**-0.5. ``layer_idx`` is accepted and ignored; ``device`` must be None.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        head_dim: int | None = None,
        mlp_dim: int = 0,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        d_conv: int = 0,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        device=None,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        del layer_idx  # a torch KV-cache key; unused here
        if device is not None:
            raise ValueError(f"MHA: device must be None (place arrays with jax sharding instead), got {device!r}")
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"MHA: {name} must be a positive int, got {value!r}")
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if not isinstance(num_heads_kv, int) or num_heads_kv <= 0 or num_heads % num_heads_kv != 0:
            raise ValueError(
                f"MHA: num_heads_kv must be a positive divisor of num_heads={num_heads}, got {num_heads_kv}"
            )
        if head_dim is None:
            if embed_dim % num_heads != 0:
                raise ValueError(f"MHA: num_heads={num_heads} must divide embed_dim={embed_dim} when head_dim is None")
            head_dim = embed_dim // num_heads
        if not isinstance(head_dim, int) or head_dim <= 0:
            raise ValueError(f"MHA: head_dim must be a positive int, got {head_dim!r}")
        if not isinstance(rotary_emb_dim, int) or rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > head_dim:
            raise ValueError(
                f"MHA: rotary_emb_dim must be an even int in [0, head_dim={head_dim}], got {rotary_emb_dim}"
            )
        if not isinstance(d_conv, int) or d_conv < 0:
            raise ValueError(f"MHA: d_conv must be an int >= 0, got {d_conv!r}")
        if not isinstance(mlp_dim, int) or mlp_dim < 0:
            raise ValueError(f"MHA: mlp_dim must be an int >= 0, got {mlp_dim!r}")

        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv
        self.head_dim = head_dim
        self.mlp_dim = -(-mlp_dim // 256) * 256
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved

        qkv_dim = head_dim * (num_heads + 2 * num_heads_kv)
        common = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = linear(
            embed_dim, qkv_dim + self.mlp_dim, axes=("embed", "qkv"), use_bias=qkv_proj_bias, **common
        )
        if d_conv > 0:
            self.conv1d = CausalConv1d(qkv_dim, d_conv, use_bias=True, **common)
            with_axes(self.conv1d.kernel, ("conv", "qkv"))
            with_axes(self.conv1d.bias, ("qkv",))
        else:
            self.conv1d = None
        out_in = head_dim * num_heads + self.mlp_dim // 2
        self.out_proj = linear(out_in, embed_dim, axes=("qkv", "embed"), use_bias=out_proj_bias, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (b, l, embed_dim) -> (b, l, embed_dim)."""
        embed_dim = self.out_proj.out_features
        if x.ndim != 3 or x.shape[-1] != embed_dim:
            raise ValueError(f"MHA: input must have shape (batch, seqlen, {embed_dim}), got {x.shape}")
        b, l, _ = x.shape
        a, k, e = self.num_heads, self.num_heads_kv, self.head_dim

        qkv = self.in_proj(x)
        mlp = None
        if self.mlp_dim > 0:
            qkv, mlp_up, mlp_gate = jnp.split(
                qkv, [qkv.shape[-1] - self.mlp_dim, qkv.shape[-1] - self.mlp_dim // 2], -1
            )
            mlp = mlp_up * jax.nn.silu(mlp_gate)
        if self.conv1d is not None:
            qkv = self.conv1d(qkv)
        q, key, value = jnp.split(qkv, [a * e, (a + k) * e], axis=-1)
        q, key, value = q.reshape(b, l, a, e), key.reshape(b, l, k, e), value.reshape(b, l, k, e)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_cos_sin(l, self.rotary_emb_dim, self.rotary_emb_base)
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            key = apply_rotary(key, cos, sin, self.rotary_emb_interleaved)
        # XLA path of jax.nn.dot_product_attention: float32 logits and softmax; GQA maps query head i to kv head
        # i // (a / k), the order of torch's repeat_interleave.
        ctx = jax.nn.dot_product_attention(q, key, value, scale=self.softmax_scale, is_causal=self.causal)
        ctx = ctx.reshape(b, l, a * e)
        if mlp is not None:
            ctx = jnp.concatenate([ctx, mlp], axis=-1)
        return self.out_proj(ctx)
