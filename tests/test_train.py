"""mamba_jax.train: config checks, the optimizer and its weight-decay mask, gradient accumulation, remat, and whole
runs on the 8 fake CPU devices: logging, evaluation, checkpoints, SIGTERM, exact resume, restore onto another mesh,
export and fine-tuning from the export."""

import collections
import json
import os
import signal

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba_jax.config import MambaConfig
from mamba_jax.model import MambaLMHeadModel
from mamba_jax.sharding import make_mesh, state_shardings
from mamba_jax.train import TrainConfig, loop, train
from mamba_jax.train import __main__ as cli
from mamba_jax.train import export as export_cli
from mamba_jax.train.checkpoint import Checkpoints, abstract_arrays, load_model
from mamba_jax.train.config import TrainError
from mamba_jax.train.data import TOKENIZER_FILE, load_streams, write_shard
from mamba_jax.train.export import export_run
from mamba_jax.train.optim import decays, learning_rate, make_optimizer, opt_state_shardings, weight_decay_mask
from mamba_jax.train.prepare import load_data
from mamba_jax.train.remat import POLICIES, apply_remat
from tests.tolerances import assert_close

# Byte-level: vocab 257, padded to 264 (divisible by 8 devices).
MODEL = MambaConfig(d_model=16, n_layer=1, vocab_size=257, ssm_cfg={"d_state": 4})


