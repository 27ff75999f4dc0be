"""Block sizes of the Pallas selective-scan kernels (``pallas_fwd.py``, ``pallas_bwd.py``).

One program owns ``channels`` channels of one batch row and one group of B/C, one channel per GPU thread, and walks
the whole sequence. Its state is d_state vectors of ``channels`` float32 values in registers.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class ScanBlocks:
    """channels: channels per program, a power of 2; 32 is one warp, so the backward's sums over channels stay in one
    warp (shuffles, no shared memory). At (b, di) = (8, 1536) that is 384 programs for 132 multiprocessors.
    steps: time steps per tile of the forward. It loads the next tile's u, delta and z while it scans this one.
    lookahead: the forward loads B_t and C_t this many steps before it uses them (the scalars are shared by the
    program's lanes, 2 d_state registers a step).
    backward_steps: time steps per tile of the backward. It keeps the tile's d_state x (backward_steps + 1) states in
    registers and loads the next tile while it walks this one; the forward stores its checkpoints, the state every
    backward_steps steps, in a float32 (b, l / backward_steps + 1, n, di) buffer that lives only during the backward.
    It must divide ``steps``.
    """

    channels: int = 32
    steps: int = 8
    lookahead: int = 2
    backward_steps: int = 2

    def __post_init__(self):
        if self.channels < 1 or self.channels & (self.channels - 1):
            raise ValueError(f"ScanBlocks.channels must be a power of 2 (a Triton block), got {self.channels}")
        for name in ("steps", "lookahead", "backward_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScanBlocks.{name} must be positive, got {getattr(self, name)}")
        if self.steps % self.backward_steps:
            raise ValueError(f"ScanBlocks.backward_steps={self.backward_steps} must divide steps={self.steps}")

    @property
    def num_warps(self) -> int:
        return max(1, self.channels // 32)


DEFAULT_BLOCKS = ScanBlocks()
