"""Time one decode step of the SSM (``selective_state_update``): the Pallas kernel against the XLA reference.

    PYTHONPATH=. python3 benchmarks/state_update.py --out "$OUT"        # on a GPU: the published sizes
    PYTHONPATH=. python3 benchmarks/state_update.py --smoke             # a tiny shape in the interpreter (CPU)

Both implementations run on the general head layout of pallas_kernels/state_update/reference.py, as the api passes
it: Mamba-1 (one group) as one head of p = di rows; Mamba-2 with the per-head dt, A, D of our model's ``step``
(dt already discretised, no gate: the 1.3b model normalises with a gated RMSNorm), or the expanded forms mamba_ssm's
Mamba-2 passes (dt (b, h, p), A (h, p, n), D, dt_bias (h, p)). x, z, dt, B, C in ``--dtype``; state, A, D, dt_bias
float32. As in a model's decode loop, a jitted ``lax.fori_loop`` runs ``--iters`` steps, each step updating the
states of ``layers`` layers in turn (each state in place, each layer's out the next one's x), with enough layers that
their states outgrow the L2 cache (``layers_for``; a batch-1 Mamba-1 state is too small for that). A time is the
median over ``--reps`` of that loop divided by iters x layers: the call's dispatch and sync and the loop's own
overhead are spread over the updates. dt, B, C are the same in every layer and step, so XLA may hoist the
reference's work on them out of the loop, in the reference's favour. Floor: the state read and written as float32,
the other inputs read once and the output written, at 3.0e12 B/s (a device-to-device copy on the H100). One JSON
line per row; all rows to ``--out``/state_update.json. The "state only" row times an elementwise update of the
state alone in the same loop: the bandwidth this loop can reach. ``--variants`` also times the kernel at other tile
sizes.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from benchmarks.timing import environment, time_ms
from pallas_kernels.state_update.pallas import rows_per_program, state_update_pallas
from pallas_kernels.state_update.reference import state_update_reference

BANDWIDTH = 3.0e12  # bytes/s


class Shape(NamedTuple):
    """form: "mamba1" (per-channel dt, A (h, p, n), D, dt_bias, z, softplus), "mamba2" (dt (b, h, 1), A (h, 1, 1),
    D (h, 1)) or "expanded" (dt (b, h, p), A (h, p, n), D, dt_bias (h, p), softplus)."""

    name: str
    batch: int
    heads: int
    headdim: int
    d_state: int
    groups: int
    form: str


SHAPES = [
    Shape("mamba-1.4b", 1, 1, 4096, 16, 1, "mamba1"),
    Shape("mamba-1.4b", 64, 1, 4096, 16, 1, "mamba1"),
    Shape("mamba2-1.3b", 1, 64, 64, 128, 1, "mamba2"),
    Shape("mamba2-1.3b", 64, 64, 64, 128, 1, "mamba2"),
    Shape("mamba2-1.3b expanded", 64, 64, 64, 128, 1, "expanded"),
]
SMOKE_SHAPES = [Shape("smoke mamba1", 1, 2, 24, 16, 2, "mamba1"), Shape("smoke mamba2", 2, 2, 8, 16, 1, "mamba2")]


def make_inputs(shape: Shape, dtype) -> dict:
    """The array arguments of ``state_update_reference`` at Mamba-like scales (decays exp(dt A) in about (0.01, 1)),
    with D in (0, 1) and B, C of norm about 1, so that out, fed back as the next layer's x, stays bounded."""
    b, h, p, n, g = shape.batch, shape.heads, shape.headdim, shape.d_state, shape.groups
    keys = iter(jax.random.split(jax.random.key(0), 10))

    def normal(*dims, dtype=dtype, mean=0.0, scale=1.0):
        return (mean + scale * jax.random.normal(next(keys), dims)).astype(dtype)

    f32 = jnp.float32
    per_row = 1 if shape.form == "mamba2" else p
    if shape.form == "mamba2":  # dt already softplus(dt + dt_bias), per head
        dt, A, dt_bias = normal(b, h, 1, mean=0.05, scale=0.02), -jnp.exp(normal(h, 1, 1, dtype=f32)), None
    else:  # softplus(dt + dt_bias) around 0.05-1
        dt, A = normal(b, h, p, mean=-1.0, scale=0.5), -jnp.exp(normal(h, p, n, dtype=f32))
        dt_bias = normal(h, p, dtype=f32, mean=-0.5, scale=0.5)
    return {
        "state": normal(b, h, p, n, dtype=f32),
        "x": normal(b, h, p),
        "dt": dt,
        "A": A,
        "B": normal(b, g, n, scale=n**-0.5),
        "C": normal(b, g, n, scale=n**-0.5),
        "D": jax.random.uniform(next(keys), (h, per_row)),
        "z": normal(b, h, p) if shape.form == "mamba1" else None,
        "dt_bias": dt_bias,
    }


