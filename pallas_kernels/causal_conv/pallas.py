"""The causal conv (+ SiLU) as Pallas GPU kernels (Triton), with a Pallas backward through ``jax.custom_vjp``.

One program owns ``ConvTiles.channels`` channels of one batch row over ``ConvTiles.steps`` consecutive time steps and
walks them in order, a row of channels at a time, keeping the last w - 1 input rows in registers; rows are loaded
``ConvTiles.tile`` steps at a time, a tile ahead of their use. The forward reads x once and writes y once; the first
block of a row starts its window from ``initial_states`` (the w - 1 inputs before x) where they are given, else from
zeros. The backward recomputes the conv from x (nothing but x is saved), forms g = dy SiLU'(c), and writes
dx_s = sum_k kernel[k] g_{s + w - 1 - k} (it walks w - 1 steps past its block for that; the first block's s < 0 are
the initial states' cotangent) and per-program float32 sums of dkernel and dbias, which XLA adds up. XLA's own
fusion of this backward (a reduction fused with the dx pass) read and wrote its bytes at about 1.2 TB/s on an H100.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.batch_split import ChannelSplit, over_batch
from pallas_kernels.selective_scan.kernel_math import KernelMath

MAX_WIDTH = 8  # the kernel holds w weight rows and w - 1 window rows in registers


@dataclasses.dataclass(frozen=True)
class ConvTiles:
    """How a launch covers (b, l, c): one program per row, ``steps`` time steps and ``channels`` channels, with
    ``num_warps`` warps; rows are loaded ``tile`` steps at a time (``steps`` a multiple of ``tile``)."""

    channels: int = 512  # 4 warps: 4 contiguous 16-bit values a thread per row
    steps: int = 64
    tile: int = 8
    num_warps: int = 4


def causal_conv1d_pallas(
    x, kernel, bias, silu: bool, interpret: bool, tiles: ConvTiles = ConvTiles(), initial_states=None
) -> jax.Array:
    """As ``causal_conv1d_reference``; differentiable in x, kernel, bias (None: no bias) and initial_states (None:
    zeros before x)."""
    if tiles.steps % tiles.tile or tiles.steps < kernel.shape[0] - 1:
        raise ValueError(f"causal_conv1d_pallas: steps must be a multiple of tile and at least w - 1, got {tiles}")
    bias = jnp.zeros(kernel.shape[1:], jnp.float32) if bias is None else bias
    return _conv(x, initial_states, kernel, bias, silu, interpret, tiles)


def _operands(x, initial_states, kernel, bias) -> list[jax.Array]:
    """The kernels' array operands: [x, initial_states (where given), kernel, bias]."""
    return [x, kernel, bias] if initial_states is None else [x, initial_states, kernel, bias]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _conv(x, initial_states, kernel, bias, silu, interpret, tiles):
    operands = _operands(x, initial_states, kernel, bias)
    return _split(lambda *a: _forward(*a, silu=silu, interpret=interpret, tiles=tiles), operands, 2)


def _conv_fwd(x, initial_states, kernel, bias, silu, interpret, tiles):
    return _conv(x, initial_states, kernel, bias, silu, interpret, tiles), (x, initial_states, kernel, bias)


def _conv_bwd(silu, interpret, tiles, residuals, dy):
    """The cotangents of (x, initial_states (None where not given), kernel, bias) from the backward kernel."""
    x, initial_states, kernel, bias = residuals
    operands = _operands(x, initial_states, kernel, bias)
    dims = (2, 2, 3, 2) if initial_states is not None else (2, 3, 2)
    grads = _split(
        lambda *a: _backward(*a, silu=silu, interpret=interpret, tiles=tiles), [*operands[:-2], dy, kernel, bias], dims
    )
    *dinputs, dkernel, dbias = grads
    dx, dinitial = dinputs if initial_states is not None else (dinputs[0], None)
    return dx, dinitial, dkernel.sum(axis=(0, 1)).astype(kernel.dtype), dbias.sum(axis=(0, 1)).astype(bias.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _split(fn, args, result_channel_dims):
    """``fn(*args)`` on each device's rows and channels inside a sharded jit (``over_batch``): the first args are
    batch-leading (b, l, c), the last two (kernel (w, c), bias (c,)) per channel."""
    batched = [True] * (len(args) - 2) + [False, False]
    operands = [2] * (len(args) - 2) + [1, 0]
    return over_batch(fn, args, batched, ChannelSplit(operands, lambda _: result_channel_dims, 1))


def _grid(x, tiles: ConvTiles):
    batch, length, channels = x.shape
    return (batch, pl.cdiv(length, tiles.steps), pl.cdiv(channels, tiles.channels))


def _launch(kernel_fn, args, out_shape, name, interpret, tiles: ConvTiles):
    return pl.pallas_call(
        kernel_fn,
        out_shape=out_shape,
        grid=_grid(args[0], tiles),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=1),
        interpret=interpret,
        name=name,
    )(*args)


