"""The production numerics: remat policies, bfloat16 optimizer state, and a trainer run on
bf16 + remat='full' + attention='auto' (every other trainer test runs float32 without remat)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.models import presets, qwen3
from jaxtune.parallel.mesh import make_mesh
from jaxtune.parallel.sharding import batch_sharding
from jaxtune.train.optim import make_optimizer
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import abstract_train_state, new_train_state, split_model
from jaxtune.train.step import compile_train_step
from jaxtune.train.trainer import Trainer
from test_trainer_utils import read_metrics, tiny_config

pytestmark = pytest.mark.slow

POLICIES = ("none", "dots", "save_attention", "offload", "full")


def _one_device_mesh():
  return make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:1])


def _text_batch(rows: int, length: int, vocab: int, seed: int = 0) -> dict:
  ids = np.random.default_rng(seed).integers(0, vocab, (rows, length)).astype(np.int32)
  return dict(input_ids=ids, positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
              segment_ids=np.ones((rows, length), np.int32))


def test_remat_names_are_the_configs_choices():
  assert set(config_lib._CHOICES["remat"]) == set(qwen3.REMAT)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="remat must be one of"):
    qwen3.check_remat("selective")


def test_remat_policies_keep_values_and_gradients_and_order_memory():
  """Every policy computes the same function; what differs is what the backward pass keeps:
  XLA's temporaries order none > dots, save_attention > full (offload on a CPU: the host is
  the device, so it counts like dots)."""
  cfg = presets.qwen3_tiny(vocab_size=256, num_hidden_layers=4, tie_word_embeddings=False)
  mesh = _one_device_mesh()
  batch = _text_batch(2, 256, 256)
  results, temps = {}, {}
  with jax.set_mesh(mesh):
    _, params = split_model(models.create_model(cfg, mesh, param_dtype="float32",
                                                compute_dtype="float32", remat="none",
                                                attention="blockwise", seed=0))
    for remat in POLICIES:
      model_def, _ = split_model(models.abstract_model(
          cfg, mesh, param_dtype="float32", compute_dtype="float32", remat=remat,
          attention="blockwise"))

      def loss(p, b, model_def=model_def):
        model = model_def.merge(p)
        return jnp.mean(jnp.square(model.logits(model.forward(b).hidden)))

      compiled = jax.jit(jax.value_and_grad(loss)).lower(params, batch).compile()
      temps[remat] = compiled.memory_analysis().temp_size_in_bytes
      results[remat] = compiled(params, batch)
  value, grads = results["none"]
  for remat in POLICIES[1:]:
    other_value, other_grads = results[remat]
    assert float(other_value) == float(value), remat
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-8,
                                 err_msg=remat)
  assert temps["none"] > temps["dots"] > temps["full"], temps
  assert temps["none"] > temps["save_attention"] > temps["full"], temps
  assert temps["offload"] <= temps["dots"], temps


def _optim_cfg(state_dtype: str) -> ConfigDict:
  cfg = config_lib.base_config().optim
  cfg.state_dtype = state_dtype
  return cfg


def test_bfloat16_optimizer_state_halves_and_tracks_float32():
  cfg = config_lib.base_config()
  cfg.model = presets.qwen3_tiny(vocab_size=512, hidden_size=32, head_dim=8)
  cfg.loss.chunk_size = 64
  mesh = _one_device_mesh()
  host = _text_batch(4, 64, 512, seed=1)
  host["labels"] = np.roll(host["input_ids"], -1, axis=1)
  losses, state_bytes = {}, {}
  with jax.set_mesh(mesh):
    batch = {k: to_global_array(v, batch_sharding(mesh)) for k, v in host.items()}
    for dtype in ("float32", "bfloat16"):
      # The same initial params each time (the step donates its state).
      model_def, params = split_model(models.create_model(
          cfg.model, mesh, param_dtype="float32", compute_dtype="float32", remat="none",
          attention="xla", seed=3))
      optimizer = make_optimizer(_optim_cfg(dtype))
      abstract = abstract_train_state(params, optimizer, mesh, model_def)
      moments = [x for x in jax.tree.leaves(abstract.opt_state) if x.ndim > 0]
      assert {x.dtype for x in moments} == {jnp.dtype(dtype)}
      state_bytes[dtype] = sum(math.prod(x.shape) * x.dtype.itemsize for x in moments)
      state = new_train_state(params, optimizer, mesh, model_def)
      step = compile_train_step(state, model_def=model_def, loss_cfg=cfg.loss,
                                optimizer=optimizer, schedule=optax.constant_schedule(3e-3),
                                num_micro=1, batch_layout=models.text_batch_layout(4, 64),
                                batch_sharding=batch_sharding(mesh))
      losses[dtype] = []
      for _ in range(6):
        state, out = step(state, batch)
        losses[dtype].append(float(out["loss"]))
  assert state_bytes["bfloat16"] * 2 == state_bytes["float32"]
  fp32, bf16 = np.array(losses["float32"]), np.array(losses["bfloat16"])
  assert fp32[-1] < fp32[0] - 0.1 and bf16[-1] < bf16[0] - 0.1, losses
  np.testing.assert_allclose(bf16, fp32, rtol=1e-3)  # seen: 6e-5


def _records(root, **overrides):
  summary = Trainer(tiny_config(str(root), checkpoint_interval=-1, **overrides)).fit()
  return read_metrics(summary["run_dir"])


def test_trainer_runs_bf16_with_remat_and_auto_attention(tmp_path):
  """The production settings end to end: finite metrics, a falling loss, and step 1's loss
  within bf16's tolerance of the float32 / remat='none' run's on the same batch."""
  records = _records(tmp_path / "bf16", compute_dtype="bfloat16", remat="full",
                          attention="auto", total_steps=5)
  reference = _records(tmp_path / "fp32", compute_dtype="float32", remat="none",
                            attention="auto", total_steps=1)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  for r in records:
    for field in ("loss", "grad_norm", "lr", "tokens_per_sec"):
      assert np.isfinite(r[field]), (field, r)
    assert not r["skipped"] and not r["nonfinite"]
  assert records[-1]["loss"] < records[0]["loss"] - 0.1, [r["loss"] for r in records]
  assert records[0]["tokens"] == reference[0]["tokens"]  # the same first batch
  # Seen: 5e-6 (loss) and 1e-3 (grad norm) relative.
  np.testing.assert_allclose(records[0]["loss"], reference[0]["loss"], rtol=2e-3)
  np.testing.assert_allclose(records[0]["grad_norm"], reference[0]["grad_norm"], rtol=2e-2)
