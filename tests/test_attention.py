"""Packed attention (causal, and non-causal as the InternViT tower runs it), RoPE and RMSNorm
against independent references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3 import modeling_qwen3

from jaxtune.ops.attention import attention
from jaxtune.ops.norms import rms_norm
from jaxtune.ops.rope import apply_rope, rope_cos_sin


def _naive_attention(q, k, v, segment_ids, causal=True):
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
        if causal:
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
@pytest.mark.parametrize("impl", ["xla", "dpa_xla", "blockwise"])
def test_matches_naive_per_sample_attention(impl, num_heads, num_kv_heads):
  q, k, v, segment_ids = _packed_inputs(num_heads, num_kv_heads)
  out = jax.jit(lambda *a: attention(*a, impl=impl))(q, k, v, segment_ids)
  out = np.asarray(out)
  assert out.shape == q.shape and np.isfinite(out).all()
  real = segment_ids > 0
  expected = _naive_attention(q, k, v, segment_ids)
  np.testing.assert_allclose(out[real], expected[real], atol=1e-5, rtol=1e-5)


def _torch_per_sample(q, k, v, segment_ids, cotangent, causal=True):
  """float64 autograd reference: each sample alone (causal, or each token seeing its whole
  sample); returns (out, dq, dk, dv) for loss = sum(out * cotangent). Padding tokens get no
  output and no gradient."""
  qt, kt, vt = (torch.tensor(np.asarray(x, np.float64), requires_grad=True) for x in (q, k, v))
  group = q.shape[2] // k.shape[2]
  loss, outs = 0.0, np.zeros(q.shape)
  for b in range(q.shape[0]):
    for segment in np.unique(segment_ids[b]):
      if segment == 0:
        continue
      idx = torch.tensor(np.nonzero(segment_ids[b] == segment)[0])
      qs = qt[b, idx].transpose(0, 1)                                       # [N, L, H]
      ks = kt[b, idx].repeat_interleave(group, dim=1).transpose(0, 1)
      vs = vt[b, idx].repeat_interleave(group, dim=1).transpose(0, 1)
      scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
      visible = torch.ones(len(idx), len(idx), dtype=torch.bool)
      visible = visible.tril() if causal else visible
      out = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1) @ vs
      out = out.transpose(0, 1)                                             # [L, N, H]
      outs[b, idx.numpy()] = out.detach().numpy()
      loss = loss + (out * torch.tensor(np.asarray(cotangent[b, idx.numpy()], np.float64))).sum()
  loss.backward()
  return outs, qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy()


def _long_packed_inputs(num_heads, num_kv_heads, dtype=np.float32, seed=1):
  """Two rows of 37 tokens (a prime: no block divides it), 1-4 samples each + padding."""
  rng = np.random.RandomState(seed)
  segment_ids = np.array([[1] * 9 + [2] * 1 + [3] * 17 + [4] * 6 + [0] * 4,
                          [1] * 30 + [0] * 7], np.int32)
  shape, head_dim = segment_ids.shape, 16
  q = rng.randn(*shape, num_heads, head_dim).astype(dtype)
  k = rng.randn(*shape, num_kv_heads, head_dim).astype(dtype)
  v = rng.randn(*shape, num_kv_heads, head_dim).astype(dtype)
  cotangent = rng.randn(*shape, num_heads, head_dim) * (segment_ids > 0)[:, :, None, None]
  return q, k, v, segment_ids, cotangent.astype(np.float32)


def _value_and_grads(impl, q, k, v, segment_ids, cotangent, **blocks):
  def loss(q, k, v):
    out = attention(q, k, v, segment_ids, impl=impl, **blocks)
    return jnp.sum(out.astype(jnp.float32) * cotangent), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (out, *grads)


@pytest.mark.parametrize("num_heads,num_kv_heads,block_q,block_kv", [
    (4, 4, 8, 8),       # GQA group 1; 37 tokens padded to 40
    (8, 2, 16, 4),      # group 4; query blocks span several kv blocks
    (8, 2, 5, 12),      # blocks that divide neither T nor each other
    (8, 2, 512, 512),   # the defaults: one block capped at T
])
def test_blockwise_forward_and_gradients_match_per_sample(num_heads, num_kv_heads, block_q,
                                                          block_kv):
  """Packed rows against each sample run alone (not against the packed xla path): the
  MaxText #4476 trap, in the forward values and in dq, dk, dv."""
  q, k, v, segment_ids, cotangent = _long_packed_inputs(num_heads, num_kv_heads)
  got = _value_and_grads("blockwise", q, k, v, segment_ids, cotangent, block_q=block_q,
                         block_kv=block_kv)
  expected = _torch_per_sample(q, k, v, segment_ids, cotangent)
  real = segment_ids > 0
  assert all(np.isfinite(np.asarray(x)).all() for x in got)
  np.testing.assert_allclose(np.asarray(got[0])[real], expected[0][real], atol=1e-5, rtol=1e-5)
  for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
    np.testing.assert_allclose(np.asarray(g), e, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("impl,blocks", [
    ("xla", {}), ("dpa_xla", {}),
    ("blockwise", dict(block_q=8, block_kv=8)),    # 37 tokens padded to 40
    ("blockwise", dict(block_q=16, block_kv=4)),   # query blocks span several kv blocks
    ("blockwise", dict(block_q=5, block_kv=12)),   # blocks that divide neither T nor each other
    ("blockwise", {}),                             # one block capped at T
], ids=lambda x: "-".join(f"{k}{v}" for k, v in x.items()) if isinstance(x, dict) else x)
def test_non_causal_forward_and_gradients_match_per_sample(impl, blocks, num_heads,
                                                           num_kv_heads):
  """causal=False (the InternViT tower): each token sees every token of its own sample, later
  ones too, and none of another sample or of the padding appended to fill a block."""
  q, k, v, segment_ids, cotangent = _long_packed_inputs(num_heads, num_kv_heads, seed=4)
  got = _value_and_grads(impl, q, k, v, segment_ids, cotangent, causal=False, **blocks)
  expected = _torch_per_sample(q, k, v, segment_ids, cotangent, causal=False)
  real = segment_ids > 0
  assert all(np.isfinite(np.asarray(x)).all() for x in got)
  np.testing.assert_allclose(np.asarray(got[0])[real], expected[0][real], atol=1e-5, rtol=1e-5)
  for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
    np.testing.assert_allclose(np.asarray(g), e, atol=1e-5, rtol=1e-5, err_msg=name)
  causal = _torch_per_sample(q, k, v, segment_ids, cotangent)[0]
  assert np.abs(np.asarray(got[0])[real] - causal[real]).max() > 0.1


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["xla", "dpa_xla", "blockwise"])
def test_no_segment_ids_is_one_sample_per_row(impl, causal):
  """segment_ids None (the tower's tiles) gives what ids of ones give, values and gradients;
  the dense impls then build no [B, T, T] segment mask."""
  q, k, v, _, cotangent = _long_packed_inputs(8, 2, seed=5)
  ones = np.ones(q.shape[:2], np.int32)
  got = _value_and_grads(impl, q, k, v, None, cotangent, causal=causal, block_q=8, block_kv=16)
  want = _value_and_grads(impl, q, k, v, ones, cotangent, causal=causal, block_q=8,
                          block_kv=16)
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=1e-6, err_msg=name)
  if impl != "blockwise":
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: attention(q, k, v, None, impl=impl,
                                                         causal=causal))(q, k, v))
    b, t = q.shape[:2]
    assert f"bool[{b},{t},{t}]" not in jaxpr and f"bool[{b},1,{t},{t}]" not in jaxpr