def _forward(x, *args, silu, interpret, tiles):
    """args: [initial_states (b, w - 1, c),] kernel, bias -> y (b, l, c) in x's dtype."""
    out_shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
    body = functools.partial(_forward_kernel, silu=silu, ops=KernelMath(interpret), tiles=tiles)
    return _launch(body, [x, *args], out_shape, "causal_conv_fwd", interpret, tiles)


def _backward(x, *args, silu, interpret, tiles):
    """args: [initial_states,] dy, kernel, bias -> dx (b, l, c) in x's dtype[, d initial_states (b, w - 1, c) in
    theirs]; dkernel float32 (b, L, w, c) and dbias float32 (b, L, c), one partial sum per program (L = cdiv(l,
    steps) blocks of time)."""
    batch, _, channels = x.shape
    *initial, _, kernel, _ = args
    blocks = _grid(x, tiles)[1]
    out_shape = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        *[jax.ShapeDtypeStruct(i.shape, i.dtype) for i in initial],
        jax.ShapeDtypeStruct((batch, blocks, kernel.shape[0], channels), jnp.float32),
        jax.ShapeDtypeStruct((batch, blocks, channels), jnp.float32),
    )
    ops = KernelMath(interpret)
    body = functools.partial(_backward_kernel, silu=silu, ops=ops, tiles=tiles, initial=bool(initial))
    return _launch(body, [x, *args], out_shape, "causal_conv_bwd", interpret, tiles)


class _Rows:
    """The program's view of (b, l, c) arrays (and of the (b, w - 1, c) initial states): its row of the batch, its
    channels (lanes), time clamped into the array's range (rows outside it read as 0 and are not written)."""

    def __init__(self, channels: int, tiles: ConvTiles):
        self.batch, self.block = pl.program_id(0), pl.program_id(1)
        first = pl.program_id(2) * tiles.channels
        self.lanes = pl.ds(first, tiles.channels)
        self.mask = first + lax.iota(jnp.int32, tiles.channels) < channels
        self.start = self.block * tiles.steps
        self.tiles = tiles

    def load(self, ref, t) -> jax.Array:
        """float32 row ``ref[batch, t, lanes]``; 0 where t is outside [0, ref's length) or a lane past the channels."""
        length = ref.shape[1]
        inside = (t >= 0) & (t < length)
        row = plt.load(ref.at[self.batch, jnp.clip(t, 0, length - 1), self.lanes], mask=self.mask, other=0)
        return jnp.where(inside, row.astype(jnp.float32), 0.0)

    def store(self, ref, t, value, where=True) -> None:
        """``ref[batch, t, lanes] = value`` where 0 <= t < ref's length and ``where``."""
        length = ref.shape[1]
        mask = self.mask & (t >= 0) & (t < length) & where
        index = jnp.clip(t, 0, length - 1)
        plt.store(ref.at[self.batch, index, self.lanes], value.astype(ref.dtype), mask=mask)

    def first_window(self, x_ref, initial_ref, width: int) -> list[jax.Array]:
        """The w - 1 input rows before the block, oldest first: x's, or before x the initial states' (0 without)."""
        times = [self.start - width + 1 + k for k in range(width - 1)]
        if initial_ref is None:
            return [self.load(x_ref, t) for t in times]
        # Each time is inside exactly one of the two arrays (initial state i is time i - (w - 1)); the other reads 0.
        return [self.load(x_ref, t) + self.load(initial_ref, t + width - 1) for t in times]

    def weights(self, ref, *index) -> jax.Array:
        return plt.load(ref.at[(*map(_index, index), self.lanes)], mask=self.mask, other=0).astype(jnp.float32)


def _index(i):
    # Pallas's interpreter rejects a Python int inside a Triton-style load/store index; a NumPy int works.
    return np.int32(i) if isinstance(i, int) else i


