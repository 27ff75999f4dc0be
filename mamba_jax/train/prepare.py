"""The start of a run: every check of the user's input, before anything is written.

``prepare_run(cfg, model_config)`` joins the processes, makes the mesh, reads the run directory's newest checkpoint,
loads the data, settles the model (the checkpoint's when resuming, else ``cfg.init_from``'s, else ``model_config``;
a ``model_config`` that differs from the checkpoint's or ``init_from``'s is an error, never silently replaced) and
checks the data's tokenizer against it. Then the processes agree to start (every process must have passed its checks
and found the same checkpoint) or all stop; only then are ``init_from``'s weights loaded and the run directory
created: a bad argument leaves nothing behind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
from jax.sharding import Mesh

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import check_batch_size, make_mesh
from mamba_jax.train.checkpoint import run_meta
from mamba_jax.train.config import TrainConfig, TrainError
from mamba_jax.train.data import ByteTokenizer, HFTokenizer, Split, load_streams, make_splits
from mamba_jax.train.distributed import agree_to_start, initialize_distributed


@dataclass(frozen=True)
class PreparedRun:
    """A checked run, for ``mamba_jax.train.loop.run_prepared``."""

    cfg: TrainConfig
    model_config: MambaConfig
    mesh: Mesh
    start: int  # the step of the checkpoint to resume from; 0: start afresh
    saved_train_config: dict | None  # that checkpoint's TrainConfig (as a dict)
    pretrained: MambaLMHeadModel | None  # cfg.init_from's model (float32 parameters), when not resuming
    train_split: Split
    eval_split: Split | None
    tokenizer: str | None  # the text data's tokenizer; None for token shards (unknown)


def prepare_run(cfg: TrainConfig, model_config: MambaConfig | None = None) -> PreparedRun:
    """Check ``cfg`` and ``model_config`` against the devices, the run directory and the data; then create the run
    directory. Errors in the user's input are ValueErrors (most of them TrainError) naming the argument or file.

    In a multi-process run each process checks its own view (its data, its files), then all of them agree to start
    or all stop (``agree_to_start``): a process whose checks fail raises its own error, the others a TrainError naming
    it, instead of waiting for it in a collective until a timeout. So between joining and agreeing, a check must not
    be a collective that a process which failed an earlier check would skip: ``init_from``'s weights (Orbax reads
    and placements, collectives) load after the agreement, and only checks that every process answers alike (the
    mesh, from the arguments; the shared run directory) come before reading a checkpoint (Orbax: a collective)."""
    initialize_distributed(cfg)
    start, error = 0, None
    try:
        mesh = make_mesh(cfg.mesh_data, cfg.mesh_fsdp, cfg.mesh_tensor)
        check_batch_size(cfg.micro_batch_size, mesh)
        run_dir = Path(cfg.run_dir)
        if run_dir.exists() and not run_dir.is_dir():
            raise TrainError(f"--run-dir {cfg.run_dir} is a file, not a directory")
        meta = run_meta(run_dir)
        start = 0 if meta is None else meta["step"]
        train_split, eval_split, tokenizer = load_data(cfg)
        model_config = chosen_model(cfg, meta, model_config)
        if tokenizer is not None:
            check_vocab(tokenizer, model_config)
    except Exception as e:  # raised again by agree_to_start, once every process knows that this one failed
        error = e
    agree_to_start(start, cfg.run_dir, error)  # raises unless every process passed

    pretrained = None
    if meta is None and cfg.init_from is not None:
        from mamba_jax.pretrained import load_pretrained  # only fine-tuning needs the converters

        pretrained = load_pretrained(cfg.init_from, mesh=mesh, dtype=jnp.float32)
    run_dir.mkdir(parents=True, exist_ok=True)
    return PreparedRun(
        cfg=cfg,
        model_config=model_config,
        mesh=mesh,
        start=start,
        saved_train_config=None if meta is None else meta["train_config"],
        pretrained=pretrained,
        train_split=train_split,
        eval_split=eval_split,
        tokenizer=None if tokenizer is None else tokenizer.name,
    )


def chosen_model(cfg: TrainConfig, meta: dict | None, requested: MambaConfig | None) -> MambaConfig:
    """The model to train: the checkpoint's (``meta``, when resuming), else ``cfg.init_from``'s, else ``requested``
    (from --model/--set); a ``requested`` model that differs from the checkpoint's or init_from's is a TrainError."""
    if meta is not None:
        return settled_model(
            MambaConfig.from_dict(meta["model_config"]),
            requested,
            holder=f"run dir {cfg.run_dir} holds a checkpoint (step {meta['step']}) that",
            label="checkpoint",
            advice="use a new --run-dir, or the same --model/--set (or none) to resume",
        )
    if cfg.init_from is not None:
        return settled_model(
            init_from_config(cfg.init_from),
            requested,
            holder=f"--init-from {cfg.init_from}",
            label="init-from",
            advice="leave out --model/--set to fine-tune it as it is",
        )
    if requested is None:
        raise TrainError(
            f"no model to train: give one (--model, --init-from), or a --run-dir holding a checkpoint to resume "
            f"({cfg.run_dir} has none)"
        )
    return requested


def init_from_config(source: str) -> MambaConfig:
    """The config of ``load_pretrained(source)``'s model, read without its weights (they load once every process
    has passed its checks): a converted checkpoint's config.json, else the config of the source it would convert."""
    from convert.formats import inspect_source  # only fine-tuning needs the converters
    from convert.hub import resolve_source
    from convert.pipeline import model_config
    from convert.writer import is_converted
    from mamba_jax.pretrained import read_config

    directory = Path(source).expanduser()
    if is_converted(directory):
        return read_config(directory)
    return model_config(inspect_source(resolve_source(source)))


