"""The published configs build abstractly (``nnx.eval_shape``, no weights) with the parameter shapes of the
published checkpoints. Literal shapes (torch layout, as stored in the checkpoints) are written out for the layer
kinds; depth is cut to the layers that matter, since eval_shape of 64 layers costs seconds each on a CI core."""

import dataclasses

import jax
import pytest
from flax import nnx

from mamba_jax import MambaConfig, MambaLMHeadModel


def abstract_shapes(config: MambaConfig) -> dict[str, tuple[int, ...]]:
    model = nnx.eval_shape(lambda: MambaLMHeadModel(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in flat}


def torch_layout(shape: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Our JAX layout -> the checkpoint's torch layout (linear (in, out) -> (out, in); conv (w, c) -> (c, 1, w))."""
    if name.endswith("conv1d.kernel"):
        return (shape[1], 1, shape[0])
    if name.endswith(".kernel"):
        return shape[::-1]
    return shape


# (preset, layers kept, attention layer indices kept, {our parameter: torch-layout shape in the checkpoint})
CASES = [
    (
        "mamba-1.4b",
        1,
        (),
        {
            "backbone.embedding.embedding": (50280, 2048),
            "backbone.layers.0.mixer.in_proj.kernel": (8192, 2048),
            "backbone.layers.0.mixer.conv1d.kernel": (4096, 1, 4),
            "backbone.layers.0.mixer.x_proj.kernel": (160, 4096),
            "backbone.layers.0.mixer.dt_proj.kernel": (4096, 128),
            "backbone.layers.0.mixer.A_log": (4096, 16),
            "backbone.layers.0.mixer.out_proj.kernel": (2048, 4096),
        },
    ),
    (
        "mamba2-2.7b",
        1,
        (),
        {
            "backbone.embedding.embedding": (50288, 2560),
            "backbone.layers.0.mixer.in_proj.kernel": (10576, 2560),
            "backbone.layers.0.mixer.conv1d.kernel": (5376, 1, 4),
            "backbone.layers.0.mixer.A_log": (80,),
            "backbone.layers.0.mixer.dt_bias": (80,),
            "backbone.layers.0.mixer.D": (80,),
            "backbone.layers.0.mixer.norm.weight": (5120,),
            "backbone.layers.0.mixer.out_proj.kernel": (2560, 5120),
        },
    ),
    (
        "mamba2attn-2.7b",
        2,
        (1,),
        {
            "backbone.layers.0.mixer.in_proj.kernel": (10576, 2560),
            "backbone.layers.1.mixer.in_proj.kernel": (11520, 2560),  # q, k, v: 3 * 30 heads * 128
            "backbone.layers.1.mixer.conv1d.kernel": (11520, 1, 4),
            "backbone.layers.1.mixer.out_proj.kernel": (2560, 3840),
        },
    ),
    (
        "codestral-mamba-7b",
        1,
        (),
        {
            "backbone.embedding.embedding": (32768, 4096),
            "backbone.layers.0.mixer.in_proj.kernel": (18560, 4096),  # 2*8192 + 2*8*128 + 128
            "backbone.layers.0.mixer.conv1d.kernel": (10240, 1, 4),
            "backbone.layers.0.mixer.norm.weight": (8192,),
            "backbone.layers.0.mixer.out_proj.kernel": (4096, 8192),
            "lm_head.kernel": (32768, 4096),
        },
    ),
]


@pytest.mark.parametrize(("name", "n_layer", "attn_idx", "expected"), CASES, ids=[c[0] for c in CASES])
def test_published_shapes(name, n_layer, attn_idx, expected):
    config = dataclasses.replace(MambaConfig.preset(name), n_layer=n_layer, attn_layer_idx=attn_idx)
    shapes = abstract_shapes(config)
    for param, shape in expected.items():
        assert torch_layout(shapes[param], param) == shape, param
    assert ("lm_head.kernel" in shapes) == (not config.tie_embeddings)


def test_transformerpp_has_mlp_blocks():
    config = dataclasses.replace(MambaConfig.preset("transformerpp-2.7b"), n_layer=1, attn_layer_idx=(0,))
    shapes = abstract_shapes(config)
    assert shapes["backbone.layers.0.mlp.fc1.kernel"] == (2560, 2 * 6912)
    assert shapes["backbone.layers.0.mlp.fc2.kernel"] == (6912, 2560)
    assert shapes["backbone.layers.0.norm2.weight"] == (2560,)


def test_full_depth_presets_build_abstractly():
    for name in ("mamba-130m", "mamba2-130m"):
        shapes = abstract_shapes(MambaConfig.preset(name))
        n_params = sum(int(jax.numpy.prod(jax.numpy.array(s))) for s in shapes.values())
        assert 120e6 < n_params < 135e6, (name, n_params)
