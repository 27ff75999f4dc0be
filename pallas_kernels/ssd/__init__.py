"""Mamba-2 SSD op ``mamba_chunk_scan``: a sequential reference (reference.py) and the chunked matrix form (xla.py)."""

from pallas_kernels.ssd.api import mamba_chunk_scan

__all__ = ["mamba_chunk_scan"]
