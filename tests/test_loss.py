"""The chunked cross-entropy (pure-JAX path; the Pallas kernels are in test_pallas_loss.py)
against full-logits references (JAX and PyTorch), its memory bound, its behaviour under
jit / scan / sharding, and XTuner's loss_reduction weights."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxtune.ops.loss import chunked_cross_entropy, eager_cross_entropy, loss_weights


def _problem(n, d, v, seed=0, ignore_every=5, ignore_label=-100):
  """Random hidden [N, D], kernel [D, V], labels with some ignored, non-uniform weights."""
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)  # peaky softmax
  y = rng.integers(0, v, size=n).astype(np.int32)
  y[::ignore_every] = ignore_label
  wt = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
  return h, w, y, wt


def _naive(h, w, y, wt):
  """Textbook JAX reference: full logits, log_softmax, gather."""
  logp = jax.nn.log_softmax(h.astype(jnp.float32) @ w.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(jnp.where(y >= 0, wt * nll, 0.0))


def _torch_ref(h, w, y, wt):
  """Independent reference in float64: loss, d/dh, d/dw."""
  ht = torch.tensor(np.asarray(h, np.float64), requires_grad=True)
  wt_ = torch.tensor(np.asarray(w, np.float64), requires_grad=True)
  ce = F.cross_entropy(ht @ wt_, torch.tensor(np.asarray(y, np.int64)), reduction="none",
                       ignore_index=-100)
  loss = (ce * torch.tensor(np.asarray(wt, np.float64))).sum()
  loss.backward()
  return loss.item(), ht.grad.numpy(), wt_.grad.numpy()


def _chunked_vg(chunk_size, vocab_tile=4096):
  f = lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=chunk_size,
                                                vocab_tile=vocab_tile)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))


def _close(actual, expected, rtol):
  """Elementwise check scaled by the largest reference magnitude."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("n,v,chunk,vocab_tile", [
    (151, 1000, 16, 128),    # N not a multiple of the chunk; 7 vocab tiles + a tail of 104
    (151, 1000, 151, 1000),  # one exact chunk, one exact vocab tile
    (151, 1000, 4096, 4096), # chunk larger than N, tile larger than V
    (151, 257, 1, 64),       # odd (prime) vocab, one token per chunk, a 1-column tail
    (200, 151, 64, 50),      # padding of 56 tokens in the last chunk; 3 exact tiles + 1
])
def test_matches_torch_and_naive(n, v, chunk, vocab_tile):
  h, w, y, wt = _problem(n, 24, v)
  y[1], y[2] = v - 1, 0  # labels in the first and the last (tail) vocab tile
  loss, (dh, dw) = _chunked_vg(chunk, vocab_tile)(h, w, y, wt)
  t_loss, t_dh, t_dw = _torch_ref(h, w, y, wt)
  np.testing.assert_allclose(float(loss), t_loss, rtol=2e-6)
  _close(dh, t_dh, 1e-5)
  _close(dw, t_dw, 1e-5)
  n_loss, (n_dh, n_dw) = jax.value_and_grad(_naive, argnums=(0, 1))(h, w, y, wt)
  np.testing.assert_allclose(float(loss), float(n_loss), rtol=2e-6)
  _close(dh, n_dh, 1e-5)
  _close(dw, n_dw, 1e-5)
  e_loss, (e_dh, e_dw) = jax.value_and_grad(eager_cross_entropy, argnums=(0, 1))(h, w, y, wt)
  np.testing.assert_allclose(float(e_loss), t_loss, rtol=2e-6)
  _close(e_dh, t_dh, 1e-5)
  _close(e_dw, t_dw, 1e-5)
  assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32


def test_any_negative_label_is_ignored_whatever_its_weight():
  h, w, y, wt = _problem(96, 16, 300, ignore_label=-1)
  y[7] = -100
  wt[::5] = 1e6  # huge weights on the ignored tokens must not leak in
  loss, (dh, dw) = _chunked_vg(40, vocab_tile=128)(h, w, y, wt)
  keep = y >= 0
  ref, (r_dh, r_dw) = jax.value_and_grad(_naive, argnums=(0, 1))(h[keep], w, y[keep], wt[keep])
  np.testing.assert_allclose(float(loss), float(ref), rtol=2e-6)
  assert np.all(np.asarray(dh)[~keep] == 0)
  _close(np.asarray(dh)[keep], r_dh, 1e-5)
  _close(dw, r_dw, 1e-5)


