"""Multi-process (multi-host) training on CPU: ``python -m mamba_jax.train`` launched as 2 processes of 4 fake devices
each, joined by ``jax.distributed`` (gloo collectives), against the same run in this one process of 8 devices: the
same losses, checkpoints written by both processes together, and a run resumed by one process from them.

Process 1 reads the run directory a few seconds late: by then process 0 may have created ``checkpoints/``, which a
process must not mistake for a run to resume (that once deadlocked the two, now and then, on a loaded machine).
A bad input that only one process sees stops every process at start-up, at once (``agree_to_start``)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

from mamba_jax.train import train
from tests.test_train import MODEL, losses, run_config, saved_steps, write_corpus
from tests.tolerances import assert_close

PROCESSES, DEVICES_EACH = 2, 4  # 8 devices in all, as this process has (conftest.py)
REPO = Path(__file__).resolve().parent.parent
LAG_S = 5
# ``python -m mamba_jax.train``, with process 1 reading the run directory LAG_S seconds after process 0.
LAGGING_MAIN = f"""
import sys, time
import mamba_jax.train.prepare as prepare

read = prepare.run_meta


def read_late(*args, **kwargs):
    time.sleep({LAG_S})
    return read(*args, **kwargs)


if sys.argv[sys.argv.index("--process-id") + 1] == "1":
    prepare.run_meta = read_late
from mamba_jax.train.__main__ import main

sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(
    cfg, model_json: Path, timeout: float = 600, flags_of: dict[int, list[str]] | None = None
) -> list[subprocess.CompletedProcess]:
    """Run ``cfg`` as PROCESSES processes of ``python -m mamba_jax.train`` (LAGGING_MAIN) on one machine; their
    results, whatever their exit status. ``flags_of``: more flags for some processes, by process id (a flag given
    again overrides ``cfg``'s)."""
    flags = ["--model", str(model_json)]
    for name, value in cfg.to_dict().items():
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    flags += ["--coordinator-address", f"localhost:{free_port()}", "--num-processes", str(PROCESSES)]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "JAX_NUM_CPU_DEVICES": str(DEVICES_EACH),
        "JAX_PLATFORMS": "cpu",
        "JAX_DEFAULT_MATMUL_PRECISION": "highest",  # as conftest.py sets for this process
    }
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LAGGING_MAIN, *flags, "--process-id", str(i), *(flags_of or {}).get(i, [])],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    deadline, results = time.monotonic() + timeout, []
    try:
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:  # killed: its output still tells where it was
                proc.kill()
                out, err = proc.communicate()
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return results


def launch_ok(cfg, model_json: Path) -> list[subprocess.CompletedProcess]:
    """``launch``, every process of which must succeed."""
    results = launch(cfg, model_json)
    failed = [f"process {i} (exit {r.returncode}):\n{r.stderr[-3000:]}" for i, r in enumerate(results) if r.returncode]
    assert not failed, "\n".join(failed)
    return results


def records_of(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def eval_losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}


@pytest.mark.slow
def test_two_processes_train_as_one(tmp_path):
    write_corpus(tmp_path / "corpus")
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(MODEL.to_dict()))

    single = train(run_config(tmp_path, "single"), MODEL)
    launch_ok(run_config(tmp_path, "multi"), model_json)
    multi = records_of(tmp_path / "multi")
    # The same program over 8 devices either way; only the reductions' order across processes may differ.
    assert sorted(losses(multi)) == [1, 2, 3, 4] and sorted(eval_losses(multi)) == [2, 4]
    for got, expected in ((losses(multi), losses(single)), (eval_losses(multi), eval_losses(single))):
        for step, value in expected.items():
            assert_close(jnp.float32(got[step]), jnp.float32(value), jnp.float32, err_msg=f"step {step}")
    assert saved_steps(tmp_path / "multi") == [2, 4]

    # Both runs resumed by this one process: the two-process checkpoint restores like the one-process one.
    resumed_single = train(run_config(tmp_path, "single", steps=6))
    resumed_multi = train(run_config(tmp_path, "multi", steps=6))
    assert sorted(losses(resumed_multi)) == [5, 6]
    for step, value in losses(resumed_single).items():
        assert_close(jnp.float32(losses(resumed_multi)[step]), jnp.float32(value), jnp.float32, err_msg=f"step {step}")


# agree_to_start, three times over: process 1 fails its checks; both fail; each process claims to have found
# checkpoint step = its process id. Every process must refuse to start each time, with its own error if it had one.
AGREEMENTS = """
import sys
from mamba_jax.train.config import TrainConfig
from mamba_jax.train.distributed import agree_to_start, initialize_distributed

address, process_id = sys.argv[1], int(sys.argv[2])
initialize_distributed(TrainConfig(coordinator_address=address, num_processes=2, process_id=process_id))
own = OSError(f"process {process_id}'s own error")
for start, error in ((0, own if process_id == 1 else None), (0, own), (process_id, None)):
    try:
        agree_to_start(start, "runs/x", error)
    except Exception as e:
        print("raised", type(e).__name__, e)
"""


def test_processes_agree_to_start_or_all_stop():
    address = f"localhost:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGREEMENTS, address, str(i)], env=env, stdout=subprocess.PIPE, text=True
        )
        for i in range(PROCESSES)
    ]
    try:
        outputs = [proc.communicate(timeout=120)[0].splitlines() for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    outputs = [[line.removeprefix("raised ") for line in lines if line.startswith("raised ")] for lines in outputs]
    different = (
        "TrainError the processes found different checkpoints in --run-dir runs/x (newest step by process: [0, 1], "
        "0 = none): the run directory must be one directory that every host shares"
    )
    assert outputs[0] == [
        "TrainError process 1 of 2 failed its start-up checks, so process 0 stops too: read process 1's log for the "
        "error",
        "OSError process 0's own error",
        different,
    ]
    assert outputs[1] == ["OSError process 1's own error", "OSError process 1's own error", different]


@pytest.mark.parametrize("bad_input", ["data", "model"])
def test_a_bad_input_on_one_process_stops_every_process(tmp_path, bad_input):
    """Process 1 alone is given a data path (or a --model file) that does not exist: it fails its start-up checks
    with its own error, process 0 (whose checks pass) stops too, naming process 1, and both exit within seconds, not
    when a JAX timeout would end a process left waiting in a collective. Nothing is written."""
    write_corpus(tmp_path / "corpus")
    model_json = tmp_path / "model.json"
    model_json.write_text(json.dumps(MODEL.to_dict()))
    missing = tmp_path / "missing"
    flag, message = {
        "data": ("--data", f"error: data path '{missing}' does not exist"),
        "model": ("--model", f"error: --model {missing} is not a config file, and unknown preset"),
    }[bad_input]

    began = time.monotonic()
    results = launch(run_config(tmp_path, "multi"), model_json, timeout=120, flags_of={1: [flag, str(missing)]})
    elapsed = time.monotonic() - began
    assert [r.returncode for r in results] == [2, 2], [r.stderr[-3000:] for r in results]
    assert elapsed < 60, elapsed  # about 10 s; before, process 0 waited until killed
    assert message in results[1].stderr
    assert "error: process 1 of 2 failed its start-up checks" in results[0].stderr
    assert "read process 1's log" in results[0].stderr
    assert not (tmp_path / "multi").exists()
