"""Compile time of a sharded Mamba-1 training step against its layer count, with the Pallas scan's kernels split
over the devices by a ``custom_partitioning`` rule (``pallas_kernels.batch_split.over_batch`` on Auto mesh axes) or
under ``shard_map`` (the training step's ``kernel_split``), and how often the rule is asked to partition.

    PYTHONPATH=. python3 benchmarks/partition_compile.py --layers 2,4,8 --devices 1,2 --paths partitioned,shard_map

Runs on a CPU: ``--devices`` fake host devices, FSDP over them (``benchmarks/scaling.py``'s step, compiled for
abstract inputs), the scan forced to ``implementation="pallas"`` (Pallas's interpreter off a GPU). Each row runs in a
fresh process. On one device nothing is split; on more, every partition request makes JAX lower the kernels into a
module of their own again, so with the rule the compile time grows faster with the layers; under shard_map the
kernels are lowered once with the rest of the program.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time

CONFIG = dict(d_model=64, vocab_size=256)  # a small Mamba-1: the kernels' lowering, not XLA's work, is what grows


class PartitionRequests(logging.Handler):
    """While entered: counts the partition requests XLA makes of ``over_batch``'s custom_partitioning rule (the
    rule's debug record, "... on each device's share ...", on the "pallas_kernels" logger, set to DEBUG meanwhile)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record):
        self.count += "on each device's share" in record.getMessage()

    def __enter__(self):
        logger = logging.getLogger("pallas_kernels")
        self.level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("pallas_kernels")
        logger.removeHandler(self)
        logger.setLevel(self.level)


def child(layers: int, devices: int, path: str) -> dict:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    import importlib

    from benchmarks import scaling
    from mamba_jax import MambaConfig
    from mamba_jax.train import loop

    if path == "partitioned":  # the training step without its kernel_split: the rule splits the kernels
        loop.kernel_split = lambda mesh: contextlib.nullcontext()

    api = importlib.import_module("pallas_kernels.selective_scan.api")
    api.default_implementation = lambda: "pallas"
    config = MambaConfig(n_layer=layers, **CONFIG)
    MambaConfig.preset = staticmethod(lambda name: config)
    start = time.perf_counter()
    with PartitionRequests() as requests:
        scaling.build_step("probe", devices, "fsdp", per_device_batch=2, seqlen=32, abstract=True)
    elapsed = time.perf_counter() - start
    return {"layers": layers, "devices": devices, "path": path, "compile_s": elapsed, "partitions": requests.count}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="2,4,8")
    parser.add_argument("--devices", default="1,2")
    parser.add_argument("--paths", default="partitioned,shard_map", help="how the kernels are split on the mesh")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.child:
        layers, devices, path = args.child.split(",")
        print(json.dumps(child(int(layers), int(devices), path)))
        return
    rows = []
    for path in args.paths.split(","):
        for devices in map(int, args.devices.split(",")):
            for layers in map(int, args.layers.split(",")):
                command = [sys.executable, __file__, "--child", f"{layers},{devices},{path}"]
                result = subprocess.run(command, capture_output=True, text=True, check=True)
                row = json.loads(result.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{path}, devices {devices}, layers {layers}: compile {row['compile_s']:.1f} s, "
                    f"{row['partitions']} partition requests"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
