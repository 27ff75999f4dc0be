"""pallas_kernels.batch_split on the 8 fake CPU devices: a kernel wrapped in ``over_batch`` runs on each device's rows
of the batch inside a sharded jit (no collective, no gathered operand), and the Pallas selective scan (interpreted)
and the fused decode steps give one device's results, forward and gradients, with their inputs split over the batch."""

import contextlib
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.mamba_step import random_layer
from benchmarks.partition_compile import PartitionRequests
from benchmarks.scaling import collectives
from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import kernel_split, make_mesh, named_sharding, state_shardings
from mamba_jax.train.loop import make_eval_step, make_train_step
from mamba_jax.train.remat import apply_remat
from pallas_kernels import mamba_chunk_scan
from pallas_kernels.batch_split import over_batch, split_over
from pallas_kernels.mamba2_step.pallas import mamba2_step_pallas
from pallas_kernels.mamba2_step.reference import mamba2_step_reference
from pallas_kernels.mamba_step import PartialSums, PreNorm
from pallas_kernels.mamba_step.pallas import mamba_step_pallas
from pallas_kernels.selective_scan import pallas_config
from pallas_kernels.selective_scan.pallas import selective_scan_pallas
from tests.test_mamba2_step import Shape, arguments
from tests.tolerances import assert_close


def ops_of(compiled) -> list[str]:
    return [c["op"] for c in collectives(compiled.as_text())]


def rows_then_weight(x, w):
    """x (b, l, d), w (d, e) -> ({"y": (b, l, e)}, (b,)): row-wise work, as a kernel's."""
    return {"y": jnp.cumsum(x, axis=1) @ w}, x.sum(axis=(1, 2))


def test_over_batch_runs_each_device_on_its_rows():
    mesh = make_mesh(data=2, fsdp=4)
    x = jax.random.normal(jax.random.key(0), (8, 6, 5))
    w = jax.random.normal(jax.random.key(1), (5, 3))
    split = NamedSharding(mesh, P(("data", "fsdp")))
    run = jax.jit(lambda x, w: over_batch(rows_then_weight, [x, w], [True, False]))
    compiled = run.lower(jax.device_put(x, split), w).compile()
    assert ops_of(compiled) == []
    assert "f32[1,6,5]" in compiled.as_text()  # the function's body on one row per device
    (got, sums), (expected, expected_sums) = run(jax.device_put(x, split), w), rows_then_weight(x, w)
    assert got["y"].sharding.spec == P(("data", "fsdp"))
    assert_close(got["y"], expected["y"], jnp.float32)
    assert_close(sums, expected_sums, jnp.float32)
    # Unsharded (one device's jit) and eager calls run the function as written.
    assert_close(run(x, w)[0]["y"], expected["y"], jnp.float32)
    assert_close(over_batch(rows_then_weight, [x, w], [True, False])[1], expected_sums, jnp.float32)


