"""Where a decode step's time goes: the whole model step, one layer's step, and each piece of a layer, each compared
with its own bytes floor, to tell launch overhead (pieces far above their floors, floors tiny) from slow GEMVs
(projections far above theirs).

    PYTHONPATH=. python3 benchmarks/decode_breakdown.py --out benchmarks/results/decode_breakdown_h100.json
    PYTHONPATH=. python3 benchmarks/decode_breakdown.py --tiny          # a small config, for a CPU check

Every piece runs ``--iters`` times inside one compiled ``lax.fori_loop``, as the pieces run inside the generate
loop, each iteration feeding the next (a carry of the piece's input shape, so XLA can neither hoist nor drop it); the
time per iteration is the median of ``--reps`` loops divided by ``--iters``. The carry update costs a tiny fusion
of its own: the ``empty`` row (only that update) measures it, and ``net`` subtracts it.
bytes floor = (parameters read + inputs read + outputs written) / 3.0 TB/s. ``kernels`` counts the fusions and
custom calls of the compiled loop (the GPU launches one kernel for each, per iteration, unless command buffers
group them).
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp

from benchmarks.generation import BANDWIDTH, nbytes, random_model
from benchmarks.timing import environment, time_ms
from mamba_jax import MambaConfig
from mamba_jax.generation.cache import conv_step
from pallas_kernels.state_update import selective_state_update

TINY = {
    "tiny-mamba": MambaConfig(d_model=64, n_layer=2, vocab_size=1000),
    "tiny-mamba2": MambaConfig(
        d_model=64, n_layer=2, vocab_size=1000, ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 32}
    ),
}


def _bump(x, y):
    """x plus zero times one element of y: makes the next iteration's input depend on this output."""
    first = jax.tree.leaves(y)[0].reshape(-1)[0]
    return x + (first * 0).astype(x.dtype)


def pieces(model, batch: int) -> list[tuple[str, object, object, object, int]]:
    """(name, module, initial carry, step(module, carry) -> carry, parameter bytes read) for every timed piece."""
    config = model.config
    block = model.backbone.layers[0]
    mixer = block.mixer
    dtype = model.dtype
    cache = model.init_cache(batch, 256)
    hidden = jnp.ones((batch, config.d_model), dtype)
    residual = jnp.ones((batch, config.d_model), jnp.float32)
    tokens = jnp.zeros((batch,), jnp.int32)

    def model_step(m, carry):  # the loop body of generate, greedy: the next token depends on the logits
        logits, cache = m.step(*carry)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    def layer_step(b, carry):
        hidden, _, layer_cache = b.step(*carry)
        return hidden, residual, layer_cache

    rows = [
        ("empty", None, hidden, lambda _, x: _bump(x, x), 0),
        ("model step", model, (tokens, cache), model_step, nbytes(model)),
        ("layer step", block, (hidden, residual, cache[0]), layer_step, nbytes(block)),
        ("add + norm", block.norm, residual, lambda n, r: _bump(r, n(r + 1.0)), nbytes(block.norm)),
        ("in_proj", mixer.in_proj, hidden, lambda p, x: _bump(x, p(x)), nbytes(mixer.in_proj)),
    ]
    width = mixer.conv1d.kernel.shape[1]
    conv_in = jnp.ones((batch, width), dtype)
    conv_bytes = nbytes(mixer.conv1d) + 2 * nbytes(cache[0].conv_state)  # the window is read and written
    rows.append(("conv update", mixer.conv1d, conv_in,
                 lambda c, x: _bump(x, conv_step(c, x, cache[0].conv_state)), conv_bytes))  # fmt: skip
    rows.append(("out_proj", mixer.out_proj, jnp.ones((batch, mixer.out_proj.kernel.shape[0]), dtype),
                 lambda p, y: _bump(y, p(y)), nbytes(mixer.out_proj)))  # fmt: skip
    if config.ssm_layer == "Mamba1":
        x = jnp.ones((batch, mixer.d_inner), dtype)
        dt_bytes = nbytes(mixer.x_proj) + nbytes(mixer.dt_proj.kernel)
        rows.append(("x_proj + dt_proj", mixer, x, lambda m, x: _bump(x, m._dt_B_C(x)), dt_bytes))
        state_bytes = nbytes((mixer.A_log, mixer.D, mixer.dt_proj.bias))
        dt, B, C = mixer._dt_B_C(x)

        def state_update(m, state):
            y, state = selective_state_update(
                state, x, dt, m._A(), B, C, D=m.D[...].astype(jnp.float32), z=x,
                dt_bias=m.dt_proj.bias[...].astype(jnp.float32), dt_softplus=True,
            )  # fmt: skip
            return _bump(state, y)

    else:
        h, p, g, n = mixer.nheads, mixer.headdim, mixer.ngroups, mixer.d_state
        x = jnp.ones((batch, h, p), dtype)
        B = C = jnp.ones((batch, g, n), dtype)
        dt = jnp.ones((batch, h), dtype)
        rows.append(("gated norm", mixer.norm, x.reshape(batch, -1), lambda nm, y: _bump(y, nm(y, y)),
                     nbytes(mixer.norm)))  # fmt: skip
        state_bytes = nbytes((mixer.A_log, mixer.D, mixer.dt_bias))

        def state_update(m, state):
            y, state = selective_state_update(
                state, x, m._discretize_dt(dt), -jnp.exp(m.A_log[...]), B, C, D=m._skip()
            )  # fmt: skip
            return _bump(state, y)

    rows.append(("state update", mixer, cache[0].ssm_state, state_update, state_bytes))
    head = model.backbone.embedding if config.tie_embeddings else model.lm_head
    rows.append(("lm head", model, hidden, lambda m, h: _bump(h, m.logits(h)), nbytes(head)))
    rows.append(("greedy argmax", None, jnp.ones((batch, config.padded_vocab_size), jnp.float32),
                 lambda _, logits: _bump(logits, jnp.argmax(logits, axis=-1)), 0))  # fmt: skip
    return rows


