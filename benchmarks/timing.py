"""Timing helpers shared by the benchmarks: median wall time of a jitted function on the device, and XLA's own
memory accounting of the compiled program."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import jax


def time_ms(fn: Callable, *args, reps: int = 50, warmup: int = 3) -> dict[str, float]:
    """Median / 10th / 90th percentile milliseconds of ``fn(*args)``, synchronising on its outputs each call.

    ``fn`` should be jitted; the warm-up calls keep compilation out of the numbers.
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {
        "median_ms": statistics.median(samples),
        "p10_ms": samples[len(samples) // 10],
        "p90_ms": samples[(9 * len(samples)) // 10],
    }


def compiled_memory_gib(fn: Callable, *args) -> float:
    """Bytes XLA plans for arguments, outputs and temporaries of the compiled ``fn(*args)``, in GiB."""
    stats = fn.lower(*args).compile().memory_analysis()
    if stats is None:
        return float("nan")
    total = stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
    return total / 2**30


def environment() -> dict[str, str]:
    """Device and versions, for the results table."""
    import flax

    device = jax.devices()[0]
    return {
        "device": getattr(device, "device_kind", str(device)),
        "jax": jax.__version__,
        "flax": flax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def gpu_kernels(trace_dir: str) -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every GPU kernel in the newest perfetto trace under ``trace_dir`` (as
    ``jax.profiler.trace(trace_dir, create_perfetto_trace=True)`` writes it), in start order."""
    path = max(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
    kernels = [
        (e["name"], e["ts"], e["dur"]) for e in events if e.get("ph") == "X" and e.get("pid") in gpu and e.get("dur")
    ]
    if not kernels:
        raise ValueError(f"no GPU kernel events in {path} (processes: {sorted(set(names.values()))})")
    return sorted(kernels, key=lambda k: k[1])


def time_by_name(kernels: list[tuple[str, float, float]], per: float) -> collections.Counter:
    """Each kernel name's total duration in ``gpu_kernels``' list (us), divided by ``per`` (the calls, steps or loops
    traced, times 1e3 for ms)."""
    totals = collections.Counter()
    for name, _, duration in kernels:
        totals[name] += duration / per
    return totals


def busy_fraction(kernels: list[tuple[str, float, float]]) -> tuple[float, float]:
    """(the fraction of the traced span in which some kernel ran, the span in us) of ``gpu_kernels``' list."""
    busy, end = 0.0, float("-inf")
    for _, start, duration in kernels:
        busy += max(0.0, start + duration - max(start, end))
        end = max(end, start + duration)
    span = max(start + duration for _, start, duration in kernels) - kernels[0][1]
    return busy / span, span


def gpu_ms(fn, args, reps):
    """GPU time a call in ms: every kernel of ``reps`` calls in one trace, summed, over ``reps``."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace:
        with jax.profiler.trace(trace, create_perfetto_trace=True):
            for _ in range(reps):
                out = fn(*args)
            jax.block_until_ready(out)
        return sum(duration for _, _, duration in gpu_kernels(trace)) / reps / 1e3
