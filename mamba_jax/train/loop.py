"""The training loop: a sharded model, AdamW, deterministic data, logging, evaluation and Orbax checkpoints.

``train(cfg, model_config)`` runs (or resumes) the run in ``cfg.run_dir`` and returns the logged records: it checks
everything (``prepare.prepare_run``), then trains (``run_prepared``). A run directory holds ``checkpoints/<step>/``
(Orbax) and ``metrics.jsonl`` (one JSON record per log or eval line).

The state of a run is the parameters and the optimizer state (pure pytrees of arrays, sharded by the rules in
``mamba_jax.sharding``) and the step number. The data of a step is a function of the step, so restoring those
reproduces an uninterrupted run exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import drop_mesh_axis, kernel_split, named_sharding, shard_model, state_shardings
from mamba_jax.train.checkpoint import Checkpoints, abstract_arrays
from mamba_jax.train.config import TrainConfig, TrainError
from mamba_jax.train.data import Split
from mamba_jax.train.distributed import StopOnSigterm
from mamba_jax.train.optim import learning_rate, make_optimizer, opt_state_shardings
from mamba_jax.train.prepare import PreparedRun, prepare_run
from mamba_jax.train.progress import Progress
from mamba_jax.train.remat import apply_remat


def next_token_loss(model: nnx.Module, tokens: jax.Array, loss_chunk: int = 0) -> jax.Array:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``tokens[:, :-1]``. tokens (b, l + 1) int32 -> ().

    The float32 logits (b, l, v) and their gradient are the largest activations of a small model (3.3 GB each at
    8 x 2048 x 50,280). With ``loss_chunk`` > 0 the LM head and the cross-entropy run on ``loss_chunk`` positions at
    a time under a ``lax.scan`` whose body is rematerialised (its logits recomputed in the backward instead of kept),
    so one chunk's logits exist at a time. The result is the same sum, up to float32 rounding."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, length = targets.shape
    if not loss_chunk or loss_chunk >= length:
        return optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets).mean()
    hidden = model.backbone(inputs)  # (b, l, d)
    chunks = -(-length // loss_chunk)
    pad = chunks * loss_chunk - length
    # (chunks, b, c, ...) with the padded positions masked out of the sum
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, chunks, loss_chunk, -1).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, chunks, loss_chunk).swapaxes(0, 1)
    valid = (jnp.arange(chunks * loss_chunk) < length).reshape(chunks, 1, loss_chunk)
    graphdef, state = nnx.split(model)

    @jax.checkpoint
    def chunk_loss(total, chunk):
        hidden, targets, valid = chunk
        logits = nnx.merge(graphdef, state).logits(hidden)  # (b, c, v) float32
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return total + jnp.where(valid, losses, 0.0).sum(), None

    total, _ = jax.lax.scan(chunk_loss, jnp.zeros((), jnp.float32), (hidden, targets, valid))
    return total / (batch * length)


def gather_params(params, param_shardings, compute_dtype=None):
    """FSDP's gather, written out: every parameter stored split over the "fsdp" mesh axis, cast to ``compute_dtype``
    and gathered whole over the fsdp devices (still split over "tensor"), for the forward and backward to use.

    Why explicit: left to itself, XLA's sharding propagation followed the fsdp-split ``embed`` dimension of the
    weights into the activations (the (b, l, v) logits were all-reduced and all-gathered in float32, the in_proj
    output all-reduced): traffic that grows with the tokens, not the parameters. With the weights constrained whole,
    activations stay split over the batch only, and the only collectives left are the weights' all-gathers and their
    gradients' reduce-scatters (the transpose of this gather). The fsdp-split parameters are the d_model-wide
    matrices and biases (logical axis "embed": linear layers and the embedding), all of which the model casts to its
    compute dtype before use, so casting before the gather changes no result and halves the bytes gathered.
    Parameters not split over fsdp pass through unchanged. Leaves match ``param_shardings`` (NamedShardings).
    """

    def gather(x, sharding):
        if "fsdp" not in jax.tree.leaves(tuple(sharding.spec)):
            return x
        dtype = compute_dtype or x.dtype
        whole = drop_mesh_axis(sharding, "fsdp")

        @jax.custom_vjp
        def cast_and_gather(x):
            # The first constraint keeps the cast on the shards, so the all-gather moves compute_dtype bytes.
            return jax.lax.with_sharding_constraint(jax.lax.with_sharding_constraint(x.astype(dtype), sharding), whole)

        def backward(_, grad):
            # Straight to the stored sharding: each device's partial gradient is reduce-scattered, never all-reduced.
            return (jax.lax.with_sharding_constraint(grad, sharding).astype(x.dtype),)

        cast_and_gather.defvjp(lambda x: (cast_and_gather(x), None), backward)
        return cast_and_gather(x)

    return jax.tree.map(gather, params, param_shardings)


def mesh_of(param_shardings) -> Mesh:
    """The mesh of a pytree of NamedShardings (the parameters'), where the step's kernels split their work."""
    shardings = jax.tree.leaves(param_shardings)
    named = all(isinstance(sharding, NamedSharding) for sharding in shardings)
    meshes = {sharding.mesh for sharding in shardings} if named else set()
    if len(meshes) != 1:
        raise ValueError(
            f"param_shardings must be NamedShardings on one mesh (mamba_jax.sharding.state_shardings), found "
            f"{len(meshes)} meshes and {sorted({type(s).__name__ for s in shardings})}"
        )
    return meshes.pop()


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, param_shardings, compute_dtype=None, loss_chunk: int = 0
) -> Callable:
    """The step (params, opt_state, tokens (accum, b, l + 1)) -> (params, opt_state, metrics), to be jitted.

    The parameters are gathered for use by ``gather_params`` (cast to ``compute_dtype``, the model's activation
    dtype, or None to keep their own). Gradients of the ``accum`` micro-batches are summed in float32 under a scan,
    then averaged; they are pinned to the parameters' shardings (with FSDP: reduce-scattered, never whole on one
    device), so the optimizer update runs on each device's shard only. The Pallas kernels run on each device's share
    under ``kernel_split`` (the parameters' mesh). ``loss_chunk``: see ``next_token_loss``."""

    mesh = mesh_of(param_shardings)

    def loss_fn(params, tokens):
        model = nnx.merge(graphdef, gather_params(params, param_shardings, compute_dtype))
        return next_token_loss(model, tokens, loss_chunk)

    def step(params, opt_state, tokens):
        def accumulate(carry, micro_batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, micro_batch)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        # The kernels' backward is traced while the gradient is taken: the whole of it inside the split's context.
        with kernel_split(mesh):
            # The first micro-batch's gradients start the sum (no zero-filled float32 copy of the parameters).
            loss, grads = jax.value_and_grad(loss_fn)(params, tokens[0])
            if tokens.shape[0] > 1:
                (loss, grads), _ = jax.lax.scan(accumulate, (loss, grads), tokens[1:])
        loss, grads = jax.tree.map(lambda x: x / tokens.shape[0], (loss, grads))
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return step


def make_eval_step(graphdef: nnx.GraphDef, param_shardings, compute_dtype=None, loss_chunk: int = 0) -> Callable:
    """(params, tokens (b, l + 1)) -> mean loss (), jitted; the parameters gathered as in ``make_train_step``."""

    mesh = mesh_of(param_shardings)

    def eval_step(params, tokens):
        model = nnx.merge(graphdef, gather_params(params, param_shardings, compute_dtype))
        with kernel_split(mesh):
            return next_token_loss(model, tokens, loss_chunk)

    return jax.jit(eval_step)


def device_batch(split: Split, step: int, shape: tuple[int, ...], sharding: NamedSharding, vocab_size: int):
    """Batch ``step`` of ``split`` as a global array of ``shape`` ([accum,] b, l + 1) in ``sharding``.

    Each process reads only the rows its own devices hold, so this is also the multi-host loader.
    """
    rows_shape = shape[:-1]

    def fetch(index: tuple[slice, ...]) -> np.ndarray:
        rows = np.arange(math.prod(rows_shape)).reshape(rows_shape)[index[:-1]]
        tokens = split.rows(step, rows.reshape(-1)).reshape(*rows.shape, shape[-1])[..., index[-1]]
        if tokens.max(initial=0) >= vocab_size:
            raise TrainError(
                f"token id {tokens.max()} in the data (batch {step}) is >= the model's vocab_size {vocab_size}: "
                "token shards written for a larger vocabulary, or read with the wrong --token-dtype"
            )
        return tokens

    return jax.make_array_from_callback(shape, sharding, fetch)


def _initial_state(run: PreparedRun, checkpoints: Checkpoints):
    """(graphdef, tx, params, opt_state, shardings of both) of a run: resumed from checkpoint ``run.start`` (> 0),
    fine-tuned from ``run.pretrained``, or fresh. Every array is created or restored in its sharding."""
    cfg, mesh = run.cfg, run.mesh
    dtype = jnp.dtype(cfg.dtype)

    def model_fn() -> MambaLMHeadModel:
        model = MambaLMHeadModel(run.model_config, rngs=nnx.Rngs(cfg.seed), dtype=dtype, param_dtype=jnp.float32)
        return apply_remat(model, cfg.remat)

    if run.start:  # abstract: the checkpoint fills it below
        graphdef, state = nnx.split(nnx.eval_shape(model_fn))
    elif run.pretrained is not None:  # float32 pretrained weights, computing in ``dtype``
        graphdef, state = nnx.split(nnx.eval_shape(model_fn))[0], nnx.state(run.pretrained)
    else:
        graphdef, state = nnx.split(shard_model(model_fn, mesh))
    param_shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    params = nnx.to_pure_dict(state)

    tx = make_optimizer(cfg, params)
    opt_shardings = opt_state_shardings(tx, params, param_shardings, mesh)
    if run.start:
        params, opt_state, _ = checkpoints.restore(
            abstract_arrays(params, param_shardings),
            abstract_arrays(jax.eval_shape(tx.init, params), opt_shardings),
            step=run.start,
        )
    else:
        params = jax.device_put(params, param_shardings)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return graphdef, tx, params, opt_state, param_shardings, opt_shardings


def train(cfg: TrainConfig, model_config: MambaConfig | None = None) -> list[dict]:
    """Train (or resume) the run in ``cfg.run_dir``; returns the records also appended to ``metrics.jsonl``.

    The model is ``MambaLMHeadModel(model_config)`` with float32 parameters computing in ``cfg.dtype``, initialised
    from ``cfg.seed``, or loaded from ``cfg.init_from`` (then ``model_config`` may be None). A run directory that
    holds checkpoints is resumed from the newest one, with the model config stored there (``model_config``, if
    given, must be the same).
    """
    records, _ = run_prepared(prepare_run(cfg, model_config))
    return records


def run_prepared(run: PreparedRun) -> tuple[list[dict], bool]:
    """Train a checked run from its start step to ``cfg.steps``: (the records, whether SIGTERM stopped it early).

    However it ends (done, SIGTERM, an error, Ctrl-C), the saves in flight are finished before it returns or the
    error goes on: the newest checkpoint is whole, and no save is left to a shutting-down interpreter."""
    cfg = run.cfg
    if run.start >= cfg.steps:
        if jax.process_index() == 0:
            print(f"run already at step {run.start} (>= --steps {cfg.steps}): nothing to do")
        return [], False
    checkpoints = Checkpoints(Path(cfg.run_dir) / "checkpoints", keep=cfg.keep)
    try:
        return _train_steps(run, checkpoints)
    finally:
        checkpoints.wait()
        checkpoints.close()


def _train_steps(run: PreparedRun, checkpoints: Checkpoints) -> tuple[list[dict], bool]:
    """The loop of ``run_prepared``; saves with ``checkpoints`` (whose saves the caller waits for)."""
    cfg, mesh, model_config, start = run.cfg, run.mesh, run.model_config, run.start
    graphdef, tx, params, opt_state, param_shardings, opt_shardings = _initial_state(run, checkpoints)
    n_params = sum(x.size for x in jax.tree.leaves(params))

    # Data: (accum, micro batch, seq_len + 1) token arrays, the micro batch split over the mesh's batch axes.
    train_shape = (cfg.grad_accum, cfg.micro_batch_size, cfg.seq_len + 1)
    train_sharding = named_sharding((None, "batch", None), train_shape, mesh)
    eval_sharding = named_sharding(("batch", None), train_shape[1:], mesh)

    train_step = jax.jit(
        make_train_step(graphdef, tx, param_shardings, jnp.dtype(cfg.dtype), cfg.loss_chunk),
        donate_argnums=(0, 1),
        out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())),
    )
    eval_step = make_eval_step(graphdef, param_shardings, jnp.dtype(cfg.dtype), cfg.loss_chunk)
    schedule = jax.jit(learning_rate(cfg))  # read at every log line: one compilation, not one per op

    def evaluate(step: int) -> None:
        if run.eval_split is None or cfg.eval_batches == 0:
            return
        batches = (
            device_batch(run.eval_split, i, train_shape[1:], eval_sharding, model_config.vocab_size)
            for i in range(cfg.eval_batches)
        )
        loss = float(np.mean(jax.device_get([eval_step(params, batch) for batch in batches])))
        progress.write({"step": step, "eval_loss": loss, "eval_ppl": math.exp(min(loss, 80.0))})

    pending: list[dict] = []  # metrics of the steps since the last log line, still on the devices
    stopping = False
    with Progress(cfg, n_params, start) as progress, StopOnSigterm() as sigterm:
        progress.message(
            f"{n_params / 1e6:.2f}M parameters, mesh {dict(mesh.shape)}, {cfg.tokens_per_step} tokens per step, "
            f"{len(run.train_split.indices)} training windows" + (f", resuming after step {start}" if start else "")
        )
        changed = cfg.trajectory_changes(run.saved_train_config) if start else []
        if changed:
            progress.message(f"settings changed since the checkpoint: {changed} (not an exact continuation)")
        for step in range(start, cfg.steps):
            tokens = device_batch(run.train_split, step, train_shape, train_sharding, model_config.vocab_size)
            params, opt_state, metrics = train_step(params, opt_state, tokens)
            pending.append(metrics)
            done = step + 1
            if progress.clock is None:  # the first step compiled: time from its end
                jax.block_until_ready(metrics)
                progress.restart_clock()
            else:
                progress.steps_timed += 1
            progress.bar.update(1)
            if done % cfg.log_every == 0 or done == cfg.steps:
                host = jax.device_get(pending)
                progress.train(done, [m["loss"] for m in host], float(host[-1]["grad_norm"]), float(schedule(step)))
                pending = []
            if done % cfg.eval_every == 0 or done == cfg.steps:
                evaluate(done)
                progress.restart_clock()
            stopping = sigterm.any_process()
            if done % cfg.save_every == 0 or done == cfg.steps or stopping:
                meta = {
                    "step": done,
                    "train_config": cfg.to_dict(),
                    "model_config": model_config.to_dict(),
                    "tokenizer": run.tokenizer,
                }
                checkpoints.save(done, params, opt_state, meta)
                progress.restart_clock()
            if stopping:
                progress.message(f"SIGTERM: saved step {done}, stopping")
                break
    return progress.records, stopping