def test_all_ignored_gives_zero_loss_and_gradients():
  h, w, _, wt = _problem(50, 8, 100)
  y = np.full(50, -100, np.int32)
  loss, (dh, dw) = _chunked_vg(16)(h, w, y, wt)
  assert float(loss) == 0.0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


def test_bfloat16_hidden_with_float32_kernel():
  h, w, y, wt = _problem(300, 64, 1000, seed=1)
  h16 = jnp.asarray(h, jnp.bfloat16)
  loss, (dh, dw) = _chunked_vg(128, vocab_tile=384)(h16, w, y, wt)
  assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  # Reference on the values the matmul actually sees: both operands rounded to bf16.
  w16 = np.asarray(jnp.asarray(w, jnp.bfloat16).astype(jnp.float32))
  t_loss, t_dh, t_dw = _torch_ref(np.asarray(h16.astype(jnp.float32)), w16, y, wt)
  np.testing.assert_allclose(float(loss), t_loss, rtol=1e-4)
  _close(dh, t_dh, 2e-2)  # d logits are rounded to bf16 for the backward matmuls
  _close(dw, t_dw, 2e-2)
  e_loss, (e_dh, e_dw) = jax.value_and_grad(eager_cross_entropy, argnums=(0, 1))(h16, w, y, wt)
  np.testing.assert_allclose(float(loss), float(e_loss), rtol=1e-4)
  _close(dh, e_dh.astype(jnp.float32), 2e-2)
  _close(dw, e_dw, 2e-2)


def test_gradient_accumulation_inside_scan_matches_one_batch():
  h, w, y, wt = _problem(4 * 60, 16, 333, seed=2)

  @jax.jit
  def accumulated(h, w, y, wt):
    grad_fn = jax.value_and_grad(
        lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=25), argnums=(0, 1))

    def body(carry, mb):
      loss, dw = carry
      h_mb, y_mb, wt_mb = mb
      l, (dh, g) = grad_fn(h_mb, w, y_mb, wt_mb)
      return (loss + l, dw + g), dh
    split = lambda x: x.reshape((4, -1) + x.shape[1:])
    (loss, dw), dh = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros_like(w)),
                                  (split(h), split(y), split(wt)))
    return loss, dh.reshape(h.shape), dw

  loss, dh, dw = accumulated(h, w, y, wt)
  t_loss, t_dh, t_dw = _torch_ref(h, w, y, wt)
  np.testing.assert_allclose(float(loss), t_loss, rtol=2e-6)
  _close(dh, t_dh, 1e-5)
  _close(dw, t_dw, 1e-5)


def test_cotangent_scales_gradients():
  h, w, y, wt = _problem(70, 8, 50)
  f = lambda h, w: 0.25 * chunked_cross_entropy(h, w, y, wt, chunk_size=32)
  dh, dw = jax.grad(f, argnums=(0, 1))(h, w)
  _, r_dh, r_dw = _torch_ref(h, w, y, wt)
  _close(dh, 0.25 * r_dh, 1e-5)
  _close(dw, 0.25 * r_dw, 1e-5)


def _abstract(n, d, v, dtype):
  return (jax.ShapeDtypeStruct((n, d), dtype), jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))


def _temp_bytes(loss_fn, args):
  vg = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))
  return vg.lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_memory_never_holds_full_logits(dtype):
  n, d, v, chunk = 4096, 64, 8192, 128
  logits_bytes = n * v * 4
  args = _abstract(n, d, v, dtype)
  chunked = _temp_bytes(lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=chunk),
                        args)
  eager = _temp_bytes(eager_cross_entropy, args)
  assert chunked < 0.25 * logits_bytes, (chunked, logits_bytes)
  assert eager > logits_bytes, (eager, logits_bytes)


