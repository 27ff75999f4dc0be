"""Progress of a run: the progress bar, one JSON record per log or eval line in ``metrics.jsonl``, and throughput
(tokens/s and model FLOPs utilisation) measured between log points."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np
from tqdm.auto import tqdm

from mamba_jax.train.config import TrainConfig

# Dense bf16 peak per device in TFLOP/s, matched in order against ``device_kind`` (e.g. "NVIDIA H100 80GB HBM3").
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))


def peak_tflops(cfg: TrainConfig) -> float | None:
    """Peak TFLOP/s of one device: ``cfg.peak_tflops`` if given, else from PEAK_TFLOPS, else None (no MFU)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    kind = jax.devices()[0].device_kind
    return next((peak for name, peak in PEAK_TFLOPS if name in kind), None)


class Progress:
    """Writes records (process 0 only) and times training between log points. A context manager: closes the bar.

    Model FLOPs per token are 6 * parameters (2 forward, 4 backward), the usual estimate; the scan's own FLOPs are
    not counted. MFU divides by the peak of all devices together.
    """

    def __init__(self, cfg: TrainConfig, n_params: int, start: int):
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        self.main = jax.process_index() == 0
        self.bar = tqdm(total=cfg.steps, initial=start, disable=not self.main, desc="train", dynamic_ncols=True)
        self.records: list[dict] = []
        peak = peak_tflops(cfg)
        self.flops_per_token = 6 * n_params
        self.peak_flops = None if peak is None else peak * 1e12 * jax.device_count()
        self.tokens_per_step = cfg.tokens_per_step
        self.clock: float | None = None
        self.steps_timed = 0

    def restart_clock(self) -> None:
        """Time afresh from now (after compilation, evaluation or a save: they are not training throughput)."""
        self.clock = time.perf_counter()
        self.steps_timed = 0

    def message(self, text: str) -> None:
        if self.main:
            self.bar.write(text)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def train(self, step: int, losses: list[float], grad_norm: float, lr: float) -> None:
        """Log the mean loss of the steps since the last log (their results already on the host: all done)."""
        record = {"step": step, "loss": float(np.mean(losses)), "grad_norm": grad_norm, "lr": lr}
        if self.clock is not None and self.steps_timed:
            tokens_per_s = self.steps_timed * self.tokens_per_step / (time.perf_counter() - self.clock)
            record["tokens_per_s"] = tokens_per_s
            if self.peak_flops is not None:
                record["mfu"] = self.flops_per_token * tokens_per_s / self.peak_flops
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
        self.write(record)
        self.restart_clock()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on an error: the bar's line is finished before the error is printed
