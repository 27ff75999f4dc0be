"""Small building blocks shared by the mixers: linear layers with PyTorch's default init, the causal depthwise conv,
and the norms. Every parameter carries ``logical_axes`` metadata (see ``mamba_jax.sharding``)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.arguments import integer
from pallas_kernels.causal_conv import IMPLEMENTATIONS as CONV_IMPLEMENTATIONS
from pallas_kernels.causal_conv import causal_conv1d
from pallas_kernels.mamba_step import PreNorm

Axes = Sequence[str | None]


def positive_int(owner: str, name: str, value) -> int:
    """``value`` as a Python int >= 1 (a Python or NumPy integer, not a bool), or a ValueError naming ``owner``'s
    argument ``name``."""
    index = integer(value)
    if index is None or index < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, found {value!r}")
    return index


def check_implementation(owner: str, name: str, value, implementations: tuple[str, ...]) -> None:
    """A ValueError naming ``owner``'s argument ``name`` unless ``value`` is None or one of ``implementations`` (the
    op's ``IMPLEMENTATIONS``)."""
    if value is not None and value not in implementations:
        raise ValueError(f"{owner}: {name} must be None or one of {implementations}, found {value!r}")


def check_sequence_input(owner: str, u: jax.Array) -> None:
    """A ValueError unless u (b, l, d) has b >= 1 and l >= 1 (the mixers take no empty batch or sequence)."""
    if min(u.shape[:2]) < 1:
        raise ValueError(f"{owner}: u must have batch >= 1 and seqlen >= 1, found shape {u.shape}")


def check_last_dim(owner: str, x: jax.Array, dim: int) -> None:
    """A ValueError unless x is (..., dim): a last dimension of 1 would broadcast against (dim,) parameters."""
    if x.ndim < 1 or x.shape[-1] != dim:
        raise ValueError(f"{owner}: x must have shape (..., dim={dim}), found {x.shape}")


def torch_uniform_init(fan_in: int) -> nnx.Initializer:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): torch's default for Linear/Conv weights (kaiming_uniform, a=sqrt(5))
    and biases."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def with_axes(variable: nnx.Variable, axes: Axes) -> nnx.Variable:
    """Attach logical axis names to a variable (one per dimension)."""
    if len(axes) != len(variable.shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match a parameter of shape {variable.shape}")
    variable.set_metadata(logical_axes=tuple(axes))
    return variable


def param(rngs: nnx.Rngs, init: nnx.Initializer, shape: Sequence[int], dtype, axes: Axes) -> nnx.Param:
    """A parameter drawn from ``init`` with logical axes attached."""
    return with_axes(nnx.Param(init(rngs.params(), tuple(shape), dtype)), axes)


def value_or_none(param: nnx.Param | None) -> jax.Array | None:
    """A parameter's array, or None for an absent (bias) parameter."""
    return None if param is None else param[...]


def linear(
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str | None, str | None],
    use_bias: bool,
    rngs: nnx.Rngs,
    dtype=None,
    param_dtype=jnp.float32,
    kernel_init: nnx.Initializer | None = None,
    bias_init: nnx.Initializer | None = None,
) -> nnx.Linear:
    """``nnx.Linear`` with torch's default init (unless given) and logical axes on kernel (in, out) and bias (out,)."""
    default = torch_uniform_init(in_features)
    layer = nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=kernel_init or default,
        bias_init=bias_init or default,
        rngs=rngs,
    )
    with_axes(layer.kernel, axes)
    if use_bias:
        with_axes(layer.bias, axes[1:])
    return layer


