"""The Pallas selective-scan kernels against the reference, through the shared suite of tests/test_selective_scan.py:
forward, last state and the gradients in every float argument.

On CPU the kernels run in Pallas's interpreter with small blocks (8 channels, tiles of 4 and 2 steps), so the small
cases still cross channel blocks, lane masks, groups, tile tails and the prefetches past the last tile. The ``gpu``
marker runs the compiled kernels at full size with the default blocks (``make test-gpu`` on the device).
"""

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.selective_scan import mosaic_fwd, selective_scan
from pallas_kernels.selective_scan.pallas import (
    TRITON_DEPRECATION,
    pallas_supported,
    plan_forward,
    selective_scan_pallas,
)
from pallas_kernels.selective_scan.pallas_config import Chunks, ScanBlocks, chunking
from tests.test_selective_scan import (
    CASES,
    FLOAT_ARGUMENTS,
    Case,
    _largest_array,
    all_eqns,
    case_inputs,
    check_forward_and_grads,
    make_inputs,
)

INTERPRET_BLOCKS = ScanBlocks(channels=8, steps=4, lookahead=3, backward_steps=2, chunk=8)
interpreted = functools.partial(selective_scan_pallas, blocks=INTERPRET_BLOCKS, interpret=True)

# Small on purpose: the interpreter compiles each kernel for each shape (about 10 s a case on one core). Tiles of 4
# (forward) and 2 (backward) steps, B and C loaded 3 steps ahead (across tile and chunk ends), channel blocks of 8,
# time chunks of 8 steps: seqlen 10 is a full chunk and a last one of 2 steps (no full tile, a tail), 13 is 8 + 5
# (a full tile and a tail), 128 is 16 chunks, 7 and below one chunk.
INTERPRET_CASES = [
    Case(2, 1, 4, 3, None),  # one step, shorter than either tile; 4 of 8 lanes masked
    Case(1, 7, 6, 4, 2, with_D=False, with_z=False, with_bias=False, softplus=False, with_init=False),
    Case(2, 10, 40, 4, 2),  # 20 channels a group: blocks of 8, 8 and a masked 4; forward tail of 2
    Case(1, 9, 32, 3, 1, "float16", with_init=False),  # 4 full blocks, no mask; tails of 1
    Case(2, 8, 24, 2, 3, "bfloat16", with_D=False, softplus=False),  # one full block a group
    Case(1, 128, 6, 5, 2, "bfloat16", with_bias=False),
    Case(1, 13, 16, 3, 1),
]


@pytest.mark.parametrize("case", INTERPRET_CASES, ids=str)
def test_matches_reference_interpreted(case):
    check_forward_and_grads(interpreted, case)


def test_one_chunk_matches_reference_interpreted():
    """The whole sequence as one chunk per channel block: no stitching launches."""
    blocks = dataclasses.replace(INTERPRET_BLOCKS, chunk=64)
    check_forward_and_grads(
        functools.partial(selective_scan_pallas, blocks=blocks, interpret=True), Case(2, 37, 8, 4, 2)
    )


def test_backward_tiles_of_four_interpreted():
    """The backward on tiles of 4 steps (checkpoints every 4), as ``benchmarks/selective_scan.py --sweep`` times."""
    blocks = dataclasses.replace(INTERPRET_BLOCKS, backward_steps=4)
    check_forward_and_grads(
        functools.partial(selective_scan_pallas, blocks=blocks, interpret=True), Case(2, 13, 16, 3, 2)
    )


def test_unpacked_bf16_matches_reference_interpreted():
    """bfloat16 B and C read as float32 scalars (``pack_bc=False``) instead of packed words."""
    blocks = dataclasses.replace(INTERPRET_BLOCKS, pack_bc=False)
    check_forward_and_grads(
        functools.partial(selective_scan_pallas, blocks=blocks, interpret=True), Case(2, 10, 16, 3, 2, "bfloat16")
    )


needs_mosaic = pytest.mark.skipif(not mosaic_fwd.available(), reason="Mosaic GPU API of jax >= 0.11")


@needs_mosaic
@pytest.mark.parametrize(
    ("case", "backward_steps"),
    [
        (Case(2, 64, 256, 4, 2, "bfloat16"), 2),  # two groups of 128 channels, 4 chunks of 16, initial state
        (Case(1, 32, 128, 3, None, "bfloat16", with_D=False, with_z=False, softplus=False, with_init=False), 2),
        # One chunk (no first launch, no adjoints, the initial state read directly); 16 states: the dB/dC sums
        # fill a warp's 32 lanes, as at the real sizes.
        (Case(1, 16, 128, 16, None, "bfloat16"), 2),
        (Case(2, 64, 256, 4, 2, "float16"), 2),  # float32 B and C side by side (not packed), 4 chunks
        (Case(1, 32, 128, 3, None, "float32", with_z=False), 2),  # float32 inputs, 2 chunks
        (Case(1, 32, 128, 3, None, "float32", with_z=False), 4),  # checkpoints every 4 steps
    ],
    ids=str,
)
def test_mosaic_kernels_match_reference_interpreted(case, backward_steps):
    """The Mosaic GPU forward and backward launches in its interpreter (the backward on the forward's chunks, with
    checkpoints every ``backward_steps`` steps)."""
    blocks = dataclasses.replace(INTERPRET_BLOCKS, forward_backend="mosaic", backward_steps=backward_steps)
    check_forward_and_grads(functools.partial(selective_scan_pallas, blocks=blocks, interpret=True), case)


