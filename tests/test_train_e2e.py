"""End to end: the embedded default recipe trains, logs contract-4 metrics, checkpoints, and
exports HF weights that transformers loads with the checkpoint's own logits."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from jaxtune import Trainer, models
from jaxtune.parallel.mesh import make_mesh
from jaxtune.recipes.qwen3_mini import get_config

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONTRACT_FIELDS = ("step", "epoch", "loss", "loss_tokens", "tokens", "lr", "grad_norm",
                   "step_time", "tokens_per_sec", "tokens_per_sec_per_device", "mfu")


def _mini(tmp_path, **overrides):
  cfg = get_config()
  cfg.work_dir = str(tmp_path / "work")
  cfg.data.pack_max_length = 256
  cfg.data.sample_max_length = 256
  cfg.progress_bar = False
  cfg.epoch_num = None
  cfg.total_steps = 10
  cfg.lr.warmup_ratio = 2.0  # >= 1: an absolute count of warmup steps
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  cfg = _mini(tmp_path_factory.mktemp("e2e"))
  return cfg, Trainer(cfg).fit()


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_metrics_follow_the_contract_and_loss_falls(finished_run):
  cfg, summary = finished_run
  records = _records(summary["run_dir"])
  assert [r["step"] for r in records] == list(range(1, cfg.total_steps + 1))
  for r in records:
    for field in CONTRACT_FIELDS:
      if field == "mfu":  # no known peak FLOP/s on a CPU: null, not a made-up number
        assert r[field] is None
        continue
      assert isinstance(r[field], (int, float)) and np.isfinite(r[field]), (field, r)
    assert 0 < r["loss_tokens"] < r["tokens"] <= cfg.global_batch_size * cfg.data.pack_max_length
    np.testing.assert_allclose(r["tokens_per_sec"], r["tokens"] / r["step_time"], rtol=1e-6)
    np.testing.assert_allclose(r["tokens_per_sec_per_device"] * jax.device_count(),
                               r["tokens_per_sec"], rtol=1e-6)
  # XTuner's warmup: a linear ramp from 0 over 2 updates, then cosine decay to lr_min.
  np.testing.assert_allclose([r["lr"] for r in records[:3]], [0.0, cfg.optim.lr / 2, cfg.optim.lr],
                             rtol=1e-6)
  assert max(r["lr"] for r in records) <= cfg.optim.lr * (1 + 1e-6)
  first, last = np.mean([r["loss"] for r in records[:2]]), np.mean([r["loss"] for r in records[-2:]])
  assert last < first - 0.5, (first, last)


def test_run_directory_holds_config_checkpoint_and_latest_export(finished_run):
  cfg, summary = finished_run
  run_dir = summary["run_dir"]
  with open(os.path.join(run_dir, "config.json")) as f:
    saved = json.load(f)
  assert saved["total_steps"] == cfg.total_steps and saved["model"]["hidden_size"] == 64
  assert os.path.isdir(os.path.join(run_dir, "checkpoints", str(cfg.total_steps)))
  latest = os.path.join(run_dir, "hf-latest")
  assert os.path.realpath(latest) == os.path.realpath(os.path.join(run_dir, f"hf-{cfg.total_steps}"))
  for name in ("config.json", "model.safetensors.index.json", "tokenizer.json"):
    assert os.path.isfile(os.path.join(latest, name)), name
  assert glob.glob(os.path.join(latest, "model-*.safetensors"))


def _checkpoint_params(run_dir, step):
  """The parameter arrays of the orbax checkpoint, read with orbax alone (no jaxtune code)."""
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(run_dir, "checkpoints", str(step), "state"))
  params = restored["params"] if "params" in restored else restored[0]

  def unwrap(node):  # nnx variables are stored as {"value": array}
    if isinstance(node, dict):
      return unwrap(node["value"]) if set(node) == {"value"} else {k: unwrap(v) for k, v in
                                                                   node.items()}
    return np.asarray(node)
  return unwrap(params)


def test_hf_export_loads_in_transformers_with_the_checkpoints_logits(finished_run):
  cfg, summary = finished_run
  hf_model = AutoModelForCausalLM.from_pretrained(os.path.join(summary["run_dir"], "hf-latest"),
                                                  dtype=torch.float32).eval()
  ids = np.array([[151644, 872, 198, 17, 10, 17, 30, 151645, 198, 151644, 77091, 198]], np.int32)
  with torch.no_grad():
    reference = hf_model(torch.from_numpy(ids).long()).logits.numpy()

  mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}, jax.devices()[:1])
  with jax.set_mesh(mesh):
    model = models.create_model(cfg.model, mesh, param_dtype="float32", compute_dtype="float32",
                                remat="none", attention="xla")
    graphdef, params = nnx.split(model)
    params.replace_by_pure_dict(_checkpoint_params(summary["run_dir"], cfg.total_steps))
    model = nnx.merge(graphdef, params)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    logits = np.asarray(model.logits(model(ids, positions, np.ones_like(ids))))
  np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)


def test_cli_runs_the_default_recipe(tmp_path):
  """The README's main command, shortened: `python -m jaxtune.main` with overrides."""
  proc = subprocess.run(
      [sys.executable, "-m", "jaxtune.main", f"--config={REPO}/configs/sft_qwen3_mini.py",
       f"--config.work_dir={tmp_path}", "--config.total_steps=3", "--config.epoch_num=0",
       "--config.data.pack_max_length=256", "--config.data.sample_max_length=256",
       "--config.progress_bar=False"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path,
      env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout[proc.stdout.index("{"):])
  assert summary["steps"] == 3
  assert len(_records(summary["run_dir"])) == 3


def test_rows_split_over_the_sequence_axis_train_like_whole_rows(tmp_path):
  """The trainer end to end with mesh.sequence=2 (x fsdp=2 on the 4 test devices): the same
  losses and gradient norms, step by step, as whole rows on fsdp=2 x tensor=2 (the same two
  data-parallel ranks, so the same rows in each micro-batch)."""
  runs = {}
  for name, mesh in (("whole", dict(fsdp=2, tensor=2)), ("split", dict(fsdp=2, sequence=2))):
    cfg = _mini(tmp_path / name, total_steps=3, compute_dtype="float32")
    cfg.mesh.update(mesh)
    runs[name] = _records(Trainer(cfg).fit()["run_dir"])
  for key in ("loss", "grad_norm", "tokens", "loss_tokens"):
    np.testing.assert_allclose([r[key] for r in runs["split"]], [r[key] for r in runs["whole"]],
                               rtol=2e-5)
