"""Mamba-2 SSD op ``mamba_chunk_scan``: a sequential reference (reference.py), the chunked matrix form (xla.py) and
Pallas GPU kernels (pallas.py)."""

from pallas_kernels.ssd.api import mamba_chunk_scan
from pallas_kernels.ssd.pallas import SAVEABLE_NAMES

__all__ = ["SAVEABLE_NAMES", "mamba_chunk_scan"]
