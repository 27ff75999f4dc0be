"""Block sizes of the Pallas selective-scan kernels (``pallas_fwd.py``, ``pallas_bwd.py``), and the time chunks.

One program owns ``channels`` channels of one batch row and one group of B/C, one channel per GPU thread, and one
chunk of ``chunk`` consecutive time steps. Its state is d_state vectors of ``channels`` float32 values in registers.
"""

import dataclasses
from typing import NamedTuple

# Automatic chunking aims at about this many one-warp programs, several waves of them: the H100's 132 multiprocessors
# hold 8-12 each (the kernels use 170-255 registers a thread). Measured at (8, 2048, 1536, 16): chunks of 128 steps
# (6144 programs) beat 256 and 1024 (benchmarks/notes_selective_scan.md, v4).
TARGET_PROGRAMS = 6144
MIN_CHUNK = 64
# From this many programs a chunk on, time is not split: the grid is full already, and chunks cost a second pass over
# the exponentials and a stitch. On the H100 one chunk took 14-28% less time than two in a prefill's forward at
# (64, 128, 1536) and (16, 128, 4096), and 22-24% less forward + backward at (16, 2048, 4096) and (64, 2048, 1536)
# (benchmarks/RESULTS.md, "The prefill's scan in one chunk").
UNSPLIT_PROGRAMS = TARGET_PROGRAMS // 3
FORWARD_BACKENDS = ("auto", "triton", "mosaic")


@dataclasses.dataclass(frozen=True)
class ScanBlocks:
    """channels: channels per program, a power of 2 up to 32 (one warp), so the backward's sums over channels stay in
    one warp (shuffles, no shared memory). At (b, di) = (8, 1536) that is 384 channel blocks for 132 multiprocessors.
    steps: time steps per tile of the forward. It loads the next tile's u, delta and z while it scans this one.
    lookahead: the forward loads B_t and C_t this many steps before it uses them (the scalars are shared by the
    program's lanes, 2 d_state registers a step).
    backward_steps: time steps per tile of the backward. It keeps the tile's d_state x (backward_steps + 1) states in
    registers and loads the next tile while it walks this one; the forward stores its checkpoints, the state every
    backward_steps steps, in a float32 (b, l / backward_steps + 1, n, di) buffer that lives only during the backward.
    It must divide ``steps``.
    chunk: time steps per program, a multiple of ``steps``; the sequence is split into cdiv(l, chunk) chunks scanned
    in parallel, then stitched (``pallas.py``). None picks it from the shape (``chunking``) so that the grid has about
    TARGET_PROGRAMS programs (one chunk from UNSPLIT_PROGRAMS channel blocks on); a chunk of at least the sequence
    length is one sequential scan per channel block.
    pack_bc: bfloat16 B and C go to the kernels as one 32-bit word per (step, state) holding both (half the scalar
    loads and registers, one shift or mask per use); False, or other dtypes: as float32.
    forward_backend: which lowering runs the forward: "triton" (``pallas_fwd.py``, every case), "mosaic"
    (``mosaic_fwd.py``: Mosaic GPU, faster on Hopper, for the cases ``mosaic_fwd.supports``), or "auto": Mosaic GPU
    where it is supported and covers the call, else Triton. With a Mosaic GPU forward the backward's checkpoint
    launch and its adjoint and reverse launches run there too (``mosaic_bwd.py``), else on Triton.
    """

    channels: int = 32
    steps: int = 4
    lookahead: int = 2
    backward_steps: int = 2
    chunk: int | None = None
    pack_bc: bool = True
    forward_backend: str = "auto"

    def __post_init__(self):
        if self.forward_backend not in FORWARD_BACKENDS:
            raise ValueError(
                f"ScanBlocks.forward_backend must be one of {FORWARD_BACKENDS}, got {self.forward_backend!r}"
            )
        if self.channels < 1 or self.channels & (self.channels - 1) or self.channels > 32:
            raise ValueError(f"ScanBlocks.channels must be a power of 2 up to 32 (one warp), got {self.channels}")
        for name in ("steps", "lookahead", "backward_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ScanBlocks.{name} must be positive, got {getattr(self, name)}")
        if self.steps % self.backward_steps:
            raise ValueError(f"ScanBlocks.backward_steps={self.backward_steps} must divide steps={self.steps}")
        if self.chunk is not None and (self.chunk < 1 or self.chunk % self.steps):
            raise ValueError(f"ScanBlocks.chunk must be a positive multiple of steps={self.steps}, got {self.chunk}")

    @property
    def num_warps(self) -> int:
        return max(1, self.channels // 32)


class Chunks(NamedTuple):
    """How the time axis is split: ``count`` chunks of ``length`` steps, the last one ``last`` steps long."""

    length: int
    count: int
    last: int


def chunking(blocks: ScanBlocks, seqlen: int, channel_blocks: int) -> Chunks:
    """The time chunks for a sequence of ``seqlen`` steps when the grid already has ``channel_blocks`` programs per
    chunk (b x g x blocks per group)."""
    length = blocks.chunk
    if length is None:
        wanted = 1 if channel_blocks >= UNSPLIT_PROGRAMS else max(1, round(TARGET_PROGRAMS / channel_blocks))
        length = max(MIN_CHUNK, -(-seqlen // wanted))
        length = -(-length // blocks.steps) * blocks.steps
    length = min(length, -(-seqlen // blocks.steps) * blocks.steps)
    count = -(-seqlen // length)
    return Chunks(length, count, seqlen - (count - 1) * length)


DEFAULT_BLOCKS = ScanBlocks()
