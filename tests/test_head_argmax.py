"""head_argmax: the Pallas kernel (in Pallas's interpreter on CPU, compiled on a GPU) against the float32 logits'
arg-max, both head layouts, odd batches and vocabularies, ties; split over the batch in a sharded jit; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mamba_jax.sharding import make_mesh
from pallas_kernels.head_argmax import head_argmax
from pallas_kernels.head_argmax.pallas import head_argmax_pallas
from pallas_kernels.head_argmax.reference import head_logits
from tests.test_batch_split import ops_of

# (batch, d_model, vocab, vocab_size, layout, dtype): one row, rows past a block of 64, a vocabulary smaller than a
# tile, a padded one whose last tile overlaps its neighbour, d not a multiple of the 128-row depth.
CASES = [
    (1, 64, 300, 300, "vd", jnp.float32),
    (3, 48, 61, 61, "dv", jnp.float32),
    (70, 32, 1000, 997, "vd", jnp.bfloat16),
    (64, 160, 520, 515, "dv", jnp.float16),
    (5, 256, 4096, 4096, "vd", jnp.bfloat16),
]


def inputs(batch, d_model, vocab, layout, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    hidden = jax.random.normal(keys[0], (batch, d_model)).astype(dtype)
    shape = (vocab, d_model) if layout == "vd" else (d_model, vocab)
    head = (jax.random.normal(keys[1], shape) / np.sqrt(d_model)).astype(dtype)
    return hidden, head


def check_argmax(got, hidden, head, layout, vocab_size):
    """got is each row's arg-max of the float32 logits: exactly where the top two logits are apart by more than
    float32 rounding of the sum, and else a column within that rounding of the maximum."""
    logits = np.asarray(head_logits(hidden, head, layout == "vd"), np.float64)[:, :vocab_size]
    got = np.asarray(got)
    assert got.dtype == np.int32 and got.shape == (hidden.shape[0],)
    assert np.all((got >= 0) & (got < vocab_size))
    top2 = np.sort(logits, axis=1)[:, -2:]
    slack = 1e-5 * np.abs(top2[:, 1]) + 1e-5
    clear = top2[:, 1] - top2[:, 0] > slack
    np.testing.assert_array_equal(got[clear], logits.argmax(axis=1)[clear])
    assert np.all(logits[np.arange(len(got)), got] >= top2[:, 1] - slack)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pallas_matches_reference(case):
    batch, d_model, vocab, vocab_size, layout, dtype = case
    hidden, head = inputs(batch, d_model, vocab, layout, dtype)
    got = head_argmax(hidden, head, layout=layout, vocab_size=vocab_size, implementation="pallas", interpret=True)
    check_argmax(got, hidden, head, layout, vocab_size)
    want = head_argmax(hidden, head, layout=layout, vocab_size=vocab_size, implementation="reference")
    check_argmax(want, hidden, head, layout, vocab_size)
    # Fewer programs than tiles: each walks several (the last ones twice where the tiles run out).
    few = head_argmax_pallas(hidden, head.astype(dtype), vocab_size, layout == "vd", True, columns=16, programs=3)
    check_argmax(few, hidden, head, layout, vocab_size)


def test_ties_go_to_the_first_index_and_padding_is_never_chosen():
    """Columns 5, 40 and 300 hold the same, largest logit (in different tiles); the padding past vocab_size is larger
    still and must not win."""
    hidden, head = inputs(4, 32, 520, "vd", jnp.float32, seed=1)
    best = 10 * jnp.abs(hidden).sum(0) * jnp.sign(hidden[0])  # row 0's logit along it is the largest
    head = head.at[jnp.array([5, 40, 300])].set(best).at[515:].set(100 * best)
    for implementation in ("reference", "pallas"):
        got = head_argmax(hidden, head, vocab_size=515, implementation=implementation, interpret=True)
        assert int(got[0]) == 5, implementation


def test_pallas_under_enable_x64():
    """With jax_enable_x64 the kernel's loop index stays int32 (it was int64 and failed to trace, also compiled)."""
    hidden, head = inputs(3, 32, 100, "vd", jnp.float32)
    with jax.enable_x64(True):
        got = head_argmax(hidden, head, implementation="pallas", interpret=True)
    check_argmax(got, hidden, head, "vd", 100)


def test_split_over_the_batch_in_a_sharded_jit():
    """Inside a sharded jit each device runs the kernel on its rows (the head whole): no collective on the
    activations, the same tokens."""
    mesh = make_mesh(data=8, fsdp=1, tensor=1)
    hidden, head = inputs(16, 32, 200, "vd", jnp.float32, seed=2)
    run = jax.jit(lambda h, w: head_argmax(h, w, implementation="pallas", interpret=True))
    want = run(hidden, head)
    placed = jax.device_put(hidden, NamedSharding(mesh, P("data", None)))
    ops = ops_of(run.lower(placed, head).compile())
    assert "all-gather" not in ops and "all-to-all" not in ops, ops
    np.testing.assert_array_equal(run(placed, head), want)


def test_bad_arguments():
    hidden, head = inputs(2, 32, 64, "vd", jnp.float32)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        head_argmax(hidden, head, implementation="cuda")
    with pytest.raises(ValueError, match="layout must be one of"):
        head_argmax(hidden, head, layout="vocab_first")
    with pytest.raises(ValueError, match=r"hidden must be floating \(batch, d_model\)"):
        head_argmax(hidden[0], head)
    with pytest.raises(ValueError, match=r"head must have shape \(d_model, vocab\) with d_model 32"):
        head_argmax(hidden, head, layout="dv")
    with pytest.raises(ValueError, match=r"head must have shape \(vocab, d_model\) with d_model 32"):
        head_argmax(hidden, head[0])
    with pytest.raises(ValueError, match=r"vocab_size must be an int in \[1, 64\], got 65"):
        head_argmax(hidden, head, vocab_size=65)
    with pytest.raises(ValueError, match=r"vocab_size must be an int >= 1, got True"):
        head_argmax(hidden, head, vocab_size=True)
    with pytest.raises(ValueError, match="needs d_model a multiple of 16"):
        head_argmax(hidden[:, :20], head[:, :20], implementation="pallas", interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "case",
    [
        (64, 768, 50280, 50277, "vd", jnp.float16),
        (1, 2560, 50280, 50277, "dv", jnp.bfloat16),
        (100, 2048, 50280, 50280, "vd", jnp.float16),
    ],
    ids=str,
)
def test_pallas_on_gpu(case):
    """The compiled kernel (the default on a GPU) at Mamba-1 130m's head at batch 64, an untied 2.8b-sized head at
    one row, and past a block of 64 rows."""
    from pallas_kernels.selective_scan.pallas import pallas_supported

    assert pallas_supported()
    batch, d_model, vocab, vocab_size, layout, dtype = case
    hidden, head = inputs(batch, d_model, vocab, layout, dtype, seed=3)
    got = jax.jit(lambda h, w: head_argmax(h, w, layout=layout, vocab_size=vocab_size))(hidden, head)
    check_argmax(got, hidden, head, layout, vocab_size)
