"""The optimizer: AdamW with linear warmup and cosine decay, global-norm clipping, and a weight-decay mask.

Parameters are a pure nested dict (``nnx.to_pure_dict``), so the mask is a dict of bools by path.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mamba_jax.train.config import TrainConfig

# Leaf names never decayed, as in mamba_ssm (``_no_weight_decay`` on A_log, D, dt_bias) and the GPT recipe (biases).
NO_DECAY_LEAVES = frozenset({"bias", "A_log", "D", "dt_bias"})


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """0 -> ``lr`` linearly over ``warmup_steps``, then cosine down to ``lr * min_lr_ratio`` at step ``steps``."""
    warmup = min(cfg.warmup_steps, cfg.steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.lr,
        warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def decays(path: Sequence) -> bool:
    """Whether the parameter at ``path`` (its keys from the root) gets weight decay.

    Not decayed: the leaves named in NO_DECAY_LEAVES and every parameter of a norm (a module whose name contains
    "norm": ``norm``, ``norm_f``, ``norm2``, the gated norm inside a Mamba-2 mixer).
    """
    names = [str(getattr(key, "key", key)) for key in path]
    return names[-1] not in NO_DECAY_LEAVES and not any("norm" in name for name in names[:-1])


def weight_decay_mask(params) -> dict:
    """A tree like ``params`` (a pure dict) with True where the parameter is decayed."""
    return jax.tree_util.tree_map_with_path(lambda path, _: decays(path), params)


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    """Clip the global gradient norm to ``clip_norm``, then AdamW with the schedule and the decay mask."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(
            learning_rate(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask(params),
        ),
    )


def opt_state_shardings(tx: optax.GradientTransformation, params, param_shardings, mesh: Mesh):
    """Shardings of ``tx``'s state for ``params``: moments shard like their parameters; counters are replicated."""
    return optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        jax.eval_shape(tx.init, params),
        param_shardings,
        transform_non_params=lambda _: NamedSharding(mesh, PartitionSpec()),
    )