def linear_parts(layer: nnx.Linear, x: jax.Array, sizes: Sequence[int], ordered: bool = False) -> list[jax.Array]:
    """``jnp.split(layer(x), cumsum(sizes)[:-1], axis=-1)``, each part its own matrix product with its columns of the
    kernel (and bias). The same numbers, but the backward then never concatenates the parts' cotangents into one
    (..., sum(sizes)) array, a full pass over the activations (twice over, as XLA feeds the weight and the input
    gradients each their own copy); the kernel's gradient is concatenated instead, (in, out) and small.

    XLA may still merge the products into one and copy each part out of it (its dot merger, for small enough
    operands: a Mamba-1 130m prefill at batch 64 does). ``ordered`` makes each product wait for the one before (an
    optimization barrier, which changes no value), so that each writes its part where its consumer reads it.
    x (..., in) -> [(..., size) for size in sizes]."""
    if sum(sizes) != layer.out_features or min(sizes) < 1:
        raise ValueError(f"linear_parts: sizes {tuple(sizes)} must be positive and add up to {layer.out_features}")
    bias = value_or_none(layer.bias)
    x, kernel, bias = layer.promote_dtype((x, layer.kernel[...], bias), dtype=layer.dtype)
    parts, start = [], 0
    for size in sizes:
        columns = slice(start, start + size)
        start += size
        if ordered and parts:
            x, parts[-1] = jax.lax.optimization_barrier((x, parts[-1]))
        y = layer.dot_general(x, kernel[:, columns], (((x.ndim - 1,), (0,)), ((), ())), precision=layer.precision)
        parts.append(y if bias is None else y + bias[columns])
    return parts


class CausalConv1d(nnx.Module):
    """Depthwise causal conv over time, as torch's ``Conv1d(c, c, w, groups=c, padding=w-1)`` truncated to l.

    kernel (w, c): ``kernel[w-1]`` multiplies the current step, ``kernel[0]`` the step w-1 back. bias (c,).
    """

    def __init__(
        self,
        channels: int,
        width: int,
        *,
        use_bias: bool = True,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
        implementation: str | None = None,
    ):
        check_implementation("CausalConv1d", "implementation", implementation, CONV_IMPLEMENTATIONS)
        init = torch_uniform_init(width)  # fan_in of a depthwise conv = 1 input channel * width
        self.kernel = param(rngs, init, (width, channels), param_dtype, ("conv", "inner"))
        self.bias = param(rngs, init, (channels,), param_dtype, ("inner",)) if use_bias else None
        self.width = width
        self.dtype = dtype
        self.implementation = implementation

    def __call__(self, x: jax.Array, silu: bool = False, initial_states: jax.Array | None = None) -> jax.Array:
        """x (b, l, c) -> (b, l, c), then SiLU if ``silu``, on ``dtype``-cast inputs, continuing from
        ``initial_states`` (b, w - 1, c), the inputs before x (None: zeros):
        ``pallas_kernels.causal_conv.causal_conv1d`` with the layer's ``implementation`` (None: the Pallas kernels,
        float32 inside, on a GPU; else XLA's ops in ``dtype``)."""
        dtype = self.dtype or x.dtype
        bias = None if self.bias is None else self.bias[...].astype(dtype)
        kernel = self.kernel[...].astype(dtype)
        if initial_states is not None:
            initial_states = initial_states.astype(dtype)
        return causal_conv1d(
            x.astype(dtype), kernel, bias, silu=silu, initial_states=initial_states, implementation=self.implementation
        )


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x**2) + eps) * weight, computed in float32; weight (d,)."""

    def __init__(
        self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32
    ):
        del rngs  # ones-initialised; accepted for a uniform constructor signature
        self.weight = with_axes(nnx.Param(jnp.ones((dim,), param_dtype)), ("norm",))
        self.dim = dim
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d) -> (..., d) in ``dtype`` (default: x's dtype)."""
        check_last_dim("RMSNorm", x, self.dim)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...].astype(jnp.float32)).astype(self.dtype or x.dtype)

    def after_residual(self, residual: jax.Array | None) -> PreNorm:
        """This norm applied to float32(hidden) + ``residual`` (b, d) float32 (None: to the hidden alone), as a
        ``PreNorm`` that a mixer's decode step computes inside its own kernels (``Block.step``)."""
        return PreNorm(residual, self.weight[...], self.eps, jnp.dtype(self.dtype or jnp.float32))


class LayerNorm(nnx.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias, computed in float32; weight, bias (d,)."""

    def __init__(
        self, dim: int, *, eps: float = 1e-5, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32
    ):
        del rngs
        self.weight = with_axes(nnx.Param(jnp.ones((dim,), param_dtype)), ("norm",))
        self.bias = with_axes(nnx.Param(jnp.zeros((dim,), param_dtype)), ("norm",))
        self.dim = dim
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., d) -> (..., d) in ``dtype`` (default: x's dtype)."""
        check_last_dim("LayerNorm", x, self.dim)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)
