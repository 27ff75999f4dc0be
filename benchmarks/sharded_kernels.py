"""What XLA does with the Pallas kernels inside a sharded jit: the collectives of the compiled program, per kernel and
sharding, and whether the results equal the XLA reference's.

    PYTHONPATH=. python3 benchmarks/sharded_kernels.py --out benchmarks/results/sharded_kernels_2xh200.json

Needs 2 or more GPUs. A Pallas kernel is a custom call that XLA's SPMD partitioner cannot look into; the kernels'
batch rule (``pallas_kernels.batch_split.over_batch``) lets each device run them on its rows of the batch. If the
compiled program gathers a kernel's operands (all-gather), every device runs the whole kernel instead. Cases: the
selective scan's forward and backward with its inputs split over the batch (data parallel / FSDP training) or over
d_inner (tensor parallel), timed against one device running one device's share (equal times: the work is split), and
the fused Mamba-1 decode step with its weights split over d_inner (tensor parallel) or over d_model (FSDP), which the
batch rule does not cover.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from benchmarks import scaling
from benchmarks.mamba_step import random_layer
from benchmarks.timing import environment, time_ms
from pallas_kernels.mamba_step.pallas import mamba_step_pallas
from pallas_kernels.mamba_step.reference import mamba_step_reference
from pallas_kernels.selective_scan import selective_scan
from tests.tolerances import rel_err


def collectives(compiled) -> dict:
    """How many of each collective the compiled program holds (an asynchronous -start counts once)."""
    found = [c["op"] for c in scaling.collectives(compiled.as_text())]
    return {name: found.count(name) for name in scaling.COLLECTIVES}


def scan_inputs(batch: int, seqlen: int, dim: int, n: int):
    keys = jax.random.split(jax.random.key(0), 5)
    u, delta, z = (jax.random.normal(k, (batch, seqlen, dim), jnp.bfloat16) for k in keys[:3])
    B, C = (jax.random.normal(k, (batch, seqlen, n), jnp.bfloat16) for k in keys[3:])
    return u, delta, B, C, z


def scan_loss(implementation):
    """sum(out^2) of the scan (A = -1, delta softplus): its value and its gradients in u, delta, B, C, z, jitted."""

    def loss(u, delta, B, C, z):
        A = -jnp.ones((u.shape[2], B.shape[2]), jnp.float32)
        out = selective_scan(u, delta, A, B, C, z=z, delta_softplus=True, implementation=implementation)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def scan_case(mesh, shape: tuple[int, int, int, int], reps: int, over: str = "batch") -> dict:
    """The scan's forward and backward with its inputs split over the batch (data parallel / FSDP) or, ``over`` =
    "channels", over d_inner (tensor parallel: u, delta, z split, B and C whole): collectives, the result against the
    XLA reference, and the time against one device running one device's share (equal: the work is split). ``shape``
    is one device's share. On a mesh of Explicit axes the split runs under ``jax.set_mesh``."""
    per_device, seqlen, dim, n = shape
    devices = mesh.size
    if over == "batch":
        inputs = scan_inputs(per_device * devices, seqlen, dim, n)
        specs = [PartitionSpec("x")] * 5
        share = [a[:per_device] for a in inputs]
    else:
        inputs = scan_inputs(per_device, seqlen, dim * devices, n)
        channels = PartitionSpec(None, None, "x")
        specs = [channels, channels, PartitionSpec(), PartitionSpec(), channels]
        share = [a if a.shape[2] == n else a[:, :, :dim] for a in inputs]
    kernel = scan_loss("pallas")
    explicit = AxisType.Explicit in mesh.axis_types
    with jax.set_mesh(mesh) if explicit else contextlib.nullcontext():
        placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip(inputs, specs, strict=True)]
        compiled = kernel.lower(*placed).compile()
        loss, grads = kernel(*placed)
        split_ms = time_ms(kernel, *placed, reps=reps)["median_ms"]
    loss_ref, grads_ref = scan_loss("reference")(*inputs)
    errors = [float(rel_err(g, r)) for g, r in zip(grads, grads_ref, strict=True)]
    one_device = [jax.device_put(a, jax.devices()[0]) for a in share]
    return {
        "case": f"selective_scan forward+backward, (batch, seqlen, d_inner, d_state) {shape} per device, split over "
        f"the {over}{', Explicit mesh axes' if explicit else ''}",
        "collectives": collectives(compiled),
        "loss_rel_diff_vs_reference": float(abs(loss - loss_ref) / abs(loss_ref)),
        "grad_rel_err_vs_reference": max(errors),  # norm-wise, the worst of the five gradients
        "split_ms": split_ms,
        "one_device_share_ms": time_ms(kernel, *one_device, reps=reps)["median_ms"],
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
    parser.add_argument(
        "--scan-shape",
        default="8,2048,2048,16",
        help="per-device batch, seqlen, d_inner, d_state of the scan case (default: Mamba-1 370m at batch 8 x 2048)",
    )
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    if jax.device_count() < 2:
        raise SystemExit(f"needs 2 or more GPUs, found {jax.devices()}")
    # Auto axes, as mamba_jax.sharding.make_mesh builds them; then the scan again on Explicit axes (jax.make_mesh's
    # default), where the shardings are in the types.
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    explicit = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(AxisType.Explicit,))
    rows = []
    scan_shape = tuple(int(x) for x in args.scan_shape.split(","))
    for case in (
        lambda: scan_case(mesh, scan_shape, args.reps),
        lambda: step_case(mesh, "tensor"),
        lambda: step_case(mesh, "fsdp"),
        lambda: scan_case(explicit, scan_shape, args.reps),
        lambda: scan_case(mesh, scan_shape, args.reps, over="channels"),
    ):
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