def test_over_batch_makes_other_dimensions_whole():
    """A weight split over "tensor" and the operands' feature dimension split too: gathered, the result still right;
    a batch the mesh axes do not divide runs whole on every device."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    x = jax.random.normal(jax.random.key(0), (4, 6, 8))
    w = jax.random.normal(jax.random.key(1), (8, 4))
    run = jax.jit(lambda x, w: over_batch(rows_then_weight, [x, w], [True, False]))
    got = run(
        jax.device_put(x, NamedSharding(mesh, P("data", None, "tensor"))),
        jax.device_put(w, NamedSharding(mesh, P("tensor"))),
    )
    assert_close(got[0]["y"], rows_then_weight(x, w)[0]["y"], jnp.float32)
    # Three rows of a batch split four ways (data x fsdp): the rows run whole on every device.
    split = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
    got = jax.jit(lambda x, w: over_batch(rows_then_weight, [x[:3], w], [True, False]))(split, w)
    assert_close(got[1], rows_then_weight(x[:3], w)[1], jnp.float32)


def scan_inputs(batch=8, seqlen=20, dim=12, n=4):
    keys = jax.random.split(jax.random.key(3), 9)
    u, delta, z = (jax.random.normal(k, (batch, seqlen, dim)) for k in keys[:3])
    B, C = (jax.random.normal(k, (batch, seqlen, 1, n)) for k in keys[3:5])
    A = -jnp.exp(jax.random.normal(keys[5], (dim, n)))
    D, delta_bias = (jax.random.normal(k, (dim,)) for k in keys[6:8])
    h0 = jax.random.normal(keys[8], (batch, dim, n))
    return u, delta, A, B, C, D, z, delta_bias, h0


def scan_loss(u, delta, A, B, C, D, z, delta_bias, h0):
    out, last = selective_scan_pallas(u, delta, A, B, C, D, z, delta_bias, True, h0, interpret=True)
    return jnp.sum(out * jnp.cos(out)) + jnp.sum(last**2), (out, last)


def test_selective_scan_pallas_split_over_the_batch():
    mesh = make_mesh(data=2, fsdp=4)
    inputs = scan_inputs()
    batched = (True, True, False, True, True, False, True, False, True)
    placed = [
        jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")) if flag else P()))
        for x, flag in zip(inputs, batched, strict=True)
    ]
    grad = jax.jit(jax.value_and_grad(scan_loss, argnums=tuple(range(9)), has_aux=True))
    compiled = grad.lower(*placed).compile()
    # Only the batch sums of the per-channel gradients (dA, dD, d delta_bias) cross devices.
    assert "all-gather" not in ops_of(compiled), ops_of(compiled)
    (loss, (out, last)), grads = grad(*placed)
    (loss1, (out1, last1)), grads1 = jax.jit(jax.value_and_grad(scan_loss, argnums=tuple(range(9)), has_aux=True))(
        *inputs
    )
    assert out.sharding.spec == P(("data", "fsdp"))
    assert_close(out, out1, jnp.float32)
    assert_close(last, last1, jnp.float32)
    assert_close(loss, loss1, jnp.float32)
    for name, g, g1 in zip("u delta A B C D z delta_bias h0".split(), grads, grads1, strict=True):
        assert_close(g, g1, jnp.float32, err_msg=name)


@pytest.mark.parametrize("explicit", [False, True], ids=["auto-axes", "explicit-axes"])
def test_selective_scan_pallas_split_over_batch_and_channels(explicit):
    """Tensor parallelism: u, delta, z, A, D, delta_bias and h0 split over d_inner too (B and C whole). Each device
    scans its rows and its 32 channels: no operand is gathered; the per-channel gradients' batch sums and dB, dC's
    sums over channels are the only collectives (all-reduces). On Explicit axes the same split runs under shard_map."""
    if explicit:
        mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    else:
        mesh = make_mesh(data=2, fsdp=1, tensor=4)
    inputs = scan_inputs(batch=4, seqlen=20, dim=128, n=4)
    specs = [
        P("data", None, "tensor"),
        P("data", None, "tensor"),
        P("tensor", None),
        P("data"),
        P("data"),
        P("tensor"),
        P("data", None, "tensor"),
        P("tensor"),
        P("data", "tensor", None),
    ]
    grad = jax.jit(jax.value_and_grad(scan_loss, argnums=tuple(range(9)), has_aux=True))
    (loss1, (out1, last1)), grads1 = grad(*inputs)
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(inputs, specs, strict=True)]
        ops = ops_of(grad.lower(*placed).compile())
        assert "all-gather" not in ops and "all-to-all" not in ops, ops
        (loss, (out, last)), grads = grad(*placed)
    assert out.sharding.spec == P("data", None, "tensor")
    assert_close(out, out1, jnp.float32)
    assert_close(last, last1, jnp.float32)
    assert_close(loss, loss1, jnp.float32)
    for name, g, g1 in zip("u delta A B C D z delta_bias h0".split(), grads, grads1, strict=True):
        assert_close(g, g1, jnp.float32, err_msg=name)


def test_selective_scan_pallas_split_keeps_the_whole_calls_chunks(monkeypatch):
    """The Triton path picks its time chunks from the number of programs: fixed from the whole batch, not from each
    device's rows (a device's 1 row would cut 512 steps into 8 chunks where the whole batch's 8 rows give 4, and the
    results' shapes would not fit the call's)."""
    monkeypatch.setattr(pallas_config, "TARGET_PROGRAMS", 32)  # real sizes' chunking on a small shape
    inputs = scan_inputs(batch=8, seqlen=512, dim=16, n=2)
    batched = (True, True, False, True, True, False, True, False, True)
    mesh = make_mesh(data=8, fsdp=1)
    placed = [
        jax.device_put(x, NamedSharding(mesh, P("data") if flag else P()))
        for x, flag in zip(inputs, batched, strict=True)
    ]
    grad = jax.jit(jax.value_and_grad(scan_loss, argnums=(0, 2), has_aux=True))
    (_, (out, last)), grads = grad(*placed)
    (_, (out1, last1)), grads1 = grad(*inputs)
    assert_close(out, out1, jnp.float32)
    assert_close(last, last1, jnp.float32)
    for name, g, g1 in zip(("u", "A"), grads, grads1, strict=True):
        assert_close(g, g1, jnp.float32, err_msg=name)


def test_selective_scan_pallas_under_explicit_axes():
    """jax.make_mesh's Explicit axes put the shardings into the types, where a Pallas kernel refuses sharded operands
    while tracing; over_batch runs the kernels under shard_map there: one device's forward and gradients, no gather."""
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit, AxisType.Explicit))
    inputs = scan_inputs()
    batched = (True, True, False, True, True, False, True, False, True)
    grad = jax.jit(jax.value_and_grad(scan_loss, argnums=tuple(range(9)), has_aux=True))
    (loss1, (out1, _)), grads1 = grad(*inputs)
    with jax.set_mesh(mesh):
        placed = [
            jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")) if flag else P()))
            for x, flag in zip(inputs, batched, strict=True)
        ]
        assert "all-gather" not in ops_of(grad.lower(*placed).compile())
        (loss, (out, _)), grads = grad(*placed)
    assert out.sharding.spec[0] == ("data", "fsdp")
    assert_close(out, out1, jnp.float32)
    assert_close(loss, loss1, jnp.float32)
    for name, g, g1 in zip("u delta A B C D z delta_bias h0".split(), grads, grads1, strict=True):
        assert_close(g, g1, jnp.float32, err_msg=name)