@pytest.mark.parametrize("kernel_dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_memory_at_qwen_scale_is_under_one_gib(kernel_dtype):
  """Loss + gradients at 16,384 tokens x 4,096 hidden x 151,936 vocab, bf16 hidden: <= 1 GiB
  of temporaries (compiled only). The previous [C, V]-chunked version needed 7.2 GiB, the
  full logits 20.9 GiB (bf16 kernel): the float32 [D, V] kernel-gradient accumulator, whole
  [C, V] float32 logit chunks and a bf16 copy of the kernel are all gone."""
  n, d, v = 16384, 4096, 151936
  args = _abstract(n, d, v, jnp.bfloat16)
  args = (args[0], jax.ShapeDtypeStruct((d, v), kernel_dtype)) + args[2:]
  temp = _temp_bytes(lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=1024),
                     args)
  assert temp <= 2**30, temp / 2**30


def _mesh(axis_type, shape=(4,), names=("x",)):
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices; tests/conftest.py sets them")
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(names),
                       devices=jax.devices()[:4])


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("kernel_spec", [P(), P("x", None), P(None, "x")])
@pytest.mark.parametrize("n,token_axes", [(256, None), (250, None), (256, "x")])
def test_sharded_inputs(axis_type, kernel_spec, n, token_axes):
  """Tokens sharded over 4 devices; kernel replicated, FSDP-style on D, or vocab-parallel
  (vocab tiles of 128 then cut across the kernel's shards)."""
  mesh = _mesh(axis_type)
  h, w, y, wt = _problem(n, 16, 300, seed=3)
  t_loss, t_dh, t_dw = _torch_ref(h, w, y, wt)
  f = lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=32,
                                                token_axes=token_axes, vocab_tile=128)
  with jax.set_mesh(mesh):
    tokens = NamedSharding(mesh, P("x")) if n % 4 == 0 else NamedSharding(mesh, P())
    args = (jax.device_put(h, tokens), jax.device_put(w, NamedSharding(mesh, kernel_spec)),
            jax.device_put(y, tokens), jax.device_put(wt, tokens))
    loss, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)
    e_loss = jax.jit(eager_cross_entropy)(*args)
  np.testing.assert_allclose(float(loss), t_loss, rtol=2e-6)
  np.testing.assert_allclose(float(e_loss), t_loss, rtol=2e-6)
  _close(dh, t_dh, 1e-5)
  _close(dw, t_dw, 1e-5)


def _collectives_in_loops(hlo: str) -> list[str]:
  """Collective ops inside while-loop bodies of a compiled HLO module."""
  bodies = set(re.findall(r"body=%?([\w.\-]+)", hlo))
  found, comp = [], None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      comp = m.group(1)
    elif comp in bodies and re.search(r"\b(all-reduce|reduce-scatter|all-gather)(-start)?\(", line):
      found.append(line.strip())
  return found


def test_token_axes_reduce_the_kernel_gradient_once():
  """Plain jit over sharded tokens reduces [D, V] after every chunk; token_axes does not."""
  mesh = _mesh(AxisType.Auto, (2, 2), ("data", "fsdp"))
  n, d, v = 512, 16, 300
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=rows),
          jax.ShapeDtypeStruct((d, v), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
          jax.ShapeDtypeStruct((n,), jnp.int32, sharding=rows),
          jax.ShapeDtypeStruct((n,), jnp.float32, sharding=rows))
  def hlo(token_axes):
    f = lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=32,
                                                  token_axes=token_axes)
    with jax.set_mesh(mesh):
      return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile().as_text()
  assert any(f"f32[{d},{v}]" in op for op in _collectives_in_loops(hlo(None)))
  assert _collectives_in_loops(hlo(("data", "fsdp"))) == []
  with pytest.raises(ValueError, match="token_axes"):
    chunked_cross_entropy(*_problem(8, 4, 10)[:4], chunk_size=4, token_axes="data")