def time_piece(step, module, carry, iters: int, reps: int) -> dict:
    """Median time per iteration of ``iters`` chained ``step`` calls in one compiled loop, and its kernel count."""
    loop = jax.jit(lambda m, c: jax.lax.fori_loop(0, iters, lambda _, c: step(m, c), c))
    start = time.perf_counter()
    compiled = loop.lower(module, carry).compile()
    compile_s = time.perf_counter() - start
    hlo = compiled.as_text()
    kernels = len(re.findall(r"= \S+ (?:fusion|custom-call)\(", hlo))
    timing = time_ms(compiled, module, carry, reps=reps, warmup=1)
    return {"us": 1e3 * timing["median_ms"] / iters, "compile_s": compile_s, "kernels": kernels}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mamba-1.4b,mamba2-1.3b", help="comma-separated presets")
    parser.add_argument("--tiny", action="store_true", help="two tiny configs instead (a quick check on a CPU)")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--iters", type=int, default=200, help="iterations per timed loop (the model step: 1/4)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    configs = TINY if args.tiny else {name: MambaConfig.preset(name) for name in args.models.split(",")}
    batches = [int(b) for b in args.batches.split(",")]
    result = {"environment": environment(), "dtype": args.dtype, "rows": []}
    started = time.perf_counter()
    for name, config in configs.items():
        model = random_model(config, jnp.dtype(args.dtype))
        for batch in batches:
            empty_us = 0.0
            for piece, module, carry, step, param_bytes in pieces(model, batch):
                iters = max(1, args.iters // 4) if piece == "model step" else args.iters
                row = {"model": name, "batch": batch, "piece": piece}
                try:
                    row.update(time_piece(step, module, carry, iters, args.reps))
                    # parameters read + input read + output written (the carry has the output's shape)
                    row["bytes"] = param_bytes + 2 * nbytes(carry)
                    row["floor_us"] = 1e6 * row["bytes"] / BANDWIDTH
                    empty_us = row["us"] if piece == "empty" else empty_us
                    row["net_us"] = row["us"] - empty_us
                    row["net_over_floor"] = row["net_us"] / row["floor_us"]
                except Exception as e:  # keep the other rows
                    row["error"] = str(e).splitlines()[0]
                result["rows"].append(row)
                print(f"[{time.perf_counter() - started:5.0f} s] {_format(row)}", flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(result, f, indent=2)
        del model
    print(f"Decode step breakdown, {args.dtype}, on {environment()['device']} (us per call, median)")
    for row in result["rows"]:
        print(_format(row))


def _format(row: dict) -> str:
    lead = f"{row['model']:<12} b{row['batch']:<3} {row['piece']:<17}"
    if "error" in row:
        return f"{lead} ERROR {row['error']}"
    return (
        f"{lead} {row['us']:>9.2f} us  net {row['net_us']:>9.2f}  floor {row['floor_us']:>8.2f}  "
        f"x floor {row['net_over_floor']:>7.2f}  kernels {row['kernels']:>4}  MB {row['bytes'] / 1e6:>8.2f}"
    )


if __name__ == "__main__":
    main()