@pytest.mark.parametrize(
    "d_model, batch, dtype, options",
    [
        (16, 4, "float32", {}),
        (32, 8, "bfloat16", dict(conv_in_proj=True)),  # in_proj's kernel with the conv, two rows a device
    ],
    ids=str,
)
def test_mamba_step_pallas_split_over_the_batch(d_model, batch, dtype, options):
    """Each device steps its rows: the results of the whole batch on one device, and no weight gathered."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    dtype = jnp.dtype(dtype)
    weights = random_layer(jax.random.key(1), d_model, dtype)
    u = jax.random.normal(jax.random.key(2), (batch, d_model)).astype(dtype)
    conv_state = jax.random.normal(jax.random.key(3), (batch, 4, 2 * d_model)).astype(dtype)
    ssm_state = jax.random.normal(jax.random.key(4), (batch, 2 * d_model, 16))
    split = NamedSharding(mesh, P(("data", "fsdp")))
    step = jax.jit(lambda *args: mamba_step_pallas(*args, dtype=dtype, interpret=True, **options))
    placed = [jax.device_put(x, split) for x in (u, conv_state, ssm_state)]
    assert "all-gather" not in ops_of(step.lower(*placed, weights).compile())
    got = step(*placed, weights)
    # one device's run of the same kernels (tests/test_mamba_step.py holds them to the reference in every dtype)
    expected = step(u, conv_state, ssm_state, weights)
    for name, a, b in zip(("out", "conv_state", "ssm_state"), got, expected, strict=True):
        assert a.sharding.spec == P(("data", "fsdp")), name
        assert_close(a, b, jnp.float32, err_msg=name)


def test_mamba_step_pallas_partial_sums_split_over_the_batch():
    """A step that takes the previous block's out as partial sums (parts, b, d), the batch second, and returns its
    own so (``partial_out``): each device its rows, no collective, one device's results."""
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    batch, d_model, dtype = 8, 16, jnp.dtype(jnp.bfloat16)  # two rows a device: the kernels of the whole batch
    weights = random_layer(jax.random.key(1), d_model, dtype)
    sums = jax.random.normal(jax.random.key(2), (3, batch, d_model))
    residual = jax.random.normal(jax.random.key(5), (batch, d_model))
    conv_state = jax.random.normal(jax.random.key(3), (batch, 4, 2 * d_model)).astype(dtype)
    ssm_state = jax.random.normal(jax.random.key(4), (batch, 2 * d_model, 16))

    def step(sums, conv_state, ssm_state, residual):
        prenorm = PreNorm(residual, jnp.ones((d_model,), dtype), 1e-5, dtype)
        u = PartialSums(sums, dtype)
        return mamba_step_pallas(
            u, conv_state, ssm_state, weights, dtype, prenorm=prenorm, interpret=True, partial_out=True
        )

    step = jax.jit(step)
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    placed = [jax.device_put(sums, NamedSharding(mesh, P(None, ("data", "fsdp"))))]
    placed += [jax.device_put(x, rows) for x in (conv_state, ssm_state, residual)]
    ops = ops_of(step.lower(*placed).compile())
    assert "all-gather" not in ops and "all-to-all" not in ops, ops
    got, expected = step(*placed), step(sums, conv_state, ssm_state, residual)
    assert isinstance(got[0], PartialSums) and got[0].sums.sharding.spec == P(None, ("data", "fsdp"))
    for name, a, b in zip(("out", "conv_state", "ssm_state", "residual"), got, expected, strict=True):
        if isinstance(a, PartialSums):
            a, b = a.sums, b.sums
        assert_close(a, b, jnp.float32, err_msg=name)


