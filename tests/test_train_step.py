"""The compiled train step against a naive reference: loss, accumulation, clipping, the NaN guard."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.models import presets
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.sharding import batch_sharding
from jaxtune.train.optim import make_optimizer
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step

VOCAB = 512


def _batch(rows=4, pack=32, seed=0):
  """Packed rows of 2-3 samples each plus padding; labels shifted inside each sample."""
  rng = np.random.default_rng(seed)
  b = {k: np.zeros((rows, pack), np.int32) for k in ("input_ids", "segment_ids", "positions")}
  b["labels"] = np.full((rows, pack), -100, np.int32)
  for r in range(rows):
    lens = rng.integers(5, 12, size=rng.integers(2, 4))
    t = 0
    for s, n in enumerate(lens, start=1):
      ids = rng.integers(0, VOCAB, n)
      b["input_ids"][r, t:t + n] = ids
      b["segment_ids"][r, t:t + n] = s
      b["positions"][r, t:t + n] = np.arange(n)
      b["labels"][r, t + 1:t + n - 1] = ids[2:]  # the first token is a prompt; last has no target
      t += n
  return b


def _setup(mesh_sizes, num_micro, reduction="token", max_grad_norm=1.0, lr=1e-2, optimizer=None,
           schedule=None, skip_grad_norm_threshold=None):
  cfg = config_lib.base_config()
  cfg.model = presets.qwen3_tiny(vocab_size=VOCAB, hidden_size=32, head_dim=8)
  cfg.loss.chunk_size = 16
  cfg.loss.loss_reduction = reduction
  cfg.optim.max_grad_norm = max_grad_norm
  mesh = make_mesh(mesh_sizes, jax.devices()[:int(np.prod(list(mesh_sizes.values())))])
  schedule = schedule or optax.constant_schedule(lr)
  optimizer = optimizer or make_optimizer(cfg.optim)  # unit lr: the step applies the schedule
  with jax.set_mesh(mesh):
    model = models.create_model(cfg.model, mesh, param_dtype=jnp.float32,
                                compute_dtype=jnp.float32, remat="none", attention="xla", seed=3)
    model_def, params = split_model(model)
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=cfg.loss,
                              optimizer=optimizer, schedule=schedule, num_micro=num_micro,
                              batch_layout=models.text_batch_layout(8, 32),
                              batch_sharding=batch_sharding(mesh),
                              skip_grad_norm_threshold=skip_grad_norm_threshold)
  return mesh, model_def.graphdef, state, step, cfg


def _run(mesh, state, step, host):
  with jax.set_mesh(mesh):
    batch = {k: to_global_array(v, batch_sharding(mesh)) for k, v in host.items()}
    return step(state, batch)


def _naive_loss(graphdef, params, host, reduction):
  """Full logits, log-softmax and per-sample weights written out directly."""
  model = nnx.merge(graphdef, params)
  logits = np.asarray(model.logits(model(host["input_ids"], host["positions"],
                                         host["segment_ids"])), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  num = den = 0.0
  for r in range(host["labels"].shape[0]):
    for s in set(host["segment_ids"][r]) - {0}:
      idx = [t for t in range(host["labels"].shape[1])
             if host["segment_ids"][r, t] == s and host["labels"][r, t] >= 0]
      w = {"token": 1.0, "sample": 1.0 / len(idx), "square": len(idx) ** -0.5}[reduction]
      for t in idx:
        num -= w * logp[r, t, host["labels"][r, t]]
        den += w
  return num / den


@pytest.mark.slow
@pytest.mark.parametrize("reduction", ["token", "sample", "square"])
def test_loss_matches_naive_reference(reduction):
  mesh, graphdef, state, step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1,
                                          reduction)
  host = _batch()
  expected = _naive_loss(graphdef, state.params, host, reduction)
  _, out = _run(mesh, state, step, host)
  np.testing.assert_allclose(float(out["loss"]), expected, rtol=1e-5)
  assert int(out["loss_tokens"]) == int((host["labels"] >= 0).sum())
  assert int(out["tokens"]) == int((host["segment_ids"] > 0).sum())


@pytest.mark.slow
def test_accumulation_and_data_parallel_give_the_single_batch_update():
  """Plain SGD, so the update is the (clipped) gradient itself: Adam's first step would turn
  float noise in a near-zero gradient into a move of up to the learning rate."""
  host = _batch(rows=8, seed=1)
  results = []
  for sizes, micro in [({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1),
                       ({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 4),
                       ({"data": 2, "fsdp": 2, "tensor": 1, "expert": 1}, 2),
                       ({"data": 1, "fsdp": 2, "tensor": 2, "expert": 1}, 4)]:
    mesh, _, state, step, _ = _setup(sizes, micro, reduction="sample", lr=1.0,
                                     optimizer=optax.sgd(1.0))
    new_state, out = _run(mesh, state, step, host)
    results.append((float(out["loss"]), float(out["grad_norm"]),
                    jax.tree.map(np.asarray, new_state.params)))
  for loss, norm, params in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
    np.testing.assert_allclose(norm, results[0][1], rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params,
                 results[0][2])


@pytest.mark.slow
def test_grad_norm_is_reported_before_clipping_and_update_is_clipped():
  mesh, _, state, step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1,
                                   max_grad_norm=1e-3, lr=1.0)
  before = jax.tree.map(np.asarray, state.params)
  new_state, out = _run(mesh, state, step, _batch())
  assert float(out["grad_norm"]) > 1e-3  # the raw norm, not the clipped one
  assert int(new_state.step) == 1
  changed = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), new_state.params, before)
  assert max(jax.tree.leaves(changed)) > 0


def test_non_finite_step_is_skipped():
  mesh, _, state, step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1)
  before = jax.tree.map(np.asarray, state.params)
  # A NaN in one parameter makes the loss NaN: the update must not be applied.
  poisoned = jax.tree.map(lambda x: x, state.params)
  leaves, treedef = jax.tree.flatten(poisoned)
  leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
  state = state._replace(params=jax.tree.unflatten(treedef, leaves))
  opt_before = jax.tree.map(np.asarray, state.opt_state)  # the step donates its input
  new_state, out = _run(mesh, state, step, _batch())
  assert bool(out["skipped"]) and bool(out["nonfinite"]) and not np.isfinite(float(out["loss"]))
  assert int(new_state.step) == 1  # the schedule moves on, as XTuner's scheduler does
  after = jax.tree.leaves(jax.tree.map(np.asarray, new_state.params))
  for a, b in zip(after[1:], jax.tree.leaves(before)[1:]):
    np.testing.assert_array_equal(a, b)
  # ... but Adam's state (its count and moments) did not.
  for a, b in zip(jax.tree.leaves(new_state.opt_state), jax.tree.leaves(opt_before)):
    np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.slow
def test_a_gradient_norm_over_the_threshold_skips_the_update_but_not_the_schedule():
  """XTuner's optim.skip_grad_norm_threshold: the update is skipped, the next step runs at the
  next learning rate, and Adam's first real update is the one an unskipped run makes first."""
  schedule = lambda s: 1e-2 * (1.0 + s)  # a rate that shows which step index was used
  mesh, _, state, step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1,
                                   schedule=schedule, skip_grad_norm_threshold=1e-6)
  before = jax.tree.map(np.asarray, state.params)
  new_state, out = _run(mesh, state, step, _batch())
  assert bool(out["skipped"]) and not bool(out["nonfinite"]) and float(out["grad_norm"]) > 1e-6
  assert float(out["lr"]) == pytest.approx(1e-2) and int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, new_state.params), before)

  # Step 1 of a run without the threshold, from the same state, matches the skipped run's
  # step 2 (same params, same Adam state, the lr of index 1).
  mesh, _, fresh, plain_step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1,
                                         schedule=schedule)
  at_step_1 = fresh._replace(step=jax.device_put(np.asarray(new_state.step), fresh.step.sharding))
  want, want_out = _run(mesh, at_step_1, plain_step, _batch(seed=2))
  mesh, _, _, threshold_step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1,
                                         schedule=schedule, skip_grad_norm_threshold=1e6)
  got, got_out = _run(mesh, new_state, threshold_step, _batch(seed=2))
  assert float(got_out["lr"]) == float(want_out["lr"]) == pytest.approx(2e-2)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               got.params, want.params)