# ---- config ----


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"batch_size": 6, "grad_accum": 4}, r"batch_size \(6\) must be divisible by grad_accum \(4\)"),
        ({"seq_len": 0}, r"TrainConfig.seq_len must be >= 1, got 0"),
        ({"remat": "all"}, r"TrainConfig.remat must be one of \('none', 'block', 'dots', 'dots_scan'\), got 'all'"),
        ({"dtype": "int8"}, r"TrainConfig.dtype must be one of"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_train_config(fields, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**fields)


def test_train_config_round_trips_through_json():
    cfg = TrainConfig(data="x", peak_tflops=2.5, remat="dots")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        TrainConfig.from_dict({"colour": 1})


def test_command_line():
    train_flags = ["--data", "d", "--batch-size", "16", "--peak-tflops", "2.5", "--init-from", "x"]
    model_flags = ["--model", "mamba-130m", "--set", "n_layer=2", "vocab_size=257", 'ssm_cfg={"d_state": 8}']
    args = vars(cli.parser().parse_args([*train_flags, *model_flags]))
    config = cli.model_config(args.pop("model"), args.pop("set"))
    assert TrainConfig(**args) == TrainConfig(data="d", batch_size=16, peak_tflops=2.5, init_from="x")
    assert (config.d_model, config.n_layer, config.vocab_size, config.ssm_cfg["d_state"]) == (768, 2, 257, 8)
    with pytest.raises(ValueError, match="--set expects KEY=VALUE, got 'n_layer'"):
        cli.model_config("mamba-130m", ["n_layer"])


def test_settings_that_leave_the_training_unchanged_are_not_reported():
    saved = TrainConfig(data="x", log_every=10, mesh_fsdp=8).to_dict()
    cfg = TrainConfig(data="x", log_every=2, mesh_data=2, mesh_fsdp=4, eval_every=7, keep=1, lr=1e-3, steps=20)
    assert cfg.trajectory_changes(saved) == ["lr", "steps"]


def test_remat_policies_match_the_config():
    assert {"none", *POLICIES} == {"none", "block", "dots", "dots_scan"}


def pallas_launches(jaxpr, counts: collections.Counter) -> collections.Counter:
    """How often each Pallas kernel (by name) is launched in ``jaxpr``, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            counts[eqn.params["name"]] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else [value]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr | jax.extend.core.Jaxpr):
                    pallas_launches(getattr(sub, "jaxpr", sub), counts)
    return counts


@pytest.mark.parametrize(
    "layer, forward",
    [("Mamba1", "selective_scan_out"), ("Mamba2", "ssd_forward")],  # the forward's (output) launch
)
def test_dots_scan_runs_the_pallas_scan_forward_once(layer, forward):
    """Under ``dots`` the backward launches the Pallas scan's forward again in every layer; ``dots_scan`` keeps the
    scan's output (and Mamba-1's chunk states), so its forward launches once a layer, as without remat; same loss and
    gradients as without remat (the interpreted kernels, float32)."""
    if layer == "Mamba1":
        config = MambaConfig(d_model=16, n_layer=2, vocab_size=61, ssm_cfg={"d_state": 4})
        implementation = {"scan_implementation": "pallas"}
    else:
        ssm_cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4}
        config = MambaConfig(d_model=16, n_layer=2, vocab_size=61, ssm_cfg=ssm_cfg)
        implementation = {"ssd_implementation": "pallas"}
    tokens = jax.random.randint(jax.random.key(1), (2, 11), 0, config.vocab_size)
    launches, results = {}, {}
    for policy in ("none", "dots", "dots_scan"):
        model = MambaLMHeadModel(config, rngs=nnx.Rngs(0), **implementation)
        graphdef, state = nnx.split(apply_remat(model, policy))
        grad = jax.value_and_grad(
            lambda params, graphdef=graphdef: loop.next_token_loss(nnx.merge(graphdef, params), tokens)
        )
        params = nnx.to_pure_dict(state)
        launches[policy] = pallas_launches(jax.make_jaxpr(grad)(params).jaxpr, collections.Counter())
        if policy != "dots":
            results[policy] = jax.jit(grad)(params)
    assert launches["none"][forward] == launches["dots_scan"][forward] == config.n_layer, launches
    assert launches["dots"][forward] == 2 * config.n_layer, launches
    assert_close(results["dots_scan"][0], results["none"][0], jnp.float32)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(results["dots_scan"][1]), jax.tree.leaves(results["none"][1]), strict=True
    ):
        assert_close(a, b, jnp.float32, err_msg=jax.tree_util.keystr(path))


# ---- optimizer ----


def test_weight_decay_mask_of_the_model():
    params = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MambaLMHeadModel(MODEL, rngs=nnx.Rngs(0)))))
    mask = weight_decay_mask(params)
    decayed = sorted(".".join(map(str, path[2:])) for path, on in nnx.to_flat_state(nnx.State(mask)) if on)
    assert decayed == [
        "0.mixer.conv1d.kernel",
        "0.mixer.dt_proj.kernel",
        "0.mixer.in_proj.kernel",
        "0.mixer.out_proj.kernel",
        "0.mixer.x_proj.kernel",
        "embedding",  # backbone.embedding.embedding
    ]
    # Mamba-2 and MLP names: the gated norm inside the mixer, dt_bias, the second norm of a block.
    assert not decays(("backbone", "layers", 0, "mixer", "norm", "weight"))
    assert not decays(("backbone", "layers", 0, "mixer", "dt_bias"))
    assert not decays(("backbone", "layers", 0, "norm2", "weight"))
    assert decays(("backbone", "layers", 0, "mlp", "fc1", "kernel"))


def test_adamw_decays_only_the_masked_parameters():
    params = {
        "mixer": {"A_log": jnp.ones((2, 3)), "in_proj": {"kernel": jnp.ones((2, 4)), "bias": jnp.ones(4)}},
        "norm": {"weight": jnp.ones(2)},
    }
    cfg = TrainConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, steps=10, clip_norm=1.0)
    tx = make_optimizer(cfg, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    # Zero gradients: Adam's term is 0, so the update is the decoupled decay -lr * wd * p, on kernels only.
    np.testing.assert_allclose(updates["mixer"]["in_proj"]["kernel"], -0.1 * 0.5, rtol=1e-6)
    for leaf in (updates["mixer"]["A_log"], updates["mixer"]["in_proj"]["bias"], updates["norm"]["weight"]):
        np.testing.assert_array_equal(leaf, 0.0)


def test_learning_rate_warmup_then_cosine():
    schedule = learning_rate(TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1))
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(schedule(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # half way down the cosine
    np.testing.assert_allclose([schedule(110), schedule(500)], [0.1, 0.1], atol=1e-6)


# ---- one step: accumulation and remat against the plain computation (one device) ----


def test_accumulation_and_remat_leave_the_step_unchanged():
    """One optimizer step of make_train_step: two micro-batches of 2 give the batch of 4's loss and update, and
    rematerialised blocks the same as stored activations. (All variants in one jitted call: one compilation.)"""
    mesh = make_mesh(devices=jax.devices()[:1])
    tokens = jax.random.randint(jax.random.key(0), (4, 9), 0, MODEL.vocab_size)
    variants = {
        "plain": TrainConfig(batch_size=4, warmup_steps=0, lr=1e-2),
        "accumulated": TrainConfig(batch_size=4, grad_accum=2, warmup_steps=0, lr=1e-2),
        **{policy: TrainConfig(batch_size=4, warmup_steps=0, lr=1e-2, remat=policy) for policy in POLICIES},
    }

    @jax.jit
    def one_step_each(tokens):
        results = {}
        for name, cfg in variants.items():
            graphdef, state = nnx.split(apply_remat(MambaLMHeadModel(MODEL, rngs=nnx.Rngs(0)), cfg.remat))
            params = nnx.to_pure_dict(state)
            tx = make_optimizer(cfg, params)
            step = loop.make_train_step(graphdef, tx, nnx.to_pure_dict(state_shardings(state, mesh)))
            results[name] = step(params, tx.init(params), tokens.reshape(cfg.grad_accum, cfg.micro_batch_size, -1))
        return results

    results = one_step_each(tokens)
    plain_params, _, plain_metrics = results.pop("plain")
    for name, (params, _, metrics) in results.items():
        assert_close(metrics["loss"], plain_metrics["loss"], jnp.float32, err_msg=name)
        for (path, a), b in zip(
            jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(plain_params), strict=True
        ):
            assert_close(a, b, jnp.float32, err_msg=f"{name} {jax.tree_util.keystr(path)}")


# ---- whole runs on 8 devices ----


def write_corpus(directory) -> None:
    """About 40 KB of varied text, deterministic."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["state", "space", "model", "scan", "selective", "token", "mamba", "jax", "layer", "gate"]
    for i in range(4):
        lines = [" ".join(rng.choice(words, 8)) + f" {i * 100 + j}.\n" for j in range(100)]
        (directory / f"doc{i}.txt").write_text("".join(lines))


