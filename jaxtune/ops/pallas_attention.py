"""Packed GQA attention, causal or not, as Pallas Triton kernels (NVIDIA GPUs): no [T, T]
mask, ever.

FlashAttention-2 kernels of jaxtune's own (JAX 0.12.1 removed the Triton attention module
`jax.experimental.pallas.ops.gpu.attention` that jaxtune used before). Causality (a static
kernel parameter: causal for the text models, not for the InternViT tower) and segment ids
are applied inside the kernels: each program builds its [tile_q, tile_k] mask from the
tile's positions and segment ids, so memory is O(T) (outputs, per-query logsumexp, the [T]
segment ids). Around them:

  * GQA without copying k / v: the BlockSpecs of k and v map query head n to kv head
    n // G (HF's repeat_kv order), so the forward reads each kv head in place. In the
    backward pass the kernel writes dk / dv per *query* head ([B, T, N, H], float32 when
    G > 1) and the G heads of a group are summed outside: O(T * N * H) memory, like dq.
  * the outputs carry shard_map's varying-axes type (so the kernels run per device under
    `jaxtune.parallel.sharding.logical_shard_map`), and delta = rowsum(dO * O) is one XLA
    reduction instead of a third kernel.

Semantics are `attention.segment_mask`'s: key s is seen by query t iff the segment ids are
equal and (when causal) s <= t, so padding (segment 0) sees (earlier) padding and every row
has its own key (no empty softmax). T need not be a multiple of the blocks: rows are padded
at the end with segment -1, which no real token shares. H that is not a power of two is
zero-padded (Triton tiles are powers of two); the scale stays 1 / sqrt(H).

Skipped, from `segment_spans`: key tiles wholly before the first key of the query tile's
samples (forward, dq) and query tiles after the last token of the key tile's samples (dk,
dv); causal, also key tiles above the diagonal, and otherwise key tiles wholly after the last
key of the query tile's samples (forward, dq) and query tiles before the first token of the
key tile's samples (dk, dv). So the work follows the sum of the squared sample lengths (at
tile granularity), not the row's T^2 / 2 (or T^2), however many samples a row packs.

`interpret=True` runs the same kernels through Pallas' interpreter on any backend (how the
CPU tests check them); without it the kernels need Triton, i.e. a CUDA GPU.

Shape letters: B rows, T tokens, N query heads, K kv heads, G = N / K, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxtune.ops.flash_attention import RESIDUAL_NAMES
from jaxtune.ops.pallas_loss import varying_out_struct
from jaxtune.parallel.sharding import logical_shard_map

# Logical axis names of the per-device call (jaxtune.parallel.sharding's rules): rows over
# the batch axes, heads over 'tensor'; tokens and head dim whole on every device.
Q_NAMES = ("activation_batch", "activation_length", "activation_heads", None)
KV_NAMES = ("activation_batch", "activation_length", "activation_kv_heads", None)
SEGMENT_NAMES = ("activation_batch", "activation_length")


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes, powers of two (Triton). `q` / `kv`: the forward's query and key tiles.
  Backward: each program owns `bwd_major` keys (for dk, dv) and then `bwd_major` queries
  (for dq), walking the other side in tiles of `bwd_minor`. Not tuned here: the forward's
  128 x 64 is a common Triton choice for H = 128, the backward's 32 x 32 the usual
  FlashAttention-2 Triton default. T is padded to a multiple of the largest tile."""
  q: int = 128
  kv: int = 64
  bwd_major: int = 32
  bwd_minor: int = 32
  num_warps: int | None = None   # None: 4 for H <= 64, else 8 (forward); 4 / 8 by tile area
  num_stages: int = 2

  def __post_init__(self):
    for name in ("q", "kv", "bwd_major", "bwd_minor"):
      size = getattr(self, name)
      if size < 1 or size & (size - 1):
        raise ValueError(f"Blocks.{name} must be a power of two, got {size}")

  @property
  def row_multiple(self) -> int:
    return max(self.q, self.kv, self.bwd_major, self.bwd_minor)


