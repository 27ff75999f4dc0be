"""``head_argmax`` as one Pallas GPU kernel (Triton) and a small XLA reduction.

The head's columns are cut into tiles of ``columns``; grid (programs, row blocks): program (p, r) takes block r of
hidden's rows (padded to a power of 2 of at least 16, ``tl.dot``'s smallest tile, at most MAX_ROWS) and the tiles
p, p + programs, p + 2 programs, ... in one loop over (tile, tile of ``depth`` rows of d) pairs, so that Triton's
pipeline keeps ``num_stages`` loads of the head in flight across the tiles (a loop per tile refills it every tile:
at d = 768 that is six loads, and the head read at ~2.2 TB/s instead of ~2.5). After a tile's last product the
program folds its logits into each row's largest value so far and the first column holding it, and stores them:
(programs, b) float32 and int32, instead of the (b, V) float32 logits that XLA writes and its arg-max reads again.
XLA then takes, per row, the first column among the programs holding the largest value (one variadic reduction).

The last tile ends at ``vocab_size``, overlapping its neighbour (``first_column``), so no column past the
vocabulary is read and nothing is masked; a column seen twice only repeats its value.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.batch_split import over_batch
from pallas_kernels.mamba_step.tiles import MIN_ROWS, first_column

MAX_ROWS = 64  # rows a program holds: a (64, 128) float32 accumulator is 64 registers a thread at 4 warps
COLUMNS = 128  # columns of the head a tile covers
DEPTH = 128  # rows of d a loop iteration multiplies
PROGRAMS = 132  # programs along the columns: an H100's SMs (4 stages of 128 x 128 head and 64 x 128 row tiles, 16-bit,
# are 192 KB of shared memory: one program an SM)
NUM_WARPS = 4
NUM_STAGES = 4


def supports(d_model: int, vocab_size: int) -> bool:
    """Whether the kernel takes the head: d a multiple of 16 (``tl.dot``'s smallest depth) and at least 16 columns."""
    return d_model % MIN_ROWS == 0 and vocab_size >= MIN_ROWS


def head_argmax_pallas(
    hidden: jax.Array,
    head: jax.Array,
    vocab_size: int,
    rows: bool,
    interpret: bool,
    *,
    columns: int = COLUMNS,
    depth: int = DEPTH,
    programs: int = PROGRAMS,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
) -> jax.Array:
    """As ``head_argmax_reference``; each device's rows on their own inside a sharded jit (``over_batch``: the head
    whole on every device)."""
    d_model = hidden.shape[1]
    if not supports(d_model, vocab_size):
        raise ValueError(
            f"head_argmax_pallas: needs d_model a multiple of {MIN_ROWS} and vocab_size >= {MIN_ROWS}, got d_model "
            f"{d_model}, vocab_size {vocab_size}"
        )
    columns = min(pl.next_power_of_2(columns), 1 << (vocab_size.bit_length() - 1))
    depth = min(pl.next_power_of_2(depth), d_model & -d_model)  # a power of 2 dividing d
    programs = min(programs, pl.cdiv(vocab_size, columns))
    options = dict(columns=columns, depth=depth, programs=programs, vocab_size=vocab_size, rows=rows)
    options["interpret"] = interpret
    params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    return over_batch(lambda h, w: _argmax(h, w, params=params, **options), [hidden, head], [True, False])


def _argmax(hidden, head, *, columns, depth, programs, vocab_size, rows, interpret, params):
    batch = hidden.shape[0]
    block = min(MAX_ROWS, max(MIN_ROWS, pl.next_power_of_2(batch)))
    padded = pl.cdiv(batch, block) * block
    hidden = jnp.pad(hidden, ((0, padded - batch), (0, 0)))
    body = functools.partial(
        _kernel, columns=columns, depth=depth, programs=programs, block=block, vocab_size=vocab_size, rows=rows
    )
    best, index = pl.pallas_call(
        body,
        out_shape=(
            jax.ShapeDtypeStruct((programs, padded), jnp.float32),
            jax.ShapeDtypeStruct((programs, padded), jnp.int32),
        ),
        grid=(programs, padded // block),
        compiler_params=params,
        interpret=interpret,
        name="head_argmax",
    )(hidden, head)
    # Each row's first column among the programs that hold its largest value: one (value, index) reduction.
    init = (jnp.float32(-jnp.inf), jnp.int32(vocab_size))
    _, token = lax.reduce((best[:, :batch], index[:, :batch]), init, _first_of_largest, (0,))
    return token


def _first_of_largest(a, b):
    """The larger of two (value, index) pairs, on equal values the smaller index."""
    (value_a, index_a), (value_b, index_b) = a, b
    take_b = (value_b > value_a) | ((value_b == value_a) & (index_b < index_a))
    return jnp.where(take_b, value_b, value_a), jnp.where(take_b, index_b, index_a)


def _kernel(h_ref, head_ref, best_ref, index_ref, *, columns, depth, programs, block, vocab_size, rows):
    """h (B, d) @ the head's tiles p, p + programs, ... -> each row's largest logit there and its first column."""
    program, first_row = pl.program_id(0), pl.program_id(1) * block
    steps = h_ref.shape[1] // depth  # loop iterations a tile
    tiles = pl.cdiv(vocab_size, columns)
    rounds = pl.cdiv(tiles, programs)  # tiles a program covers (the last ones again where they run out)
    dtype = h_ref.dtype
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None  # float32 exactly, not TF32

    def first_of(k):
        """The first column of iteration k's tile."""
        tile = jnp.minimum(program + lax.div(k, jnp.int32(steps)) * programs, tiles - 1)
        return first_column(tile, columns, vocab_size)

    def fold(acc, best, index, first):
        """best, index updated with a tile's logits acc (B, columns) from column ``first``: the first column wins."""
        top = jnp.max(acc, axis=1)
        at = jnp.min(jnp.where(acc == top[:, None], first + lax.iota(jnp.int32, columns)[None, :], vocab_size), axis=1)
        return _first_of_largest((best, index), (top, at))

    def step(k, carry):
        acc, best, index = carry
        within = lax.rem(k, jnp.int32(steps))  # k's tile of d (lax.rem: Triton's lowering of % failed on it)
        first, at = first_of(k), pl.multiple_of(within * depth, depth)
        h = h_ref[pl.ds(first_row, block), pl.ds(at, depth)]
        if rows:  # (columns, depth) rows of a (V, d) embedding
            w = head_ref[pl.ds(first, columns), pl.ds(at, depth)].astype(dtype).T
        else:
            w = head_ref[pl.ds(at, depth), pl.ds(first, columns)].astype(dtype)
        acc = acc + jnp.dot(h, w, precision=precision, preferred_element_type=jnp.float32)
        last = within == steps - 1
        best, index = lax.cond(last, lambda: fold(acc, best, index, first), lambda: (best, index))
        return jnp.where(last, 0.0, acc), best, index

    carry = (
        jnp.zeros((block, columns), jnp.float32),
        jnp.full((block,), -jnp.inf, jnp.float32),
        jnp.full((block,), vocab_size, jnp.int32),
    )
    # int32 bounds: Python ints would make k int64 under jax_enable_x64, which lax.rem with int32 refuses
    _, best, index = lax.fori_loop(jnp.int32(0), jnp.int32(rounds * steps), step, carry)
    best_ref[program, pl.ds(first_row, block)] = best
    index_ref[program, pl.ds(first_row, block)] = jnp.minimum(index, vocab_size - 1)  # a NaN row: some column
