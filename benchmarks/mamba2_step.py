"""The Mamba-2 decode step of one mixer (``pallas_kernels.mamba2_step``): XLA op by op against the fused Pallas kernels
and their block-size variants, at the published models' sizes.

    PYTHONPATH=. python3 benchmarks/mamba2_step.py --out benchmarks/results/mamba2_step_h100.json
    PYTHONPATH=. python3 benchmarks/mamba2_step.py --tiny          # a small shape in the interpreter, for a CPU check

Measured by benchmarks/mamba_step.py's harness, as the Mamba-1 step (``--layers`` mixers with their own random
weights, ``--iters`` passes in one compiled loop, the caches carried); us per layer = median loop time / (iters *
layers); bytes floor = (weights + conv and SSM states read and written) / 3.0 TB/s per layer. Every variant is
checked first against the float32 computation on random caches, as tests/test_mamba2_step.py checks the kernels.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.mamba_step import Mixer, main
from pallas_kernels.mamba2_step import Mamba2StepWeights
from pallas_kernels.mamba2_step.pallas import mamba2_step_pallas
from pallas_kernels.mamba2_step.reference import mamba2_step_reference

HEADDIM, D_STATE, WIDTH = 64, 128, 4  # the published Mamba-2 models' (expand 2, ngroups 1)
# (name, batch, d_model)
SHAPES = [("mamba2-1.3b", 1, 2048), ("mamba2-2.7b", 1, 2560), ("mamba2-130m", 1, 768), ("mamba2-1.3b", 16, 2048)]
SHAPES += [("mamba2-1.3b", 64, 2048), ("mamba2-130m", 64, 768), ("mamba2-2.7b", 64, 2560)]
# Options of the kernels (keyword arguments of pallas.mamba2_step_pallas; absent: its default); the first is the
# default.
VARIANTS = [
    {},
    dict(xla_in_proj=False),  # in_proj by the first kernel at every size
    dict(xla_in_proj=True),  # in_proj by XLA's product at every size
    dict(num_warps=4),
    dict(state_warps=8),
    dict(depth=64),
    dict(parts=4),
    dict(parts=1),
    dict(columns=128),  # out_proj: 128 columns a program
    dict(columns=32),  # 32
    dict(out_splits=4),  # half the programs, each twice the rows
    dict(out_splits=16),  # twice the programs
    dict(prefetch=2),  # tiles loaded 2 iterations ahead
    dict(depth=256),  # 256 rows an iteration
    # past one row: in_proj by the first kernel, Triton's pipeline
    dict(splits=1, prefetch=0, xla_in_proj=False, num_warps=4, num_stages=4),
    dict(splits=2, prefetch=0, xla_in_proj=False, num_warps=4, num_stages=4),
    # past one row: the fused state kernel (xla_state=False) against the conv alone as a kernel (xla_state=True)
    dict(xla_state=False),
    dict(xla_state=True),
    dict(xla_state=True, conv_channels=16),
    dict(xla_state=True, conv_channels=64),
    dict(xla_state=True, conv_channels=128),
    dict(xla_out_proj=True),  # one row: the gated norm and out_proj by XLA (from the state kernel's sums of squares)
]


def random_layer(key, d_model: int, dtype) -> Mamba2StepWeights:
    d_inner = 2 * d_model
    heads = d_inner // HEADDIM
    conv_dim = d_inner + 2 * D_STATE
    keys = iter(jax.random.split(key, 8))

    def normal(*shape, scale):
        return (scale * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    return Mamba2StepWeights(
        in_proj=normal(d_model, 2 * d_inner + 2 * D_STATE + heads, scale=d_model**-0.5),
        in_proj_bias=None,
        conv=normal(WIDTH, conv_dim, scale=0.5),
        conv_bias=normal(conv_dim, scale=0.5),
        dt_bias=normal(heads, scale=1.0) - 4.0,
        A_log=jnp.log(jax.random.uniform(next(keys), (heads,), jnp.float32, 1.0, 16.0)),
        D=jnp.ones((heads,), jnp.float32),
        norm=1.0 + normal(d_inner, scale=0.1),
        out_proj=normal(d_inner, d_model, scale=d_inner**-0.5),
        out_proj_bias=None,
    )


def step_fn(variant: dict):
    """(u, conv_state, ssm_state, weights, dtype) -> (out, conv_state, ssm_state) for a variant of the kernels."""
    return functools.partial(mamba2_step_pallas, **variant)


def empty_cache(batch: int, d_model: int, dtype):
    heads = 2 * d_model // HEADDIM
    conv_state = jnp.zeros((batch, WIDTH, 2 * d_model + 2 * D_STATE), dtype)
    return conv_state, jnp.zeros((batch, heads, HEADDIM, D_STATE), jnp.float32)


MAMBA2 = Mixer(random_layer, empty_cache, step_fn, mamba2_step_reference, SHAPES, VARIANTS, tiny_d_model=128)

if __name__ == "__main__":
    main(MAMBA2, __doc__)