def test_blockwise_bfloat16_within_bfloat16_tolerance():
  q, k, v, segment_ids, cotangent = _long_packed_inputs(8, 2)
  bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  got = _value_and_grads("blockwise", *bf16, segment_ids, cotangent, block_q=8, block_kv=16)
  assert all(x.dtype == jnp.bfloat16 for x in got)
  # Reference on the bf16-rounded inputs, so only the kernel's own rounding is measured.
  rounded = [np.asarray(x.astype(jnp.float32)) for x in bf16]
  expected = _torch_per_sample(*rounded, segment_ids, cotangent)
  real = segment_ids > 0
  np.testing.assert_allclose(np.asarray(got[0], np.float32)[real], expected[0][real], atol=3e-2)
  for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
    scale = np.abs(e).max()
    np.testing.assert_allclose(np.asarray(g, np.float32), e, atol=3e-2 * scale, err_msg=name)


def test_blockwise_memory_is_linear_in_length():
  """value_and_grad at T=8192, one head: blockwise temporaries are far below one [T, T]
  float32 score matrix, which the xla path exceeds (compiled, not run)."""
  t, h = 8192, 64
  args = (jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32),) * 3 + (
      jax.ShapeDtypeStruct((1, t), jnp.int32),)
  def temp_bytes(impl):
    loss = lambda q, k, v, s: jnp.sum(attention(q, k, v, s, impl=impl))
    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return vg.lower(*args).compile().memory_analysis().temp_size_in_bytes
  scores_bytes = t * t * 4
  blockwise, xla = temp_bytes("blockwise"), temp_bytes("xla")
  assert blockwise < 0.25 * scores_bytes, (blockwise, scores_bytes)
  assert xla > scores_bytes, (xla, scores_bytes)


