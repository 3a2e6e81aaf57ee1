"""The non-finite guard in a real run: a model whose embedding row for "~" is NaN gives a NaN
loss exactly on the steps whose batch holds a "~"; those steps are skipped (logged, counted,
null in metrics.jsonl) and the run goes on; too many in a row stop it with a message."""

import glob
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.config import dataset
from jaxtune.data.pipeline import SFTData
from jaxtune.models import export_hf
from jaxtune.parallel.mesh import make_mesh
from jaxtune.train.nonfinite import NonFiniteError
from jaxtune.train.trainer import Trainer
from test_trainer_utils import read_metrics, tiny_config, use_compile_cache, write_chats

TILDE = ord("~")  # byte-level tokenizer: the id of "~" is its byte


def _config_with_nan_row(root, marked):
  cfg = tiny_config(root)
  cfg.data.datasets = [dataset("chats", write_chats(os.path.join(root, "marked.jsonl"), 96, 0,
                                                    marker="~", marked=marked))]
  out = os.path.join(root, "hf-nan")
  mesh = make_mesh(config_lib.mesh_shape(config_lib.validate(cfg), jax.device_count()))
  with jax.set_mesh(mesh):
    model = models.create_model(cfg.model, mesh, param_dtype="float32", compute_dtype="float32",
                                remat="none", seed=cfg.seed)
    export_hf(model, cfg.model, out, dtype="float32", tokenizer_path=cfg.tokenizer_path)
  (path,) = glob.glob(os.path.join(out, "*.safetensors"))
  tensors = load_file(path)
  tensors["model.embed_tokens.weight"][TILDE] = np.nan
  save_file(tensors, path, metadata={"format": "pt"})
  cfg.load_from = out
  return cfg


def _steps_with_tilde(cfg):
  """1-based steps of the first epoch whose batch holds a "~", read from the data alone."""
  data = SFTData(cfg.data, cfg.tokenizer_path, global_batch_size=cfg.global_batch_size)
  return [k + 1 for k, batch in enumerate(data.batches(0)) if (batch["input_ids"] == TILDE).any()]


def test_nonfinite_steps_are_skipped_counted_and_the_run_continues(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = _config_with_nan_row(str(tmp_path), marked=(3, 50, 77))
  expected = [s for s in _steps_with_tilde(cfg) if s <= cfg.total_steps]
  assert 0 < len(expected) < cfg.total_steps  # the data set-up does what the test needs
  summary = Trainer(cfg).fit()

  records = read_metrics(summary["run_dir"])
  assert [r["step"] for r in records if r["skipped"]] == expected
  for r in records:
    finite = r["loss"] is not None and np.isfinite(r["loss"])
    assert finite != r["skipped"], r  # null in the JSON where not finite
  assert summary["skipped_steps"] == len(expected) and summary["steps"] == cfg.total_steps
  with open(os.path.join(summary["run_dir"], "train.log"), encoding="utf-8") as f:
    text = f.read()
  assert f"step {expected[0]}: loss nan" in text and "update skipped" in text


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  cfg = _config_with_nan_row(str(tmp_path), marked=tuple(range(96)))
  cfg.max_consecutive_nonfinite = 2
  with pytest.raises(NonFiniteError, match="2 steps in a row .* non-finite"):
    Trainer(cfg).fit()
  (run_dir,) = glob.glob(os.path.join(cfg.work_dir, "*"))
  assert [(r["step"], r["skipped"], r["loss"]) for r in read_metrics(run_dir)] == [
      (1, True, None), (2, True, None)]
  assert not os.path.exists(os.path.join(run_dir, "checkpoints", "2"))  # nothing saved
