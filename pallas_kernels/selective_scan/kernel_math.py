"""Float32 arithmetic for the scan kernels, each operation one PTX instruction on the GPU.

XLA compiles Pallas's Triton kernels without floating-point contraction and with IEEE denormals: ``a * b + c`` is a
multiply and an add (never one fused multiply-add), ``jnp.exp2`` is the special-function instruction wrapped in three
more that rescale denormal arguments and results, and ``1 / x`` is a full-precision division. Profiled on an H100
(benchmarks/notes_selective_scan.md, v6) the kernels were issue-bound with about 200 instructions a step, 45% of them
multiplies. The scan needs none of that: a decay below 2^-126 is as good as 0, and the approximate instructions are
within 2 ulp. So the kernels spell their arithmetic with these helpers: inline PTX on the GPU, the same function with
jnp operations under Pallas's interpreter (the CPU tests).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as plt

# exp(x) = exp2(x log2 e): the kernels scale A once so each decay is one exp2.
LOG2_E = math.log2(math.e)
LN_2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class KernelMath:
    """interpret: plain jnp operations instead of inline PTX: for Pallas's interpreter, and for Mosaic GPU kernels,
    which lower them with ``approx_math`` to the same single instructions themselves (``mosaic_fwd.py``)."""

    interpret: bool

    def _ptx(self, instruction: str, *args: jax.Array) -> jax.Array:
        """One float32 PTX instruction ``instruction $0, $1, ...;`` applied elementwise."""
        operands = ", ".join(f"${i}" for i in range(len(args) + 1))
        [result] = plt.elementwise_inline_asm(
            f"{instruction} {operands};",
            args=list(args),
            constraints="=f" + ",f" * len(args),
            pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)],
        )
        return result

    def barrier(self) -> None:
        """Every thread of a Triton program waits here until all have arrived, their earlier loads done. A kernel that
        updates a buffer in place calls it between reading and overwriting: Triton spreads a block's elements over
        warps that run unsynchronised, and replicates a small block in several, so without it one warp can read an
        element another has already overwritten. The interpreter runs a program's operations in order: no-op."""
        if not self.interpret:
            plt.debug_barrier()

    def exp2(self, x: jax.Array) -> jax.Array:
        """2^x; results below 2^-126 flush to 0."""
        return jnp.exp2(x) if self.interpret else self._ptx("ex2.approx.ftz.f32", x)

    def log2(self, x: jax.Array) -> jax.Array:
        return jnp.log2(x) if self.interpret else self._ptx("lg2.approx.ftz.f32", x)

    def reciprocal(self, x: jax.Array) -> jax.Array:
        return 1.0 / x if self.interpret else self._ptx("rcp.approx.ftz.f32", x)

    def fma(self, a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
        """a * b + c, rounded once on the GPU."""
        if self.interpret:
            return a * b + c
        a, b, c = jnp.broadcast_arrays(a, b, c)
        return self._ptx("fma.rn.f32", a, b, c)

    def softplus(self, x: jax.Array) -> jax.Array:
        """log(1 + e^x) = max(x, 0) + ln 2 log2(1 + 2^(-|x| log2 e)), without overflow. For very negative x it returns
        0 where the exact value is below float32's resolution of 1 + e^x, an absolute error under 1e-7."""
        return self.fma(self.log2(1.0 + self.exp2(jnp.abs(x) * -LOG2_E)), LN_2, jnp.maximum(x, 0.0))

    def sigmoid(self, x: jax.Array) -> jax.Array:
        """1 / (1 + e^-x); 0 where e^-x overflows."""
        return self.reciprocal(1.0 + self.exp2(x * -LOG2_E))

    def dot(self, a: list[jax.Array], b: list[jax.Array], init: jax.Array) -> jax.Array:
        """init + sum_k a[k] b[k] as fused multiply-adds in four independent chains (a short dependency chain)."""
        chains = [init] + [None] * 3
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            j = k % 4
            chains[j] = x * y if chains[j] is None else self.fma(x, y, chains[j])
        chains = [c for c in chains if c is not None]
        while len(chains) > 1:
            chains = [chains[i] + chains[i + 1] if i + 1 < len(chains) else chains[i] for i in range(0, len(chains), 2)]
        return chains[0]
