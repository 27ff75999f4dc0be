"""One decode step of the selective scan for Mamba-1 and Mamba-2 states (``selective_state_update``)."""

from pallas_kernels.state_update.api import selective_state_update

__all__ = ["selective_state_update"]
