"""Blockwise int8 and NF4 quantisation of frozen kernels (QLoRA's base weights).

A kernel [*stack, in, out] is cut into blocks of `block_size` consecutive input rows per
output column; each block keeps its absmax as a float32 scale and its values as codes:
  int8  symmetric: code = round(w / (absmax / 127)), one int8 per param.
  nf4   QLoRA's NormalFloat4 (Dettmers et al. 2023, bitsandbytes' table): the index of the
        NF4 level nearest to w / absmax, two 4-bit codes per uint8 (rows 2r and 2r+1 of the
        kernel share codes row r: low nibble, high nibble).
Codes are [*stack, in, out] (int8) or [*stack, in / 2, out] (nf4) and scales
[*stack, in / block_size, out]: every axis of the kernel survives, so codes and scales take
the kernel's logical axis names and shard like it, as long as a shard of `in` holds whole
blocks. Bytes per param: int8 1 + 4 / block_size, nf4 0.5 + 4 / block_size (0.5625 at 64).
The scales are not quantised again (QLoRA's double quantisation saves 0.37 bit/param; not
done here).

Why our own code and not google/qwix's `quantize`/`dequantize` (qwix 0.1.8): qwix stores NF4
codes as `jnp.uint4`, one element per param, which jax counts (and the host and checkpoint
formats store) as a byte each, so the base would cost 1 byte/param instead of 0.5 and the
planner would count it so; packing is ours to do in any case, and its scale layout
(`tiled_axes`) would have to be wrapped to keep our stacked [*stack, in, out] layout. Its
model-level interception (dot_general/einsum) does not reach our scanned layers and grouped
expert matmul either. The arithmetic is a few lines, so it lives here, tested against a
NumPy reference (`tests/test_quant.py`); the NF4 table is the one qwix and bitsandbytes use.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "nf4")
DEFAULT_BLOCK_SIZE = 64

# The 16 NF4 levels (QLoRA, appendix E; bitsandbytes' `get_4bit_type('nf4')`), ascending.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
# Decision boundaries between adjacent levels: a value goes to the nearest level.
_NF4_MIDPOINTS = (NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2
# The largest gap between adjacent levels (between -1 and -0.696): the nearest-level error
# bound of a block is half of it times the block's absmax.
NF4_MAX_GAP = float(np.max(np.diff(NF4_LEVELS)))
_INT8_MAX = 127


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A quantised kernel: `codes` and float32 `scales` (see the module docstring for their
  shapes); `kind` and `block_size` are static (pytree metadata), so the tensor passes through
  jit, scan and tree maps like its two arrays."""
  codes: jax.Array
  scales: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True))
  block_size: int = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """The kernel's shape [*stack, in, out]."""
    *stack, rows, out = self.codes.shape
    return (*stack, rows * 2 if self.kind == "nf4" else rows, out)

  @property
  def nbytes(self) -> int:
    return self.codes.nbytes + self.scales.nbytes


jax.tree_util.register_dataclass(QuantizedTensor, data_fields=["codes", "scales"],
                                 meta_fields=["kind", "block_size"])


