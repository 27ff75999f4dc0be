"""The key table against the published checkpoints' configs, abstractly (no weights): every tensor mamba_ssm's
MambaLMHeadModel(config) has maps to exactly one of our parameters with the right shape, and nothing is left over.

Building a 48-64 layer model abstractly takes 5-15 s on a CI core (nnx.eval_shape), so each preset is checked with
its real sizes but only as many layers as it has kinds of layer (mixer; attention; both, in that order): every
per-layer shape is the real one, and layer indices beyond 0 are exercised. mamba-130m is also checked at full depth.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from convert import keymap
from convert.errors import ConversionError
from convert.formats import MAMBA_SSM, TRANSFORMERS
from convert.pipeline import abstract_params, plan
from mamba_jax.config import PRESETS, MambaConfig
from tests import checkpoints as ck


class ShapesOnly:
    """The reader interface ``plan`` uses, over names and shapes only (every tensor float32)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.names = list(shapes)

    def shape(self, name):
        return self.shapes[name]

    def dtype(self, name):
        return "float32"

    def file_of(self, name):
        return "shapes-only"


def shallow(config: MambaConfig) -> MambaConfig:
    """``config`` with one layer of each kind it has (two when it has one kind)."""
    if not config.attn_layer_idx:
        return dataclasses.replace(config, n_layer=2)
    if len(config.attn_layer_idx) == config.n_layer:
        return dataclasses.replace(config, n_layer=2, attn_layer_idx=(0, 1))
    return dataclasses.replace(config, n_layer=3, attn_layer_idx=(1,))


@pytest.mark.parametrize("name", [*sorted(PRESETS), "mamba-130m (24 layers)"])
def test_published_config_maps_completely(name):
    config = PRESETS["mamba-130m"] if name.endswith("(24 layers)") else shallow(PRESETS[name])
    targets = abstract_params(config, jnp.float32)
    shapes = ck.mamba_ssm_shapes(config.to_dict())
    if not config.tie_embeddings:
        assert "lm_head.weight" in shapes
    steps = plan(ShapesOnly(shapes), MAMBA_SSM, targets, config.tie_embeddings)  # raises on any mismatch
    assert sorted(".".join(map(str, s.path)) for s in steps) == sorted(targets)
    assert len(steps) == len(shapes) - config.tie_embeddings  # a tied checkpoint's lm_head is checked, not stored

    hf_names = {keymap.to_transformers_name(n): s for n, s in shapes.items()}  # the -hf repos' names
    if config.tie_embeddings:
        hf_names.pop("lm_head.weight")
    assert len(plan(ShapesOnly(hf_names), TRANSFORMERS, targets, config.tie_embeddings)) == len(steps)


def test_table_round_trip_and_hooks():
    shapes = ck.mamba_ssm_shapes(PRESETS["mamba2attn-2.7b"].to_dict()) | ck.mamba_ssm_shapes(
        PRESETS["transformerpp-2.7b"].to_dict()
    )
    for name in shapes:
        ours, hook = keymap.to_ours(name)
        assert keymap.to_source(ours) == (name, hook)
    assert keymap.to_ours("backbone.layers.0.mixer.rotary_emb.inv_freq") is None

    rng = np.random.default_rng(0)
    conv = rng.standard_normal((6, 1, 3)).astype(np.float32)  # (channels, 1, width)
    kernel = keymap.CONV.to_ours(conv)
    assert kernel.shape == (3, 6) and kernel[2, 5] == conv[5, 0, 2]
    np.testing.assert_array_equal(keymap.CONV.to_torch(kernel), conv)
    weight = rng.standard_normal((5, 4)).astype(np.float32)  # (out, in)
    np.testing.assert_array_equal(keymap.LINEAR.to_ours(weight), weight.T)
    with pytest.raises(
        ConversionError, match=r"depthwise conv weight of shape \(channels, 1, width\), found \(6, 2, 3\)"
    ):
        keymap.CONV.to_ours(np.zeros((6, 2, 3)))


def test_shape_error_names_both_layouts():
    config = MambaConfig(d_model=16, n_layer=1, vocab_size=37)
    targets = abstract_params(config, jnp.float32)
    shapes = ck.mamba_ssm_shapes(config.to_dict())
    shapes["backbone.layers.0.mixer.conv1d.weight"] = (32, 1, 3)
    with pytest.raises(ConversionError) as info:
        plan(ShapesOnly(shapes), MAMBA_SSM, targets, tied=True)
    assert str(info.value) == (
        "shapes-only: tensor 'backbone.layers.0.mixer.conv1d.weight' has shape (32, 1, 3), but the config needs "
        "(32, 1, 4) (parameter backbone.layers.0.mixer.conv1d.kernel (4, 32))"
    )
