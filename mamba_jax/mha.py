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

from mamba_jax.generation.cache import AttentionCache, check_lengths, conv_prefill
from mamba_jax.layers import CausalConv1d, linear, with_axes


def rotary_cos_sin(seqlen: int, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (l, rotary_dim / 2) in float32 of angle t * base**(-2i / rotary_dim) at positions t = 0..l-1."""
    return rotary_cos_sin_at(jnp.arange(seqlen), rotary_dim, base)


def rotary_cos_sin_at(positions: jax.Array, rotary_dim: int, base: float) -> tuple[jax.Array, jax.Array]:
    """cos, sin (..., rotary_dim / 2) in float32 of angle t * base**(-2i / rotary_dim) at integer positions t (...)."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array, interleaved: bool) -> jax.Array:
    """Rotate the first 2 * cos.shape[-1] dims of each head, in float32; the rest pass through.

    x (b, l, heads, e); cos, sin (l, r/2), or (b, l, r/2) for positions that differ per row. Non-interleaved
    (GPT-NeoX) pairs dim i with i + r/2; interleaved (GPT-J) pairs 2i with 2i + 1.
    """
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half].astype(jnp.float32), x[..., 2 * half :]
    cos, sin = cos[..., None, :], sin[..., None, :]  # broadcast over heads
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
        self._check_input(x, 3)
        qkv, mlp = self._project(x)
        if self.conv1d is not None:
            qkv = self.conv1d(qkv)
        q, key, value = self._split_heads(qkv)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_cos_sin(x.shape[1], self.rotary_emb_dim, self.rotary_emb_base)
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            key = apply_rotary(key, cos, sin, self.rotary_emb_interleaved)
        # XLA path of jax.nn.dot_product_attention: float32 logits and softmax; GQA maps query head i to kv head
        # i // (a / k), the order of torch's repeat_interleave.
        ctx = jax.nn.dot_product_attention(q, key, value, scale=self.softmax_scale, is_causal=self.causal)
        return self._output(ctx, mlp)

    # ---- decoding: a preallocated key/value cache (mamba_jax.generation.cache) ----

    def init_cache(self, batch: int, max_len: int, dtype=jnp.float32, state_dtype=None) -> AttentionCache:
        """An empty cache for ``max_len`` positions: key, value (b, s, k, e) and the conv window (b, w, (a + 2k) e)
        when the layer has a conv, in ``dtype``; length (b,) int32 zeros. ``state_dtype`` (the SSM mixers') is
        unused."""
        del state_dtype
        kv_shape = (batch, max_len, self.num_heads_kv, self.head_dim)
        conv_state = None
        if self.conv1d is not None:
            conv_state = jnp.zeros((batch, *self.conv1d.kernel.shape), dtype)
        return AttentionCache(
            key=jnp.zeros(kv_shape, dtype),
            value=jnp.zeros(kv_shape, dtype),
            length=jnp.zeros((batch,), jnp.int32),
            conv_state=conv_state,
        )

    def prefill(
        self, x: jax.Array, cache: AttentionCache, lengths: jax.Array | None = None
    ) -> tuple[jax.Array, AttentionCache]:
        """Append a (right-padded) chunk of tokens to each row of ``cache`` and attend over everything cached.

        x (b, l, embed_dim); lengths int (b,) valid positions per row (default l) -> (out (b, l, embed_dim), cache).
        Row r's tokens take positions cache.length[r] + 0..l-1 (rotary angles included); positions past the cache's
        capacity s are dropped, so s must cover every token. A causal layer's query sees the keys up to its own
        position; a non-causal one (as mamba_ssm's inference) sees every valid key of the chunk and before. Outputs
        past a row's length are not meaningful. From an empty cache ``out`` equals ``self(x)``.
        """
        self._check_input(x, 3)
        b, l, _ = x.shape
        lengths = check_lengths(lengths, b, l)
        qkv, mlp = self._project(x)
        conv_state = cache.conv_state
        if self.conv1d is not None:
            qkv, conv_state = conv_prefill(self.conv1d, qkv, conv_state, lengths)
        q, key, value = self._split_heads(qkv)
        positions = cache.length[:, None] + jnp.arange(l)[None, :]  # (b, l)
        if self.rotary_emb_dim > 0:
            cos, sin = rotary_cos_sin_at(positions, self.rotary_emb_dim, self.rotary_emb_base)
            q = apply_rotary(q, cos, sin, self.rotary_emb_interleaved)
            key = apply_rotary(key, cos, sin, self.rotary_emb_interleaved)
        rows = jnp.arange(b)[:, None]
        keys = cache.key.at[rows, positions].set(key.astype(cache.key.dtype), mode="drop")
        values = cache.value.at[rows, positions].set(value.astype(cache.value.dtype), mode="drop")

        end = cache.length + (l if lengths is None else lengths)  # (b,)
        slots = jnp.arange(keys.shape[1])[None, None, :]  # (1, 1, s)
        visible = slots <= positions[:, :, None] if self.causal else slots < end[:, None, None]  # (b, l, s)
        ctx = jax.nn.dot_product_attention(
            q, keys.astype(q.dtype), values.astype(q.dtype), mask=visible[:, None], scale=self.softmax_scale
        )
        return self._output(ctx, mlp), AttentionCache(keys, values, end, conv_state)

    def step(self, x: jax.Array, cache: AttentionCache) -> tuple[jax.Array, AttentionCache]:
        """One token per row: x (b, embed_dim) -> (out (b, embed_dim), cache); attends over the s cached slots."""
        self._check_input(x, 2)
        out, cache = self.prefill(x[:, None], cache)
        return out[:, 0], cache

    # ---- pieces shared by the paths ----

    def _check_input(self, x: jax.Array, ndim: int) -> None:
        embed_dim = self.out_proj.out_features
        if x.ndim != ndim or x.shape[-1] != embed_dim:
            shape = "(batch, seqlen, " if ndim == 3 else "(batch, "
            raise ValueError(f"MHA: input must have shape {shape}{embed_dim}), got {x.shape}")

    def _project(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """x (b, l, embed_dim) -> qkv (b, l, (a + 2k) e) and the gated MLP branch (b, l, m/2) or None."""
        qkv = self.in_proj(x)
        if self.mlp_dim == 0:
            return qkv, None
        qkv, mlp_up, mlp_gate = jnp.split(qkv, [qkv.shape[-1] - self.mlp_dim, qkv.shape[-1] - self.mlp_dim // 2], -1)
        return qkv, mlp_up * jax.nn.silu(mlp_gate)

    def _split_heads(self, qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """qkv (b, l, (a + 2k) e) -> q (b, l, a, e), key, value (b, l, k, e)."""
        b, l, _ = qkv.shape
        a, k, e = self.num_heads, self.num_heads_kv, self.head_dim
        q, key, value = jnp.split(qkv, [a * e, (a + k) * e], axis=-1)
        return q.reshape(b, l, a, e), key.reshape(b, l, k, e), value.reshape(b, l, k, e)

    def _output(self, ctx: jax.Array, mlp: jax.Array | None) -> jax.Array:
        """ctx (b, l, a, e), mlp (b, l, m/2) or None -> out_proj([ctx, mlp]) (b, l, embed_dim)."""
        b, l = ctx.shape[:2]
        ctx = ctx.reshape(b, l, self.num_heads * self.head_dim)
        if mlp is not None:
            ctx = jnp.concatenate([ctx, mlp], axis=-1)
        return self.out_proj(ctx)
