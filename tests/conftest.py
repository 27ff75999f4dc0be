"""Test configuration: 8 fake CPU devices (for the sharding tests), float32 matmuls at full precision."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")