def test_mamba2_step_pallas_split_over_the_batch():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    u, conv_state, ssm_state, weights = arguments(Shape(4, 32, 2, 16, 8, 1, 4, "float32"), seed=0)
    split = NamedSharding(mesh, P(("data", "fsdp")))
    step = jax.jit(lambda *args: mamba2_step_pallas(*args, jnp.float32, interpret=True))
    placed = [jax.device_put(x, split) for x in (u, conv_state, ssm_state)]
    assert "all-gather" not in ops_of(step.lower(*placed, weights).compile())
    got = step(*placed, weights)
    expected = mamba2_step_reference(u, conv_state, ssm_state, weights, jnp.float32)
    for name, a, b in zip(("out", "conv_state", "ssm_state"), got, expected, strict=True):
        assert a.sharding.spec == P(("data", "fsdp")), name
        assert_close(a, b, jnp.float32, err_msg=name)


def check_lm_on_mesh(config, remat: str, batch_shape: tuple[int, int], mesh, split: bool) -> str:
    """A Mamba-1 LM with the (interpreted) Pallas scan and ``remat``: the loss and gradients of a batch of
    ``batch_shape`` tokens placed on ``mesh`` by the sharding rules equal one device's; returns the compiled step's
    HLO text. ``split``: trace the gradient inside ``kernel_split`` (the kernels under shard_map; XLA then never asks
    the custom_partitioning rule to partition), else leave the split to that rule (asked at least once a layer)."""
    model = apply_remat(MambaLMHeadModel(config, rngs=nnx.Rngs(0), scan_implementation="pallas"), remat)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    tokens = jax.random.randint(jax.random.key(1), batch_shape, 0, config.vocab_size)

    def loss_fn(params, tokens):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    def sharded(params, tokens):
        with kernel_split(mesh) if split else contextlib.nullcontext():
            return jax.value_and_grad(loss_fn)(params, tokens)

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, tokens)
    placed = jax.device_put(params, nnx.to_pure_dict(state_shardings(state, mesh)))
    batch = jax.device_put(tokens, named_sharding(("batch", None), tokens.shape, mesh))
    with PartitionRequests() as requests:
        compiled = jax.jit(sharded).lower(placed, batch).compile()
    assert (requests.count == 0) if split else (requests.count >= config.n_layer), requests.count
    s_loss, s_grads = compiled(placed, batch)
    assert_close(s_loss, loss, jnp.float32)
    for (path, g), s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(s_grads), strict=True):
        assert_close(s, g, jnp.float32, err_msg=jax.tree_util.keystr(path))
    return compiled.as_text()


