"""The causal conv (+ SiLU), from zeros or from initial states: XLA's ops and the Pallas kernels (in Pallas's
interpreter on CPU) against the float32 reference, forward and gradients; split over rows and channels inside a
sharded jit; argument errors."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_jax.sharding import make_mesh
from pallas_kernels.causal_conv import causal_conv1d
from pallas_kernels.causal_conv import pallas as conv_pallas
from tests.test_batch_split import ops_of
from tests.tolerances import assert_close

# (batch, seqlen, channels, width, silu, bias, dtype): seqlen past one block of time (64) with a tail, shorter than a
# tile (8), exactly a block; channels past one block (512) with a masked remainder, and a few.
CASES = [
    (2, 70, 40, 4, True, True, jnp.float32),
    (1, 5, 600, 3, False, False, jnp.float32),
    (2, 64, 16, 4, True, False, jnp.bfloat16),
    (1, 131, 24, 2, True, True, jnp.bfloat16),
    (1, 9, 8, 1, False, True, jnp.float32),
]


def inputs(batch, seqlen, channels, width, bias, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (batch, seqlen, channels)).astype(dtype)
    kernel = (jax.random.normal(keys[1], (width, channels)) / width).astype(dtype)
    b = jax.random.normal(keys[2], (channels,)).astype(dtype) if bias else None
    dy = jax.random.normal(keys[3], (batch, seqlen, channels))
    return x, kernel, b, dy


def history(x, width, seed=7):
    """Random initial states (b, w - 1, c) for x (b, l, c), in x's dtype."""
    shape = (x.shape[0], width - 1, x.shape[2])
    return jax.random.normal(jax.random.key(seed), shape).astype(x.dtype)


@pytest.mark.parametrize("initial", [False, True], ids=["zeros", "initial_states"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case, initial):
    batch, seqlen, channels, width, silu, bias, dtype = case
    x, kernel, b, dy = inputs(batch, seqlen, channels, width, bias, dtype)
    h = history(x, width) if initial else None

    def loss(implementation):
        def f(x, kernel, b, h):
            y = causal_conv1d(x, kernel, b, silu=silu, initial_states=h, implementation=implementation, interpret=True)
            return jnp.sum(y.astype(jnp.float32) * dy), y

        argnums = (0, 1) + ((2,) if bias else ()) + ((3,) if initial and width > 1 else ())
        return jax.value_and_grad(f, argnums=argnums, has_aux=True)(x, kernel, b, h)

    (_, want), want_grads = loss("reference")
    # XLA's ops in a 16-bit dtype round after every op (not the table's one rounding): their formula is checked in
    # float32.
    for implementation in ("xla", "pallas") if dtype == jnp.float32 else ("pallas",):
        (_, got), got_grads = loss(implementation)
        assert got.dtype == dtype and got.shape == x.shape
        assert_close(got, want, dtype)
        for g, w in zip(got_grads, want_grads, strict=True):
            assert g.dtype == w.dtype
            assert_close(g, w, dtype)


@pytest.mark.parametrize("implementation", ["reference", "xla"])
def test_torch_conv_semantics(implementation):
    """kernel[w - 1] multiplies the current step, kernel[0] the step w - 1 back; before the sequence is 0, or the
    initial states (the last of them at t = -1)."""
    x = jnp.arange(1.0, 6.0).reshape(1, 5, 1)
    kernel = jnp.array([[100.0], [10.0], [1.0]])
    y = causal_conv1d(x, kernel, jnp.array([0.5]), implementation=implementation)
    assert y[0, :, 0].tolist() == [1.5, 12.5, 123.5, 234.5, 345.5]
    before = jnp.array([7.0, 8.0]).reshape(1, 2, 1)
    y = causal_conv1d(x, kernel, jnp.array([0.5]), initial_states=before, implementation=implementation)
    assert y[0, :, 0].tolist() == [781.5, 812.5, 123.5, 234.5, 345.5]


def test_initial_states_continue_a_sequence():
    """A conv over x split in two, the second part from the first part's last w - 1 inputs, is the conv over x, for
    the Pallas kernels (interpreted) and XLA's ops."""
    x, kernel, b, _ = inputs(2, 150, 24, 4, True, jnp.float32, seed=3)
    whole = causal_conv1d(x, kernel, b, silu=True, implementation="reference")
    for implementation in ("xla", "pallas"):
        first = causal_conv1d(x[:, :67], kernel, b, silu=True, implementation=implementation, interpret=True)
        second = causal_conv1d(
            x[:, 67:], kernel, b, silu=True, initial_states=x[:, 64:67], implementation=implementation, interpret=True
        )
        assert_close(jnp.concatenate([first, second], axis=1), whole, jnp.float32)


def test_pallas_split_over_rows_and_channels():
    """Inside a sharded jit the kernels run on each device's rows and channels: nothing gathered, the same result."""
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    x, kernel, b, dy = inputs(4, 20, 32, 4, True, jnp.float32, seed=1)
    h = history(x, 4)

    def loss(x, kernel, b, h):
        y = causal_conv1d(x, kernel, b, silu=True, initial_states=h, implementation="pallas", interpret=True)
        return jnp.sum(y * dy)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    want = grad(x, kernel, b, h)
    specs = [P("data", None, "tensor"), P(None, "tensor"), P("tensor"), P("data", None, "tensor")]
    placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a, spec in zip((x, kernel, b, h), specs, strict=True)]
    ops = ops_of(grad.lower(*placed).compile())
    assert "all-gather" not in ops and "all-to-all" not in ops, ops
    got = grad(*placed)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, jnp.float32)