def run_config(tmp_path, run: str, **fields) -> TrainConfig:
    values = dict(
        data=str(tmp_path / "corpus"),
        seq_len=16,
        batch_size=8,
        steps=4,
        lr=3e-3,
        warmup_steps=1,
        dtype="float32",
        log_every=1,
        eval_every=2,
        eval_batches=1,
        eval_fraction=0.1,
        save_every=2,
        keep=3,
        peak_tflops=1.0,
        run_dir=str(tmp_path / run),
    )
    return TrainConfig(**{**values, **fields})


def losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def saved_steps(run_dir) -> list[int]:
    checkpoints = Checkpoints(run_dir / "checkpoints")
    try:
        return list(checkpoints.manager.all_steps())
    finally:
        checkpoints.close()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """An uninterrupted 4-step run: (tmp_path, its config, its records)."""
    tmp_path = tmp_path_factory.mktemp("train")
    write_corpus(tmp_path / "corpus")
    cfg = run_config(tmp_path, "full")
    return tmp_path, cfg, train(cfg, MODEL)


def test_a_run_logs_evaluates_and_saves(full_run):
    tmp_path, _, records = full_run
    train_records = [r for r in records if "loss" in r]
    eval_records = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [2, 4]
    assert train_records[-1]["loss"] < train_records[0]["loss"]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in train_records[1:])  # step 1 compiles: not timed
    for r in eval_records:
        np.testing.assert_allclose(r["eval_ppl"], np.exp(r["eval_loss"]), rtol=1e-6)
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        assert [json.loads(line) for line in f] == records
    assert saved_steps(tmp_path / "full") == [2, 4]


