"""Mamba-1 selective scan: sequential reference, XLA fallbacks (associative, chunked) and a Pallas GPU kernel,
behind one ``selective_scan`` entry point (see ``api`` for the interface every implementation shares)."""

from pallas_kernels.selective_scan.api import IMPLEMENTATIONS, SAVEABLE_NAMES, selective_scan

__all__ = ["IMPLEMENTATIONS", "SAVEABLE_NAMES", "selective_scan"]