def test_bad_arguments():
    x = jnp.zeros((1, 4, 8))
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, channels\) and kernel \(width >= 1, channels\)"):
        causal_conv1d(x, jnp.zeros((4, 6)))
    with pytest.raises(ValueError, match=r"kernel \(width >= 1, channels\); got x \(1, 4, 8\), kernel \(0, 8\)"):
        causal_conv1d(x, jnp.zeros((0, 8)))
    with pytest.raises(ValueError, match="x must have a floating dtype, got int32"):
        causal_conv1d(x.astype(jnp.int32), jnp.full((4, 8), 0.5))
    with pytest.raises(ValueError, match="silu must be a Python bool"):
        jax.jit(lambda silu: causal_conv1d(x, jnp.zeros((4, 8)), silu=silu))(True)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\), got \(3,\)"):
        causal_conv1d(x, jnp.zeros((4, 8)), jnp.zeros(3))
    with pytest.raises(ValueError, match="implementation must be one of"):
        causal_conv1d(x, jnp.zeros((4, 8)), implementation="cuda")
    with pytest.raises(ValueError, match=f"widths up to {conv_pallas.MAX_WIDTH}, got 9"):
        causal_conv1d(x, jnp.zeros((9, 8)), implementation="pallas")
    with pytest.raises(
        ValueError, match=r"initial_states must have shape \(batch, width - 1, channels\) = \(1, 3, 8\)"
    ):
        causal_conv1d(x, jnp.zeros((4, 8)), initial_states=jnp.zeros((1, 4, 8)))


def test_nested_lists_are_arrays():
    x, kernel = [[[1.0, 2.0], [3.0, 4.0]]], [[0.5, 1.0], [1.0, 0.5]]
    got = causal_conv1d(x, kernel, implementation="reference")
    assert_close(got, causal_conv1d(jnp.array(x), jnp.array(kernel), implementation="reference"), jnp.float32)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case, initial",
    [
        ((8, 2048, 2048, 4, True, True, jnp.bfloat16), False),
        ((2, 1000, 2304, 4, True, True, jnp.float32), False),
        ((64, 128, 1536, 4, True, True, jnp.float16), True),  # a Mamba-1 130m batch-64 prefill from a cache
    ],
)
def test_pallas_on_gpu(case, initial):
    """The compiled kernels (the default on a GPU) at a Mamba-1 370m and a Mamba-2-like layer's shape, and from
    initial states at a prefill's."""
    from pallas_kernels.selective_scan.pallas import pallas_supported

    assert pallas_supported()
    batch, seqlen, channels, width, silu, bias, dtype = case
    x, kernel, b, dy = inputs(batch, seqlen, channels, width, bias, dtype, seed=2)
    h = history(x, width) if initial else None

    def grads(implementation):
        def f(x, kernel, b, h):
            y = causal_conv1d(x, kernel, b, silu=silu, initial_states=h, implementation=implementation)
            return jnp.sum(y.astype(jnp.float32) * dy), y

        argnums = (0, 1, 2, 3) if initial else (0, 1, 2)
        return jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))(x, kernel, b, h)

    (_, want), want_grads = grads("reference")
    (_, got), got_grads = grads(None)
    assert_close(got, want, dtype)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert_close(g, w, dtype)


def test_mamba1_mixer_with_the_kernels_interpreted():
    """The Mamba-1 mixer as a GPU runs it (its conv, with the SiLU, through the kernels; here the interpreter) gives
    the XLA conv's loss and parameter gradients, float32."""
    from flax import nnx

    from mamba_jax import Mamba

    layer = Mamba(d_model=16, d_state=4, rngs=nnx.Rngs(0), scan_implementation="reference")
    u = jax.random.normal(jax.random.key(1), (2, 70, 16))
    dy = jax.random.normal(jax.random.key(2), (2, 70, 16))

    def run(implementation):
        layer.conv1d.implementation = implementation
        return nnx.value_and_grad(lambda module: jnp.sum(module(u) * dy))(layer)

    (want, want_grads), (got, got_grads) = run("xla"), run("pallas")
    assert "pallas_call" in str(jax.make_jaxpr(lambda u: layer(u))(u))  # the kernels did run
    assert_close(got, want, jnp.float32)
    want_grads, got_grads = nnx.to_flat_state(want_grads), dict(nnx.to_flat_state(got_grads))
    for path, value in want_grads:
        assert_close(got_grads[path][...], value[...], jnp.float32, err_msg=str(path))
