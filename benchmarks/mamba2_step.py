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
# (depth, proj_columns, splits, columns, out_splits, parts, prefetch, xla_in_proj, num_warps, state_warps,
# num_stages) of the kernels (pallas.mamba2_step_pallas; None: its default); the first is the default.
VARIANTS = [
    (128, 64, None, 64, None, 2, 1, None, 8, 4, 3),
    (128, 64, None, 64, None, 2, 1, False, 8, 4, 3),  # in_proj by the first kernel at every size
    (128, 64, None, 64, None, 2, 1, True, 8, 4, 3),  # in_proj by XLA's product at every size
    (128, 64, None, 64, None, 2, 1, None, 4, 4, 3),
    (128, 64, None, 64, None, 2, 1, None, 8, 8, 3),
    (64, 64, None, 64, None, 2, 1, None, 8, 4, 3),
    (128, 64, None, 64, None, 4, 1, None, 8, 4, 3),
    (128, 64, None, 64, None, 1, 1, None, 8, 4, 3),
    (128, 64, None, 128, None, 2, 1, None, 8, 4, 3),  # out_proj: 128 columns a program
    (128, 64, None, 32, None, 2, 1, None, 8, 4, 3),  # 32
    (128, 64, None, 64, 4, 2, 1, None, 8, 4, 3),  # half the programs, each twice the rows
    (128, 64, None, 64, 16, 2, 1, None, 8, 4, 3),  # twice the programs
    (128, 64, None, 64, None, 2, 2, None, 8, 4, 3),  # tiles loaded 2 iterations ahead
    (256, 64, None, 64, None, 2, 1, None, 8, 4, 3),  # 256 rows an iteration
    (128, 64, 1, 64, None, 2, 0, False, 4, 4, 4),  # past one row: in_proj by the first kernel, Triton's pipeline
    (128, 64, 2, 64, None, 2, 0, False, 4, 4, 4),
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


def step_fn(variant):
    """(u, conv_state, ssm_state, weights, dtype) -> (out, conv_state, ssm_state) for a variant of the kernels."""
    depth, proj_columns, splits, columns, out_splits, parts, prefetch, xla_in_proj = variant[:8]
    num_warps, state_warps, num_stages = variant[8:]
    return functools.partial(
        mamba2_step_pallas,
        depth=depth,
        proj_columns=proj_columns,
        splits=splits,
        columns=columns,
        out_splits=out_splits,
        parts=parts,
        prefetch=prefetch,
        xla_in_proj=xla_in_proj,
        num_warps=num_warps,
        state_warps=state_warps,
        num_stages=num_stages,
    )


def empty_cache(batch: int, d_model: int, dtype):
    heads = 2 * d_model // HEADDIM
    conv_state = jnp.zeros((batch, WIDTH, 2 * d_model + 2 * D_STATE), dtype)
    return conv_state, jnp.zeros((batch, heads, HEADDIM, D_STATE), jnp.float32)


MAMBA2 = Mixer(random_layer, empty_cache, step_fn, mamba2_step_reference, SHAPES, VARIANTS, tiny_d_model=128)

if __name__ == "__main__":
    main(MAMBA2, __doc__)
