"""mamba_jax.sharding on the 8 fake CPU devices: meshes, the rules, a model created sharded, and the same loss,
logits and gradients on every mesh (DP, FSDP, TP, combined) as on one device."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import (
    check_batch_size,
    constrain,
    fit_spec,
    make_mesh,
    named_sharding,
    partition_specs,
    shard_model,
    state_shardings,
)
from tests.tolerances import assert_close

# d_inner 32, vocab padded to 64: every sharded dimension divides by 8, so TP over 8 devices really splits.
CONFIG = MambaConfig(d_model=16, n_layer=1, vocab_size=61, ssm_cfg={"d_state": 4})


def model_fn():
    return MambaLMHeadModel(CONFIG, rngs=nnx.Rngs(0))


def test_make_mesh_sizes():
    assert dict(make_mesh().shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dict(make_mesh(data=2, fsdp=2, tensor=2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(data=-1, fsdp=1, tensor=4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert dict(make_mesh(fsdp=2, devices=jax.devices()[:2]).shape) == {"data": 1, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize(
    "sizes, message",
    [
        ({"data": 3}, "fixed axes' product 3 does not divide 8"),
        ({"data": 2, "fsdp": 2, "tensor": 1}, "needs 4 devices, but there are 8"),
        ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
        ({"tensor": 0}, "tensor must be a positive int or -1, got 0"),
    ],
)
def test_make_mesh_errors(sizes, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(**sizes)


def test_fit_spec_drops_what_cannot_apply():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    assert fit_spec(P("fsdp", "tensor"), (4, 6), mesh) == P("fsdp", "tensor")
    assert fit_spec(P("fsdp", "tensor"), (3, 6), mesh) == P(None, "tensor")  # 3 rows do not split in 2
    assert fit_spec(P(("data", "fsdp"), None), (8, 5), mesh) == P(("data", "fsdp"), None)
    assert fit_spec(P(("data", "fsdp"), "fsdp"), (8, 4), mesh) == P(("data", "fsdp"), None)  # fsdp used once
    with pytest.raises(ValueError, match="mesh axes \\['model'\\] absent"):
        fit_spec(P("model"), (4,), mesh)


def test_check_batch_size():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    check_batch_size(8, mesh)
    with pytest.raises(ValueError, match=r"batch size 6 is not divisible by the batch mesh axes .* \(product 4\)"):
        check_batch_size(6, mesh)


MESHES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (1, 1, 8), "dp-fsdp-tp": (2, 2, 2)}


def loss_logits_grads(graphdef, params, tokens):
    """tokens (b, l + 1) -> (loss, logits (b, l, v), grads like params)."""

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads


@pytest.fixture(scope="module")
def one_device():
    """A model (eager init), a batch, and the one-device (loss, logits, grads) every mesh must reproduce."""
    tokens = jax.random.randint(jax.random.key(1), (8, 13), 0, CONFIG.vocab_size)
    graphdef, state = nnx.split(model_fn())
    params = nnx.to_pure_dict(state)
    return graphdef, state, tokens, jax.jit(loss_logits_grads, static_argnums=0)(graphdef, params, tokens)


def test_shard_model_places_parameters_by_their_logical_axes(one_device):
    _, state, _, _ = one_device
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = shard_model(model_fn, mesh)
    specs = dict(nnx.to_flat_state(partition_specs(nnx.state(sharded))))
    mixer = ("backbone", "layers", 0, "mixer")
    expected = {
        ("backbone", "embedding", "embedding"): P("tensor", "fsdp"),
        (*mixer, "in_proj", "kernel"): P("fsdp", "tensor"),  # column-parallel
        (*mixer, "out_proj", "kernel"): P("tensor", "fsdp"),  # row-parallel
        (*mixer, "A_log"): P("tensor", None),
        (*mixer, "dt_proj", "bias"): P("tensor"),
        ("backbone", "norm_f", "weight"): P(None),
    }
    for path, spec in expected.items():
        assert specs[path] == spec, path
    # The same values as the eager, unsharded init from the same seed (up to XLA's fusion of the init arithmetic).
    reference = dict(nnx.to_flat_state(state))
    for path, variable in nnx.to_flat_state(nnx.state(sharded)):
        array = variable[...]
        assert array.sharding.spec == fit_spec(specs[path], array.shape, mesh), path
        assert_close(array, reference[path][...], jnp.float32, err_msg=str(path))


def test_every_mesh_matches_one_device(one_device):
    """Data, fully sharded data, tensor and all three parallel: the same loss, logits (sharded inference) and
    gradients as one device. The four meshes run in one jitted call (one compilation, to keep the test fast)."""
    graphdef, state, tokens, (loss, logits, grads) = one_device
    meshes = {name: make_mesh(*sizes) for name, sizes in MESHES.items()}
    params = {
        name: jax.device_put(nnx.to_pure_dict(state), nnx.to_pure_dict(state_shardings(state, mesh)))
        for name, mesh in meshes.items()
    }
    batches = {
        name: jax.device_put(tokens, named_sharding(("batch", None), tokens.shape, mesh))
        for name, mesh in meshes.items()
    }

    @jax.jit
    def on_every_mesh(params, batches):
        return {
            name: loss_logits_grads(graphdef, params[name], constrain(batches[name], ("batch", None), mesh))
            for name, mesh in meshes.items()
        }

    for name, (s_loss, s_logits, s_grads) in on_every_mesh(params, batches).items():
        assert_close(s_loss, loss, jnp.float32, err_msg=name)
        assert_close(s_logits, logits, jnp.float32, err_msg=name)
        for (path, g), s in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(s_grads), strict=True):
            assert_close(s, g, jnp.float32, err_msg=f"{name} {jax.tree_util.keystr(path)}")
