"""`jaxtune.ops.quant`: int8 and NF4 blockwise quantisation against a naive NumPy reference,
round-trip error bounds from the quantisation step, nibble packing, stacked kernels, jit and
byte counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.ops import quant

# bitsandbytes' NF4 table (functional.py, `get_4bit_type('nf4')`), typed in independently of
# the module's copy.
BNB_NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def _gaussian(shape, seed=0, std=0.02):
  return np.random.default_rng(seed).normal(0, std, shape).astype(np.float32)


def _blocks(w, block):
  *stack, rows, out = w.shape
  return w.reshape(*stack, rows // block, block, out)


def _naive_nf4(w, block):
  """Per element: the index of the NF4 level nearest to w / absmax of its block."""
  wb = _blocks(w, block)
  absmax = np.abs(wb).max(axis=-2, keepdims=True)
  normed = wb / np.where(absmax == 0, 1, absmax)
  idx = np.argmin(np.abs(normed[..., None] - BNB_NF4), axis=-1)
  return idx.reshape(w.shape).astype(np.uint8), absmax.squeeze(-2)


def test_nf4_codes_match_naive_table_lookup():
  w = _gaussian((3, 128, 24))
  q = quant.quantize(jnp.asarray(w), "nf4")
  codes, absmax = _naive_nf4(w, 64)
  np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(q.codes)), codes)
  np.testing.assert_array_equal(np.asarray(q.scales), absmax)
  np.testing.assert_array_equal(quant.NF4_LEVELS, BNB_NF4)
  # Each block's largest magnitude lands exactly on -1 or +1.
  deq = np.asarray(quant.dequantize(q))
  np.testing.assert_array_equal(np.abs(_blocks(deq, 64)).max(axis=-2), absmax)


def test_nf4_round_trip_within_half_the_largest_gap():
  w = _gaussian((2, 256, 40), seed=1)
  deq = np.asarray(quant.dequantize(quant.quantize(jnp.asarray(w), "nf4", block_size=64)))
  # The largest gap is between -1 and -0.696; a float32 ulp of slack for the scaling.
  gap = np.max(np.diff(BNB_NF4))
  absmax = np.abs(_blocks(w, 64)).max(axis=-2, keepdims=True)
  bound = gap / 2 * absmax * (1 + 1e-6)
  assert np.all(np.abs(_blocks(deq - w, 64)) <= bound)
  # Typical error is far below the bound (most Gaussian mass sits where levels are dense).
  assert np.mean(np.abs(deq - w)) < 0.1 * np.mean(np.abs(w))


def test_int8_round_trip_within_half_a_step():
  w = _gaussian((2, 128, 16), seed=2)
  q = quant.quantize(jnp.asarray(w), "int8")
  assert q.codes.dtype == jnp.int8 and q.codes.shape == w.shape
  deq = np.asarray(quant.dequantize(q))
  absmax = np.abs(_blocks(w, 64)).max(axis=-2, keepdims=True)
  assert np.all(np.abs(_blocks(deq - w, 64)) <= absmax / 127 / 2 * (1 + 1e-5))
  # Codes against the naive formula.
  ref = np.clip(np.round(_blocks(w, 64) / (absmax / 127)), -127, 127).reshape(w.shape)
  np.testing.assert_array_equal(np.asarray(q.codes), ref.astype(np.int8))


@pytest.mark.parametrize("kind", quant.KINDS)
def test_values_on_the_grid_round_trip_exactly(kind):
  rng = np.random.default_rng(3)
  shape, block = (2, 64, 8), 32
  # Power-of-two scales keep level x scale and its division exact in float32.
  scales = 2.0 ** rng.integers(-8, 2, (2, 2, 1, 8)).astype(np.float32)
  if kind == "nf4":
    levels = BNB_NF4[rng.integers(0, 16, (2, 2, block, 8))]
    levels[..., 0, :] = 1.0  # each block reaches its absmax
  else:
    levels = rng.integers(-127, 128, (2, 2, block, 8)).astype(np.float32)
    levels[..., 0, :] = 127.0  # absmax 127 x scale: the step is exactly the scale
  w = (levels * scales).reshape(shape).astype(np.float32)
  deq = quant.dequantize(quant.quantize(jnp.asarray(w), kind, block_size=block))
  np.testing.assert_array_equal(np.asarray(deq), w)


def test_zero_block_and_dtype():
  w = np.zeros((64, 4), np.float32)
  w[:, 1] = _gaussian((64,), seed=4)
  for kind in quant.KINDS:
    deq = quant.dequantize(quant.quantize(jnp.asarray(w), kind), jnp.bfloat16)
    assert deq.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(deq[:, 0], np.float32), 0)
    assert np.all(np.isfinite(np.asarray(deq, np.float32)))


def test_pack_unpack_nibbles():
  codes = np.random.default_rng(5).integers(0, 16, (3, 10, 7)).astype(np.uint8)
  packed = np.asarray(quant.pack_nibbles(jnp.asarray(codes)))
  assert packed.shape == (3, 5, 7) and packed.dtype == np.uint8
  # Row 2r in the low nibble, row 2r + 1 in the high nibble.
  np.testing.assert_array_equal(packed, codes[:, 0::2] + 16 * codes[:, 1::2])
  np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(jnp.asarray(packed))), codes)


def test_stack_axes_quantise_each_layer_alone():
  """A stacked kernel's slice i quantises as the layer kernel i would on its own: blocks never
  cross the stack or out axes, so the codes shard like the kernel."""
  w = jnp.asarray(_gaussian((2, 3, 128, 12), seed=6))
  for kind in quant.KINDS:
    q = quant.quantize(w, kind)
    one = quant.quantize(w[1, 2], kind)
    np.testing.assert_array_equal(np.asarray(q.codes[1, 2]), np.asarray(one.codes))
    np.testing.assert_array_equal(np.asarray(q.scales[1, 2]), np.asarray(one.scales))
    assert q.shape == w.shape and q.scales.shape == (2, 3, 2, 12)
    # Slicing rows of codes and scales by whole blocks is slicing the kernel's rows.
    rows = 64 if kind == "int8" else 32
    part = quant.QuantizedTensor(q.codes[..., rows:, :], q.scales[..., 1:, :], kind, 64)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(part)),
                                  np.asarray(quant.dequantize(q))[..., 64:, :])


def test_pytree_and_jit():
  w = jnp.asarray(_gaussian((2, 128, 8), seed=7))
  for kind in quant.KINDS:
    q = jax.jit(quant.quantize, static_argnums=(1, 2))(w, kind, 64)
    eager = quant.quantize(w, kind)
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(eager.codes))
    assert len(jax.tree.leaves(q)) == 2
    deq = jax.jit(quant.dequantize, static_argnums=1)(q, jnp.float32)
    # XLA may fold the scale's division into a reciprocal multiply under jit (jax 0.12.1
    # does): the same codes, scales within an ulp or two.
    np.testing.assert_allclose(np.asarray(deq), np.asarray(quant.dequantize(eager)),
                               rtol=1e-6, atol=0)
    # Abstract evaluation gives the shapes the planner counts.
    shapes = jax.eval_shape(lambda x, k=kind: quant.quantize(x, k), w)
    assert sum(s.size * s.dtype.itemsize for s in jax.tree.leaves(shapes)) == q.nbytes
    # Scanning over the stack axis: each step sees one layer's QuantizedTensor.
    _, per_layer = jax.lax.scan(lambda c, ql: (c, quant.dequantize(ql)), 0, q)
    np.testing.assert_array_equal(np.asarray(per_layer), np.asarray(deq))


def test_byte_counts():
  shape = (4, 512, 256)
  params = 4 * 512 * 256
  w = jnp.asarray(_gaussian(shape, seed=8))
  nf4, int8 = quant.quantize(w, "nf4"), quant.quantize(w, "int8")
  assert nf4.codes.dtype == jnp.uint8 and nf4.codes.shape == (4, 256, 256)
  assert nf4.nbytes == params // 2 + params * 4 // 64 == quant.quantized_nbytes(shape, "nf4")
  assert int8.nbytes == params + params * 4 // 64 == quant.quantized_nbytes(shape, "int8")
  # Against a bf16 kernel: nf4 is 0.5625 / 2, int8 1.0625 / 2.
  assert nf4.nbytes / (params * 2) == pytest.approx(0.28125)
  assert int8.nbytes / (params * 2) == pytest.approx(0.53125)


def test_rejects_bad_shapes_and_kinds():
  with pytest.raises(ValueError, match="multiple of an even block_size"):
    quant.quantize(jnp.zeros((96, 4)), "nf4", block_size=64)
  with pytest.raises(ValueError, match="kind must be one of"):
    quant.quantize(jnp.zeros((64, 4)), "int4")
  with pytest.raises(ValueError, match="kernel"):
    quant.quantize(jnp.zeros((64,)), "nf4")


def test_block_size_for():
  assert quant.block_size_for(4096) == 64
  assert quant.block_size_for(32) == 32
  assert quant.block_size_for(96) == 32


def test_shard_units():
  assert quant.shard_units((128, 1), "nf4", 64) == ((64, 1), (2, 1))
  assert quant.shard_units((128, 1), "int8", 64) == ((128, 1), (2, 1))
  assert quant.shard_units((32, 1), "nf4", 64) == ((16, 1), (1, 1))
  assert quant.shard_units((1, 128), "nf4", 64) == ((1, 128), (1, 128))
  assert quant.shard_units(None, "nf4", 64) == (None, None)
