"""Causal self-attention over packed rows: a token sees earlier tokens of its own sample only.

Packed rows carry `segment_ids` [B, T]: 1, 2, ... per sample and 0 for padding. The mask is
`causal & (segment_q == segment_k)`. Padding tokens (segment 0) attend to earlier padding, so
no row of the softmax is empty (no NaN); their outputs are never used.

Implementations:
  "blockwise" flash-style blocks in pure JAX (ops/flash_attention.py): online softmax, custom
            VJP that recomputes scores block by block, causal blocks skipped. Runs everywhere;
            O(T * block) memory in forward and backward.
  "xla"     plain jnp: einsum, mask, float32 softmax. Runs everywhere; O(T^2) scores memory
            (a Qwen3-8B layer at 16k tokens: ~128 GiB of temporaries for value_and_grad).
  "cudnn"   jax.nn.dot_product_attention(implementation="cudnn") with the same dense segment
            mask (turned into an additive bias by JAX). GPU only; bf16/fp16 inputs.
  "dpa_xla" the "cudnn" call with implementation="xla": the CPU twin of the cudnn path, so
            tests check the mask and layout we hand to jax.nn.dot_product_attention.
  "pallas"  Pallas Triton flash kernels (ops/pallas_attention.py, JAX's own kernel bodies):
            segment ids and causality applied inside each tile, so no [T, T] mask and O(T)
            memory; GQA by index map (k / v never repeated in the forward); per device
            under a mesh. NVIDIA GPUs only (float32 inputs get Triton's default dot
            precision, TF32 on recent GPUs); elsewhere it raises unless `interpret=True`
            (Pallas' interpreter, for CPU tests). Measured only by scripts/gpu_kernels.py.
  "auto"    "cudnn" on a GPU with bf16/fp16 inputs (4.6x faster than "xla" for Qwen3-0.6B at
            8k tokens on an H100; docs/benchmarks.md), "blockwise" otherwise (CPU, TPU, float32
            on GPU): the only path here whose memory does not grow with T^2.
            `scripts/gpu_kernels.py` measures "pallas" against "cudnn" and "blockwise" on a GPU
            (errors against per-sample attention, forward + backward time); if "pallas" wins
            there, flip `AUTO_GPU_IMPL` below to "pallas" (cudnn's dense mask is O(T^2)).
"""

import math

import jax
import jax.numpy as jnp

from jaxtune.ops import pallas_attention
from jaxtune.ops.flash_attention import blockwise_attention

IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn", "dpa_xla", "pallas")

# What "auto" runs on a GPU with bf16/fp16 inputs: "cudnn" (the measured path) or "pallas".
AUTO_GPU_IMPL = "cudnn"


def resolve_impl(impl: str, backend: str, dtype) -> str:
  """What `impl` runs on `backend` with inputs of `dtype`: "auto"'s rule, in one place (the
  planner's report and jaxtune.config.resolve read it too)."""
  if impl != "auto":
    return impl
  on_gpu = backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
  return AUTO_GPU_IMPL if on_gpu else "blockwise"


def segment_causal_mask(segment_ids_bt: jax.Array) -> jax.Array:
  """[B, T, S] bool: query t may attend key s (s <= t, same segment)."""
  seq_len = segment_ids_bt.shape[-1]
  causal_ts = jnp.tril(jnp.ones((seq_len, seq_len), dtype=jnp.bool_))
  same_segment_bts = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
  return same_segment_bts & causal_ts


def _xla_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt):
  batch, seq_len, num_heads, head_dim = q_btnh.shape
  num_kv_heads = k_btkh.shape[2]
  group = num_heads // num_kv_heads
  # GQA: query head n uses kv head n // group (HF's repeat_kv order).
  q_btkgh = q_btnh.reshape(batch, seq_len, num_kv_heads, group, head_dim)
  scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_btkh,
                            preferred_element_type=jnp.float32)
  scores_bkgts = scores_bkgts * (1.0 / math.sqrt(head_dim))
  mask_b11ts = segment_causal_mask(segment_ids_bt)[:, None, None]
  scores_bkgts = jnp.where(mask_b11ts, scores_bkgts, jnp.finfo(jnp.float32).min)
  probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_btkh.dtype)
  out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_btkh)
  return out_btkgh.reshape(batch, seq_len, num_heads, head_dim)


def _jax_nn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, implementation):
  # The segment mask is dense [B, 1, T, T]: cuDNN's public API takes padding lengths only,
  # not per-sample offsets, so packed rows need the full mask (O(T^2) memory per row).
  mask_b1ts = segment_causal_mask(segment_ids_bt)[:, None]
  return jax.nn.dot_product_attention(q_btnh, k_btkh, v_btkh, mask=mask_b1ts, is_causal=True,
                                      implementation=implementation)


def attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array,
              segment_ids_bt: jax.Array, *, impl: str = "auto", block_q: int = 512,
              block_kv: int = 512, interpret: bool = False,
              pallas_blocks: pallas_attention.Blocks | None = None) -> jax.Array:
  """Packed causal GQA attention with scale 1/sqrt(H); returns [B, T, N, H] in v's dtype.

  `block_q` / `block_kv` are the "blockwise" tile sizes (capped at T); other impls ignore them.
  `interpret` runs "pallas" in Pallas' interpreter (any backend); `pallas_blocks` are its
  tiles (`pallas_attention.Blocks`).
  """
  num_heads, num_kv_heads = q_btnh.shape[2], k_btkh.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
  impl = resolve_impl(impl, jax.default_backend(), q_btnh.dtype)
  if impl == "blockwise":
    return blockwise_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, block_q=block_q,
                               block_kv=block_kv).astype(v_btkh.dtype)
  if impl == "xla":
    return _xla_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt)
  if impl == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention impl 'cudnn' needs an NVIDIA GPU, but JAX's backend is "
                       f"'{jax.default_backend()}'. Use attention='auto' (blockwise) here.")
    if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention impl 'cudnn' needs bfloat16 or float16 inputs, got "
                       f"{q_btnh.dtype}; set compute_dtype='bfloat16' or attention='auto'.")
    return _jax_nn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, "cudnn")
  if impl == "pallas":
    if jax.default_backend() != "gpu" and not interpret:
      raise ValueError(f"attention impl 'pallas' needs an NVIDIA GPU (Triton), but JAX's "
                       f"backend is '{jax.default_backend()}'. Use attention='auto' "
                       f"(blockwise) here, or interpret=True to run the kernels interpreted.")
    return pallas_attention.packed_attention(
        q_btnh, k_btkh, v_btkh, segment_ids_bt, blocks=pallas_blocks or pallas_attention.Blocks(),
        interpret=interpret)
  if impl == "dpa_xla":
    return _jax_nn_attention(q_btnh, k_btkh, v_btkh, segment_ids_bt, "xla")
  raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")
