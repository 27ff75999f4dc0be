"""The config.json side of the converter: transformers' time_step_limit checked with errors naming the user's key,
and the special floats (inf, nan) written as transformers 5 writes them, so the file is strict JSON."""

import json
import math

import pytest

from convert.__main__ import main
from mamba_jax.config import MambaConfig, decode_special_floats

# A transformers Mamba2Config dict, as save_pretrained writes it (sizes of tests/checkpoints.py).
MAMBA2_HF = {
    "model_type": "mamba2",
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "vocab_size": 37,
    "num_heads": 4,
    "head_dim": 8,
    "state_size": 8,
    "n_groups": 2,
    "conv_kernel": 4,
    "chunk_size": 8,
    "time_step_limit": [0.0, {"__float__": "Infinity"}],
}


def reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def test_decode_special_floats_recurses():
    encoded = {"a": [1.0, {"__float__": "-Infinity"}], "b": {"c": {"__float__": "NaN"}}, "d": {"__float__": "x"}}
    decoded = decode_special_floats(encoded)
    assert decoded["a"] == [1.0, -math.inf] and math.isnan(decoded["b"]["c"])
    assert decoded["d"] == {"__float__": "x"}  # not a tag transformers writes: left for validation to report


@pytest.mark.parametrize("limit", [[0.1], None, 5, [0, "inf"], [1.0, 0.5], [-1.0, 1.0], [0.0, 1.0, 2.0], [True, 1]])
def test_time_step_limit_is_checked(limit):
    with pytest.raises(ValueError) as info:
        MambaConfig.from_dict({**MAMBA2_HF, "time_step_limit": limit})
    message = str(info.value)
    assert (
        message == f"time_step_limit must be a list [low, high] of two numbers with 0 <= low <= high, found {limit!r}"
    )


def test_dt_limit_is_checked():
    with pytest.raises(ValueError, match=r"^MambaConfig.ssm_cfg\['dt_limit'\] must be a list \[low, high\]"):
        MambaConfig(d_model=16, n_layer=1, ssm_cfg={"layer": "Mamba2", "dt_limit": [0.1]})


def test_time_step_limit_error_from_the_cli(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**MAMBA2_HF, "time_step_limit": [0.1]}))
    (src / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    assert main([str(src), str(tmp_path / "dst")]) == 1
    err = capsys.readouterr().err
    assert (
        err == f"error: {src / 'config.json'}: time_step_limit must be a list [low, high] of two numbers with "
        "0 <= low <= high, found [0.1]\n"
    )
    assert not (tmp_path / "dst").exists()


def test_config_json_is_strict_json(tmp_path):
    config = MambaConfig(d_model=16, n_layer=1, ssm_cfg={"layer": "Mamba2", "dt_limit": (0.0, math.inf)})
    config.to_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text(), parse_constant=reject_constant)
    assert data["ssm_cfg"]["dt_limit"] == [0.0, {"__float__": "Infinity"}]
    assert MambaConfig.from_json(tmp_path / "config.json") == config
    # transformers' default limit (0, inf) is left out of ours: mamba_ssm's own loader then reads the file as written
    assert "dt_limit" not in MambaConfig.from_dict(MAMBA2_HF).ssm_cfg