def test_blockwise_non_causal_memory_is_linear_in_length():
  """Non-causal (every kv block visited), value_and_grad at T=4096, GQA: temporaries still far
  below one [T, T] float32 score matrix (compiled, not run)."""
  t, h = 4096, 64
  q = jax.ShapeDtypeStruct((1, t, 2, h), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, t, 1, h), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  loss = lambda q, k, v, s: jnp.sum(attention(q, k, v, s, impl="blockwise", causal=False))
  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  temp = vg.lower(q, kv, kv, seg).compile().memory_analysis().temp_size_in_bytes
  assert temp < 0.25 * t * t * 4, (temp, t * t * 4)


def test_auto_picks_blockwise_off_gpu():
  q, k, v, segment_ids = _packed_inputs(4, 2)
  if jax.default_backend() == "gpu":
    pytest.skip("auto picks cudnn for bf16 on a GPU")
  fn = lambda *a: attention(*a, impl="auto", block_q=4, block_kv=4)
  jaxpr = str(jax.make_jaxpr(fn)(q, k, v, segment_ids))
  assert "custom_vjp" in jaxpr and "while" in jaxpr


def test_tokens_never_see_other_samples():
  """Changing sample 1's keys and values leaves sample 2's outputs untouched."""
  q, k, v, segment_ids = _packed_inputs(4, 2)
  fn = jax.jit(lambda *a: attention(*a, block_q=4, block_kv=4))
  out = np.asarray(fn(q, k, v, segment_ids))
  k2, v2 = k.copy(), v.copy()
  k2[0, :5] += 10.0
  v2[0, :5] -= 10.0
  out2 = np.asarray(fn(q, k2, v2, segment_ids))
  np.testing.assert_array_equal(out[0, 5:14], out2[0, 5:14])
  assert np.abs(out[0, :5] - out2[0, :5]).max() > 1.0


def test_bfloat16_inputs_accumulate_in_float32():
  q, k, v, segment_ids = _packed_inputs(4, 2)
  out = jax.jit(attention)(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), segment_ids)
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
  with pytest.raises(ValueError, match="block sizes"):
    attention(q, k, v, segment_ids, impl="blockwise", block_q=0)
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


def test_rope_gradient_matches_torch_autograd():
  head_dim, theta = 16, 1_000_000.0
  positions = np.array([[0, 1, 2, 3, 0, 1, 40, 1000]], np.int32)
  x = np.random.RandomState(5).randn(1, 8, 3, head_dim).astype(np.float32)
  g = np.random.RandomState(6).randn(1, 8, 3, head_dim).astype(np.float32)
  cos, sin = rope_cos_sin(jnp.asarray(positions), head_dim, theta)
  dx = jax.jit(jax.grad(lambda x: jnp.sum(apply_rope(x, cos, sin) * g)))(jnp.asarray(x))

  config = modeling_qwen3.Qwen3Config(head_dim=head_dim, rope_theta=theta)
  xt = torch.tensor(x).transpose(1, 2).requires_grad_(True)
  cos_t, sin_t = modeling_qwen3.Qwen3RotaryEmbedding(config)(
      xt, torch.tensor(positions, dtype=torch.long))
  out, _ = modeling_qwen3.apply_rotary_pos_emb(xt, xt, cos_t, sin_t)
  (out * torch.tensor(g).transpose(1, 2)).sum().backward()
  np.testing.assert_allclose(np.asarray(dx), xt.grad.transpose(1, 2).numpy(), atol=1e-5,
                             rtol=1e-5)


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


def test_rms_norm_gradients_match_torch_autograd_and_keep_no_float32_copy():
  x = np.random.RandomState(2).randn(3, 7, 64).astype(np.float32) * 2
  weight = np.random.RandomState(3).randn(64).astype(np.float32)
  g = np.random.RandomState(4).randn(3, 7, 64).astype(np.float32)
  reference = modeling_qwen3.Qwen3RMSNorm(64, eps=1e-6)
  with torch.no_grad():
    reference.weight.copy_(torch.tensor(weight))
  xt = torch.tensor(x, requires_grad=True)
  (reference(xt) * torch.tensor(g)).sum().backward()
  loss = lambda x, w: jnp.sum(rms_norm(x, w, 1e-6) * g)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(weight))
  np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy(), atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), reference.weight.grad.numpy(), atol=1e-4, rtol=1e-5)
  # What the backward keeps of a bf16 input is the input itself (the weight aside), not a
  # float32 copy of it or of the normalised values: the forward's residuals are x and w.
  xb = jax.ShapeDtypeStruct((4096, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024,), jnp.float32)
  residuals = jax.eval_shape(lambda x, w: jax.vjp(lambda x, w: rms_norm(x, w, 1e-6), x, w)[1],
                             xb, w)
  sizes = sorted(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(residuals))
  assert sum(sizes) == 4096 * 1024 * 2 + 1024 * 4, sizes
