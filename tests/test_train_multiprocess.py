"""Multi-process (multi-host) training on CPU: ``python -m mamba_jax.train`` launched as 2 processes of 4 fake devices
each, joined by ``jax.distributed`` (gloo collectives), against the same run in this one process of 8 devices: the
same losses, checkpoints written by both processes together, and a run resumed by one process from them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from mamba_jax.train import train
from tests.test_train import MODEL, losses, run_config, saved_steps, write_corpus
from tests.tolerances import assert_close

PROCESSES, DEVICES_EACH = 2, 4  # 8 devices in all, as this process has (conftest.py)
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(cfg, model_json: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """Run ``cfg`` as PROCESSES processes of ``python -m mamba_jax.train`` on one machine; their results."""
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
            [sys.executable, "-m", "mamba_jax.train", *flags, "--process-id", str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(PROCESSES)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i} failed:\n{result.stderr[-3000:]}"
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
    launch(run_config(tmp_path, "multi"), model_json)
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
