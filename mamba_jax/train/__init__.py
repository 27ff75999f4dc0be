"""Training: ``train(TrainConfig(...), MambaConfig(...))``, or ``python -m mamba_jax.train``."""

from mamba_jax.train.config import TrainConfig
from mamba_jax.train.loop import train

__all__ = ["TrainConfig", "train"]
