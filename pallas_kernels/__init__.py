"""Selective-scan and SSD ops for Mamba: Pallas GPU kernels, XLA fallbacks and sequential references.

Each op lives in its own folder with its reference beside the fast paths; ``implementation=None`` picks the best one
available on the current platform.
"""
