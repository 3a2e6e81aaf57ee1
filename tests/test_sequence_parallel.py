"""Rows split over the `sequence` mesh axis (context parallelism) give the unsplit results.

Attention across shards is checked against per-sample float64 attention (values and
gradients); the train step of each family against the same step on an unsplit mesh. Samples
straddle the shard boundaries on purpose.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.models import intern_s1, presets
from jaxtune.models.qwen3 import model as qwen3_model
from jaxtune.ops import attention as attention_lib
from jaxtune.ops.attention import attention
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.sharding import axis_rules, batch_sharding, logical_to_spec, merge_rules
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step
from tests import test_intern_s1 as intern_s1_tests
from tests import test_train_step as train_step_tests
from tests.test_attention import _naive_attention


def _rows(rows, length, num_heads, num_kv_heads, head_dim=8, seed=0):
  """Packed rows of several samples each (lengths drawn at random, so most samples cross a
  shard boundary) and trailing padding."""
  rng = np.random.default_rng(seed)
  segment_ids = np.zeros((rows, length), np.int32)
  for r in range(rows):
    t, s = 0, 1
    while t < length - 4:
      n = int(rng.integers(3, 2 * length // 3))
      segment_ids[r, t:t + n] = s
      t, s = t + n, s + 1
    segment_ids[r, length - 2:] = 0  # padding at the end
  draw = lambda heads: rng.normal(size=(rows, length, heads, head_dim)).astype(np.float32)
  return draw(num_heads), draw(num_kv_heads), draw(num_kv_heads), segment_ids


def _mesh(**sizes):
  return make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])


def _sharded(mesh, x, names):
  return jax.device_put(x, jax.sharding.NamedSharding(
      mesh, logical_to_spec(names, x.shape, mesh)))


def _dense_grads(q, k, v, seg, do):
  """Gradients of sum(out * do) through the dense 'xla' impl on one device: no blocks, no
  shards, no collectives (an independent path)."""
  loss = lambda q, k, v: jnp.sum(attention(q, k, v, seg, impl="xla") * do)
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("sizes,num_heads,num_kv_heads,path", [
    (dict(sequence=2), 4, 2, "ulysses"),
    (dict(sequence=4), 8, 2, "ulysses"),      # 2 kv heads repeated to the 4 devices
    (dict(sequence=4), 4, 4, "ulysses"),
    (dict(sequence=4), 6, 2, "all-gather"),   # 6 heads do not split 4 ways
    (dict(sequence=2, tensor=2), 4, 2, "ulysses"),
    (dict(sequence=2, fsdp=2), 3, 1, "all-gather"),
])
@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_attention_across_shards_matches_per_sample_attention(sizes, num_heads, num_kv_heads,
                                                              path, impl):
  q, k, v, seg = _rows(2, 32, num_heads, num_kv_heads)
  mesh = _mesh(**sizes)
  devices = sizes["sequence"]
  heads_here = num_heads // sizes.get("tensor", 1)
  kv_here = num_kv_heads // sizes.get("tensor", 1)
  assert attention_lib.uses_ulysses(heads_here, kv_here, devices) == (path == "ulysses")
  # Padding queries' outputs are never used: the loss reads real tokens only.
  do = np.random.default_rng(1).normal(size=q.shape).astype(np.float32)
  do *= (seg > 0)[:, :, None, None]
  want = _naive_attention(q, k, v, seg)
  want_grads = _dense_grads(q, k, v, seg, do)
  q_names = ("activation_batch", "activation_length", "activation_heads", None)
  kv_names = ("activation_batch", "activation_length", "activation_kv_heads", None)
  with jax.set_mesh(mesh):
    args = (_sharded(mesh, q, q_names), _sharded(mesh, k, kv_names), _sharded(mesh, v, kv_names),
            _sharded(mesh, seg, q_names[:2]))
    assert attention_lib.sequence_axes(args[0]) == ("sequence",)
    fn = lambda q, k, v, s: attention(q, k, v, s, impl=impl, block_q=4, block_kv=4)
    got = jax.jit(fn)(*args)
    got_grads = jax.jit(jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s) * do),
                                 argnums=(0, 1, 2)))(*args)
  real = seg > 0
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=2e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5)


def _train_once(model_cfg, host, layout, sizes=None, attention_impl="blockwise"):
  """One SGD step (lr 1: the update is the clipped gradient) on a mesh of `sizes`:
  (loss, grad norm, model metrics, new params)."""
  cfg = config_lib.base_config()
  cfg.loss.chunk_size = 16
  cfg.loss.loss_reduction = "sample"  # per-sample weights: samples cross the shard boundaries
  mesh = _mesh(**sizes) if sizes else make_mesh({}, jax.devices()[:1])
  optimizer = optax.sgd(1.0)
  with jax.set_mesh(mesh):
    model = models.create_model(model_cfg, mesh, param_dtype=jnp.float32,
                                compute_dtype=jnp.float32, remat="full",
                                attention=attention_impl, seed=3)
    model_def, params = split_model(model)
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=cfg.loss,
                              optimizer=optimizer, schedule=optax.constant_schedule(1.0),
                              num_micro=1, batch_layout=layout,
                              batch_sharding=batch_sharding(mesh))
    batch = {k: to_global_array(v, batch_sharding(mesh)) for k, v in host.items()}
    new_state, out = step(state, batch)
  return (float(out["loss"]), float(out["grad_norm"]), jax.tree.map(np.asarray, out["model"]),
          jax.tree.map(np.asarray, nnx.to_pure_dict(new_state.params)))


def _assert_same_step(got, want):
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[2],
               want[2])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got[3],
               want[3])


SPLITS = [dict(sequence=2, fsdp=2), dict(sequence=4), dict(sequence=2, tensor=2)]


def _dense_case():
  model_cfg = presets.qwen3_tiny(vocab_size=train_step_tests.VOCAB, hidden_size=32, head_dim=8)
  host = train_step_tests._batch(rows=4, pack=32, seed=2)
  return model_cfg, host, models.text_batch_layout(4, 32)


def _moe_case():
  model_cfg = presets.qwen3_moe_tiny(vocab_size=train_step_tests.VOCAB)
  host = train_step_tests._batch(rows=4, pack=32, seed=3)
  return model_cfg, host, models.text_batch_layout(4, 32)


def _intern_s1_case():
  model_cfg = intern_s1_tests._tiny()
  return model_cfg, _intern_s1_rows(), intern_s1.batch_layout(model_cfg, 2, 32, max_tiles=3)


@functools.cache
def _unsplit(case):
  """The one-device step of a case, computed once for all the splits compared with it."""
  return _train_once(*case())


@pytest.mark.slow
@pytest.mark.parametrize("sizes", SPLITS)
def test_dense_step_with_rows_split_equals_the_unsplit_step(sizes, monkeypatch):
  # MLP chunks of 8 tokens under remat='full': the split run walks strided chunks of each
  # device's slice, the unsplit one contiguous chunks.
  monkeypatch.setattr(qwen3_model, "MLP_TOKEN_CHUNK", 8)
  _assert_same_step(_train_once(*_dense_case(), sizes), _unsplit(_dense_case))


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [dict(sequence=2, expert=2), dict(sequence=4),
                                   dict(sequence=2, tensor=2)])
def test_moe_step_with_rows_split_equals_the_unsplit_step(sizes):
  want = _unsplit(_moe_case)
  assert want[2]  # the router's metrics (auxiliary losses, expert counts) are compared too
  _assert_same_step(_train_once(*_moe_case(), sizes), want)


def _intern_s1_rows():
  """Two rows of two samples each; image tokens start past the first shard and straddle the
  shard boundaries of sequence=4 (at 8, 16, 24)."""
  rng = np.random.default_rng(4)
  rows = []
  for _ in range(2):
    samples = [intern_s1_tests._sample(rng, 1, text_before=9),
               intern_s1_tests._sample(rng, 2, text_before=3, text_after=3)]
    tiles = [rng.normal(size=(n, intern_s1_tests.TILE, intern_s1_tests.TILE, 3))
             .astype(np.float32) for n in (1, 2)]
    rows.append(intern_s1_tests._pack(samples, tiles, 32, max_tiles=3))
  host = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
  image = host["input_ids"] == intern_s1_tests.IMAGE_TOKEN
  labels = np.roll(host["input_ids"], -1, axis=1)
  labels[:, -1] = -100
  host["labels"] = np.where(image | (host["segment_ids"] == 0), -100, labels).astype(np.int32)
  return host


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [dict(sequence=4), dict(sequence=2, fsdp=2)])
def test_intern_s1_step_with_rows_split_equals_the_unsplit_step(sizes):
  _assert_same_step(_train_once(*_intern_s1_case(), sizes), _unsplit(_intern_s1_case))


def test_sequence_is_a_mesh_axis_the_rules_can_name():
  """A recipe's logical_axis_rules may use `sequence` like any mesh axis, and by default the
  hidden dim of every weight is split over fsdp x sequence."""
  mesh = _mesh(sequence=2, tensor=2)
  rules = merge_rules((("embed", "fsdp"), ("mlp", ("tensor", "sequence")),
                       ("activation_length", None)))
  assert logical_to_spec(("embed", "mlp"), (64, 64), mesh, rules) == P("fsdp",
                                                                       ("tensor", "sequence"))
  assert logical_to_spec(("embed", "mlp"), (64, 64), mesh) == P(("fsdp", "sequence"), "tensor")
  with jax.set_mesh(mesh):
    x = jnp.zeros((2, 8, 4))
    assert attention_lib.sequence_devices(x) == 2
    with axis_rules(rules):  # rows no longer split: attention runs on whole rows
      assert attention_lib.sequence_devices(x) == 1