def test_loss_weights_hand_computed():
  # Row 0: sample A (segment 1, 3 trained of 4), sample B (segment 2, 2 trained), padding.
  # Row 1: sample C (segment 1, 1 trained of 3), then padding. -100 = not trained.
  x = -100
  labels = jnp.array([[x, 5, 6, 7, x, 8, 9, x, x],
                      [x, x, 4, x, x, x, x, x, x]])
  segs = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0, 0],
                    [1, 1, 1, 0, 0, 0, 0, 0, 0]])
  a, b, c = 1 / 3, 1 / 2, 1.0
  expected = {
      "token": [[0, 1, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 0]],
      "sample": [[0, a, a, a, 0, b, b, 0, 0], [0, 0, c, 0, 0, 0, 0, 0, 0]],
      "square": [[0] + [np.sqrt(a)] * 3 + [0] + [np.sqrt(b)] * 2 + [0, 0],
                 [0, 0, 1, 0, 0, 0, 0, 0, 0]],
  }
  for reduction, want in expected.items():
    got = jax.jit(loss_weights, static_argnums=2)(labels, segs, reduction)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.array(want), rtol=1e-6, err_msg=reduction)
  # Same samples, different id scheme (global ids, no 0 for padding): same weights.
  relabelled = jnp.array([[1000, 1000, 1000, 1000, 1001, 1001, 1001, -1, -1],
                          [42, 42, 42, 5, 5, 5, 5, 5, 5]])
  np.testing.assert_allclose(loss_weights(labels, relabelled, "sample"), expected["sample"],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="loss_reduction"):
    loss_weights(labels, segs, "mean")


@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_micro_batches_reproduce_the_global_batch_loss(reduction):
  """sum(w * ce) / sum(w) over the global batch, accumulated per micro-batch, is exact."""
  b, t, d, v = 8, 24, 16, 97
  rng = np.random.default_rng(4)
  h, w, y, _ = _problem(b * t, d, v, seed=4, ignore_every=3)
  cuts = np.sort(rng.integers(1, t, size=(b, 2)), axis=1)
  segs = np.where(np.arange(t)[None] < cuts[:, :1], 1, np.where(np.arange(t)[None] < cuts[:, 1:],
                                                                 2, 0))
  y = np.where(segs == 0, -100, y.reshape(b, t))  # padding is never trained
  weights = loss_weights(jnp.asarray(y), jnp.asarray(segs), reduction)
  denom = weights.sum()
  whole = chunked_cross_entropy(h, w, y.reshape(-1), weights.reshape(-1), chunk_size=20) / denom
  parts = 0.0
  for rows in np.split(np.arange(b), 4):
    mb = lambda x: x.reshape(b, t, -1)[rows].reshape(len(rows) * t, -1)
    parts += chunked_cross_entropy(mb(h), w, y[rows].reshape(-1), weights[rows].reshape(-1),
                                   chunk_size=20)
  np.testing.assert_allclose(float(parts / denom), float(whole), rtol=1e-6)
  # And against the definition of each reduction, computed per sample in numpy.
  logits = h.astype(np.float64) @ w.astype(np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, np.maximum(y.reshape(-1, 1), 0), axis=1).reshape(b, t)
  num = den = 0.0
  for r in range(b):
    for s in (1, 2):
      m = (segs[r] == s) & (y[r] >= 0)
      if m.any():
        k = {"token": 1.0, "sample": 1.0 / m.sum(), "square": 1.0 / np.sqrt(m.sum())}[reduction]
        num, den = num + k * ce[r][m].sum(), den + k * m.sum()
  np.testing.assert_allclose(float(whole), num / den, rtol=1e-5)


def test_rejects_bad_shapes():
  h, w, y, wt = _problem(10, 8, 20)
  with pytest.raises(ValueError):
    chunked_cross_entropy(h, w.T, y, wt, chunk_size=4)
  with pytest.raises(ValueError):
    chunked_cross_entropy(h, w, y[:5], wt, chunk_size=4)
  with pytest.raises(ValueError):
    chunked_cross_entropy(h, w, y, wt, chunk_size=0)
  with pytest.raises(ValueError, match="vocab_tile"):
    chunked_cross_entropy(h, w, y, wt, chunk_size=4, vocab_tile=0)
