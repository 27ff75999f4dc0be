"""Mamba's depthwise causal conv over time (with the SiLU that follows it): an XLA reference and Pallas GPU kernels,
behind one ``causal_conv1d`` entry point."""

from pallas_kernels.causal_conv.api import IMPLEMENTATIONS, causal_conv1d

__all__ = ["IMPLEMENTATIONS", "causal_conv1d"]
