"""The process environment of a run: joining a multi-process (multi-host) run, and stopping cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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


def agree_to_start(start: int, run_dir: str, error: Exception | None = None) -> None:
    """The end of start-up: every process has run its own checks (``error``: the one they raised, None if they
    passed) and found the newest checkpoint step ``start`` (0: none); one collective tells every process how all the
    others did, so that all of them start, or all of them stop.

    If any process failed, every process raises: a failed one its own ``error``, the others a TrainError naming the
    failed processes (whose logs say why). An error on one process never leaves the others waiting in a collective
    until a timeout. Then every process must resume from the same ``start``: a TrainError otherwise.

    It is also the barrier between reading the run directory and writing it: no process creates ``checkpoints/``
    before every process has looked, so none mistakes another's fresh directory for a run to resume. With one
    process it only raises ``error``.
    """
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    try:
        rows = gather_from_processes(np.array([error is not None, start], np.int32)).tolist()
    except Exception:
        if error is None:
            raise
        # The collective broke (another process died?): this process's own error is still the one to show.
    if error is not None:
        raise error
    failed = [i for i, (flag, _) in enumerate(rows) if flag]
    if len(failed) == 1:
        raise TrainError(
            f"process {failed[0]} of {len(rows)} failed its start-up checks, so process {jax.process_index()} stops "
            f"too: read process {failed[0]}'s log for the error"
        )
    if failed:
        raise TrainError(
            f"processes {', '.join(map(str, failed))} of {len(rows)} failed their start-up checks, so process "
            f"{jax.process_index()} stops too: read their logs for the errors"
        )
    starts = [start for _, start in rows]
    if len(set(starts)) > 1:
        raise TrainError(
            f"the processes found different checkpoints in --run-dir {run_dir} (newest step by process: {starts}, "
            "0 = none): the run directory must be one directory that every host shares"
        )


def gather_from_processes(row: np.ndarray) -> np.ndarray:
    """``row`` of every process, stacked in process order: (process_count, *row.shape). A collective.

    It runs on one device per process. ``multihost_utils.process_allgather(row)`` runs one collective per local device
    and returns when this process's first one is done: a process that then exits (as all do when one fails to start)
    can leave another's still waiting for it (seen on CPU: a process hung at exit, in gloo's connect)."""
    first = {}
    for device in jax.devices():
        first.setdefault(device.process_index, device)
    mesh = Mesh(np.array([first[i] for i in range(jax.process_count())]), ("processes",))
    rows = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("processes")), row[None])
    return multihost_utils.process_allgather(rows, tiled=True)


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
        return bool(np.max(gather_from_processes(np.array([self.requested], np.int32))))
