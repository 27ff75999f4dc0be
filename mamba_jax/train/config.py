"""TrainConfig: every knob of a training run, validated once, serialisable to JSON (stored in each checkpoint)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

REMAT_POLICIES = ("none", "block", "dots", "dots_scan")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Fields that do not change what is trained (the parameters after each step): where the run is, what is logged,
# evaluated and saved, and how the work is laid out over devices and processes (a run resumed on another mesh
# computes the same losses).
NOT_TRAJECTORY = frozenset(
    {
        "run_dir",
        "log_every",
        "eval_every",
        "eval_batches",
        "save_every",
        "keep",
        "peak_tflops",
        "mesh_data",
        "mesh_fsdp",
        "mesh_tensor",
        "coordinator_address",
        "num_processes",
        "process_id",
    }
)


class TrainError(ValueError):
    """Bad input the user can act on (an argument, a data file, a run directory); ``python -m mamba_jax.train``
    prints its message as one line, without a traceback, so the message names the argument or file and what was
    expected."""


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Sizes are global: ``batch_size`` sequences of ``seq_len`` tokens per optimizer step, over
    all devices and processes, in ``grad_accum`` micro-batches."""

    # data: a directory (or one file) of token shards ``*.bin``, else text files matching ``text_glob``
    data: str = ""
    text_glob: str = "**/*.txt"
    tokenizer: str = "byte"  # "byte" (built in) or a transformers tokenizer name, for text data
    token_dtype: str = "uint16"  # element type of ``*.bin`` shards: uint16 or uint32
    seq_len: int = 1024
    batch_size: int = 8
    grad_accum: int = 1
    eval_fraction: float = 0.01  # the tail of the token windows, held out for evaluation

    # optimization: AdamW, linear warmup to ``lr`` then cosine decay to ``lr * min_lr_ratio`` at ``steps``
    steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient norm limit; 0 disables clipping

    # compute: float32 parameters, ``dtype`` activations; ``remat`` trades compute for activation memory
    dtype: str = "bfloat16"
    remat: str = "none"  # "none", "block", "dots" or "dots_scan": see mamba_jax.train.remat
    loss_chunk: int = 0  # positions per LM-head chunk in the loss (0: all at once); see train.loop.next_token_loss

    # device mesh (see mamba_jax.sharding.make_mesh; one of them may be -1)
    mesh_data: int = 1
    mesh_fsdp: int = -1
    mesh_tensor: int = 1

    # logging, evaluation, checkpoints
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4  # micro-batches of the held-out split per evaluation; 0 disables evaluation
    save_every: int = 500
    keep: int = 3
    peak_tflops: float | None = None  # per device; default from the device kind (H100/H200 bf16 dense)
    seed: int = 0
    init_from: str | None = None  # a converted checkpoint to fine-tune (mamba_jax.load_pretrained)

    # multi-process runs; left unset, the environment (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI) decides
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def __post_init__(self):
        positive = ("seq_len", "batch_size", "grad_accum", "steps", "log_every", "eval_every", "save_every", "keep")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_batches", "weight_decay", "clip_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"TrainConfig.batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})"
            )
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"TrainConfig.eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"TrainConfig.dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
        if self.loss_chunk < 0:
            raise ValueError(f"TrainConfig.loss_chunk must be >= 0 (0: no chunking), got {self.loss_chunk}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"TrainConfig.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.token_dtype not in ("uint16", "uint32"):
            raise ValueError(f"TrainConfig.token_dtype must be 'uint16' or 'uint32', got {self.token_dtype!r}")

    @property
    def micro_batch_size(self) -> int:
        """Sequences per micro-batch (one forward/backward)."""
        return self.batch_size // self.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def trajectory_changes(self, saved: dict) -> list[str]:
        """The fields that differ from ``saved`` (an earlier run's ``to_dict``) and change what is trained (not those
        in NOT_TRAJECTORY), sorted."""
        return sorted(k for k, v in self.to_dict().items() if k not in NOT_TRAJECTORY and saved.get(k) != v)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """The inverse of ``to_dict``; unknown keys are an error (a config from another version)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(**values)