def test_forward_plan():
    """Which forward runs, and on which chunks: "auto" never picks Mosaic GPU in the interpreter or without a GPU;
    asking for it where it does not apply names the reason. B and C of any dtype (packed bfloat16 words or float32)."""
    assert plan_forward(ScanBlocks(), (8, 2048, 1536), 1, interpret=True).forward_backend == "triton"
    expected = "mosaic" if mosaic_fwd.device_supported() else "triton"
    assert plan_forward(ScanBlocks(), (8, 2048, 1536), 1, interpret=False).forward_backend == expected
    if mosaic_fwd.available():
        mosaic = ScanBlocks(forward_backend="mosaic")
        assert plan_forward(mosaic, (8, 2048, 1536), 1, interpret=False).chunk == 128
        assert plan_forward(mosaic, (4, 4096, 4096), 1, interpret=False).chunk == 256  # Triton wants 344
        with pytest.raises(ValueError, match=r"channels per group a multiple of 128 .* u \(8, 2048, 1600\), 1 groups"):
            plan_forward(mosaic, (8, 2048, 1600), 1, interpret=False)
        with pytest.raises(ValueError, match=r"seqlen a multiple of 16"):
            plan_forward(mosaic, (8, 2047, 1536), 1, interpret=False)
        with pytest.raises(ValueError, match=r"ScanBlocks.steps dividing 16"):  # the backward's tiles on its chunks
            plan_forward(ScanBlocks(steps=6, forward_backend="mosaic"), (8, 2048, 1536), 1, interpret=False)
    with pytest.raises(ValueError, match=r"ScanBlocks.forward_backend must be one of .*got 'cuda'"):
        ScanBlocks(forward_backend="cuda")
    assert [mosaic_fwd.chunk_length(seqlen, 344) for seqlen in (4096, 2048, 48, 16)] == [256, 256, 16, 16]


def test_compiled_kernels_use_single_instruction_math():
    """interpret=False kernels spell exp2, log2, reciprocals and multiply-adds as PTX (kernel_math.py): XLA's Triton
    pipeline turns jnp.exp2 into four instructions and a * b + c into two (benchmarks/notes_selective_scan.md, v6).
    Traced here without a GPU: no kernel body holds a floating exp, log or division primitive."""
    inputs = case_inputs(Case(1, 40, 8, 4, 2, "bfloat16"))
    arrays = {name: inputs[name] for name in FLOAT_ARGUMENTS}
    normalised = {**arrays, "B": inputs["B"], "C": inputs["C"]}

    def loss(arrays):
        out, last_state = selective_scan_pallas(
            **arrays, delta_softplus=True, blocks=dataclasses.replace(INTERPRET_BLOCKS, chunk=16), interpret=False
        )
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(last_state)

    primitives, asm = set(), set()  # (name, result dtype) and inline PTX instructions inside the kernels
    for call in all_eqns(jax.make_jaxpr(jax.grad(loss))(normalised).jaxpr):
        if call.primitive.name == "pallas_call":
            for eqn in all_eqns(call.params["jaxpr"]):
                primitives.update((eqn.primitive.name, str(getattr(var.aval, "dtype", ""))) for var in eqn.outvars)
                if "asm" in eqn.params:
                    asm.add(eqn.params["asm"].split()[0])
    assert {"ex2.approx.ftz.f32", "lg2.approx.ftz.f32", "rcp.approx.ftz.f32", "fma.rn.f32"} <= asm
    slow = {(name, "float32") for name in ("exp2", "exp", "log", "log2", "div")}
    assert primitives & {("mul", "float32"), ("add", "float32")}  # the check sees the kernels' float32 arithmetic
    assert not primitives & slow, primitives & slow