def _walk(rows: _Rows, step, carry, loads):
    """``carry = step(carry, t, loaded)`` for the program's steps t in order, where ``loaded`` is ``loads(t)``,
    issued a tile ahead."""
    size = rows.tiles.tile

    def tile(i, state):
        carry, ahead = state
        t0 = rows.start + i * size
        following = [loads(t0 + size + s) for s in range(size)]
        for s in range(size):
            carry = step(carry, t0 + s, ahead[s])
        return carry, following

    first = [loads(rows.start + s) for s in range(size)]
    carry, _ = lax.fori_loop(0, rows.tiles.steps // size, tile, (carry, first))
    return carry


def _conv_at(window, x_t, weights, bias):
    """c_t = sum_k w_k x_{t - (w - 1) + k} + bias from the w - 1 previous rows ``window`` (oldest first) and x_t."""
    c = bias + weights[-1] * x_t
    for k, row in enumerate(window):
        c = c + weights[k] * row
    return c


def _forward_kernel(x_ref, *refs, silu: bool, ops: KernelMath, tiles: ConvTiles):
    *initial, kernel_ref, bias_ref, y_ref = refs
    channels = x_ref.shape[2]
    width = kernel_ref.shape[0]
    rows = _Rows(channels, tiles)
    weights = [rows.weights(kernel_ref, k) for k in range(width)]
    bias = rows.weights(bias_ref)
    window = rows.first_window(x_ref, initial[0] if initial else None, width)

    def step(window, t, x_t):
        c = _conv_at(window, x_t, weights, bias)
        rows.store(y_ref, t, c * ops.sigmoid(c) if silu else c)
        return [*window, x_t][1:]

    _walk(rows, step, window, lambda t: rows.load(x_ref, t))


def _backward_kernel(x_ref, *refs, silu: bool, ops, tiles, initial: bool):
    if initial:
        initial_ref, dy_ref, kernel_ref, bias_ref, dx_ref, dinitial_ref, dkernel_ref, dbias_ref = refs
    else:
        dy_ref, kernel_ref, bias_ref, dx_ref, dkernel_ref, dbias_ref = refs
        initial_ref = dinitial_ref = None
    channels = x_ref.shape[2]
    width = kernel_ref.shape[0]
    rows = _Rows(channels, tiles)
    weights = [rows.weights(kernel_ref, k) for k in range(width)]
    bias = rows.weights(bias_ref)
    zeros = jnp.zeros((tiles.channels,), jnp.float32)

    def gradient(window, t, loaded):
        """g_t, the cotangent of the conv's output at t (0 past the sequence: dy reads 0 there)."""
        x_t, dy_t = loaded
        if not silu:
            return dy_t
        c = _conv_at(window, x_t, weights, bias)
        sig = ops.sigmoid(c)
        return dy_t * sig * ops.fma(c, 1.0 - sig, 1.0)

    def step(carry, t, loaded, accumulate: bool):
        """At t: g_t; while t is in the block, dkernel and dbias; dx_{t - w + 1} once it lies in the block."""
        window, gs, dkernel, dbias = carry
        g = gradient(window, t, loaded)
        if accumulate:
            dkernel = [ops.fma(g, row, dk) for row, dk in zip([*window, loaded[0]], dkernel, strict=True)]
            dbias = dbias + g
        gs = [*gs[1:], g]  # g_{t - w + 1} .. g_t
        s = t - width + 1
        dx = sum(weights[width - 1 - k] * gs[k] for k in range(width))
        rows.store(dx_ref, s, dx, s >= rows.start)  # earlier rows are the previous block's
        if dinitial_ref is not None:  # s < 0 only in the first block: the initial state at s + w - 1
            rows.store(dinitial_ref, s + width - 1, dx, s < 0)
        return [*window, loaded[0]][1:], gs, dkernel, dbias

    def loads(t):
        return rows.load(x_ref, t), rows.load(dy_ref, t)

    window = rows.first_window(x_ref, initial_ref, width)
    carry = (window, [zeros] * width, [zeros] * width, zeros)
    carry = _walk(rows, functools.partial(step, accumulate=True), carry, loads)
    end = rows.start + tiles.steps
    for t in range(width - 1):  # the w - 1 steps past the block that dx of its last rows needs
        carry = step(carry, end + t, loads(end + t), accumulate=False)
    _, _, dkernel, dbias = carry
    for k in range(width):
        plt.store(dkernel_ref.at[rows.batch, rows.block, _index(k), rows.lanes], dkernel[k], mask=rows.mask)
    plt.store(dbias_ref.at[rows.batch, rows.block, rows.lanes], dbias, mask=rows.mask)