# kernel_split with "dots" only: the rematerialised backward is the case where the split must reach a trace made
# after the forward's (each variant compiles the interpreted kernels: ~25 s).
SPLIT_CASES = [("none", False), ("dots", False), ("dots", True)]


@pytest.mark.parametrize(("remat", "split"), SPLIT_CASES, ids=["none-partitioned", "dots-partitioned", "dots-split"])
def test_mamba1_model_with_the_pallas_scan_data_parallel(remat, split):
    """A whole Mamba-1 LM with the (interpreted) Pallas scan, the batch split 8 ways, with and without the training
    loop's rematerialisation, the kernels split by custom_partitioning or under ``kernel_split``'s shard_map: one
    device's loss and gradients, and the only collective of the compiled step is the gradients' all-reduce (the
    scan's operands are not gathered: before ``over_batch`` they were, with 20 all-gathers and 80 collective permutes
    in this program)."""
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=61, ssm_cfg={"d_state": 4})
    hlo = check_lm_on_mesh(config, remat, (8, 11), make_mesh(data=8, fsdp=1), split)
    assert [c["op"] for c in collectives(hlo)] == ["all-reduce"]


@pytest.mark.parametrize(("remat", "split"), SPLIT_CASES, ids=["none-partitioned", "dots-partitioned", "dots-split"])
def test_mamba1_model_with_the_pallas_scan_tensor_parallel(remat, split):
    """The same LM over data 2 x tensor 4 with the model's sharding rules (in_proj column-parallel, out_proj and
    x_proj row-parallel), with and without rematerialisation, split either way: one device's loss and gradients, and
    the scan runs on each device's rows and 32 of the 128 channels. The compiled step has no all-gather at all
    (before the channel split: the scan's (b, l, d_inner) operands and cotangents, and its per-channel parameters,
    were gathered whole onto every device); its collectives are those of XLA's own partitioning of the chunked
    scan."""
    config = MambaConfig(d_model=64, n_layer=2, vocab_size=64, ssm_cfg={"d_state": 4})
    hlo = check_lm_on_mesh(config, remat, (4, 9), make_mesh(data=2, fsdp=1, tensor=4), split)
    assert " all-gather(" not in hlo, [line for line in hlo.splitlines() if " all-gather(" in line]


def test_split_over_is_part_of_the_jit_key_and_checked():
    """A function jitted inside ``split_over`` and outside it is traced for each (jax's caches tell the contexts
    apart): the scan under shard_map inside, not outside, right both times. Axes the mesh lacks, or one axis named
    twice, are a ValueError naming them."""
    mesh = make_mesh(data=2, fsdp=4)
    inputs = scan_inputs()
    loss = jax.jit(lambda *args: scan_loss(*args)[0])
    expected = loss(*inputs)
    assert "shard_map" not in str(loss.trace(*inputs).jaxpr)
    with split_over(mesh, batch=("data", "fsdp")):
        assert "shard_map" in str(loss.trace(*inputs).jaxpr)
        assert_close(loss(*inputs), expected, jnp.float32)
    assert "shard_map" not in str(loss.trace(*inputs).jaxpr)
    with pytest.raises(ValueError, match=r"batch \('data', 'rows'\).*mesh"):
        with split_over(mesh, batch=("data", "rows")):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with split_over(mesh, batch=("data",), channels=("data",)):
            pass


def test_training_and_eval_steps_trace_the_kernels_under_shard_map():
    """The training loop's steps enter ``kernel_split`` from their parameters' mesh: the scan's launches, forward
    and backward, are shard_maps in the traced step (no custom_partitioning left for XLA to ask about)."""
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=61, ssm_cfg={"d_state": 4})
    graphdef, state = nnx.split(MambaLMHeadModel(config, rngs=nnx.Rngs(0), scan_implementation="pallas"))
    params = nnx.to_pure_dict(state)
    shardings = nnx.to_pure_dict(state_shardings(state, make_mesh(data=2, fsdp=4)))
    tx = optax.sgd(0.1)
    tokens = jnp.zeros((1, 8, 12), jnp.int32)
    train = str(jax.make_jaxpr(make_train_step(graphdef, tx, shardings))(params, tx.init(params), tokens))
    assert "shard_map" in train and "custom_partitioning" not in train
    evaluate = str(make_eval_step(graphdef, shardings).trace(params, tokens[0]).jaxpr)
    assert "shard_map" in evaluate and "custom_partitioning" not in evaluate


