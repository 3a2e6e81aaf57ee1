"""Packed causal attention, RoPE and RMSNorm against independent references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3

from jaxtune.ops.attention import attention
from jaxtune.ops.norms import rms_norm
from jaxtune.ops.rope import apply_rope, rope_cos_sin


def _naive_attention(q, k, v, segment_ids):
  """float64 loop: each sample of each row alone, kv heads repeated as HF's repeat_kv does."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, seq_len, num_heads, head_dim = q.shape
  group = num_heads // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  out = np.zeros_like(q)
  for b in range(batch):
    for segment in np.unique(segment_ids[b]):
      if segment == 0:
        continue  # padding: output unused
      idx = np.nonzero(segment_ids[b] == segment)[0]
      for n in range(num_heads):
        scores = q[b, idx, n] @ k[b, idx, n].T / np.sqrt(head_dim)
        scores = np.where(np.tril(np.ones((len(idx), len(idx)), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out[b, idx, n] = (probs / probs.sum(-1, keepdims=True)) @ v[b, idx, n]
  return out


def _packed_inputs(num_heads, num_kv_heads, head_dim=8, seed=0):
  rng = np.random.RandomState(seed)
  # Row 0: samples of 5, 3, 6 tokens + 2 padding; row 1: one 11-token sample + 5 padding.
  segment_ids = np.array([[1] * 5 + [2] * 3 + [3] * 6 + [0] * 2,
                          [1] * 11 + [0] * 5], np.int32)
  shape = segment_ids.shape
  q = rng.randn(*shape, num_heads, head_dim).astype(np.float32)
  k = rng.randn(*shape, num_kv_heads, head_dim).astype(np.float32)
  v = rng.randn(*shape, num_kv_heads, head_dim).astype(np.float32)
  return q, k, v, segment_ids


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("impl", ["xla", "dpa_xla"])
def test_matches_naive_per_sample_attention(impl, num_heads, num_kv_heads):
  q, k, v, segment_ids = _packed_inputs(num_heads, num_kv_heads)
  out = jax.jit(lambda *a: attention(*a, impl=impl))(q, k, v, segment_ids)
  out = np.asarray(out)
  assert out.shape == q.shape and np.isfinite(out).all()
  real = segment_ids > 0
  expected = _naive_attention(q, k, v, segment_ids)
  np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)


def test_tokens_never_see_other_samples():
  """Changing sample 1's keys and values leaves sample 2's outputs untouched."""
  q, k, v, segment_ids = _packed_inputs(4, 2)
  out = np.asarray(attention(q, k, v, segment_ids))
  k2, v2 = k.copy(), v.copy()
  k2[0, :5] += 10.0
  v2[0, :5] -= 10.0
  out2 = np.asarray(attention(q, k2, v2, segment_ids))
  np.testing.assert_array_equal(out[0, 5:14], out2[0, 5:14])
  assert np.abs(out[0, :5] - out2[0, :5]).max() > 1.0


def test_bfloat16_inputs_accumulate_in_float32():
  q, k, v, segment_ids = _packed_inputs(4, 2)
  out = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), segment_ids)
  assert out.dtype == jnp.bfloat16
  real = segment_ids > 0
  expected = _naive_attention(q, k, v, segment_ids)
  np.testing.assert_allclose(np.asarray(out, np.float32)[real], expected[real], atol=0.05)


def test_cudnn_needs_a_gpu_and_unknown_impl_is_rejected():
  q, k, v, segment_ids = _packed_inputs(4, 2)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      attention(q, k, v, segment_ids, impl="cudnn")
  with pytest.raises(ValueError, match="unknown attention impl"):
    attention(q, k, v, segment_ids, impl="flash")
  with pytest.raises(ValueError, match="multiple of kv heads"):
    attention(q[:, :, :3], k, v, segment_ids)


def test_rope_matches_transformers():
  head_dim, theta = 16, 1_000_000.0
  positions = np.array([[0, 1, 2, 3, 0, 1, 40, 1000]], np.int32)
  x = np.random.RandomState(0).randn(1, 8, 3, head_dim).astype(np.float32)
  cos, sin = rope_cos_sin(jnp.asarray(positions), head_dim, theta)
  ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin))

  config = modeling_qwen3.Qwen3Config(head_dim=head_dim, rope_theta=theta)
  rotary = modeling_qwen3.Qwen3RotaryEmbedding(config)
  xt = torch.tensor(x).transpose(1, 2)  # HF layout [B, N, T, H]
  cos_t, sin_t = rotary(xt, torch.tensor(positions, dtype=torch.long))
  expected, _ = modeling_qwen3.apply_rotary_pos_emb(xt, xt, cos_t, sin_t)
  np.testing.assert_allclose(ours, expected.transpose(1, 2).numpy(), atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_transformers():
  x = np.random.RandomState(0).randn(2, 5, 32).astype(np.float32) * 3
  weight = np.random.RandomState(1).randn(32).astype(np.float32)
  reference = modeling_qwen3.Qwen3RMSNorm(32, eps=1e-6)
  with torch.no_grad():
    reference.weight.copy_(torch.tensor(weight))
    expected = reference(torch.tensor(x)).numpy()
  ours = np.asarray(rms_norm(jnp.asarray(x), jnp.asarray(weight), 1e-6))
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=1e-5)
  assert rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(weight), 1e-6).dtype == jnp.bfloat16
