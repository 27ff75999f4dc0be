"""mamba_ssm state-dict names <-> our parameter paths, with the per-key layout hook.

One table row per kind of parameter: a source name template, our path template, and a ``Hook`` (its layout change
and the inverse). Templates name their variable parts ``{i}`` (layer index) and the fields in ``FIELDS``; a row
matches in either direction, so the same table drives import (``to_ours``) and export (``to_source``). Our paths are
the parameter paths of ``nnx.state(model, nnx.Param)`` joined with "." (``layers`` indices are list indices).
transformers names differ only in the embedding (``backbone.embeddings.weight``): ``from_transformers_name`` /
``to_transformers_name`` translate at the edges.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convert.errors import ConversionError


@dataclass(frozen=True)
class Hook:
    """A layout change: ``to_ours`` torch layout -> ours, ``to_torch`` its inverse. Both only transpose or reshape
    (views; no dtype change), so applying them to a zero-stride dummy gives the converted shape for free."""

    name: str
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


def _conv_to_ours(x: np.ndarray) -> np.ndarray:
    """Depthwise conv weight (c, 1, w) -> kernel (w, c)."""
    if x.ndim != 3 or x.shape[1] != 1:
        raise ConversionError(f"expected a depthwise conv weight of shape (channels, 1, width), found {x.shape}")
    return x[:, 0, :].T


def _linear_to_ours(x: np.ndarray) -> np.ndarray:
    """Linear weight (out, in) -> kernel (in, out)."""
    if x.ndim != 2:
        raise ConversionError(f"expected a linear weight of shape (out, in), found {x.shape}")
    return x.T


KEEP = Hook("keep", lambda x: x, lambda x: x)
LINEAR = Hook("linear", _linear_to_ours, lambda x: x.T)
CONV = Hook("conv", _conv_to_ours, lambda x: x.T[:, None, :])

FIELDS = {
    "i": r"\d+",
    "leaf": r"weight|bias",
    "norm": r"norm|norm2",
    "linear": r"mixer\.(?:in_proj|out_proj|x_proj|dt_proj)|mlp\.fc1|mlp\.fc2",
    "vector": r"A_log|D|dt_bias|norm\.weight|conv1d\.bias",
}

LAYER = "backbone.layers.{i}"
TABLE = [
    ("backbone.embedding.weight", "backbone.embedding.embedding", KEEP),
    ("backbone.norm_f.{leaf}", "backbone.norm_f.{leaf}", KEEP),
    ("lm_head.weight", "lm_head.kernel", LINEAR),
    (f"{LAYER}.{{norm}}.{{leaf}}", f"{LAYER}.{{norm}}.{{leaf}}", KEEP),
    (f"{LAYER}.{{linear}}.weight", f"{LAYER}.{{linear}}.kernel", LINEAR),
    (f"{LAYER}.{{linear}}.bias", f"{LAYER}.{{linear}}.bias", KEEP),
    (f"{LAYER}.mixer.conv1d.weight", f"{LAYER}.mixer.conv1d.kernel", CONV),
    (f"{LAYER}.mixer.{{vector}}", f"{LAYER}.mixer.{{vector}}", KEEP),
]


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(regex)


_ROWS = [(_compile(source), source, _compile(ours), ours, hook) for source, ours, hook in TABLE]


def to_ours(source_name: str) -> tuple[str, Hook] | None:
    """Our parameter path and the hook for a mamba_ssm state-dict name; None if no row matches."""
    for source_re, _, _, ours, hook in _ROWS:
        match = source_re.fullmatch(source_name)
        if match:
            return ours.format(**match.groupdict()), hook
    return None


def to_source(our_path: str) -> tuple[str, Hook]:
    """The mamba_ssm state-dict name and the hook for one of our parameter paths."""
    for _, source, ours_re, _, hook in _ROWS:
        match = ours_re.fullmatch(our_path)
        if match:
            return source.format(**match.groupdict()), hook
    raise ConversionError(f"no mamba_ssm name for our parameter '{our_path}' (convert/keymap.py has no row for it)")


_FROM_TRANSFORMERS = {"backbone.embeddings.weight": "backbone.embedding.weight"}
_TO_TRANSFORMERS = {ours: theirs for theirs, ours in _FROM_TRANSFORMERS.items()}


def from_transformers_name(name: str) -> str:
    """transformers Mamba/Mamba2 state-dict name -> mamba_ssm name."""
    return _FROM_TRANSFORMERS.get(name, name)


def to_transformers_name(name: str) -> str:
    """mamba_ssm state-dict name -> transformers Mamba/Mamba2 name."""
    return _TO_TRANSFORMERS.get(name, name)