def test_ssd_pallas_split_over_rows_and_heads():
    """The Mamba-2 SSD kernels (interpreted) under tensor parallelism: x, dt, A, D and the initial state split over
    heads, the batch over "data", B and C (one group) whole. Each device runs its rows and heads: no operand is
    gathered; one device's outputs and gradients."""
    mesh = make_mesh(data=2, fsdp=1, tensor=4)
    batch, length, heads, headdim, d_state = 2, 24, 8, 4, 3
    keys = jax.random.split(jax.random.key(3), 7)
    inputs = (
        jax.random.normal(keys[0], (batch, length, heads, headdim)),
        jax.random.normal(keys[1], (batch, length, heads)),
        -jnp.exp(jax.random.normal(keys[2], (heads,))),
        jax.random.normal(keys[3], (batch, length, 1, d_state)),
        jax.random.normal(keys[4], (batch, length, 1, d_state)),
        jax.random.normal(keys[5], (heads,)),
        jax.random.normal(keys[6], (batch, heads, headdim, d_state)),
    )
    specs = [P("data", None, "tensor"), P("data", None, "tensor"), P("tensor"), P("data"), P("data"), P("tensor")]
    specs.append(P("data", "tensor"))

    def loss(x, dt, A, B, C, D, h0):
        out, last = mamba_chunk_scan(
            x,
            dt,
            A,
            B,
            C,
            8,
            D=D,
            dt_softplus=True,
            initial_states=h0,
            return_final_states=True,
            implementation="pallas",
        )
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(last**2), out

    grad = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7)), has_aux=True))
    (loss1, out1), grads1 = grad(*inputs)
    placed = [jax.device_put(x, NamedSharding(mesh, spec)) for x, spec in zip(inputs, specs, strict=True)]
    ops = ops_of(grad.lower(*placed).compile())
    assert "all-gather" not in ops and "all-to-all" not in ops, ops
    (loss, out), grads = grad(*placed)
    assert out.sharding.spec == P("data", None, "tensor")
    assert_close(out, out1, jnp.float32)
    assert_close(loss, loss1, jnp.float32)
    for name, g, g1 in zip("x dt A B C D h0".split(), grads, grads1, strict=True):
        assert_close(g, g1, jnp.float32, err_msg=name)


REPO_ROOT = Path(__file__).resolve().parents[1]
VMAP_ON_ONE_DEVICE = """
import jax
jax.config.update("jax_num_cpu_devices", 1)
import jax.numpy as jnp
from flax import nnx
from mamba_jax import Mamba, Mamba2

x = jax.random.normal(jax.random.key(0), (3, 2, 8, 32))  # (an extra axis, batch, seqlen, d_model)
for layer in (Mamba(32, d_state=4, rngs=nnx.Rngs(0), scan_implementation="pallas"),
              Mamba2(32, d_state=4, headdim=16, rngs=nnx.Rngs(0), ssd_implementation="pallas")):
    graph, state = nnx.split(layer)
    f = lambda x: nnx.merge(graph, state)(x)
    mapped = jax.vmap(f)(x)
    assert max(float(jnp.max(jnp.abs(mapped[i] - f(x[i])))) for i in range(3)) < 1e-5
print("ok")
"""


def test_vmap_over_the_pallas_paths_on_one_device():
    """In a one-device process over_batch calls the kernels as they are: jax.vmap over a layer on its Pallas path
    (the default on one GPU) works, where custom_partitioning, which has no batching rule, made it fail. (A process
    of its own: the tests' own process has 8 devices.)"""
    result = subprocess.run(
        [sys.executable, "-c", VMAP_ON_ONE_DEVICE], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
