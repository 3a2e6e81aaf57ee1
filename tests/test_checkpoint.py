"""Checkpointer: complete-or-ignored saves, skipping damaged checkpoints, weights-only reads,
max_to_keep pruning, and locating `resume_from` paths. No training: a tiny state saved as is."""

import gc
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from jaxtune import models
from jaxtune.config import base_config
from jaxtune.models import presets
from jaxtune.parallel.mesh import make_mesh
from jaxtune.train.checkpoint import (CheckpointError, Checkpointer, checkpoint_location,
                                      complete_steps)
from jaxtune.train.optim import make_optimizer
from jaxtune.train.state import abstract_train_state, new_train_state, split_model

# A failed Orbax read leaves an un-awaited coroutine behind (harmless); it is reported when
# garbage-collected, so the tests that provoke one collect before they end.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]

CFG = presets.qwen3_tiny(vocab_size=64, hidden_size=16, intermediate_size=32, head_dim=4,
                         num_attention_heads=2, num_key_value_heads=1)
MESH_SIZES = {"fsdp": 2, "tensor": 2}


@pytest.fixture(scope="module")
def setup():
  """(mesh, optimizer, abstract state, states keyed by step: params shifted by the step)."""
  mesh = make_mesh(MESH_SIZES)
  optimizer = make_optimizer(base_config().optim)
  with jax.set_mesh(mesh):
    model_def, params = split_model(models.create_model(CFG, mesh, seed=0))
    abstract = abstract_train_state(split_model(models.abstract_model(CFG, mesh))[1], optimizer,
                                    mesh, model_def)
    states = {}
    for step in (2, 4, 6):
      shifted = jax.tree.map(lambda p, s=step: p + s, params)
      states[step] = new_train_state(shifted, optimizer, mesh, model_def)._replace(
          step=jax.numpy.asarray(step, jax.numpy.int32))
  return mesh, optimizer, abstract, states


def _save_all(directory, states, max_to_keep=-1):
  ckpt = Checkpointer(directory, max_to_keep=max_to_keep)
  for step, state in states.items():
    ckpt.save(step, state, {"step": step}, {"note": "test"})
  ckpt.close()


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_params_equal(restored, state):
  for a, b in zip(_leaves(restored), _leaves(state.params)):
    np.testing.assert_array_equal(a, b)


def test_round_trip_keeps_values_shardings_and_json(setup, tmp_path):
  mesh, _, abstract, states = setup
  _save_all(tmp_path / "ckpt", {4: states[4]})
  with jax.set_mesh(mesh):
    ckpt = Checkpointer(tmp_path / "ckpt", read_only=True)
    restored = ckpt.restore(4, abstract)
    ckpt.close()
  _assert_params_equal(restored.params, states[4])
  for a, b in zip(_leaves(restored.optimizer["opt_state"]), _leaves(states[4].opt_state)):
    np.testing.assert_array_equal(a, b)
  assert int(restored.optimizer["step"]) == 4
  assert restored.progress == {"step": 4} and restored.config == {"note": "test"}
  for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(abstract.params)):
    assert got.sharding == want.sharding


def test_max_to_keep_prunes_the_oldest(setup, tmp_path):
  _save_all(tmp_path / "ckpt", setup[3], max_to_keep=2)
  assert complete_steps(str(tmp_path / "ckpt")) == [4, 6]


def test_weights_only_reads_the_params_and_progress_only(setup, tmp_path):
  mesh, _, abstract, states = setup
  _save_all(tmp_path / "ckpt", {6: states[6]})
  shutil.rmtree(tmp_path / "ckpt" / "6" / "optimizer")  # proves it is never read
  with jax.set_mesh(mesh):
    ckpt = Checkpointer(tmp_path / "ckpt", read_only=True)
    restored = ckpt.restore_latest(abstract, weights_only=True)
    ckpt.close()
  assert restored.step == 6 and restored.optimizer is None and restored.config is None
  _assert_params_equal(restored.params, states[6])


def test_damaged_newest_is_skipped_with_a_warning_and_moved_aside(setup, tmp_path, caplog):
  mesh, _, abstract, states = setup
  directory = tmp_path / "run" / "checkpoints"
  _save_all(directory, states)
  shutil.rmtree(directory / "6" / "state" / "d")               # array data lost
  os.makedirs(directory / "8.orbax-checkpoint-tmp" / "state")  # a crash during a save
  with jax.set_mesh(mesh), caplog.at_level(logging.WARNING, logger="jaxtune"):
    ckpt = Checkpointer(directory, max_to_keep=-1)
    assert ckpt.all_steps() == [2, 4, 6]                       # the temporary one is ignored
    restored = ckpt.restore_latest(abstract, quarantine=True)
    assert restored.step == 4 and restored.progress == {"step": 4}
    _assert_params_equal(restored.params, states[4])
    assert ckpt.all_steps() == [2, 4]
    ckpt.save(6, states[6], {"step": 6}, {})                   # the step can be written again
    ckpt.close()
  assert "checkpoint" in caplog.text and "/6 cannot be restored" in caplog.text
  assert os.path.isdir(tmp_path / "run" / "checkpoints-skipped" / "6")
  assert sorted(os.listdir(directory)) == ["2", "4", "6"]      # leftover tmp dir cleaned up
  gc.collect()


def test_nothing_restorable_is_an_error_not_a_fresh_start(setup, tmp_path):
  mesh, optimizer, _, states = setup
  _save_all(tmp_path / "ckpt", {2: states[2]})
  other = presets.qwen3_tiny(vocab_size=64, hidden_size=24, intermediate_size=32, head_dim=4,
                             num_attention_heads=2, num_key_value_heads=1)
  with jax.set_mesh(mesh):
    wrong_def, wrong_params = split_model(models.abstract_model(other, mesh))
    wrong = abstract_train_state(wrong_params, optimizer, mesh, wrong_def)
    ckpt = Checkpointer(tmp_path / "ckpt", read_only=True)
    with pytest.raises(CheckpointError, match="no checkpoint .* can be restored"):
      ckpt.restore_latest(wrong, quarantine=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 3"):
      ckpt.restore_latest(wrong, step=3)
    ckpt.close()
  assert complete_steps(str(tmp_path / "ckpt")) == [2]         # nothing moved or deleted
  gc.collect()


def test_checkpoint_location_accepts_step_checkpoints_and_run_dirs(tmp_path):
  run = tmp_path / "run"
  os.makedirs(run / "checkpoints" / "12")
  assert checkpoint_location(str(run / "checkpoints" / "12")) == (str(run / "checkpoints"), 12)
  assert checkpoint_location(str(run / "checkpoints")) == (str(run / "checkpoints"), None)
  assert checkpoint_location(str(run)) == (str(run / "checkpoints"), None)
