"""FSDP in the training step on the fake CPU devices: the explicit parameter gather (cast to the compute dtype, then
all-gathered; gradients reduce-scattered) gives one device's step, and the step's collective traffic depends on the
parameters only, never on the number of tokens (no activation is gathered or all-reduced)."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.scaling import collective_table, collectives
from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import drop_mesh_axis, make_mesh, named_sharding, state_shardings
from mamba_jax.train import TrainConfig
from mamba_jax.train.loop import gather_params, make_train_step, next_token_loss
from mamba_jax.train.optim import make_optimizer
from tests.tolerances import assert_close

# Mamba-2, one layer; every fsdp-split dimension (d_model 32, padded vocab 64) divides by 8.
CONFIG = MambaConfig(
    d_model=32,
    n_layer=1,
    vocab_size=61,
    ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
)


def model_fn(dtype=None):
    return MambaLMHeadModel(CONFIG, rngs=nnx.Rngs(0), dtype=dtype)


def test_drop_mesh_axis():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cases = {
        P("fsdp", "tensor"): P(None, "tensor"),
        P(("data", "fsdp"), None): P("data", None),
        P("tensor", "fsdp"): P("tensor", None),
        P(): P(),
    }
    for spec, expected in cases.items():
        assert drop_mesh_axis(NamedSharding(mesh, spec), "fsdp").spec == expected


def test_casting_before_the_gather_changes_nothing():
    """A bf16 model fed parameters pre-cast by gather_params gives the same loss and float32 gradients as the model
    casting its float32 parameters itself (one device: the gather is a no-op, the cast is what is tested)."""
    mesh = make_mesh(devices=jax.devices()[:1])
    graphdef, state = nnx.split(model_fn(jnp.bfloat16))
    params, shardings = nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, CONFIG.vocab_size)

    @jax.jit
    def both(params):
        plain = jax.value_and_grad(lambda p: next_token_loss(nnx.merge(graphdef, p), tokens))(params)
        cast = jax.value_and_grad(
            lambda p: next_token_loss(nnx.merge(graphdef, gather_params(p, shardings, jnp.bfloat16)), tokens)
        )(params)
        return plain, cast

    (loss, grads), (cast_loss, cast_grads) = both(params)
    assert_close(cast_loss, loss, jnp.float32)
    cast_leaves = jax.tree.leaves(cast_grads)
    for (path, g), c in zip(jax.tree_util.tree_leaves_with_path(grads), cast_leaves, strict=True):
        assert c.dtype == jnp.float32, path
        assert_close(c, g, jnp.float32, err_msg=jax.tree_util.keystr(path))


def train_step(mesh, batch: int, seq_len: int, compute_dtype=None):
    """(jitted step of make_train_step on ``mesh``, params, opt_state, tokens (1, batch, seq_len + 1))."""
    graphdef, state = nnx.split(model_fn(compute_dtype))
    shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    params = jax.device_put(nnx.to_pure_dict(state), shardings)
    tx = make_optimizer(TrainConfig(batch_size=batch, warmup_steps=0, lr=1e-2), params)
    shape = (1, batch, seq_len + 1)
    tokens = jax.random.randint(jax.random.key(2), shape, 0, CONFIG.vocab_size)
    tokens = jax.device_put(tokens, named_sharding((None, "batch", None), shape, mesh))
    step = jax.jit(make_train_step(graphdef, tx, shardings, compute_dtype))
    return step, params, tx.init(params), tokens


@pytest.mark.parametrize(
    "sizes, compute_dtype",
    [((1, 8, 1), None), ((1, 8, 1), jnp.bfloat16), ((2, 2, 2), None)],
    ids=["fsdp-float32", "fsdp-bfloat16", "dp-fsdp-tp-float32"],
)
def test_sharded_step_matches_one_device(sizes, compute_dtype):
    """One optimizer step on a sharded mesh: the same loss and updated parameters as on one device, and the updated
    parameters still split over fsdp (the optimizer update ran on shards, not on replicated arrays)."""
    tolerance_dtype = jnp.float32 if compute_dtype is None else compute_dtype
    results = {}
    for name, mesh in {"one": make_mesh(devices=jax.devices()[:1]), "sharded": make_mesh(*sizes)}.items():
        step, params, opt_state, tokens = train_step(mesh, batch=8, seq_len=12, compute_dtype=compute_dtype)
        results[name] = step(params, opt_state, tokens)
    (params, _, metrics), (sharded_params, _, sharded_metrics) = results["one"], results["sharded"]
    assert_close(sharded_metrics["loss"], metrics["loss"], tolerance_dtype)
    assert_close(sharded_metrics["grad_norm"], metrics["grad_norm"], tolerance_dtype)
    leaves = jax.tree.leaves(sharded_params)
    for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(params), leaves, strict=True):
        assert_close(q, p, tolerance_dtype, err_msg=jax.tree_util.keystr(path))
    in_proj = sharded_params["backbone"]["layers"][0]["mixer"]["in_proj"]["kernel"]
    assert in_proj.sharding.spec[0] == "fsdp"


def test_fsdp_moves_only_parameters():
    """Every floating-point all-gather / all-reduce / reduce-scatter of the compiled fsdp=4 step carries parameters
    or their gradients (an array of a parameter's shape, or transposed, or a scalar), never activations. Before the
    explicit gather, the (b, l, v) logits were all-reduced and all-gathered over the fsdp devices.

    All-to-all is left out: for the embedding gradient XLA may move the (b, l, d) scatter updates by an all-to-all
    when that is cheaper than reducing the (v, d) table (it picks by size; integer token ids go with them)."""
    step, params, opt_state, tokens = train_step(make_mesh(fsdp=4, devices=jax.devices()[:4]), 8, 16)
    shapes = {x.shape for x in jax.tree.leaves(params)}
    shapes |= {shape[::-1] for shape in shapes} | {()}
    found = collectives(step.lower(params, opt_state, tokens).compile().as_text())
    moved = [c for c in found if c["op"] != "all-to-all" and c["shapes"].startswith(("f", "bf"))]
    assert any(c["op"] == "all-gather" for c in moved)
    for c in moved:
        for array in c["shapes"].split():
            dims = array[array.index("[") + 1 : -1]
            assert tuple(int(d) for d in dims.split(",") if d) in shapes, c


def test_collectives_parser():
    hlo = """
  %all-gather.1 = f32[1024,4384]{1,0} all-gather(%p), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %all-reduce.2 = (f32[], bf16[8,16]{1,0}) all-reduce(%a, %b), channel_id=2, to_apply=%add
  %ag-start = (bf16[256]{0}, bf16[1024]{0}) all-gather-start(%x), channel_id=3, dimensions={0}
  %ag-done = bf16[1024]{0} all-gather-done(%ag-start)
  %add.3 = f32[4] add(%all-gather.1, %c)
"""
    found = collectives(hlo)
    assert [(c["op"], c["shapes"], c["bytes"]) for c in found] == [
        ("all-gather", "f32[1024,4384]", 4 * 1024 * 4384),
        ("all-reduce", "f32[] bf16[8,16]", 4 + 2 * 8 * 16),
        ("all-gather", "bf16[1024]", 2 * 1024),
    ]
    assert collective_table(found + found[:1])[0] == {
        "op": "all-gather",
        "shapes": "f32[1024,4384]",
        "count": 2,
        "bytes": 2 * 4 * 1024 * 4384,
    }
