"""Blockwise (flash-style) packed causal GQA attention in pure JAX: O(T * block) memory.

The [T, T] scores never exist. The forward pass walks kv blocks with an online softmax
(float32 running max and sum) and keeps only the output and the per-query logsumexp; the
backward pass (a custom VJP, FlashAttention-2's algorithm) recomputes each block's scores
from (q, k, v, out, logsumexp). Both loops visit the causal lower triangle only: kv blocks
after a query block are never touched. Segment ids give the same mask as
`attention.segment_causal_mask` (same segment and s <= t; padding 0 sees earlier padding).

Runs on any backend (CPU, TPU, GPU fallback); it is what `attention='auto'` uses wherever
no kernel applies. T need not be a multiple of the blocks: rows are padded at the end, where
causality hides the padding from every real query.

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

# The forward's residuals, named so a remat policy can keep them (models.layers.remat_policy's
# "save_attention"): then the backward pass needs no recomputed attention forward.
RESIDUAL_NAMES = ("attention_out", "attention_lse")

# Finite, so a row whose keys are all masked in the blocks seen so far keeps a finite running
# max (exp(mask - mask) would be 1, not NaN; `where` zeroes those probabilities anyway).
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def _slice_t(x: jax.Array, start: jax.Array, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _block_mask(seg_q_bq, seg_k_bs, q_start, k_start):
  """[B, 1, 1, Q, S] bool: same segment and key position <= query position."""
  pos_q = q_start + jnp.arange(seg_q_bq.shape[1])
  pos_k = k_start + jnp.arange(seg_k_bs.shape[1])
  causal_qs = pos_q[:, None] >= pos_k[None, :]
  same_bqs = seg_q_bq[:, :, None] == seg_k_bs[:, None, :]
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


def _last_kv_block(i, block_q, block_kv):
  """Exclusive upper bound of the kv blocks query block i can see (causality)."""
  return (i * block_q + block_q - 1) // block_kv + 1


def _flash_fwd_impl(q_btkgh, k_btkh, v_btkh, seg_bt, block_q, block_kv):
  b, t, kh, g, h = q_btkgh.shape
  scale = 1.0 / math.sqrt(h)

  def q_block(i, carry):
    out_btkgh, lse_bkgt = carry
    q_start = i * block_q
    q_bqkgh = _slice_t(q_btkgh, q_start, block_q)
    seg_q_bq = _slice_t(seg_bt, q_start, block_q)

    def kv_block(j, c):
      acc_bkgqh, m_bkgq, l_bkgq = c
      k_start = j * block_kv
      k_bskh, v_bskh = _slice_t(k_btkh, k_start, block_kv), _slice_t(v_btkh, k_start, block_kv)
      mask = _block_mask(seg_q_bq, _slice_t(seg_bt, k_start, block_kv), q_start, k_start)
      s_bkgqs = jnp.where(mask, _scores(q_bqkgh, k_bskh, scale), _MASK_VALUE)
      m_new = jnp.maximum(m_bkgq, s_bkgqs.max(-1))
      p_bkgqs = jnp.where(mask, jnp.exp(s_bkgqs - m_new[..., None]), 0.0)
      corr_bkgq = jnp.exp(m_bkgq - m_new)
      l_new = corr_bkgq * l_bkgq + p_bkgqs.sum(-1)
      pv_bkgqh = jnp.einsum("bkgqs,bskh->bkgqh", p_bkgqs.astype(v_btkh.dtype), v_bskh,
                            preferred_element_type=jnp.float32)
      return corr_bkgq[..., None] * acc_bkgqh + pv_bkgqh, m_new, l_new

    init = (jnp.zeros((b, kh, g, block_q, h), jnp.float32),
            jnp.full((b, kh, g, block_q), _MASK_VALUE, jnp.float32),
            jnp.zeros((b, kh, g, block_q), jnp.float32))
    acc_bkgqh, m_bkgq, l_bkgq = _fori(0, _last_kv_block(i, block_q, block_kv), kv_block, init)
    # l >= exp(0) = 1: every query sees itself (its own key is on the diagonal block).
    o_bqkgh = jnp.transpose(acc_bkgqh / l_bkgq[..., None], (0, 3, 1, 2, 4))
    out_btkgh = jax.lax.dynamic_update_slice_in_dim(
        out_btkgh, o_bqkgh.astype(out_btkgh.dtype), q_start, axis=1)
    lse_bkgt = jax.lax.dynamic_update_slice_in_dim(
        lse_bkgt, m_bkgq + jnp.log(l_bkgq), q_start, axis=3)
    return out_btkgh, lse_bkgt

  init = (jnp.zeros_like(q_btkgh), jnp.zeros((b, kh, g, t), jnp.float32))
  return _fori(0, t // block_q, q_block, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q_btkgh, k_btkh, v_btkh, seg_bt, block_q, block_kv):
  return _flash_fwd_impl(q_btkgh, k_btkh, v_btkh, seg_bt, block_q, block_kv)[0]


def _flash_fwd(q_btkgh, k_btkh, v_btkh, seg_bt, block_q, block_kv):
  out_btkgh, lse_bkgt = _flash_fwd_impl(q_btkgh, k_btkh, v_btkh, seg_bt, block_q, block_kv)
  out_btkgh = checkpoint_name(out_btkgh, RESIDUAL_NAMES[0])
  lse_bkgt = checkpoint_name(lse_bkgt, RESIDUAL_NAMES[1])
  return out_btkgh, (q_btkgh, k_btkh, v_btkh, seg_bt, out_btkgh, lse_bkgt)


def _flash_bwd(block_q, block_kv, res, do_btkgh):
  """One pass over kv blocks; for each, the query blocks that see it (FlashAttention-2).

  dk and dv of the kv block live in the inner loop's carry; dq is a float32 [B, T, N, H]
  buffer that every (kv block, query block) pair adds its share to.
  """
  q_btkgh, k_btkh, v_btkh, seg_bt, out_btkgh, lse_bkgt = res
  b, t, kh, g, h = q_btkgh.shape
  scale = 1.0 / math.sqrt(h)
  dtype = q_btkgh.dtype
  # softmax backward: ds = p * (dp - delta), delta_t = sum_h do_th * out_th.
  delta_bkgt = jnp.einsum("btkgh,btkgh->bkgt", do_btkgh.astype(jnp.float32),
                          out_btkgh.astype(jnp.float32))

  def kv_block(j, carry):
    dq_btkgh, dk_btkh, dv_btkh = carry
    k_start = j * block_kv
    k_bskh, v_bskh = _slice_t(k_btkh, k_start, block_kv), _slice_t(v_btkh, k_start, block_kv)
    seg_k_bs = _slice_t(seg_bt, k_start, block_kv)

    def q_block(i, c):
      dq_btkgh, dk_bskh, dv_bskh = c
      q_start = i * block_q
      q_bqkgh, do_bqkgh = _slice_t(q_btkgh, q_start, block_q), _slice_t(do_btkgh, q_start, block_q)
      lse_bkgq = jax.lax.dynamic_slice_in_dim(lse_bkgt, q_start, block_q, axis=3)
      delta_bkgq = jax.lax.dynamic_slice_in_dim(delta_bkgt, q_start, block_q, axis=3)
      mask = _block_mask(_slice_t(seg_bt, q_start, block_q), seg_k_bs, q_start, k_start)
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

    zeros_bskh = jnp.zeros((b, block_kv, kh, h), jnp.float32)
    # Query blocks before the one holding key k_start cannot see this kv block.
    dq_btkgh, dk_bskh, dv_bskh = _fori(k_start // block_q, t // block_q, q_block,
                                       (dq_btkgh, zeros_bskh, zeros_bskh))
    dk_btkh = jax.lax.dynamic_update_slice_in_dim(
        dk_btkh, dk_bskh.astype(dk_btkh.dtype), k_start, axis=1)
    dv_btkh = jax.lax.dynamic_update_slice_in_dim(
        dv_btkh, dv_bskh.astype(dv_btkh.dtype), k_start, axis=1)
    return dq_btkgh, dk_btkh, dv_btkh

  init = (jnp.zeros(q_btkgh.shape, jnp.float32), jnp.zeros_like(k_btkh), jnp.zeros_like(v_btkh))
  dq_btkgh, dk_btkh, dv_btkh = _fori(0, t // block_kv, kv_block, init)
  return dq_btkgh.astype(dtype), dk_btkh, dv_btkh, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
                        segment_ids_bt: jax.Array, *, block_q: int = 512,
                        block_kv: int = 512) -> jax.Array:
  """Packed causal GQA attention, scale 1/sqrt(H), in O(T * block) memory forward and back.

  Blocks are capped at T; T is padded up to a multiple of both. Matmuls run in the input
  dtype with float32 accumulation; softmax statistics are float32; returns q's dtype.
  """
  if block_q <= 0 or block_kv <= 0:
    raise ValueError(f"block sizes must be positive, got block_q={block_q}, block_kv={block_kv}")
  b, t, n, h = q_btnh.shape
  kh = k_btkh.shape[2]
  block_q, block_kv = min(block_q, t), min(block_kv, t)
  step = math.lcm(block_q, block_kv)
  pad = -(-t // step) * step - t
  seg_bt = segment_ids_bt.astype(jnp.int32)
  if pad:
    # Appended tokens come after every real query, so causality hides them; they form their
    # own segment (-1) so that they too see a key (themselves) and stay finite.
    pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q_btnh, k_btkh, v_btkh = pad_t(q_btnh), pad_t(k_btkh), pad_t(v_btkh)
    seg_bt = jnp.pad(seg_bt, [(0, 0), (0, pad)], constant_values=-1)
  # GQA: query head n uses kv head n // G (HF's repeat_kv order).
  q_btkgh = q_btnh.reshape(b, t + pad, kh, n // kh, h)
  out_btkgh = _flash(q_btkgh, k_btkh.astype(q_btnh.dtype), v_btkh.astype(q_btnh.dtype), seg_bt,
                     block_q, block_kv)
  return out_btkgh.reshape(b, t + pad, n, h)[:, :t]
