"""Test helper: copy the weights of a transformers ``MambaForCausalLM`` (torch) into our ``MambaLMHeadModel``.

Layout changes (docs/architecture.md): linear weights (out, in) -> kernel (in, out); conv1d weight (c, 1, w) ->
kernel (w, c); ``backbone.embeddings.weight`` -> ``backbone.embedding.embedding``. Vocab rows beyond the torch
model's vocab_size (our padding) are set to zero. Every parameter of ours is assigned exactly once and every torch
tensor is used (a tied ``lm_head.weight`` must equal the embedding), else AssertionError. The model may be abstract
(``nnx.eval_shape``): every parameter is replaced, which skips the cost of a random init.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx


def torch_source(name: str, state: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """Our parameter path "a.b.c" -> (torch key, ``state[key]`` in our layout, vocab unpadded). ``state`` maps torch
    names to numpy arrays (weights, or their gradients)."""
    if name == "backbone.embedding.embedding":
        key = "backbone.embeddings.weight"
        return key, state[key]
    if name.endswith("conv1d.kernel"):
        key = name.removesuffix("kernel") + "weight"
        return key, state[key][:, 0, :].T
    if name.endswith(".kernel"):
        key = name.removesuffix("kernel") + "weight"
        return key, state[key].T
    return name, state[name]


def _pad_vocab(name: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-pad the vocab axis (embedding rows, lm_head kernel columns) up to our padded vocab."""
    if value.shape == shape:
        return value
    axis = {"backbone.embedding.embedding": 0, "lm_head.kernel": 1}.get(name)
    assert axis is not None and value.shape[1 - axis] == shape[1 - axis], (name, value.shape, shape)
    padding = [(0, 0), (0, 0)]
    padding[axis] = (0, shape[axis] - value.shape[axis])
    return np.pad(value, padding)


def load_torch_mamba(model: nnx.Module, torch_model) -> None:
    """Copy ``torch_model`` (transformers MambaForCausalLM) into ``model`` (MambaLMHeadModel), in place."""
    state = {key: tensor.detach().float().cpu().numpy() for key, tensor in torch_model.state_dict().items()}
    used = set()
    params = [(path, node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)]
    for path, variable in params:
        name = ".".join(str(part) for part in path)
        key, value = torch_source(name, state)
        current = variable.get_value()  # an array, or a ShapeDtypeStruct in an nnx.eval_shape model
        value = _pad_vocab(name, value, current.shape)
        assert value.shape == current.shape, (name, key, value.shape, current.shape)
        variable.set_value(jnp.asarray(value, dtype=current.dtype))
        assert key not in used, f"{key} assigned twice"
        used.add(key)
    if model.config.tie_embeddings:
        np.testing.assert_array_equal(state["lm_head.weight"], state["backbone.embeddings.weight"])
        used.add("lm_head.weight")
    assert used == set(state), f"torch tensors not copied: {sorted(set(state) - used)}"
