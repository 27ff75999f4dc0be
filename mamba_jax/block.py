"""Block: one pre-norm residual layer of the language model, with mamba_ssm's residual semantics
(``modules/block.py``). Shapes: b batch, l seqlen, d d_model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba_jax.layers import RMSNorm
from pallas_kernels.mamba_step import settled


class Block(nnx.Module):
    """residual = hidden + residual; hidden = mixer(norm(residual)) [; residual += hidden; hidden = mlp(norm2(...))].

    mamba_ssm carries the residual stream separately from the branch output, so a block returns both and the next
    block (or the final norm) adds them. With ``residual_in_fp32`` the residual is kept in float32, so the sum never
    rounds to a 16-bit activation dtype. ``mixer`` and ``mlp`` are any modules mapping (b, l, d) -> (b, l, d);
    ``norm`` / ``norm2`` are RMSNorm or LayerNorm and set the dtype the mixer / mlp see.
    """

    def __init__(
        self,
        mixer: nnx.Module,
        norm: nnx.Module,
        mlp: nnx.Module | None = None,
        norm2: nnx.Module | None = None,
        *,
        residual_in_fp32: bool = True,
    ):
        if (mlp is None) != (norm2 is None):
            raise ValueError(
                f"Block: mlp and norm2 come together, found mlp={type(mlp).__name__}, norm2={type(norm2).__name__}"
            )
        self.norm = norm
        self.mixer = mixer
        self.norm2 = norm2
        self.mlp = mlp
        self.residual_in_fp32 = residual_in_fp32

    def _add_and_norm(self, norm: nnx.Module, hidden: jax.Array, residual: jax.Array | None):
        """-> (norm(hidden + residual), hidden + residual), the sum in float32 when residual_in_fp32 (as mamba_ssm's
        fused add + norm kernel computes it); hidden (b, [l,] d) or a step's ``PartialSums``."""
        _check_residual(hidden, residual)
        hidden = settled(hidden)
        if self.residual_in_fp32:
            hidden = hidden.astype(jnp.float32)
        residual = hidden if residual is None else hidden + residual
        return norm(residual), residual

    def __call__(self, hidden: jax.Array, residual: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """hidden (b, l, d), residual (b, l, d) or None (first block) -> (hidden, residual), both (b, l, d).

        hidden is the last branch's output; the block's full output is hidden + residual.
        """
        hidden_normed, residual = self._add_and_norm(self.norm, hidden, residual)
        hidden = self.mixer(hidden_normed)
        if self.mlp is not None:
            hidden_normed, residual = self._add_and_norm(self.norm2, hidden, residual)
            hidden = self.mlp(hidden_normed)
        return hidden, residual

    # ---- decoding: the mixer's cache threaded through (mamba_jax.generation.cache) ----

    def init_cache(self, batch: int, max_len: int, dtype, state_dtype=jnp.float32):
        """The mixer's empty decode cache for ``max_len`` positions."""
        return self.mixer.init_cache(batch, max_len, dtype, state_dtype)

    def prefill(self, hidden: jax.Array, residual: jax.Array | None, cache, lengths: jax.Array | None):
        """As ``__call__`` with the mixer's ``prefill``: hidden, residual (b, l, d), lengths (b,) or None (every row
        full) -> (hidden, residual, cache)."""
        return self._with_mixer(lambda x: self.mixer.prefill(x, cache, lengths), hidden, residual)

    def step(self, hidden: jax.Array, residual: jax.Array | None, cache):
        """As ``__call__`` for one token with the mixer's ``step``: hidden, residual (b, d) -> (hidden, residual,
        cache).

        With an RMSNorm, a float32 residual and a mixer that has ``normed_step`` (Mamba, Mamba2), the add and the
        norm run inside the mixer's step (``PreNorm``: where the step runs as kernels, in its first kernel or in one
        launch before XLA's in_proj, instead of XLA's three to four); XLA's ops compute the same as the unfused path,
        the kernels sum the squares in another order. Without an MLP the mixer may return its output as a
        ``PartialSums`` (out_proj's parts, for the next block's norm launch to add: one launch less a layer); hidden
        may be one, and every consumer adds the parts (``settled``) unless its kernels do."""
        if self.residual_in_fp32 and isinstance(self.norm, RMSNorm) and hasattr(self.mixer, "normed_step"):
            _check_residual(hidden, residual)
            partial_out = self.mlp is None
            hidden, residual, cache = self.mixer.normed_step(hidden, residual, self.norm, cache, partial_out)
            return (*self._mlp_branch(hidden, residual), cache)
        return self._with_mixer(lambda x: self.mixer.step(x, cache), hidden, residual)

    def _with_mixer(self, mixer_fn, hidden: jax.Array, residual: jax.Array | None):
        """``__call__``'s data flow with ``mixer_fn(x) -> (y, cache)`` as the mixer."""
        hidden_normed, residual = self._add_and_norm(self.norm, hidden, residual)
        hidden, cache = mixer_fn(hidden_normed)
        return (*self._mlp_branch(hidden, residual), cache)

    def _mlp_branch(self, hidden: jax.Array, residual: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(hidden, residual) after the MLP branch, if the block has one."""
        if self.mlp is not None:
            hidden_normed, residual = self._add_and_norm(self.norm2, hidden, residual)
            hidden = self.mlp(hidden_normed)
        return hidden, residual


def _check_residual(hidden, residual: jax.Array | None) -> None:
    """A ValueError unless residual is None or has hidden's shape (hidden an array or a ``PartialSums``): a block
    adds the two, and a size-1 dimension of either would broadcast."""
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"Block: residual must have hidden's shape {hidden.shape}, found {residual.shape}")
