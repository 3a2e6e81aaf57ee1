"""The fused Pallas cross-entropy kernels, run in interpret mode on the CPU, against a float64
full-logits reference and the pure-JAX paths (`eager_cross_entropy`, `_chunked_ce`): loss,
d/d hidden, d/d kernel. Interpret mode is slow: shapes are tiny but every tail is exercised
(V = 1000 with vocab tiles of 128 and slabs of 384, so the last slab overlaps the one before and
one of its vocab tiles is wholly masked; N = 70 with token tiles of 16; V smaller than a slab;
V a multiple of the slab), and the temporaries at the production shape are checked compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxtune.ops import loss as loss_lib
from jaxtune.ops.loss import chunked_cross_entropy, eager_cross_entropy
from jaxtune.ops.pallas_loss import Tiles, fused_cross_entropy, slab_width, supported

# V = 1000: slabs at 0, 384 and 616 (= V - 384; its columns below 768 are masked, its first
# vocab tile, 616-743, wholly).
TILES = Tiles(tokens=16, vocab=128, hidden=16, vocab_slab=384)


def _problem(n, d=32, v=1000, seed=0):
  rng = np.random.default_rng(seed)
  h = rng.normal(size=(n, d)).astype(np.float32)
  w = (rng.normal(size=(d, v)) / np.sqrt(d) * 3).astype(np.float32)
  y = rng.integers(0, v, size=n).astype(np.int32)
  y[::5] = -100
  y[1], y[2] = v - 1, 0  # first and last vocab entries: both tails of the tiling
  wt = rng.uniform(0.1, 2.0, size=n).astype(np.float32)
  wt[::5] = 1e6  # ignored tokens: their weight must not leak in
  return h, w, y, wt


def _reference(h, w, y, wt):
  """float64: sum of w * CE over labels >= 0, and its gradients, in closed form."""
  h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
  logits = h @ w
  lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
  keep = y >= 0
  target = logits[np.arange(len(y)), np.maximum(y, 0)]
  coef = np.where(keep, wt, 0.0)
  dlogits = np.exp(logits - lse[:, None])
  dlogits[np.arange(len(y)), np.maximum(y, 0)] -= 1.0
  dlogits *= coef[:, None]
  return float(np.sum(coef * (lse - target))), dlogits @ w.T, h.T @ dlogits


def _fused_vg(h, w, y, wt, tiles=TILES):
  f = lambda h, w: fused_cross_entropy(h, w, y, wt, tiles, True)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w)


def _close(actual, expected, tol):
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * np.abs(expected).max())


def test_fused_kernels_match_float64_reference():
  h, w, y, wt = _problem(64)
  loss, (dh, dw) = _fused_vg(h, w, y, wt)
  r_loss, r_dh, r_dw = _reference(h, w, y, wt)
  np.testing.assert_allclose(float(loss), r_loss, rtol=2e-6)
  _close(dh, r_dh, 1e-5)
  _close(dw, r_dw, 1e-5)
  assert np.all(np.asarray(dh)[y < 0] == 0)
  assert dh.dtype == jnp.float32 and dw.dtype == jnp.float32


def test_fused_kernels_bfloat16_and_a_token_tail():
  h, w, y, wt = _problem(70, seed=1)  # 70 = 4 x 16 + 6 tokens
  h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  loss, (dh, dw) = _fused_vg(h16, w16, y, wt)
  assert loss.dtype == jnp.float32 and dh.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  # Reference on the values the matmuls see: both operands rounded to bf16.
  r_loss, r_dh, r_dw = _reference(np.asarray(h16, np.float32), np.asarray(w16, np.float32), y, wt)
  np.testing.assert_allclose(float(loss), r_loss, rtol=1e-4)
  _close(dh, r_dh, 2e-2)  # dlogits are rounded to bf16 for the backward matmuls
  _close(dw, r_dw, 2e-2)


# (tokens, vocab, slab, dtype): ragged N and V; V < slab (one slab of V rounded down to the
# vocab tile, then one overlapping); V a multiple of the slab; a slab off the vocab tile.
RAGGED = [(70, 1000, 384, jnp.float32), (33, 1000, 384, jnp.bfloat16),
          (20, 130, 4096, jnp.float32), (50, 1024, 256, jnp.bfloat16),
          (17, 896, 200, jnp.float32)]


@pytest.mark.parametrize("n,v,slab,dtype", RAGGED, ids=lambda x: getattr(x, "__name__", str(x)))
def test_ragged_shapes_match_the_pure_jax_paths(n, v, slab, dtype):
  tiles = Tiles(tokens=16, vocab=128, hidden=16, vocab_slab=slab)
  h, w, y, wt = _problem(n, v=v, seed=n)
  h, w = jnp.asarray(h, dtype), jnp.asarray(w, dtype)
  loss, (dh, dw) = _fused_vg(h, w, y, wt, tiles)
  assert dh.dtype == dtype and dw.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for ref in (lambda *a: loss_lib._chunked_ce(*a, 16, 128), eager_cross_entropy):
    r_loss, (r_dh, r_dw) = jax.jit(jax.value_and_grad(
        lambda h, w, ref=ref: ref(h, w, y, wt), argnums=(0, 1)))(h, w)
    np.testing.assert_allclose(float(loss), float(r_loss), rtol=1e-5 if tol < 1e-3 else 1e-3)
    _close(dh, r_dh, tol)
    _close(dw, r_dw, tol)
  # And the float64 reference on the values the matmuls see.
  r_loss, r_dh, r_dw = _reference(np.asarray(h, np.float32), np.asarray(w, np.float32), y, wt)
  np.testing.assert_allclose(float(loss), r_loss, rtol=1e-5 if tol < 1e-3 else 1e-4)
  _close(dh, r_dh, tol)
  _close(dw, r_dw, tol)
  assert np.all(np.asarray(dh, np.float32)[y < 0] == 0)


def test_cotangent_and_all_ignored():
  h, w, y, wt = _problem(40, seed=3)
  f = lambda h, w, y: 2.5 * fused_cross_entropy(h, w, y, wt, TILES, True)
  _, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w, y)
  _, r_dh, r_dw = _reference(h, w, y, wt)
  _close(dh, 2.5 * r_dh, 1e-5)
  _close(dw, 2.5 * r_dw, 1e-5)
  loss, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h, w, np.full_like(y, -100))
  assert float(loss) == 0 and not np.any(np.asarray(dh)) and not np.any(np.asarray(dw))


def test_slab_width():
  assert slab_width(1000, TILES) == 384
  assert slab_width(151936, Tiles()) == 4096  # 38 slabs, the last one overlapping
  assert slab_width(130, Tiles(vocab=128, vocab_slab=4096)) == 128  # never past V
  assert slab_width(1000, Tiles(vocab=128, vocab_slab=200)) == 128  # a multiple of the tile


@pytest.mark.parametrize("kernel_dtype", [jnp.bfloat16, jnp.float32])
def test_temporaries_at_the_production_shape_are_under_one_gib(kernel_dtype):
  """Loss + gradients at 16,384 x 4,096 x 151,936, bf16 hidden, compiled (interpret mode, CPU
  backend: the buffers around the kernels are those of the GPU program; interpret mode may add
  copies of its own). Per slab of 4,096: G bf16 128 MiB, the head's slab 32 MiB, dW_slab
  float32 64 MiB, and the float32 dh 256 MiB (plus the dh matmul's result, where XLA does not
  add it in place): 0.66 GiB measured (jax 0.12.1)."""
  n, d, v = 16384, 4096, 151936
  args = (jax.ShapeDtypeStruct((n, d), jnp.bfloat16), jax.ShapeDtypeStruct((d, v), kernel_dtype),
          jax.ShapeDtypeStruct((n,), jnp.int32), jax.ShapeDtypeStruct((n,), jnp.float32))
  f = lambda h, w, y, wt: fused_cross_entropy(h, w, y, wt, Tiles(), True)
  compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 2**30, temp / 2**30


def test_self_check_passes_in_interpret_mode():
  # At an edge shape: N = 200 off the default token tile, V = 1000 off the vocab tile and
  # smaller than a slab (two overlapping slabs).
  assert loss_lib.pallas_works_here(interpret=True)


def test_pallas_impl_under_token_axes_and_float32_kernel_with_bf16_hidden():
  """chunked_cross_entropy(impl='pallas') per device under a 4-device mesh: the wiring the
  GPU uses, the kernel gradient summed over devices."""
  if jax.device_count() < 4:
    pytest.skip("needs 4 (simulated) devices; tests/conftest.py sets them")
  mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Auto,), devices=jax.devices()[:4])
  h, w, y, wt = _problem(128, seed=2)
  h16 = jnp.asarray(h, jnp.bfloat16)
  f = lambda h, w, y, wt: chunked_cross_entropy(h, w, y, wt, chunk_size=32, token_axes="x",
                                                impl="pallas", interpret=True, pallas_tiles=TILES)
  with jax.set_mesh(mesh):
    rows = NamedSharding(mesh, P("x"))
    args = (jax.device_put(h16, rows), jax.device_put(w, NamedSharding(mesh, P())),
            jax.device_put(y, rows), jax.device_put(wt, rows))
    loss, (dh, dw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(*args)
  assert dh.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
  w16 = np.asarray(jnp.asarray(w, jnp.bfloat16), np.float32)
  r_loss, r_dh, r_dw = _reference(np.asarray(h16, np.float32), w16, y, wt)
  np.testing.assert_allclose(float(loss), r_loss, rtol=1e-4)
  _close(dh, r_dh, 2e-2)
  _close(dw, r_dw, 2e-2)


def test_selection_and_shape_limits(monkeypatch):
  n, d, v = 64, 32, 1000
  assert supported(n, d, v, TILES)
  assert not supported(n, 24, v, TILES)  # D must be a multiple of the hidden tile
  assert not supported(n, d, 100, TILES)  # fewer vocab entries than one tile
  if jax.default_backend() != "gpu":
    # Off a GPU 'auto' is the pure-JAX path, without even probing the kernels.
    assert loss_lib._choose_impl("auto", n, d, v, None, False, TILES) == "jax"
  # On a GPU too until a measured win flips AUTO_GPU_IMPL: correctness alone does not.
  assert loss_lib.AUTO_GPU_IMPL == "jax"
  with monkeypatch.context() as patch:
    patch.setattr(jax, "default_backend", lambda: "gpu")
    patch.setattr(loss_lib, "pallas_works_here", lambda *a: True)
    assert loss_lib._choose_impl("auto", n, d, v, None, False, TILES) == "jax"
    patch.setattr(loss_lib, "AUTO_GPU_IMPL", "pallas")
    assert loss_lib._choose_impl("auto", n, d, v, None, False, TILES) == "pallas"
  h, w, y, wt = _problem(n, d=24)
  with pytest.raises(ValueError, match="Pallas loss needs"):
    chunked_cross_entropy(h, w, y, wt, chunk_size=16, impl="pallas", interpret=True,
                          pallas_tiles=TILES)
  with pytest.raises(ValueError, match="unknown loss impl"):
    chunked_cross_entropy(h, w, y, wt, chunk_size=16, impl="triton")
