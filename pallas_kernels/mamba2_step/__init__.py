"""One decode step of a whole Mamba-2 mixer (``mamba2_step``): XLA op by op, or Pallas GPU kernels (three fused
ones; past one row with a float32 state, two around XLA's state update)."""

from pallas_kernels.mamba2_step.api import mamba2_step
from pallas_kernels.mamba2_step.reference import Mamba2StepOptions, Mamba2StepWeights

__all__ = ["Mamba2StepOptions", "Mamba2StepWeights", "mamba2_step"]