@pytest.mark.slow
def test_zero_learning_rate_leaves_params_unchanged():
  """optim.lr = 0 is valid (evaluation-only runs, parity checks): AdamW with weight decay moves
  nothing."""
  mesh, _, state, step, _ = _setup({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, 1, lr=0.0)
  before = jax.tree.map(np.asarray, state.params)
  new_state, out = _run(mesh, state, step, _batch())
  assert not bool(out["skipped"]) and float(out["lr"]) == 0.0 and np.isfinite(float(out["loss"]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new_state.params,
               before)


@pytest.mark.slow
def test_gradient_accumulators_are_sharded_like_the_params():
  """The micro-batch loop carries each float32 gradient sum as the param's own shard (with
  fsdp=4, a quarter of its hidden dim), not a whole copy per device."""
  import re  # pylint: disable=import-outside-toplevel
  mesh, _, state, step, _ = _setup(dict(fsdp=4), num_micro=2)
  host = _batch(rows=8)
  with jax.set_mesh(mesh):
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(mesh))
             for k, v in host.items()}
    hlo = step.lower(state, batch).compile().as_text()
  loop = [line.split(" while(")[0] for line in hlo.splitlines()
          if " while(" in line and 'op_name="jit(train_step)/while"' in line]
  assert len(loop) == 1, loop
  carried = re.findall(r"f32\[([\d,]*)\]", loop[0])
  carried = [tuple(int(d) for d in dims.split(",") if d) for dims in carried]
  shards = [p.addressable_shards[0].data.shape for p in jax.tree.leaves(state.params)]
  assert any(s != p.shape for s, p in zip(shards, jax.tree.leaves(state.params)))
  for shard in set(shards):  # one float32 sum per param, in the param's shard shape
    assert carried.count(shard) >= shards.count(shard), (shard, carried)
