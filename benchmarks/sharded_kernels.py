"""What XLA does with the Pallas kernels inside a sharded jit: the collectives of the compiled program, per kernel and
sharding, and whether the results equal the XLA reference's.

    PYTHONPATH=. python3 benchmarks/sharded_kernels.py --out benchmarks/results/sharded_kernels_2xh200.json

Needs 2 or more GPUs. A Pallas kernel is a custom call that XLA's SPMD partitioner cannot split: if the compiled
program gathers the kernel's operands (all-gather) every device runs the whole kernel. Cases: the selective scan with
its inputs split over the batch (data parallel / FSDP training), and the fused Mamba-1 decode step with its weights
split over d_inner (tensor parallel) or over d_model (FSDP).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import scaling
from benchmarks.mamba_step import random_layer
from benchmarks.timing import environment
from pallas_kernels.mamba_step.pallas import mamba_step_pallas
from pallas_kernels.mamba_step.reference import mamba_step_reference
from pallas_kernels.selective_scan import selective_scan


def collectives(compiled) -> dict:
    """How many of each collective the compiled program holds (an asynchronous -start counts once)."""
    found = [c["op"] for c in scaling.collectives(compiled.as_text())]
    return {name: found.count(name) for name in scaling.COLLECTIVES}


def scan_case(mesh) -> dict:
    batch, seqlen, dim, n = 2 * mesh.size, 256, 256, 16
    keys = jax.random.split(jax.random.key(0), 5)
    u, delta, z = (jax.random.normal(k, (batch, seqlen, dim), jnp.bfloat16) for k in keys[:3])
    B, C = (jax.random.normal(k, (batch, seqlen, n), jnp.bfloat16) for k in keys[3:])
    A = -jnp.ones((dim, n), jnp.float32)
    split = NamedSharding(mesh, PartitionSpec("x"))
    u, delta, z, B, C = (jax.device_put(a, split) for a in (u, delta, z, B, C))

    def run(implementation):
        def f(u, delta, B, C, z):
            return selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, implementation=implementation)

        return jax.jit(f, out_shardings=split)

    kernel = run("pallas").lower(u, delta, B, C, z).compile()
    got, expected = kernel(u, delta, B, C, z), run("reference")(u, delta, B, C, z)
    return {
        "case": "selective_scan, inputs split over the batch",
        "collectives": collectives(kernel),
        "max_abs_diff_vs_reference": float(jnp.max(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32)))),
    }


def step_case(mesh, split: str) -> dict:
    d_model, dtype = 1024, jnp.float16
    weights = random_layer(jax.random.key(1), d_model, dtype)
    u = jax.random.normal(jax.random.key(2), (1, d_model), dtype)
    conv_state = jnp.zeros((1, 4, 2 * d_model), dtype)
    ssm_state = jnp.zeros((1, 2 * d_model, 16), jnp.float32)
    # tensor parallel: in_proj / conv / x_proj rows / dt_proj columns / out_proj rows over d_inner; FSDP: over d_model
    inner = {"in_proj": (None, "x"), "conv": (None, "x"), "conv_bias": ("x",), "x_proj": ("x", None)}
    inner |= {"dt_proj": (None, "x"), "dt_bias": ("x",), "A_log": ("x", None), "D": ("x",), "out_proj": ("x", None)}
    model = {"in_proj": ("x", None), "out_proj": (None, "x")}
    specs = inner if split == "tensor" else model
    weights = weights._replace(
        **{
            name: jax.device_put(getattr(weights, name), NamedSharding(mesh, PartitionSpec(*spec)))
            for name, spec in specs.items()
        }
    )
    kernel = jax.jit(mamba_step_pallas, static_argnames="dtype").lower(u, conv_state, ssm_state, weights, dtype=dtype)
    kernel = kernel.compile()
    reference = jax.jit(mamba_step_reference, static_argnames="dtype")
    got, expected = kernel(u, conv_state, ssm_state, weights), reference(u, conv_state, ssm_state, weights, dtype=dtype)
    ref_compiled = reference.lower(u, conv_state, ssm_state, weights, dtype=dtype).compile()
    return {
        "case": f"mamba_step, weights split over {'d_inner (tensor)' if split == 'tensor' else 'd_model (fsdp)'}",
        "collectives": collectives(kernel),
        "reference_collectives": collectives(ref_compiled),
        "max_abs_diff_vs_reference": float(np.max(np.abs(np.asarray(got[0], np.float32) - np.asarray(expected[0]))))
        if got[0].dtype == expected[0].dtype
        else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if jax.device_count() < 2:
        raise SystemExit(f"needs 2 or more GPUs, found {jax.devices()}")
    # Auto axes, as mamba_jax.sharding.make_mesh builds them (jax.make_mesh's default, Explicit axes, puts shardings
    # into the types, where Pallas refuses sharded operands outright).
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    rows = []
    for case in (lambda: scan_case(mesh), lambda: step_case(mesh, "tensor"), lambda: step_case(mesh, "fsdp")):
        try:
            rows.append(case())
        except Exception as e:  # keep the other cases
            rows.append({"error": f"{type(e).__name__}: {str(e)[:400]}"})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": environment(), "devices": jax.device_count(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