def load_data(cfg: TrainConfig) -> tuple[Split, Split | None, ByteTokenizer | HFTokenizer | None]:
    """``cfg.data``'s windows split for training and evaluation, and its tokenizer (None for token shards)."""
    streams, tokenizer = load_streams(
        cfg.data, text_glob=cfg.text_glob, tokenizer=cfg.tokenizer, token_dtype=cfg.token_dtype
    )
    train_split, eval_split = make_splits(
        streams,
        seq_len=cfg.seq_len,
        batch_size=cfg.batch_size,
        eval_batch_size=cfg.micro_batch_size,
        eval_fraction=cfg.eval_fraction,
        seed=cfg.seed,
    )
    return train_split, eval_split, tokenizer


def differences(have: dict, want: dict, prefix: str = "") -> list[str]:
    """ "field HAVE vs WANT" for each field that differs between two config dicts; dict-valued fields (ssm_cfg,
    attn_cfg) compared key by key ("ssm_cfg.d_state 4 vs unset")."""
    found = []
    for key in [*have, *(key for key in want if key not in have)]:
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        elif a != b or (key in have) != (key in want):
            shown = [json.dumps(d[key]) if key in d else "unset" for d in (have, want)]
            found.append(f"{prefix}{key} {shown[0]} vs {shown[1]}")
    return found


def settled_model(
    have: MambaConfig, requested: MambaConfig | None, *, holder: str, label: str, advice: str
) -> MambaConfig:
    """``have``, the model of a checkpoint or of --init-from (``holder`` names which); TrainError naming the differing
    fields when ``requested`` (from --model/--set) is another model."""
    if requested is not None and requested != have:
        changes = ", ".join(differences(have.to_dict(), requested.to_dict()))
        raise TrainError(
            f"{holder} is a different model than --model/--set ask for ({label} vs asked: {changes}); {advice}"
        )
    return have


def check_vocab(tokenizer: ByteTokenizer | HFTokenizer, model_config: MambaConfig) -> None:
    """Every id the tokenizer gives (its EOS included) must be below the model's vocab_size: checked here, before
    training, rather than at the first batch holding a larger id."""
    needed = max(tokenizer.vocab_size, tokenizer.eos_id + 1)
    if needed > model_config.vocab_size:
        raise TrainError(
            f"the tokenizer {tokenizer.name!r} gives ids up to {needed - 1} (vocab_size {tokenizer.vocab_size}, EOS id "
            f"{tokenizer.eos_id}), but the model's vocab_size is {model_config.vocab_size}: the model needs "
            f"vocab_size >= {needed} (--set vocab_size={needed})"
        )