def test_dispatch_through_the_api():
    """implementation="pallas" without a GPU runs the same kernels in the interpreter."""
    assert not pallas_supported()
    inputs = case_inputs(Case(1, 5, 8, 2, None))
    out = selective_scan(**inputs, implementation="pallas")
    expected = selective_scan(**inputs, implementation="reference")
    assert out.shape == expected.shape
    assert jnp.allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_no_full_state_tensor():
    """forward + backward never holds a (b, l, di, n) value: only the inputs and states every backward_steps steps."""
    batch, seqlen, dim, d_state = 1, 64, 8, 16
    inputs = make_inputs(jax.random.key(0), batch, seqlen, dim, d_state, 1, jnp.float32, True, True, True, True, True)
    arrays = {name: inputs[name] for name in FLOAT_ARGUMENTS}

    def loss(arrays):
        out, last_state = interpreted(**arrays, delta_softplus=True)
        return jnp.sum(out) + jnp.sum(last_state)

    largest = _largest_array(jax.make_jaxpr(jax.grad(loss))(arrays).jaxpr)
    checkpoints = batch * (seqlen // INTERPRET_BLOCKS.backward_steps + 1) * d_state * dim
    assert largest == checkpoints < batch * seqlen * dim * d_state


def _arguments(**overrides):
    inputs = make_inputs(jax.random.key(0), 2, 5, 4, 3, 2, jnp.float32, True, True, True, True, True)
    return {**inputs, **overrides}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"u": jnp.zeros((2, 5))}, r"u must be \(batch, seqlen, d_inner\), got shape \(2, 5\)"),
        ({"A": jnp.zeros((3, 3))}, r"A must be \(d_inner=4, d_state\), got shape \(3, 3\)"),
        ({"B": jnp.zeros((2, 5, 3))}, r"B must be \(2, 5, groups, 3\), got shape \(2, 5, 3\)"),
        ({"B": jnp.zeros((2, 5, 3, 3))}, r"B must be a number of groups dividing d_inner=4, got 3 groups"),
        ({"z": jnp.zeros((2, 5, 3))}, r"z must be of shape \(2, 5, 4\), got shape \(2, 5, 3\)"),
        ({"initial_state": jnp.zeros((2, 3, 4))}, r"initial_state must be of shape \(2, 4, 3\), got shape"),
        ({"u": jnp.zeros((2, 5, 4), jnp.int32)}, r"u must be a floating dtype, got dtype int32"),
    ],
)
def test_bad_arguments(overrides, match):
    with pytest.raises(ValueError, match=match):
        selective_scan_pallas(**_arguments(**overrides), interpret=True)


def test_block_config_checks():
    with pytest.raises(ValueError, match=r"ScanBlocks.channels must be a power of 2 .*got 24"):
        ScanBlocks(channels=24)
    with pytest.raises(ValueError, match=r"ScanBlocks.backward_steps must be positive, got 0"):
        ScanBlocks(backward_steps=0)
    with pytest.raises(ValueError, match=r"ScanBlocks.backward_steps=3 must divide steps=8"):
        ScanBlocks(steps=8, backward_steps=3)
    with pytest.raises(ValueError, match=r"ScanBlocks.chunk must be a positive multiple of steps=8, got 12"):
        ScanBlocks(steps=8, chunk=12)


@pytest.mark.parametrize(
    ("seqlen", "channel_blocks", "expected"),
    [
        (2048, 384, Chunks(128, 16, 128)),  # (8, 2048, 1536): about 6144 programs
        (4096, 512, Chunks(344, 12, 312)),
        (100, 384, Chunks(64, 2, 36)),  # never below MIN_CHUNK steps
        (5, 4, Chunks(8, 1, 5)),  # never longer than the sequence (rounded up to a tile)
        (128, 3072, Chunks(128, 1, 128)),  # (64, 128, 1536), a prefill: the grid is full without chunks
        (128, 2047, Chunks(64, 2, 64)),
    ],
)
def test_automatic_chunking(seqlen, channel_blocks, expected):
    assert chunking(ScanBlocks(), seqlen, channel_blocks) == expected


# Full size on a GPU: the compiled kernels with the default blocks.

GPU_CASES = [
    *CASES,
    Case(2, 2048, 256, 16, None, "bfloat16"),  # the Mosaic GPU forward ("auto" on Hopper)
    Case(2, 1024, 512, 16, 2, "bfloat16", with_z=False),  # Mosaic GPU, two groups
    Case(1, 1000, 200, 16, 4, with_init=False),  # 50 channels a group: a masked block in each group
    Case(2, 777, 128, 8, 2, "float16"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_matches_reference_on_gpu(case):
    assert pallas_supported()
    with warnings.catch_warnings():
        # Only the Triton backend's deprecation is ours to silence; anything else fails the test.
        warnings.filterwarnings("error")
        check_forward_and_grads(functools.partial(selective_scan_pallas, interpret=False), case, float64_reference=True)


@pytest.mark.gpu
def test_triton_forward_matches_reference_on_gpu():
    """The Triton forward where "auto" would pick Mosaic GPU: both backends stay correct."""
    blocks = ScanBlocks(forward_backend="triton")
    with warnings.catch_warnings():
        warnings.filterwarnings("error")
        check_forward_and_grads(
            functools.partial(selective_scan_pallas, blocks=blocks, interpret=False),
            Case(2, 2048, 256, 16, None, "bfloat16"),
            float64_reference=True,
        )


@pytest.mark.gpu
def test_default_implementation_on_gpu_is_pallas():
    from pallas_kernels.selective_scan.api import default_implementation

    assert pallas_supported() and default_implementation() == "pallas"
    assert TRITON_DEPRECATION.startswith("The Pallas Triton backend is deprecated")