def command_line(cfg: TrainConfig, model_json) -> list[str]:
    """The arguments of ``python -m mamba_jax.train`` for ``cfg`` and the model config file ``model_json``."""
    flags = ["--model", str(model_json)]
    for name, value in cfg.to_dict().items():
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def test_sigterm_saves_and_resuming_is_exact(full_run, monkeypatch):
    """Preempted through the command line: the run saves, stops and exits 143; resumed, it goes on bit for bit."""
    tmp_path, _, records = full_run
    cfg = run_config(tmp_path, "interrupted", save_every=100, eval_batches=0)
    (tmp_path / "model.json").write_text(json.dumps(MODEL.to_dict()))
    read_batch = loop.device_batch

    def preempted_at_step_1(split, step, *args):
        if step == 1:  # the loop notices after this step: it saves step 2 and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return read_batch(split, step, *args)

    monkeypatch.setattr(loop, "device_batch", preempted_at_step_1)
    assert cli.main(command_line(cfg, tmp_path / "model.json")) == 128 + signal.SIGTERM
    monkeypatch.undo()
    with open(tmp_path / "interrupted" / "metrics.jsonl") as f:
        first = [json.loads(line) for line in f]
    assert max(losses(first)) == 2
    assert saved_steps(tmp_path / "interrupted") == [2]
    second = train(cfg)  # the model config comes from the checkpoint
    assert min(losses(second)) == 3
    # Bit for bit: the same program on the same data from the same state.
    assert {**losses(first), **losses(second)} == losses(records)


