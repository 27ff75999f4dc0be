"""One decode step of a whole Mamba-1 mixer (``mamba_step``): XLA op by op, or two Pallas GPU kernels."""

from pallas_kernels.mamba_step.api import mamba_step
from pallas_kernels.mamba_step.reference import MambaStepWeights, PartialSums, PreNorm, settled

__all__ = ["MambaStepWeights", "PartialSums", "PreNorm", "mamba_step", "settled"]
