"""Mamba's ops (selective scan, SSD, causal conv, decode steps, the greedy LM head): Pallas GPU kernels, XLA
fallbacks and references.

Each op lives in its own folder with its reference beside the fast paths; ``implementation=None`` picks the best one
available on the current platform.
"""

from pallas_kernels.causal_conv import causal_conv1d
from pallas_kernels.head_argmax import head_argmax
from pallas_kernels.mamba2_step import Mamba2StepOptions, Mamba2StepWeights, mamba2_step
from pallas_kernels.mamba_step import MambaStepWeights, mamba_step
from pallas_kernels.selective_scan import selective_scan
from pallas_kernels.ssd import mamba_chunk_scan
from pallas_kernels.state_update import selective_state_update

__all__ = [
    "Mamba2StepOptions",
    "Mamba2StepWeights",
    "MambaStepWeights",
    "causal_conv1d",
    "head_argmax",
    "mamba2_step",
    "mamba_chunk_scan",
    "mamba_step",
    "selective_scan",
    "selective_state_update",
]
