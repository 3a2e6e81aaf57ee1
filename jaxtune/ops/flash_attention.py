"""Blockwise (flash-style) packed GQA attention in pure JAX, causal or not: O(T * block) memory.

The [T, T] scores never exist. The forward pass walks kv blocks with an online softmax
(float32 running max and sum) and keeps only the output and the per-query logsumexp; the
backward pass (a custom VJP, FlashAttention-2's algorithm) recomputes each block's scores
from (q, k, v, out, logsumexp). Causal, both loops visit the lower triangle only: kv blocks
after a query block are never touched. Non-causal (`causal=False`, the InternViT tower),
every query block meets every kv block. Segment ids give the same mask as
`attention.segment_mask` (same segment, and s <= t when causal; padding 0 sees (earlier)
padding).

Runs on any backend (CPU, TPU, GPU fallback); it is what `attention='auto'` uses wherever
no kernel applies. T need not be a multiple of the blocks: rows are padded at the end with
segment -1, which no real token shares (and which causality hides as well).

Shape letters: B rows, T tokens (Q in a query block, S in a kv block), N query heads,
K kv heads, G = N / K query heads per kv head, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jaxtune.parallel.sharding import varying_zeros

# The forward's residuals, named so a remat policy can keep them (models.layers.remat_policy's
# "save_attention"): then the backward pass needs no recomputed attention forward.
RESIDUAL_NAMES = ("attention_out", "attention_lse")

# Finite, so a row whose keys are all masked in the blocks seen so far keeps a finite running
# max (exp(mask - mask) would be 1, not NaN; `where` zeroes those probabilities anyway).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _slice_t(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _block_mask(seg_q_bq, seg_k_bs, q_start, k_start, causal):
  """[B, 1, 1, Q, S] bool: same segment and (when causal) key position <= query position."""
  same_bqs = seg_q_bq[:, :, None] == seg_k_bs[:, None, :]
  if not causal:
    return same_bqs[:, None, None]
  pos_q = q_start + jnp.arange(seg_q_bq.shape[1])
  pos_k = k_start + jnp.arange(seg_k_bs.shape[1])
  causal_qs = pos_q[:, None] >= pos_k[None, :]
  return (same_bqs & causal_qs)[:, None, None]


def _scores(q_bqkgh, k_bskh, scale):
  return jnp.einsum("bqkgh,bskh->bkgqs", q_bqkgh, k_bskh,
                    preferred_element_type=jnp.float32) * scale


def _fori(lo, hi, body, carry):
  """fori_loop, or a plain call when the trip count is statically one (rows that fit in one
  block, as in small tests, then compile like the dense path: no while loops)."""
  if isinstance(lo, int) and isinstance(hi, int) and hi - lo == 1:
    return body(lo, carry)
  return jax.lax.fori_loop(lo, hi, body, carry)


def _last_kv_block(i, block_q, block_kv, q_offset, num_kv_blocks, causal):
  """Exclusive upper bound of the kv blocks query block i can see (causality; all of them
  when not causal)."""
  if not causal:
    return num_kv_blocks
  last = (q_offset + i * block_q + block_q - 1) // block_kv + 1
  return last if isinstance(last, int) and last <= num_kv_blocks else jnp.minimum(last,
                                                                                 num_kv_blocks)


def _flash_fwd_impl(q_btkgh, k_bskh, v_bskh, seg_q_bt, seg_k_bs, q_offset, block_q, block_kv,
                    causal):
  b, t, kh, g, h = q_btkgh.shape
  scale = 1.0 / math.sqrt(h)
  num_kv_blocks = k_bskh.shape[1] // block_kv
  # Loop carries vary like the inputs inside a shard_map (context parallelism).
  zeros = lambda shape, dtype: varying_zeros(shape, dtype, q_btkgh, k_bskh, v_bskh, seg_q_bt,
                                             seg_k_bs)

  def q_block(i, carry):
    out_btkgh, lse_bkgt = carry
    q_start = i * block_q
    q_bqkgh = _slice_t(q_btkgh, q_start, block_q)
    seg_q_bq = _slice_t(seg_q_bt, q_start, block_q)

    def kv_block(j, c):
      acc_bkgqh, m_bkgq, l_bkgq = c
      k_start = j * block_kv
      k_blk, v_blk = _slice_t(k_bskh, k_start, block_kv), _slice_t(v_bskh, k_start, block_kv)
      mask = _block_mask(seg_q_bq, _slice_t(seg_k_bs, k_start, block_kv), q_offset + q_start,
                         k_start, causal)
      s_bkgqs = jnp.where(mask, _scores(q_bqkgh, k_blk, scale), _MASK_VALUE)
      m_new = jnp.maximum(m_bkgq, s_bkgqs.max(-1))
      p_bkgqs = jnp.where(mask, jnp.exp(s_bkgqs - m_new[..., None]), 0.0)
      corr_bkgq = jnp.exp(m_bkgq - m_new)
      l_new = corr_bkgq * l_bkgq + p_bkgqs.sum(-1)
      pv_bkgqh = jnp.einsum("bkgqs,bskh->bkgqh", p_bkgqs.astype(v_blk.dtype), v_blk,
                            preferred_element_type=jnp.float32)
      return corr_bkgq[..., None] * acc_bkgqh + pv_bkgqh, m_new, l_new

    init = (zeros((b, kh, g, block_q, h), jnp.float32),
            zeros((b, kh, g, block_q), jnp.float32) + _MASK_VALUE,
            zeros((b, kh, g, block_q), jnp.float32))
    acc_bkgqh, m_bkgq, l_bkgq = _fori(
        0, _last_kv_block(i, block_q, block_kv, q_offset, num_kv_blocks, causal), kv_block,
        init)
    # l >= exp(0) = 1 wherever a query sees itself; only padding appended to a query slice
    # (q_offset > 0) can see no key, and its zero output is dropped.
    o_bqkgh = jnp.transpose(acc_bkgqh / jnp.maximum(l_bkgq, 1e-30)[..., None], (0, 3, 1, 2, 4))
    out_btkgh = jax.lax.dynamic_update_slice_in_dim(
        out_btkgh, o_bqkgh.astype(out_btkgh.dtype), q_start, axis=1)
    lse_bkgt = jax.lax.dynamic_update_slice_in_dim(
        lse_bkgt, m_bkgq + jnp.log(jnp.maximum(l_bkgq, 1e-30)), q_start, axis=3)
    return out_btkgh, lse_bkgt

  init = (zeros(q_btkgh.shape, q_btkgh.dtype), zeros((b, kh, g, t), jnp.float32))
  return _fori(0, t // block_q, q_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q_btkgh, k_bskh, v_bskh, seg_q_bt, seg_k_bs, q_offset, block_q, block_kv, causal):
  return _flash_fwd_impl(q_btkgh, k_bskh, v_bskh, seg_q_bt, seg_k_bs, q_offset, block_q,
                         block_kv, causal)[0]


def _flash_fwd(q_btkgh, k_bskh, v_bskh, seg_q_bt, seg_k_bs, q_offset, block_q, block_kv,
               causal):
  out_btkgh, lse_bkgt = _flash_fwd_impl(q_btkgh, k_bskh, v_bskh, seg_q_bt, seg_k_bs, q_offset,
                                        block_q, block_kv, causal)
  out_btkgh = checkpoint_name(out_btkgh, RESIDUAL_NAMES[0])
  lse_bkgt = checkpoint_name(lse_bkgt, RESIDUAL_NAMES[1])
  return out_btkgh, (q_btkgh, k_bskh, v_bskh, seg_q_bt, seg_k_bs, q_offset, out_btkgh, lse_bkgt)


def _flash_bwd(block_q, block_kv, causal, res, do_btkgh):
  """One pass over kv blocks; for each, the query blocks that see it (FlashAttention-2; all
  of them when not causal).

  dk and dv of the kv block live in the inner loop's carry; dq is a float32 [B, T, N, H]
  buffer that every (kv block, query block) pair adds its share to.
  """
  q_btkgh, k_btkh, v_btkh, seg_bt, seg_k_bs, q_offset, out_btkgh, lse_bkgt = res
  b, t, kh, g, h = q_btkgh.shape
  scale = 1.0 / math.sqrt(h)
  dtype = q_btkgh.dtype
  zeros = lambda shape, dtype: varying_zeros(shape, dtype, q_btkgh, k_btkh, v_btkh, do_btkgh,
                                             seg_bt)
  # softmax backward: ds = p * (dp - delta), delta_t = sum_h do_th * out_th.
  delta_bkgt = jnp.einsum("btkgh,btkgh->bkgt", do_btkgh.astype(jnp.float32),
                          out_btkgh.astype(jnp.float32))

  def kv_block(j, carry):
    dq_btkgh, dk_btkh, dv_btkh = carry
    k_start = j * block_kv
    k_bskh, v_bskh = _slice_t(k_btkh, k_start, block_kv), _slice_t(v_btkh, k_start, block_kv)
    seg_k_blk = _slice_t(seg_k_bs, k_start, block_kv)

    def q_block(i, c):
      dq_btkgh, dk_bskh, dv_bskh = c
      q_start = i * block_q
      q_bqkgh, do_bqkgh = _slice_t(q_btkgh, q_start, block_q), _slice_t(do_btkgh, q_start, block_q)
      lse_bkgq = jax.lax.dynamic_slice_in_dim(lse_bkgt, q_start, block_q, axis=3)
      delta_bkgq = jax.lax.dynamic_slice_in_dim(delta_bkgt, q_start, block_q, axis=3)
      mask = _block_mask(_slice_t(seg_bt, q_start, block_q), seg_k_blk, q_offset + q_start,
                         k_start, causal)
      s_bkgqs = _scores(q_bqkgh, k_bskh, scale)
      p_bkgqs = jnp.where(mask, jnp.exp(s_bkgqs - lse_bkgq[..., None]), 0.0)
      dv_bskh = dv_bskh + jnp.einsum("bkgqs,bqkgh->bskh", p_bkgqs.astype(dtype), do_bqkgh,
                                     preferred_element_type=jnp.float32)
      dp_bkgqs = jnp.einsum("bqkgh,bskh->bkgqs", do_bqkgh, v_bskh,
                            preferred_element_type=jnp.float32)
      ds_bkgqs = (p_bkgqs * (dp_bkgqs - delta_bkgq[..., None]) * scale).astype(dtype)
      dk_bskh = dk_bskh + jnp.einsum("bkgqs,bqkgh->bskh", ds_bkgqs, q_bqkgh,
                                     preferred_element_type=jnp.float32)
      dq_bqkgh = jnp.einsum("bkgqs,bskh->bqkgh", ds_bkgqs, k_bskh,
                            preferred_element_type=jnp.float32)
      dq_btkgh = jax.lax.dynamic_update_slice_in_dim(
          dq_btkgh, _slice_t(dq_btkgh, q_start, block_q) + dq_bqkgh, q_start, axis=1)
      return dq_btkgh, dk_bskh, dv_bskh

    zeros_bskh = zeros((b, block_kv, kh, h), jnp.float32)
    # Causal: query blocks before the one holding key k_start cannot see this kv block.
    if causal:
      first = (k_start - q_offset) // block_q
      first = first if isinstance(first, int) else jnp.maximum(first, 0)
    else:
      first = 0
    dq_btkgh, dk_bskh, dv_bskh = _fori(first, t // block_q, q_block,
                                       (dq_btkgh, zeros_bskh, zeros_bskh))
    dk_btkh = jax.lax.dynamic_update_slice_in_dim(
        dk_btkh, dk_bskh.astype(dk_btkh.dtype), k_start, axis=1)
    dv_btkh = jax.lax.dynamic_update_slice_in_dim(
        dv_btkh, dv_bskh.astype(dv_btkh.dtype), k_start, axis=1)
    return dq_btkgh, dk_btkh, dv_btkh

  init = (zeros(q_btkgh.shape, jnp.float32), zeros(k_btkh.shape, k_btkh.dtype),
          zeros(v_btkh.shape, v_btkh.dtype))
  dq_btkgh, dk_btkh, dv_btkh = _fori(0, k_btkh.shape[1] // block_kv, kv_block, init)
  return dq_btkgh.astype(dtype), dk_btkh, dv_btkh, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array,
                        segment_ids_bt: jax.Array, *, block_q: int = 512, block_kv: int = 512,
                        kv_segment_ids_bs: jax.Array | None = None,
                        q_offset: jax.Array | int = 0, causal: bool = True) -> jax.Array:
  """Packed GQA attention, scale 1/sqrt(H), in O(T * block) memory forward and back: causal
  (key s seen by query t iff s <= t, same segment) or, with `causal=False`, each token seeing
  its whole segment.

  By default queries and keys are the same T tokens. A slice of the queries may attend to all
  keys instead (context parallelism, ops/attention.py): `q_offset` is the position of the
  first query among the S keys (an int or a traced scalar; causality only reads it) and
  `kv_segment_ids_bs` the keys' segment ids [B, S].

  Blocks are capped at T (S); each side is padded up to a multiple of its block. Matmuls run
  in the input dtype with float32 accumulation; softmax statistics are float32; returns q's
  dtype.
  """
  if block_q <= 0 or block_kv <= 0:
    raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_kv={block_kv}")
  b, t, n, h = q_btnh.shape
  s, kh = k_bskh.shape[1], k_bskh.shape[2]
  seg_q_bt = segment_ids_bt.astype(jnp.int32)
  seg_k_bs = seg_q_bt if kv_segment_ids_bs is None else kv_segment_ids_bs.astype(jnp.int32)
  if kv_segment_ids_bs is None and s != t:
    raise ValueError(f"keys ({s} tokens) and queries ({t}) differ: pass kv_segment_ids_bs")
  block_q, block_kv = min(block_q, t), min(block_kv, s)

  # Tokens appended to either side form their own segment (-1), so they never meet a real
  # token; a padded query that sees no key gets a zero output, which is dropped.
  def pad_t(x, block, fill=0):
    extra = -(-x.shape[1] // block) * block - x.shape[1]
    if not extra:
      return x
    return jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)

  q_btnh, seg_q_bt = pad_t(q_btnh, block_q), pad_t(seg_q_bt, block_q, -1)
  k_bskh, v_bskh = pad_t(k_bskh, block_kv), pad_t(v_bskh, block_kv)
  seg_k_bs = pad_t(seg_k_bs, block_kv, -1)
  # GQA: query head n uses kv head n // G (HF's repeat_kv order).
  q_btkgh = q_btnh.reshape(b, q_btnh.shape[1], kh, n // kh, h)
  out_btkgh = _flash(q_btkgh, k_bskh.astype(q_btnh.dtype), v_bskh.astype(q_btnh.dtype),
                     seg_q_bt, seg_k_bs, q_offset, block_q, block_kv, bool(causal))
  return out_btkgh.reshape(b, q_btnh.shape[1], n, h)[:, :t]
