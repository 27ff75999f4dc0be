"""The process environment of a run: joining a multi-process (multi-host) run, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from mamba_jax.train.config import TrainConfig, TrainError


def initialize_distributed(cfg: TrainConfig) -> None:
    """Join a multi-process run when flags or the environment describe one (no-op otherwise, or if already joined).

    Explicit ``coordinator_address`` / ``num_processes`` / ``process_id`` win; else JAX reads
    JAX_COORDINATOR_ADDRESS, or detects a SLURM / Open MPI launch of more than one task.
    """
    if jax.distributed.is_initialized():
        return
    explicit = cfg.coordinator_address is not None or cfg.num_processes is not None
    launched = (
        "JAX_COORDINATOR_ADDRESS" in os.environ
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if explicit or launched:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
        )


def check_same_start(start: int, run_dir: str) -> None:
    """Every process must resume from the same checkpoint step ``start`` (0: none): a collective over all processes.

    It is also the barrier between reading the run directory and writing it: no process creates ``checkpoints/``
    before every process has looked, so none mistakes another's fresh directory for a run to resume.
    """
    if jax.process_count() == 1:
        return
    starts = multihost_utils.process_allgather(np.int32(start)).tolist()
    if len(set(starts)) > 1:
        raise TrainError(
            f"the processes found different checkpoints in --run-dir {run_dir} (newest step by process: {starts}, "
            "0 = none): the run directory must be one directory that every host shares"
        )


class StopOnSigterm:
    """While active, SIGTERM (a preempted job) only sets a flag; the loop then saves a checkpoint and returns.

    The handler can only be installed from the main thread; elsewhere SIGTERM keeps its default action.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        """Whether any process got SIGTERM: all processes must save the same step together."""
        if jax.process_count() == 1:
            return self.requested
        return bool(np.max(multihost_utils.process_allgather(np.int32(self.requested))))
