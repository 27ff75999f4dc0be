"""Orbax checkpoints of a training run: asynchronous saves, the newest ``keep`` kept, restore onto any mesh.

A checkpoint at step s holds three items: ``params`` and ``opt_state`` (pure pytrees of arrays, each restored in
whatever sharding the caller's abstract target asks for, so a run saved on one mesh resumes on another) and
``meta`` (JSON: the train and model configs, the step, and the tokenizer of text data or None). Inference needs
only ``params``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import state_shardings
from mamba_jax.train.config import TrainError


class Checkpoints:
    """The checkpoints under ``directory`` (created if missing)."""

    def __init__(self, directory: str | Path, *, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict) -> bool:
        """Start writing step ``step`` in the background (call ``wait`` before reading it back). Returns whether a
        save started: a step already saved is skipped."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, params_target: Any, opt_state_target: Any | None = None, *, step: int | None = None):
        """(params, opt_state or None, meta) of ``step`` (default: the newest).

        The targets are abstract trees (``jax.ShapeDtypeStruct`` with ``sharding``) shaped like what was saved; the
        arrays come back in those shardings. Leave ``opt_state_target`` out to read the parameters only.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint under {self.directory}")
        items = {"params": ocp.args.StandardRestore(params_target), "meta": ocp.args.JsonRestore()}
        if opt_state_target is not None:
            items["opt_state"] = ocp.args.StandardRestore(opt_state_target)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        opt_state = restored["opt_state"] if opt_state_target is not None else None
        return restored["params"], opt_state, restored["meta"]

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata of ``step`` (default: the newest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"no checkpoint under {self.directory}")
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def run_meta(run_dir: str | Path, step: int | None = None) -> dict | None:
    """The metadata of checkpoint ``step`` (default: the newest) of a run directory; None when the run has no
    checkpoint. Creates nothing."""
    directory = Path(run_dir) / "checkpoints"
    if not directory.is_dir():
        return None
    checkpoints = Checkpoints(directory)
    try:
        return None if checkpoints.latest_step() is None else checkpoints.read_meta(step)
    finally:
        checkpoints.close()


def abstract_arrays(tree: Any, shardings: Any) -> Any:
    """Abstract arrays (shape, dtype, sharding) for a tree of arrays or ShapeDtypeStructs and a tree of shardings."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_model(
    run_dir: str | Path, *, step: int | None = None, mesh: Mesh | None = None, dtype=None
) -> MambaLMHeadModel:
    """The model of a training run's checkpoint ``step`` (default: the newest), for inference or export.

    Parameters stay float32 and are placed by their logical axes on ``mesh`` (default: the first device);
    ``dtype`` is the compute dtype (None: float32).
    """
    if not (Path(run_dir) / "checkpoints").is_dir():
        raise TrainError(f"{run_dir} is not a training run: it has no checkpoints/ folder")
    checkpoints = Checkpoints(Path(run_dir) / "checkpoints")
    try:
        config = MambaConfig.from_dict(checkpoints.read_meta(step)["model_config"])
        graphdef, state = nnx.split(nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0), dtype=dtype)))
        if mesh is None:
            shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), nnx.to_pure_dict(state))
        else:
            shardings = nnx.to_pure_dict(state_shardings(state, mesh))
        params, _, _ = checkpoints.restore(abstract_arrays(nnx.to_pure_dict(state), shardings), step=step)
    finally:
        checkpoints.close()
    return nnx.merge(graphdef, params)