def test_a_checkpoint_restores_onto_another_mesh(full_run):
    tmp_path, cfg, _ = full_run
    checkpoints = Checkpoints(tmp_path / "full" / "checkpoints")
    state = nnx.state(nnx.eval_shape(lambda: MambaLMHeadModel(MODEL, rngs=nnx.Rngs(0))))
    params_like = nnx.to_pure_dict(state)
    tx = make_optimizer(cfg, params_like)
    opt_like = jax.eval_shape(tx.init, params_like)

    def restore(mesh):
        shardings = nnx.to_pure_dict(state_shardings(state, mesh))
        opt_shardings = opt_state_shardings(tx, params_like, shardings, mesh)
        return checkpoints.restore(abstract_arrays(params_like, shardings), abstract_arrays(opt_like, opt_shardings))

    saved_params, saved_opt, meta = restore(make_mesh(fsdp=8))  # the mesh it was saved from
    params, opt_state, _ = restore(make_mesh(data=2, fsdp=2, tensor=2))
    checkpoints.close()
    assert meta["step"] == 4 and meta["model_config"] == MODEL.to_dict()
    kernel = params["backbone"]["layers"][0]["mixer"]["in_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    moments = [leaf for leaf in jax.tree.leaves(opt_state) if leaf.shape == kernel.shape]
    assert len(moments) == 2 and all(m.sharding.spec == kernel.sharding.spec for m in moments)  # Adam's mu, nu
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((saved_params, saved_opt)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_export_then_fine_tune_from_it(full_run):
    tmp_path, _, _ = full_run
    exported = tmp_path / "exported"
    assert export_run(tmp_path / "full", exported) == "byte"  # the run's tokenizer goes with it, for generate
    assert json.loads((exported / TOKENIZER_FILE).read_text()) == {"tokenizer": "byte"}
    with pytest.raises(ValueError, match="already exists"):
        export_run(tmp_path / "full", exported)  # never overwritten silently
    other = MambaConfig(**{**MODEL.to_dict(), "d_model": 8})
    with pytest.raises(
        TrainError, match=r"--init-from .*exported is a different model .* \(init-from vs asked: d_model 16 vs 8\)"
    ):
        train(run_config(tmp_path, "conflict", init_from=str(exported)), other)
    # Fine-tune on another mesh; its first loss is the exported model's loss on batch 0.
    tune = run_config(
        tmp_path, "tune", init_from=str(exported), steps=1, eval_batches=0, mesh_data=2, mesh_fsdp=2, mesh_tensor=2
    )
    records = train(tune)
    train_split, _, _ = load_data(tune)
    expected = nnx.jit(loop.next_token_loss)(load_model(tmp_path / "full"), jnp.asarray(train_split.batch(0)))
    assert_close(losses(records)[1], expected, jnp.float32)


def test_bad_run_configurations_fail_early(tmp_path):
    with pytest.raises(ValueError, match=r"batch size 4 is not divisible by the batch mesh axes .* \(product 8\)"):
        train(TrainConfig(data="unused", batch_size=4, run_dir=str(tmp_path / "a")), MODEL)
    with pytest.raises(ValueError, match="fixed axes' product 3 does not divide 8"):
        train(TrainConfig(data="unused", mesh_data=3, run_dir=str(tmp_path / "b")), MODEL)
    write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="no model to train: give one"):
        train(TrainConfig(data=str(tmp_path / "corpus"), run_dir=str(tmp_path / "c")))
    # The byte tokenizer's EOS id 256 is no id of a 256-token model: found before training, nothing written.
    with pytest.raises(
        TrainError,
        match=r"tokenizer 'byte' gives ids up to 256 .* model's vocab_size is 256: the model needs vocab_size >= 257",
    ):
        train(TrainConfig(data=str(tmp_path / "corpus"), run_dir=str(tmp_path / "d")), MambaConfig(vocab_size=256))
    assert not (tmp_path / "d").exists()


def test_resuming_another_model_is_refused(full_run, capsys):
    """A run dir's checkpoint is resumed only with its own model: --model/--set left out, or the same."""
    tmp_path, cfg, _ = full_run
    (tmp_path / "model.json").write_text(json.dumps(MODEL.to_dict()))
    flags = ["--data", cfg.data, "--run-dir", cfg.run_dir, "--seq-len", "16", "--steps", "4"]
    other = ["--model", "mamba2-130m", "--set", "d_model=32", "n_layer=1", "vocab_size=257"]
    assert cli.main([*flags, *other]) == 2
    message = capsys.readouterr().err
    assert message.startswith(f"error: run dir {cfg.run_dir} holds a checkpoint (step 4) that is a different model ")
    assert '(checkpoint vs asked: d_model 16 vs 32, ssm_cfg.d_state 4 vs unset, ssm_cfg.layer unset vs "Mamba2"' in (
        message
    )
    for model in (["--model", str(tmp_path / "model.json")], []):
        assert cli.main([*flags, *model]) == 0
        assert capsys.readouterr().out == "run already at step 4 (>= --steps 4): nothing to do\n"
    assert saved_steps(tmp_path / "full") == [2, 4]


def test_an_error_mid_run_finishes_the_save_in_flight(tmp_path, monkeypatch):
    """An error mid-run (here a bug: its traceback is kept) still finishes the save in flight, so the newest
    checkpoint is whole. On token shards, whose tokenizer is unknown, the export has none."""
    write_corpus(tmp_path / "corpus")
    (stream,), _ = load_streams(str(tmp_path / "corpus"), text_glob="*.txt", tokenizer="byte", token_dtype="uint16")
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "a.bin", stream)
    (tmp_path / "model.json").write_text(json.dumps(MODEL.to_dict()))
    cfg = run_config(tmp_path, "run", data=str(tmp_path / "shards"), save_every=1, eval_batches=0)
    read_batch = loop.device_batch

    def failing_at_step_3(split, step, *args):
        if step == 3:  # step 3 was just saved, in the background
            raise RuntimeError("a bug")
        return read_batch(split, step, *args)

    monkeypatch.setattr(loop, "device_batch", failing_at_step_3)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(command_line(cfg, tmp_path / "model.json"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2", "3"]  # no *-tmp
    assert export_cli.main([str(tmp_path / "run"), str(tmp_path / "exported")]) == 0
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json", "params"]
