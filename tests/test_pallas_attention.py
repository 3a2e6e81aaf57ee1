"""The Pallas Triton packed attention (ops/pallas_attention.py), run in interpret mode on the
CPU, against each sample run alone (a float64 numpy reference, closed-form gradients):
forward values and dq, dk, dv; causal and not (the InternViT tower's); GQA and N = K; float32
and bfloat16; padding, a 1-token sample, a row that is one sample; T = 37 (no block divides
it) and a head dim that is not a power of two; one and four (simulated) devices. Interpret
mode is slow: shapes are tiny."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtune.ops.attention import attention
from jaxtune.ops.pallas_attention import Blocks
from jaxtune.parallel.mesh import make_mesh

BLOCKS = Blocks(q=16, kv=16, bwd_major=16, bwd_minor=16)  # T = 37 is padded to 48
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Row 0: samples of 9, 1, 17 and 6 tokens + 4 padding; row 1: one 30-token sample + 7
# padding; row 2: one sample filling the row.
SEGMENTS = np.array([[1] * 9 + [2] * 1 + [3] * 17 + [4] * 6 + [0] * 4,
                     [1] * 30 + [0] * 7,
                     [1] * 37], np.int32)


def _per_sample_reference(q, k, v, segment_ids, dout, causal=True):
  """float64 (out, dq, dk, dv) of sum(out * dout), each sample attended alone (causally, or
  each token seeing its whole sample); padding tokens get no output and no gradient (dout is
  zero there)."""
  q, k, v, dout = (np.asarray(x, np.float64) for x in (q, k, v, dout))
  num_heads, head_dim = q.shape[2], q.shape[3]
  group = num_heads // k.shape[2]
  scale = 1.0 / np.sqrt(head_dim)
  out, dq = np.zeros_like(q), np.zeros_like(q)
  dk, dv = np.zeros_like(k), np.zeros_like(v)
  for b in range(q.shape[0]):
    for segment in np.unique(segment_ids[b]):
      if segment == 0:
        continue
      idx = np.nonzero(segment_ids[b] == segment)[0]
      visible = np.tril(np.ones((len(idx), len(idx)), bool)) | (not causal)
      for n in range(num_heads):
        qs, ks, vs, dos = q[b, idx, n], k[b, idx, n // group], v[b, idx, n // group], \
            dout[b, idx, n]
        s = np.where(visible, qs @ ks.T * scale, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[b, idx, n] = p @ vs
        dp = dos @ vs.T
        ds = p * (dp - (dp * p).sum(-1, keepdims=True))
        dq[b, idx, n] = ds @ ks * scale
        dk[b, idx, n // group] += ds.T @ qs * scale
        dv[b, idx, n // group] += p.T @ dos
  return out, dq, dk, dv


def _inputs(num_heads, num_kv_heads, head_dim, dtype, seed=0):
  rng = np.random.RandomState(seed)
  shape = SEGMENTS.shape
  q = rng.randn(*shape, num_heads, head_dim)
  k = rng.randn(*shape, num_kv_heads, head_dim)
  v = rng.randn(*shape, num_kv_heads, head_dim)
  dout = rng.randn(*shape, num_heads, head_dim) * (SEGMENTS > 0)[:, :, None, None]
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, jnp.asarray(SEGMENTS), jnp.asarray(dout, jnp.float32)


def _value_and_grads(q, k, v, segment_ids, dout, causal=True):
  def loss(q, k, v):
    out = attention(q, k, v, segment_ids, impl="pallas", interpret=True, pallas_blocks=BLOCKS,
                    causal=causal)
    return jnp.sum(out.astype(jnp.float32) * dout), out
  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return (out, *grads)


def _check(got, q, k, v, dout, tol, causal=True):
  """Against the reference on the inputs as the kernel sees them (bf16-rounded, if so)."""
  as64 = lambda x: np.asarray(jnp.asarray(x, jnp.float32), np.float64)
  expected = _per_sample_reference(as64(q), as64(k), as64(v), SEGMENTS, np.asarray(dout),
                                   causal)
  real = SEGMENTS > 0
  assert all(np.isfinite(as64(x)).all() for x in got)
  np.testing.assert_allclose(as64(got[0])[real], expected[0][real], rtol=0,
                             atol=tol * np.abs(expected[0]).max(), err_msg="out")
  for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
    np.testing.assert_allclose(as64(g), e, rtol=0, atol=tol * np.abs(e).max(), err_msg=name)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype,tol", [
    (4, 2, 16, jnp.float32, 1e-5),    # GQA, group 2
    (4, 4, 12, jnp.float32, 1e-5),    # N = K; H = 12 is zero-padded to 16 inside
    (4, 2, 16, jnp.bfloat16, 2e-2),   # bf16 probabilities and ds in the matmuls
    (4, 4, 16, jnp.bfloat16, 2e-2),
])
def test_forward_and_gradients_match_per_sample(num_heads, num_kv_heads, head_dim, dtype, tol):
  q, k, v, segment_ids, dout = _inputs(num_heads, num_kv_heads, head_dim, dtype)
  got = _value_and_grads(q, k, v, segment_ids, dout)
  assert [x.dtype for x in got] == [dtype] * 4 and got[0].shape == q.shape
  assert got[2].shape == k.shape and got[3].shape == v.shape
  _check(got, q, k, v, dout, tol)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,dtype,tol", [
    (4, 2, 16, jnp.float32, 1e-5),    # GQA, group 2
    (4, 1, 16, jnp.float32, 1e-5),    # GQA, group 4
    (4, 4, 12, jnp.float32, 1e-5),    # N = K; H = 12 is zero-padded to 16 inside
    (4, 2, 16, jnp.bfloat16, 2e-2),
])
def test_non_causal_forward_and_gradients_match_per_sample(num_heads, num_kv_heads, head_dim,
                                                           dtype, tol):
  """causal=False (the InternViT tower): each token sees its whole sample, later tokens too;
  samples still apart, and the row padded from 37 to 48 with tokens no one sees."""
  q, k, v, segment_ids, dout = _inputs(num_heads, num_kv_heads, head_dim, dtype, seed=4)
  got = _value_and_grads(q, k, v, segment_ids, dout, causal=False)
  assert [x.dtype for x in got] == [dtype] * 4 and got[0].shape == q.shape
  _check(got, q, k, v, dout, tol, causal=False)
  # Not the causal result: later keys of a sample count.
  causal = _per_sample_reference(*(np.asarray(jnp.asarray(x, jnp.float32), np.float64)
                                   for x in (q, k, v)), SEGMENTS, np.asarray(dout))
  assert np.abs(np.asarray(got[0], np.float64) - causal[0]).max() > 0.1


@pytest.mark.parametrize("sizes,causal", [
    ({"data": 2, "tensor": 2}, True),    # kv heads split like q's
    ({"fsdp": 1, "tensor": 4}, True),    # 2 kv heads whole on 4
    ({"fsdp": 1, "tensor": 4}, False),
])
def test_per_device_under_a_four_device_mesh(sizes, causal):
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices; tests/conftest.py sets them")
  mesh = make_mesh(sizes, jax.devices()[:4])
  q, k, v, segment_ids, dout = _inputs(4, 2, 16, jnp.float32, seed=1)
  q, k, v, segment_ids, dout = (x[:2] for x in (q, k, v, segment_ids, dout))
  with jax.set_mesh(mesh):
    got = _value_and_grads(q, k, v, segment_ids, dout, causal=causal)
  as64 = lambda x: np.asarray(x, np.float64)
  expected = _per_sample_reference(as64(q), as64(k), as64(v), SEGMENTS[:2], np.asarray(dout),
                                   causal)
  real = SEGMENTS[:2] > 0
  np.testing.assert_allclose(as64(got[0])[real], expected[0][real], atol=1e-5)
  for name, g, e in zip(("dq", "dk", "dv"), got[1:], expected[1:]):
    np.testing.assert_allclose(as64(g), e, atol=1e-5, err_msg=name)


def _avals(jaxpr):
  for eqn in jaxpr.eqns:
    for var in list(eqn.invars) + list(eqn.outvars):
      if hasattr(var, "aval") and hasattr(var.aval, "shape"):
        yield var.aval.shape
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _avals(inner)


@pytest.mark.parametrize("causal", [True, False])
def test_no_dense_mask_or_scores_anywhere(causal):
  """Forward + backward at T = 256 with 64-token tiles: no value of the program (kernel
  bodies included) has two dims of 256 or more, so no [T, T] mask or scores exist."""
  t = 256
  q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)
  blocks = Blocks(q=64, kv=64, bwd_major=64, bwd_minor=64)
  loss = lambda q, k, v, s: jnp.sum(attention(q, k, v, s, impl="pallas", interpret=True,
                                              pallas_blocks=blocks, causal=causal
                                              ).astype(jnp.float32))
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, kv, kv, seg)
  shapes = list(_avals(jaxpr.jaxpr))
  assert any(t in s for s in shapes)  # the walk sees the [B, T, ...] arrays
  assert not [s for s in shapes if sum(d >= t for d in s) >= 2]


def test_needs_a_gpu_unless_interpreted_and_blocks_are_powers_of_two():
  q, k, v, segment_ids, _ = _inputs(4, 2, 16, jnp.float32)
  if jax.default_backend() != "gpu":
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
      attention(q, k, v, segment_ids, impl="pallas")
  with pytest.raises(ValueError, match="power of two"):
    Blocks(q=48)


@pytest.mark.slow
def test_gpu_script_cpu_smoke(tmp_path):
  """scripts/gpu_kernels.py in --cpu-smoke mode (tiny shapes, interpret mode): every case
  runs and records its errors and times in the JSON."""
  out = tmp_path / "gpu_kernels.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "gpu_kernels.py"),
                         "--cpu-smoke", "--out", str(out)], env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["smoke"] and report["done"]
  cases = report["attention"]
  assert cases and all("error" not in c for c in cases), cases
  for case in cases:
    for impl in ("pallas", "blockwise"):
      res = case["impls"][impl]
      assert "error" not in res, res
      assert res["max_abs_err"]["out"] < 0.1 and res["max_abs_err"]["dk"] < 0.1
      assert res["median_s"] > 0
  loss = report["loss"]
  assert "error" not in loss, loss
  assert loss["impls"]["pallas"]["loss_rel_err"] < 1e-3
  assert loss["impls"]["jax"]["loss_rel_err"] < 1e-3
  # Every kernel measured gets a verdict, and on the CPU (interpret mode) every one passes.
  assert report["rel_tol"]["attention"] == 1e-2
  verdicts = report["verdicts"]
  assert {"smoke_gqa/pallas", "smoke_mha/blockwise", "smoke_vit/pallas",
          "loss/pallas"} <= set(verdicts)
  assert [c["causal"] for c in cases] == [True, True, False]
  assert set(verdicts.values()) == {"pass"}, verdicts


def test_segment_spans_are_each_ids_first_and_last_position():
  from jaxtune.ops.pallas_attention import segment_spans  # pylint: disable=import-outside-toplevel
  # Ids as packing writes them, one recurring (0 in the middle and at the end), -1 padding.
  seg = np.array([[3, 3, 0, 1, 1, 1, 0, 0, 2, -1, -1],
                  [5] * 11], np.int32)
  first, last = (np.asarray(x) for x in segment_spans(jnp.asarray(seg)))
  for b in range(seg.shape[0]):
    for t in range(seg.shape[1]):
      same = np.nonzero(seg[b] == seg[b, t])[0]
      assert (first[b, t], last[b, t]) == (same.min(), same.max()), (b, t)


def test_tiles_of_other_samples_are_skipped_not_masked():
  """Sample A (tokens 0-31, two 16-token tiles) has NaN values; sample B (32-63) cannot see
  them. A kernel that visited A's tiles for B's queries would multiply the masked (zero)
  probabilities by NaN and return NaN for B (0 * NaN); skipping them keeps B exact."""
  rng = np.random.RandomState(3)
  segments = np.array([[1] * 32 + [2] * 32], np.int32)
  q, k, v, dout = (rng.randn(1, 64, 2, 16) for _ in range(4))
  v[:, :32] = np.nan
  b = slice(32, 64)

  def loss(q, k, v):
    out = attention(q, k, v, jnp.asarray(segments), impl="pallas", interpret=True,
                    pallas_blocks=BLOCKS)
    return jnp.sum(jnp.where(jnp.asarray(segments == 2)[..., None, None],
                             out * jnp.asarray(dout), 0.0)), out
  (_, out), (dq, dk, dv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  expected = _per_sample_reference(q[:, b], k[:, b], v[:, b], segments[:, b], dout[:, b])
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected):
    np.testing.assert_allclose(np.asarray(got)[:, b], want, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("poisoned", ["first", "second"])
def test_non_causal_tiles_of_other_samples_are_skipped_not_masked(poisoned):
  """Non-causal, a sample's queries may see keys after them, but not past its own last
  token, nor before its first: samples A (tokens 0-31) and B (32-63), two 16-token tiles
  each, one of them all NaN (q, k, v and the cotangent). The other's out, dq, dk and dv stay
  exact only if no kernel (forward; dk / dv; dq) visits the poisoned sample's tiles for it."""
  rng = np.random.RandomState(5)
  segments = np.array([[1] * 32 + [2] * 32], np.int32)
  q, k, v, dout = (rng.randn(1, 64, 4, 16) for _ in range(4))
  k, v = k[:, :, :2], v[:, :, :2]   # GQA, group 2
  bad, good = (slice(0, 32), slice(32, 64)) if poisoned == "first" else (slice(32, 64),
                                                                         slice(0, 32))
  for x in (q, k, v, dout):
    x[:, bad] = np.nan
  keep = jnp.asarray(np.arange(64) >= 32 if poisoned == "first" else np.arange(64) < 32)

  def loss(q, k, v):
    out = attention(q, k, v, jnp.asarray(segments), impl="pallas", interpret=True,
                    pallas_blocks=BLOCKS, causal=False)
    return jnp.sum(jnp.where(keep[None, :, None, None], out * jnp.nan_to_num(
        jnp.asarray(dout)), 0.0)), out
  (_, out), (dq, dk, dv) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  expected = _per_sample_reference(q[:, good], k[:, good], v[:, good], segments[:, good],
                                   dout[:, good], causal=False)
  for name, got, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), expected):
    np.testing.assert_allclose(np.asarray(got)[:, good], want, rtol=0, atol=1e-5, err_msg=name)