# Finite, so exp(_MASKED - m) is exactly 0 and a fully hidden tile never makes a NaN.
_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, causal):
  """Scaled scores [tq, tk] in float32; hidden (another segment, or, causal, a key after the
  query) entries are _MASKED."""
  s = plgpu.dot(q, k, trans_b=True) * scale
  visible = q_seg[:, None] == k_seg[None, :]
  if causal:
    visible = visible & (q_pos[:, None] >= k_pos[None, :])
  return jnp.where(visible, s, _MASKED)


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, first_ref, last_ref, o_ref, lse_ref, *,
                    scale: float, block_q: int, block_k: int, causal: bool):
  """One query tile of one (row, head) against its visible key tiles, online softmax
  (FlashAttention-2): refs q / o [block_q, H], k / v [T, H], seg / first / last [T], lse
  [block_q]. `last` is read only when not causal."""
  i = pl.program_id(0)
  q = q_ref[...]
  q_pos = i * block_q + jnp.arange(block_q)
  q_seg = seg_ref[pl.ds(i * block_q, block_q)]

  def step(j, carry):
    acc, m, l = carry
    keys = pl.ds(j * block_k, block_k)
    s = _scores(q, k_ref[keys, :], q_pos, j * block_k + jnp.arange(block_k), q_seg,
                seg_ref[keys], scale, causal)
    m_new = jnp.maximum(m, s.max(axis=1))
    rescale = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[:, None])
    v = v_ref[keys, :]
    return (acc * rescale[:, None] + plgpu.dot(p.astype(v.dtype), v),
            m_new, l * rescale + p.sum(axis=1))

  # Key tiles that end before the first key of its queries' samples are hidden by the
  # segments, and those that start after this tile's last query by causality (or, not
  # causal, after the last key of its queries' samples): all skipped.
  if causal:
    num_tiles = jax.lax.div((i + 1) * block_q + block_k - 1, block_k)
  else:
    num_tiles = jax.lax.div(jnp.max(last_ref[pl.ds(i * block_q, block_q)]), block_k) + 1
  first_tile = jax.lax.div(jnp.min(first_ref[pl.ds(i * block_q, block_q)]), block_k)
  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(first_tile, num_tiles, step, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _backward_kernel(q_ref, k_ref, v_ref, seg_ref, first_ref, last_ref, do_ref, lse_ref,
                     delta_ref, dq_ref, dk_ref, dv_ref, *, scale: float, major: int,
                     minor: int, causal: bool):
  """Program i of one (row, head): dk / dv of key tile i (walking the query tiles that can
  see it), then dq of query tile i (walking its visible key tiles). Refs q / k / v / do
  [T, H], seg / first / last / lse / delta [T], outputs [major, H]. p is recomputed from
  lse; the softmax backward is ds = p * (dp - delta)."""
  i = pl.program_id(2)
  t = q_ref.shape[0]
  tile = pl.ds(i * major, major)
  tile_pos = i * major + jnp.arange(major)
  tile_seg = seg_ref[tile]

  def probabilities(q, k, q_pos, k_pos, q_seg, k_seg, lse):
    return jnp.exp(_scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, causal) - lse[:, None])

  k, v = k_ref[tile, :], v_ref[tile, :]

  def dkv_step(j, carry):
    dk, dv = carry
    rows = pl.ds(j * minor, minor)
    q, do = q_ref[rows, :], do_ref[rows, :]
    p = probabilities(q, k, j * minor + jnp.arange(minor), tile_pos, seg_ref[rows], tile_seg,
                      lse_ref[rows])
    ds = p * (plgpu.dot(do, v, trans_b=True) - delta_ref[rows][:, None])
    return (dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True),
            dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True))

  # Queries after the last token of its keys' samples cannot see this key tile (segments),
  # nor those before its first key (causality) or, not causal, before the first token of its
  # keys' samples (segments).
  zeros = jnp.zeros(k.shape, jnp.float32)
  end = jnp.minimum(jax.lax.div(jnp.max(last_ref[tile]), minor) + 1, t // minor)
  start = (jax.lax.div(i * major, minor) if causal
           else jax.lax.div(jnp.min(first_ref[tile]), minor))
  dk, dv = jax.lax.fori_loop(start, end, dkv_step, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)

  q, do = q_ref[tile, :], do_ref[tile, :]
  lse, delta = lse_ref[tile], delta_ref[tile]

  def dq_step(j, dq):
    keys = pl.ds(j * minor, minor)
    k = k_ref[keys, :]
    p = probabilities(q, k, tile_pos, j * minor + jnp.arange(minor), tile_seg, seg_ref[keys],
                      lse)
    ds = p * (plgpu.dot(do, v_ref[keys, :], trans_b=True) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  # Key tiles that end before the first key of its queries' samples are hidden, and those
  # that start after this query tile's last query (causal) or after the last key of its
  # queries' samples (not causal).
  if causal:
    stop = jax.lax.div((i + 1) * major + minor - 1, minor)
  else:
    stop = jax.lax.div(jnp.max(last_ref[tile]), minor) + 1
  dq = jax.lax.fori_loop(jax.lax.div(jnp.min(first_ref[tile]), minor), stop, dq_step,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _compiler_params(num_warps: int, num_stages: int, interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def segment_spans(seg_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per token, the first and the last position of its segment id in its row ([B, T] int32
  each). A query t sees no key before first[t]; a key s is seen by no query after last[s].
  The kernels skip the tiles outside these spans, so their work follows the sum of the
  squared sample lengths rather than T^2 / 2. Ids need not be contiguous runs (padding may
  recur): the spans are over equal ids wherever they sit."""
  def per_row(seg_t):
    t = seg_t.shape[0]
    order = jnp.argsort(seg_t, stable=True)           # positions grouped by id, ascending
    ids = seg_t[order]
    group = jnp.cumsum(jnp.concatenate([jnp.zeros(1, jnp.int32),
                                        (ids[1:] != ids[:-1]).astype(jnp.int32)]))
    first = jax.ops.segment_min(order, group, num_segments=t)[group]
    last = jax.ops.segment_max(order, group, num_segments=t)[group]
    inverse = jnp.zeros(t, jnp.int32).at[order].set(jnp.arange(t, dtype=jnp.int32))
    return first[inverse].astype(jnp.int32), last[inverse].astype(jnp.int32)
  return jax.vmap(per_row)(seg_bt)


def _kernel_name(stem: str, causal: bool) -> str:
  return f"jaxtune_packed_attention_{stem}" if causal else f"jaxtune_full_attention_{stem}"


def _forward(q, k, v, seg, first, last, scale, blocks: Blocks, interpret: bool, causal: bool):
  """(out [B, T, N, H] in q's dtype, lse [B, N, T] float32: log-sum-exp of the scores)."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  bq, bk = blocks.q, blocks.kv
  kernel = functools.partial(_forward_kernel, scale=scale, block_q=bq, block_k=bk,
                             causal=causal)
  kv_spec = pl.BlockSpec((None, t, None, h), lambda i, r, m: (r, 0, jax.lax.div(m, group), 0))
  q_spec = pl.BlockSpec((None, bq, None, h), lambda i, r, m: (r, i, m, 0))
  row = pl.BlockSpec((None, t), lambda i, r, m: (r, 0))
  warps = blocks.num_warps or (4 if h <= 64 else 8)
  return pl.pallas_call(
      kernel,
      grid=(t // bq, b, n),
      in_specs=[q_spec, kv_spec, kv_spec, row, row, row],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, r, m: (r, m, i))],
      out_shape=[varying_out_struct(q.shape, q.dtype, q),
                 varying_out_struct((b, n, t), jnp.float32, q)],
      compiler_params=_compiler_params(warps, blocks.num_stages, interpret),
      interpret=interpret, name=_kernel_name("fwd", causal))(q, k, v, seg, first, last)


def _backward(q, k, v, seg, first, last, out, lse, do, scale, blocks: Blocks,
              interpret: bool, causal: bool):
  b, t, n, h = q.shape
  kh = k.shape[2]
  group = n // kh
  major, minor = blocks.bwd_major, blocks.bwd_minor
  # softmax backward: ds = p * (dp - delta), delta_t = sum_h dO_th * O_th, per query head.
  delta = jnp.einsum("btnh,btnh->bnt", do.astype(jnp.float32), out.astype(jnp.float32))
  kernel = functools.partial(_backward_kernel, scale=scale, major=major, minor=minor,
                             causal=causal)
  whole_q = pl.BlockSpec((None, t, None, h), lambda r, m, _: (r, 0, m, 0))
  whole_kv = pl.BlockSpec((None, t, None, h), lambda r, m, _: (r, 0, jax.lax.div(m, group), 0))
  per_head = pl.BlockSpec((None, None, t), lambda r, m, _: (r, m, 0))
  tile = pl.BlockSpec((None, major, None, h), lambda r, m, i: (r, i, m, 0))
  row = pl.BlockSpec((None, t), lambda r, m, _: (r, 0))
  # dk / dv come out per query head; a group's G heads are summed below, in float32.
  dkv_dtype = k.dtype if group == 1 else jnp.float32
  warps = blocks.num_warps or (4 if major * minor < 128 * 128 else 8)
  dq, dk, dv = pl.pallas_call(
      kernel,
      grid=(b, n, t // major),
      in_specs=[whole_q, whole_kv, whole_kv, row, row, row, whole_q, per_head, per_head],
      out_specs=[tile, tile, tile],
      out_shape=[varying_out_struct(q.shape, q.dtype, q),
                 varying_out_struct(q.shape, dkv_dtype, q),
                 varying_out_struct(q.shape, dkv_dtype, q)],
      compiler_params=_compiler_params(warps, blocks.num_stages, interpret),
      interpret=interpret, name=_kernel_name("bwd", causal))(q, k, v, seg, first, last, do,
                                                             lse, delta)
  if group > 1:
    dk = dk.reshape(b, t, kh, group, h).sum(3).astype(k.dtype)
    dv = dv.reshape(b, t, kh, group, h).sum(3).astype(v.dtype)
  return dq, dk, dv


# seg, first and last (`segment_spans`, computed once a call) are integer inputs: no gradient.
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k, v, seg, first, last, scale, blocks, interpret, causal):
  return _forward(q, k, v, seg, first, last, scale, blocks, interpret, causal)[0]


def _attention_fwd(q, k, v, seg, first, last, scale, blocks, interpret, causal):
  out, lse = _forward(q, k, v, seg, first, last, scale, blocks, interpret, causal)
  # Named like the blockwise path's residuals, so remat='save_attention' keeps them too.
  out = checkpoint_name(out, RESIDUAL_NAMES[0])
  lse = checkpoint_name(lse, RESIDUAL_NAMES[1])
  return out, (q, k, v, seg, first, last, out, lse)


def _attention_bwd(scale, blocks, interpret, causal, res, do):
  q, k, v, seg, first, last, out, lse = res
  dq, dk, dv = _backward(q, k, v, seg, first, last, out, lse, do.astype(q.dtype), scale,
                         blocks, interpret, causal)
  return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def local_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                    segment_ids_bt: jax.Array, *, blocks: Blocks = Blocks(),
                    interpret: bool = False, head_offset: jax.Array | int | None = None,
                    group: int | None = None, causal: bool = True) -> jax.Array:
  """One device's packed GQA attention (causal unless `causal=False`), scale 1/sqrt(H);
  [B, T, N, H] in v's dtype.

  `head_offset` / `group`: for query heads split over devices while k / v hold all kv
  heads (fewer kv heads than the tensor axis): this device's first global query head and
  the global N / K. Each local query head then takes kv head (offset + n) // group, gathered
  into a [B, T, N_local, H] copy (O(T) memory). Without them q and k / v are split alike
  (or not at all), and local query head n uses local kv head n // (N / K).
  """
  b, t, n, h = q_btnh.shape
  out_dtype = v_btkh.dtype
  if head_offset is not None:
    if group is None:
      raise ValueError("head_offset needs the global group size N / K")
    heads = (head_offset + jnp.arange(n)) // group
    k_btkh, v_btkh = jnp.take(k_btkh, heads, axis=2), jnp.take(v_btkh, heads, axis=2)
  kh = k_btkh.shape[2]
  if n % kh:
    raise ValueError(f"query heads ({n}) must be a multiple of kv heads ({kh})")
  scale = 1.0 / math.sqrt(h)
  dtype = q_btnh.dtype
  k_btkh, v_btkh = k_btkh.astype(dtype), v_btkh.astype(dtype)
  seg_bt = segment_ids_bt.astype(jnp.int32)
  pad_t = -(-t // blocks.row_multiple) * blocks.row_multiple - t
  pad_h = (1 << max(h - 1, 0).bit_length()) - h
  if pad_t or pad_h:
    # Appended tokens are segment -1, which no real token shares (causal or not); they see
    # themselves and stay finite. Zero head columns change no score and no output.
    pad = lambda x: jnp.pad(x, [(0, 0), (0, pad_t), (0, 0), (0, pad_h)])
    q_btnh, k_btkh, v_btkh = pad(q_btnh), pad(k_btkh), pad(v_btkh)
    seg_bt = jnp.pad(seg_bt, [(0, 0), (0, pad_t)], constant_values=-1)
  first_bt, last_bt = segment_spans(seg_bt)
  out = _attention(q_btnh, k_btkh, v_btkh, seg_bt, first_bt, last_bt, scale, blocks,
                   bool(interpret), bool(causal))
  return out[:, :t, :, :h].astype(out_dtype)


def packed_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                     segment_ids_bt: jax.Array, *, blocks: Blocks = Blocks(),
                     interpret: bool = False, causal: bool = True) -> jax.Array:
  """Packed GQA attention (causal unless `causal=False`) through the Pallas kernels, on
  global arrays.

  Under a mesh of more than one device it runs per device (`logical_shard_map`): rows split
  over the batch axes, query and kv heads over theirs ('tensor'), tokens whole. No
  collective is needed: every (row, head) is independent. Without a mesh (or on one device)
  it is `local_attention` on the arrays as they are.
  """
  num_heads, num_kv_heads = q_btnh.shape[2], k_btkh.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads "
                     f"({num_kv_heads})")
  group = num_heads // num_kv_heads

  def per_device(axes, q, k, v, seg):
    q_axes, kv_axes = axes["activation_heads"], axes["activation_kv_heads"]
    if kv_axes == q_axes:  # split alike (or whole): local head n uses local kv head n // G
      return local_attention(q, k, v, seg, blocks=blocks, interpret=interpret, causal=causal)
    if kv_axes:
      raise ValueError(f"query heads split over {q_axes} but kv heads over {kv_axes}: the "
                       f"Pallas attention needs them split alike or kv heads whole")
    # kv heads whole (fewer than the head axis' devices): pick each local head's kv head.
    offset = jax.lax.axis_index(q_axes) * q.shape[2]
    return local_attention(q, k, v, seg, blocks=blocks, interpret=interpret,
                           head_offset=offset, group=group, causal=causal)

  # Pallas' interpreter drops the varying-axes type of its blocks inside a type-checked
  # shard_map (jax 0.12; ops/loss.py meets the same), so interpret mode runs unchecked.
  fn = logical_shard_map(per_device, (Q_NAMES, KV_NAMES, KV_NAMES, SEGMENT_NAMES), Q_NAMES,
                         check_vma=not interpret)
  return fn(q_btnh, k_btkh, v_btkh, segment_ids_bt)
