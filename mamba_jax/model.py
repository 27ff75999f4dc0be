"""The language model: MixerModel (embedding, blocks, final norm) and MambaLMHeadModel (plus the LM head), as in
mamba_ssm ``models/mixer_seq_simple.py``. Shapes: b batch, l seqlen, d d_model, v padded vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mamba_jax.block import Block
from mamba_jax.config import MambaConfig
from mamba_jax.generation.cache import check_lengths, take_last
from mamba_jax.layers import LayerNorm, RMSNorm, linear, with_axes
from mamba_jax.mamba1 import Mamba
from mamba_jax.mamba2 import Mamba2
from mamba_jax.mha import MHA
from mamba_jax.mlp import GatedMLP
from pallas_kernels.head_argmax import head_argmax
from pallas_kernels.mamba_step import settled

NORM_EPS = 1e-5  # mamba_ssm's norm_epsilon default; its config has no field for it


def create_norm(config: MambaConfig, *, dtype, param_dtype) -> nnx.Module:
    """RMSNorm or LayerNorm over d_model, per ``config.rms_norm``."""
    norm_cls = RMSNorm if config.rms_norm else LayerNorm
    return norm_cls(config.d_model, eps=NORM_EPS, dtype=dtype, param_dtype=param_dtype)


def create_block(
    config: MambaConfig,
    layer_idx: int,
    *,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
    scan_implementation: str | None = None,
    ssd_implementation: str | None = None,
    step_implementation: str | None = None,
) -> Block:
    """The Block for layer ``layer_idx``, as mamba_ssm's ``create_block``: an MHA layer (built from attn_cfg) if listed
    in attn_layer_idx, else the ssm_cfg["layer"] mixer (Mamba1 or Mamba2, built from the other ssm_cfg keys), followed
    by norm2 + GatedMLP(hidden_features=d_intermediate) when d_intermediate > 0.

    ``scan_implementation`` picks the Mamba-1 selective scan's implementation (``pallas_kernels.selective_scan``),
    ``ssd_implementation`` the Mamba-2 SSD's (``pallas_kernels.ssd``), ``step_implementation`` the decode step's
    (``pallas_kernels.mamba_step``, ``pallas_kernels.mamba2_step``).
    """
    factory = {"rngs": rngs, "dtype": dtype, "param_dtype": param_dtype}
    if layer_idx in config.attn_layer_idx:
        mixer = _build("attn_cfg", dict(config.attn_cfg), MHA, config.d_model, layer_idx=layer_idx, **factory)
    elif config.ssm_layer == "Mamba1":
        implementations = {"scan_implementation": scan_implementation, "step_implementation": step_implementation}
        mixer = _build("ssm_cfg", config.mixer_kwargs, Mamba, config.d_model, **implementations, **factory)
    elif config.ssm_layer == "Mamba2":
        mixer = _build(
            "ssm_cfg",
            config.mixer_kwargs,
            Mamba2,
            config.d_model,
            layer_idx=layer_idx,
            ssd_implementation=ssd_implementation,
            step_implementation=step_implementation,
            **factory,
        )
    else:
        raise ValueError(
            f"ssm_cfg['layer'] = {config.ssm_layer!r} is not supported (supported: 'Mamba1', 'Mamba2'; "
            "Mamba3 is not implemented yet)"
        )
    mlp = norm2 = None
    if config.d_intermediate > 0:
        mlp = GatedMLP(config.d_model, hidden_features=config.d_intermediate, out_features=config.d_model, **factory)
        norm2 = create_norm(config, dtype=dtype, param_dtype=param_dtype)
    norm = create_norm(config, dtype=dtype, param_dtype=param_dtype)
    return Block(mixer, norm, mlp, norm2, residual_in_fp32=config.residual_in_fp32)


def _build(cfg_name: str, kwargs: dict, cls: type, *args, **extra) -> nnx.Module:
    """cls(*args, **kwargs, **extra), turning a config key the constructor does not take into a clear error."""
    try:
        return cls(*args, **kwargs, **extra)
    except TypeError as e:
        raise ValueError(f"{cfg_name} {kwargs} does not fit {cls.__name__}(...): {e}") from None


class MixerModel(nnx.Module):
    """embedding -> n_layer Blocks -> norm_f(hidden + residual).

    embedding.embedding (v, d) ~ N(0, 0.02); layers: nnx.List of Block; norm_f weight (d,) [+ bias].
    """

    def __init__(
        self,
        config: MambaConfig,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        scan_implementation: str | None = None,
        ssd_implementation: str | None = None,
        step_implementation: str | None = None,
    ):
        self.embedding = nnx.Embed(
            config.padded_vocab_size,
            config.d_model,
            embedding_init=nnx.initializers.normal(stddev=0.02),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        with_axes(self.embedding.embedding, ("vocab", "embed"))
        self.layers = nnx.List(
            [
                create_block(
                    config,
                    i,
                    rngs=rngs,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    scan_implementation=scan_implementation,
                    ssd_implementation=ssd_implementation,
                    step_implementation=step_implementation,
                )
                for i in range(config.n_layer)
            ]
        )
        self.norm_f = create_norm(config, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids int (b, l) -> final hidden states (b, l, d)."""
        hidden = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        return self.norm_f(hidden + residual)

    def init_cache(self, batch: int, max_len: int, dtype, state_dtype=jnp.float32) -> tuple:
        """The empty decode cache: a tuple with one cache per layer (layouts in mamba_jax.generation.cache)."""
        return tuple(layer.init_cache(batch, max_len, dtype, state_dtype) for layer in self.layers)

    def prefill(self, input_ids: jax.Array, cache: tuple, lengths: jax.Array | None) -> tuple[jax.Array, tuple]:
        """input_ids int (b, l), lengths (b,) or None (every row full) -> (final hidden state (b, d) at each row's
        last valid token, cache)."""
        hidden = self.embedding(input_ids)
        residual = None
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            hidden, residual, layer_cache = _block_prefill(layer, hidden, residual, layer_cache, lengths)
            new_cache.append(layer_cache)
        return self.norm_f(take_last(hidden, lengths) + take_last(residual, lengths)), tuple(new_cache)

    def step(self, tokens: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
        """tokens int (b,) -> (final hidden state (b, d), cache)."""
        hidden = self.embedding(tokens)
        residual = None
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            hidden, residual, layer_cache = _block_step(layer, hidden, residual, layer_cache)
            new_cache.append(layer_cache)
        return self.norm_f(settled(hidden) + residual), tuple(new_cache)


# The decode paths call every block through one jitted function. Inside the compiled generate loop these are nested
# jits: blocks of the same structure and shapes share one trace and one lowering (jax caches both), where a plain
# Python loop traces and lowers every layer anew; for a Mamba-1 prefill that re-lowered the Pallas scan kernel once
# per layer, most of a 48-layer model's compile time. XLA inlines the calls, so the compiled program is the same.
@jax.jit
def _block_prefill(block: Block, hidden, residual, cache, lengths):
    """``block.prefill(hidden, residual, cache, lengths)`` -> (hidden, residual, cache)."""
    return block.prefill(hidden, residual, cache, lengths)


@jax.jit
def _block_step(block: Block, hidden, residual, cache):
    """``block.step(hidden, residual, cache)`` -> (hidden, residual, cache)."""
    return block.step(hidden, residual, cache)


class MambaLMHeadModel(nnx.Module):
    """MixerModel + LM head: ``model(input_ids)`` -> float32 logits (b, l, v), v = config.padded_vocab_size.

    Tied (config.tie_embeddings): logits = hidden @ backbone.embedding.embedding.T and there is no ``lm_head``.
    Untied: ``lm_head`` kernel (d, v), no bias. Init follows mamba_ssm's ``_init_weights``: linear biases zero (but
    dt_proj's), every ``out_proj`` / ``fc2`` kernel scaled by 1/sqrt(n_layer).

    Token ids must lie in [0, v). ``__call__``, ``prefill``, ``step`` and ``greedy_step`` check that where the ids are
    concrete arrays; under ``jax.jit`` (traced ids) they are not checked: an id >= v gives NaN logits and a negative
    id wraps around to a row from the end of the embedding.
    """

    def __init__(
        self,
        config: MambaConfig,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        scan_implementation: str | None = None,
        ssd_implementation: str | None = None,
        step_implementation: str | None = None,
    ):
        if not isinstance(config, MambaConfig):
            raise ValueError(f"MambaLMHeadModel: config must be a MambaConfig, found {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        self.backbone = MixerModel(
            config,
            rngs=rngs,
            dtype=dtype,
            param_dtype=param_dtype,
            scan_implementation=scan_implementation,
            ssd_implementation=ssd_implementation,
            step_implementation=step_implementation,
        )
        if not config.tie_embeddings:
            self.lm_head = linear(
                config.d_model,
                config.padded_vocab_size,
                axes=("embed", "vocab"),
                use_bias=False,
                rngs=rngs,
                dtype=dtype,
                param_dtype=param_dtype,
            )
        _init_for_language_model(self, config)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids int (b, l), each in [0, v) -> logits float32 (b, l, v)."""
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be integer (batch, seqlen), found shape {input_ids.shape} dtype {input_ids.dtype}"
            )
        self._check_ids_in_vocab("input_ids", input_ids)
        return self.logits(self.backbone(input_ids))

    # ---- decoding (mamba_jax.generation) ----

    def init_cache(self, batch: int, max_len: int, dtype=None, state_dtype=jnp.float32) -> tuple:
        """An empty decode cache for ``batch`` rows of up to ``max_len`` tokens: one cache per layer (layouts in
        mamba_jax.generation.cache). ``dtype`` of the conv windows and key/value entries: default the model's
        ``dtype``, else float32. ``state_dtype`` of the SSM states: float32 (default), or bfloat16 / float16, which
        halve the state's bytes (mamba_ssm keeps its state in the model's dtype); the update still runs in
        float32, its result rounded at every token."""
        return self.backbone.init_cache(batch, max_len, dtype or self.dtype or jnp.float32, state_dtype)

    def prefill(self, input_ids: jax.Array, cache: tuple, lengths: jax.Array | None = None) -> tuple[jax.Array, tuple]:
        """Process whole (right-padded) prompts with the parallel scans.

        input_ids int (b, l), each in [0, v); lengths int (b,) prompt tokens per row (default l) -> (logits float32
        (b, v) at each row's last prompt token, the cache after it). Continues from ``cache`` (a chunked prefill works
        too).
        """
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"input_ids must be integer (batch, seqlen), found shape {input_ids.shape} dtype {input_ids.dtype}"
            )
        self._check_ids_in_vocab("input_ids", input_ids)
        lengths = check_lengths(lengths, *input_ids.shape)
        hidden, cache = self.backbone.prefill(input_ids, cache, lengths)
        return self.logits(hidden), cache

    def step(self, tokens: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
        """One token per row, O(1) in the sequence length for SSM layers: tokens int (b,), each in [0, v) ->
        (logits float32 (b, v), cache)."""
        if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer (batch,), found shape {tokens.shape} dtype {tokens.dtype}")
        self._check_ids_in_vocab("tokens", tokens)
        hidden, cache = self.backbone.step(tokens, cache)
        return self.logits(hidden), cache

    def greedy_step(self, tokens: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
        """``step`` and the arg-max of its logits over the real vocabulary (``config.vocab_size``), without the
        logits: tokens int (b,) -> (next tokens int32 (b,), cache). The head's product and the arg-max are one pass
        over the head (``pallas_kernels.head_argmax``; XLA's arg-max of the logits off a GPU). ``generate`` decodes
        greedily with it where nothing else needs the logits (no scores, no repetition penalty)."""
        if tokens.ndim != 1 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer (batch,), found shape {tokens.shape} dtype {tokens.dtype}")
        self._check_ids_in_vocab("tokens", tokens)
        hidden, cache = self.backbone.step(tokens, cache)
        if self.config.tie_embeddings:
            head, layout = self.backbone.embedding.embedding[...], "vd"  # (v, d)
        else:
            head, layout = self.lm_head.kernel[...], "dv"  # (d, v)
        dtype = self.dtype or jnp.result_type(hidden, head)
        next_tokens = head_argmax(
            hidden.astype(dtype), head.astype(dtype), layout=layout, vocab_size=self.config.vocab_size
        )
        return next_tokens, cache

    def _check_ids_in_vocab(self, name: str, ids: jax.Array) -> None:
        """A ValueError naming the first id of ``ids`` outside [0, v), where ids is concrete and on this process's
        devices. Traced ids (under jit) are not checked: that would need their values on the host."""
        if isinstance(ids, jax.core.Tracer) or (isinstance(ids, jax.Array) and not ids.is_fully_addressable):
            return
        vocab = self.config.padded_vocab_size
        values = np.asarray(ids)
        bad = values[(values < 0) | (values >= vocab)]
        if bad.size:
            raise ValueError(f"{name} must be token ids in [0, {vocab}) (the padded vocabulary), found {bad[0]}")

    def logits(self, hidden: jax.Array) -> jax.Array:
        """The LM head: hidden (..., d), the final normed hidden states -> float32 logits (..., v). ``model(ids)`` is
        ``model.logits(model.backbone(ids))``; the training loss calls the two apart to compute the head in chunks."""
        if self.config.tie_embeddings:
            head = self.backbone.embedding.embedding[...].T  # (d, v)
        else:
            head = self.lm_head.kernel[...]  # (d, v)
        dtype = self.dtype or jnp.result_type(hidden, head)
        return head_product(hidden.astype(dtype), head.astype(dtype))


@jax.custom_vjp
def head_product(hidden: jax.Array, head: jax.Array) -> jax.Array:
    """hidden (..., d) @ head (d, v) -> float32 logits (..., v): products in the operands' (compute) dtype, accumulated
    and returned in float32. The backward's two products take the logits' float32 cotangent in that dtype too, as
    every other product of the model takes its cotangent (left to JAX they ran as float32 GEMMs, 10 ms of a Mamba-1
    370m bf16 training step on an H100; the step takes 1.6-1.9% less time this way, benchmarks/RESULTS.md). In
    float32 this is the plain product and its gradient."""
    return jnp.einsum("...d,dv->...v", hidden, head, preferred_element_type=jnp.float32)


def _head_product_fwd(hidden, head):
    return head_product(hidden, head), (hidden, head)


def _head_product_bwd(residuals, dlogits):
    hidden, head = residuals
    dlogits = dlogits.astype(hidden.dtype)
    dhidden = jnp.einsum("...v,dv->...d", dlogits, head, preferred_element_type=jnp.float32)
    dhead = jnp.einsum("...d,...v->dv", hidden, dlogits, preferred_element_type=jnp.float32)
    return dhidden.astype(hidden.dtype), dhead.astype(head.dtype)


head_product.defvjp(_head_product_fwd, _head_product_bwd)


def _init_for_language_model(model: nnx.Module, config: MambaConfig) -> None:
    """mamba_ssm's LM-level re-init on top of each module's own init: zero every linear bias except dt_proj's (its
    bias is the step-size init) and scale residual-branch output kernels (out_proj, fc2) by 1/sqrt(n_layer), GPT-2
    style, so the residual stream's variance does not grow with depth."""
    # 1/sqrt(n_layer) even with an MLP (d_intermediate > 0), not MixerModel's 1/sqrt(2 * n_layer): mamba_ssm's
    # MambaLMHeadModel.__init__ runs _init_weights a second time with the default n_residuals_per_layer=1, which
    # re-draws out_proj / fc2 (kaiming_uniform, a=sqrt(5): torch's default) and divides them by sqrt(n_layer).
    scale = 1.0 / math.sqrt(config.n_layer)
    linears = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]
    # set_raw_value, not set_value: flax's set_value compares the old and new values' shardings, and under
    # nnx.eval_shape reading a tracer's sharding scans the whole trace so far: 18 s for a 64-layer abstract model.
    for path, layer in linears:
        name = path[-1]
        if layer.bias is not None and name != "dt_proj":
            layer.bias.set_raw_value(jnp.zeros_like(layer.bias[...]))
        if name in ("out_proj", "fc2"):
            kernel = layer.kernel[...]
            layer.kernel.set_raw_value(kernel * jnp.asarray(scale, kernel.dtype))