def check(shape: tuple[int, ...], kind: str, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
  """A clear error where a kernel of `shape` cannot be quantised as asked."""
  if kind not in KINDS:
    raise ValueError(f"quantisation kind must be one of {list(KINDS)}, got {kind!r}")
  if len(shape) < 2:
    raise ValueError(f"expected a kernel [*stack, in, out], got shape {tuple(shape)}")
  if block_size <= 0 or block_size % 2 or shape[-2] % block_size:
    raise ValueError(f"the input axis ({shape[-2]}) must be a multiple of an even block_size, "
                     f"got block_size {block_size} for shape {tuple(shape)}")


def block_size_for(rows: int, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
  """The block size used for a kernel with `rows` input rows: `block_size` where it divides
  them, else their greatest common divisor (a miniature's 32-wide layers get blocks of 32)."""
  return math.gcd(rows, block_size)


def quantize(w: jax.Array, kind: str, block_size: int = DEFAULT_BLOCK_SIZE) -> QuantizedTensor:
  """`w` [*stack, in, out] quantised blockwise along `in` (absmax scales, float32 math)."""
  check(w.shape, kind, block_size)
  *stack, rows, out = w.shape
  w_blocks = w.astype(jnp.float32).reshape(*stack, rows // block_size, block_size, out)
  absmax = jnp.max(jnp.abs(w_blocks), axis=-2, keepdims=True)
  if kind == "int8":
    scale = absmax / _INT8_MAX
    # An all-zero block divides by 1 instead of 0 (its codes are 0 either way).
    codes = jnp.round(w_blocks / jnp.where(scale == 0, 1, scale))
    codes = jnp.clip(codes, -_INT8_MAX, _INT8_MAX).astype(jnp.int8).reshape(w.shape)
  else:
    scale = absmax
    normed = w_blocks / jnp.where(scale == 0, 1, scale)
    # Nearest level through the 15 midpoints: no [..., 16] distance tensor for big kernels.
    idx = jnp.searchsorted(jnp.asarray(_NF4_MIDPOINTS), normed, side="left")
    codes = pack_nibbles(idx.astype(jnp.uint8).reshape(w.shape))
  return QuantizedTensor(codes, jnp.squeeze(scale, -2), kind, block_size)


def dequantize(q: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """The kernel [*stack, in, out] in `dtype`: level (or int8 code) x block scale in float32,
  then one cast, so the result is the same whichever dtype the matmul then runs in."""
  *stack, rows, out = q.shape
  if q.kind == "int8":
    values = q.codes.astype(jnp.float32)
  else:
    values = jnp.asarray(NF4_LEVELS)[unpack_nibbles(q.codes).astype(jnp.int32)]
  values = values.reshape(*stack, rows // q.block_size, q.block_size, out)
  return (values * q.scales[..., None, :]).reshape(q.shape).astype(dtype)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """4-bit codes (uint8 values < 16) [..., 2R, out] -> bytes [..., R, out]: row 2r in the low
  nibble, row 2r + 1 in the high nibble."""
  lo, hi = codes[..., 0::2, :], codes[..., 1::2, :]
  return (lo | (hi << 4)).astype(jnp.uint8)


def unpack_nibbles(packed: jax.Array) -> jax.Array:
  """The inverse of `pack_nibbles`: bytes [..., R, out] -> codes [..., 2R, out] (uint8)."""
  lo, hi = packed & 0xF, packed >> 4
  *lead, rows, out = packed.shape
  return jnp.stack([lo, hi], axis=-2).reshape(*lead, rows * 2, out)


def quantized_nbytes(shape: tuple[int, ...], kind: str,
                     block_size: int = DEFAULT_BLOCK_SIZE) -> int:
  """Bytes of `quantize`'s output for a kernel of `shape`, without computing it."""
  check(shape, kind, block_size)
  params = int(np.prod(shape))
  code_bytes = params if kind == "int8" else params // 2
  return code_bytes + 4 * params // block_size


def shard_units(kernel_units: tuple[int, ...] | None, kind: str, block_size: int
                ) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
  """The `shard_units` (see `parallel.sharding`) of the codes and the scales of a kernel whose
  trailing dims have `kernel_units`: a unit of r input rows is r / 2 rows of nf4 codes and
  r / block_size rows of scales (at least 1: a unit smaller than a block stays whole with it)."""
  if kernel_units is None or len(kernel_units) < 2:
    return kernel_units, kernel_units
  *lead, rows_unit, out_unit = kernel_units
  tail = (out_unit,)
  code_rows = rows_unit if kind == "int8" else max(rows_unit // 2, 1)
  return ((*lead, code_rows, *tail), (*lead, max(rows_unit // block_size, 1), *tail))