def state_only(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """The bandwidth probe: read and write the state elementwise and nothing else (out is x). Its time is what this
    loop gets for the state's bytes alone, a practical floor beside the nominal one."""
    return x, state * 0.5 + 1.0


def floor_bytes(inputs: dict) -> int:
    """State read and written as float32, every other array read once, the output (x's shape and dtype) written."""
    arrays = [v for v in inputs.values() if v is not None]
    return 4 * inputs["state"].size + sum(a.nbytes for a in arrays) + inputs["x"].nbytes


def layers_for(inputs: dict) -> int:
    """Layers a timed step updates: enough distinct states to hold 256 MiB, 5 times the H100's L2 (at most 48)."""
    return max(2, min(48, pl.cdiv(256 * 2**20, inputs["state"].nbytes)))


def decode_loop(update, iters: int):
    """jit((inputs, states) -> (states, x)) running ``iters`` decode steps of a model of len(states) layers: each
    step updates every layer's state in turn, each layer's out the next one's x, as the layers of a model."""

    @jax.jit
    def loop(inputs, states):
        def step(_, carry):
            states, x = carry
            new_states = []
            for state in states:
                x, state = update(**{**inputs, "x": x, "state": state})
                new_states.append(state)
            return tuple(new_states), x

        return jax.lax.fori_loop(0, iters, step, (tuple(states), inputs["x"]))

    return loop


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    parser.add_argument("--iters", type=int, default=10, help="decode steps per timed loop")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument(
        "--variants", default="", help="kernel variants to time besides the default: comma-separated rows:warps"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in Pallas's interpreter (a CPU check)")
    parser.add_argument("--out", default=None, help="folder for state_update.json")
    args = parser.parse_args()
    shapes, iters, reps = (SMOKE_SHAPES, 2, 2) if args.smoke else (SHAPES, args.iters, args.reps)
    variants = [tuple(int(v) for v in variant.split(":")) for variant in filter(None, args.variants.split(","))]
    result = {"environment": environment(), "dtype": args.dtype, "iters": iters, "rows": []}
    for shape in shapes:
        inputs = make_inputs(shape, jnp.dtype(args.dtype))
        layers = layers_for(inputs)
        states = [inputs["state"] + i for i in range(layers)]
        floor_us = 1e6 * floor_bytes(inputs) / BANDWIDTH
        updates = {"state only": state_only, "reference": state_update_reference, "pallas": state_update_pallas}
        for rows, warps in variants:
            if rows <= pl.next_power_of_2(shape.headdim):
                updates[f"pallas {rows}:{warps}"] = functools.partial(state_update_pallas, rows=rows, num_warps=warps)
        expected = None
        for name, update in updates.items():
            update = functools.partial(update, dt_softplus=shape.form != "mamba2")
            out, state = jax.jit(update)(**inputs)  # one step, checked against the reference's
            if name == "reference":
                expected = out, state
            loop = decode_loop(update, iters)
            timing = time_ms(loop, inputs, states, reps=reps, warmup=1)
            us = 1e3 * timing["median_ms"] / (iters * layers)
            row = {
                **shape._asdict(),
                "implementation": name,
                "default_rows": rows_per_program(shape.headdim, shape.d_state),
                "layers": layers,
                "us": round(us, 3),
                "floor_us": round(floor_us, 3),
                "floor_fraction": round(floor_us / us, 4),
            }
            if expected is not None:
                row["max_abs_diff_state"] = float(jnp.max(jnp.abs(state - expected[1])))
                row["max_abs_diff_out"] = float(
                    jnp.max(jnp.abs(out.astype(jnp.float32) - expected[0].astype(jnp.float32)))
                )
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        path = pathlib.Path(args.out)
        path.mkdir(parents=True, exist_ok=True)
        (path / "state_update.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
