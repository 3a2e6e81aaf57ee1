"""LoRA runs through the Trainer: a tiny Qwen3 from an HF directory writes the merged export
`hf-<step>/` and the PEFT adapter `adapter-<step>/` (+ `adapter-latest`) on the HF schedule;
the base is untouched; checkpoints hold the adapters only; SIGKILL + auto_resume continues with
the steps of an uninterrupted run."""

import json
import os
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from safetensors.numpy import load_file

from jaxtune import models
from jaxtune.models import lora
from jaxtune.config import to_json
from jaxtune.ops import quant
from jaxtune.parallel import make_mesh
from jaxtune.train.trainer import Trainer
from test_resume import _KILL_DRIVER
from test_trainer_utils import (exact, python, read_metrics, resumed_config, subprocess_env,
                                tiny_config, use_compile_cache)

RANK, ALPHA = 4, 8.0
_RUN: dict = {}


def _lora_recipe(root: str, base_dir: str, **overrides):
  cfg = tiny_config(root, load_from=base_dir, hf_interval=2, hf_max_keep=2, **overrides)
  cfg.tokenizer_path = base_dir
  cfg.lora.rank, cfg.lora.alpha = RANK, ALPHA
  cfg.optim.lr = 1e-2
  return cfg


def _base(root: str) -> str:
  """A random tiny Qwen3 written as an HF directory (float32), with the byte tokenizer."""
  cfg = tiny_config(root)
  model = models.create_model(cfg.model, make_mesh({}, jax.devices()[:1]), param_dtype="float32",
                              compute_dtype="float32", seed=3)
  return models.export_hf(model, cfg.model, os.path.join(root, "base"), dtype="float32",
                          tokenizer_path=cfg.tokenizer_path)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """(recipe, summary, base dir) of one uninterrupted 6-step LoRA run."""
  if not _RUN:
    use_compile_cache(tmp_path_factory)
    root = str(tmp_path_factory.mktemp("lora"))
    base_dir = _base(root)
    cfg = _lora_recipe(root, base_dir)
    _RUN.update(cfg=cfg, summary=Trainer(cfg).fit(), base=base_dir)
  return _RUN["cfg"], _RUN["summary"], _RUN["base"]


def _tensors(directory: str) -> dict:
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  return out


@pytest.mark.slow
def test_lora_run_writes_merged_and_adapter_exports_and_keeps_the_base(lora_run):
  cfg, summary, base_dir = lora_run
  run_dir = summary["run_dir"]
  losses = [r["loss"] for r in read_metrics(run_dir)]
  assert len(losses) == 6 and losses[-1] < losses[0]
  names = sorted(os.listdir(run_dir))
  assert [n for n in names if n.startswith("hf-")] == ["hf-4", "hf-6", "hf-latest"]
  assert [n for n in names if n.startswith("adapter-")] == ["adapter-4", "adapter-6",
                                                             "adapter-latest"]
  assert os.readlink(os.path.join(run_dir, "adapter-latest")) == "adapter-6"
  adapter = os.path.join(run_dir, "adapter-6")
  with open(os.path.join(adapter, "adapter_config.json")) as f:
    config = json.load(f)
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, 8)
  assert config["base_model_name_or_path"] == base_dir
  adapters = load_file(os.path.join(adapter, "adapter_model.safetensors"))
  assert len(adapters) == 2 * 7 * cfg.model.num_hidden_layers
  assert all(np.abs(v).max() > 0 for k, v in adapters.items() if "lora_B" in k)  # it trained

  # The merged export: the base's layout; what LoRA does not target, the base's bits.
  base, merged = _tensors(base_dir), _tensors(os.path.join(run_dir, "hf-6"))
  assert sorted(merged) == sorted(base)
  for name, value in base.items():
    targeted = any(f".{p}." in name for p in ("q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"))
    assert (merged[name].tobytes() == value.tobytes()) != targeted, name


@pytest.mark.slow
def test_lora_checkpoint_holds_the_adapters_and_names_the_base(lora_run):
  _, summary, base_dir = lora_run
  step_dir = summary["checkpoint"]
  with open(os.path.join(step_dir, "progress", "metadata")) as f:
    progress = json.load(f)
  assert progress["base"]["load_from"] == base_dir
  state_files = json.dumps(sorted(os.listdir(os.path.join(step_dir, "state"))))
  with open(os.path.join(step_dir, "state", "_METADATA")) as f:
    metadata = f.read()
  assert "lora_a" in metadata and "lora_b" in metadata, state_files
  assert "embed_tokens" not in metadata and "norm" not in metadata  # no frozen base


@pytest.mark.slow
def test_exported_adapter_loads_in_peft_with_the_merged_logits(lora_run):
  peft = pytest.importorskip("peft")
  torch = pytest.importorskip("torch")
  import transformers  # pylint: disable=import-outside-toplevel
  _, summary, base_dir = lora_run
  run_dir = summary["run_dir"]
  ids = torch.arange(3, 40).long()[None]
  base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
  loaded = peft.PeftModel.from_pretrained(base, os.path.join(run_dir, "adapter-latest")).eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.join(run_dir, "hf-latest")).eval()
  with torch.no_grad():
    np.testing.assert_allclose(merged(ids).logits.numpy(), loaded(ids).logits.numpy(),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_sigkill_then_auto_resume_of_a_lora_run_is_exact(lora_run, tmp_path):
  ref_cfg, ref_summary, _ = lora_run
  cfg = resumed_config(ref_cfg, str(tmp_path / "work"))
  proc = subprocess.run([python(), "-c", _KILL_DRIVER, to_json(cfg), "4"], cwd=tmp_path,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  cfg = ConfigDict(cfg.to_dict())
  cfg.auto_resume = True
  summary = Trainer(cfg).fit()
  run_dir = summary["run_dir"]
  assert summary["steps"] == 6 and summary["steps_this_session"] == 2
  assert exact(read_metrics(run_dir)) == exact(read_metrics(ref_summary["run_dir"]))
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    text = f.read()
  assert f"resumed from {run_dir}/checkpoints/4" in text and "the base rebuilt from" in text
  # The final merged export equals the uninterrupted run's.
  final, reference = (_tensors(os.path.join(d, "hf-6")) for d in (run_dir,
                                                                    ref_summary["run_dir"]))
  for name, value in reference.items():
    np.testing.assert_array_equal(final[name], value, err_msg=name)


@pytest.mark.slow
def test_qlora_nf4_run_trains_exports_the_dequantised_merge_and_resumes(lora_run, tmp_path):
  """lora.quantize_base='nf4': the run trains, its checkpoint holds no base (the codes are
  rebuilt from load_from), hf-6 is the dequantised base + the adapters (untargeted tensors the
  base's bits), and SIGKILL + auto_resume continues exactly."""
  ref_cfg, _, base_dir = lora_run
  cfg = resumed_config(ref_cfg, str(tmp_path / "work"), hf_interval=6)
  cfg.lora.quantize_base = "nf4"
  summary = Trainer(cfg).fit()
  losses = [r["loss"] for r in read_metrics(summary["run_dir"])]
  assert losses[-1] < losses[0]
  with open(os.path.join(summary["checkpoint"], "state", "_METADATA")) as f:
    metadata = f.read()
  assert "lora_a" in metadata and "_codes" not in metadata
  base, merged = _tensors(base_dir), _tensors(os.path.join(summary["run_dir"], "hf-6"))
  adapter = load_file(os.path.join(summary["run_dir"], "adapter-6", "adapter_model.safetensors"))
  assert sorted(merged) == sorted(base)
  for name, value in base.items():
    if "_proj" not in name:
      assert merged[name].tobytes() == value.tobytes(), name
      continue
    kernel = jnp.asarray(value.T)  # ours [in, out]
    q = quant.quantize(kernel, "nf4", quant.block_size_for(kernel.shape[0]))
    dequantised = np.asarray(quant.dequantize(q, jnp.float32)).T
    module = "base_model.model." + name.removesuffix(".weight")
    delta = adapter[module + ".lora_B.weight"] @ adapter[module + ".lora_A.weight"]
    np.testing.assert_allclose(merged[name], dequantised + ALPHA / RANK * delta, atol=1e-5,
                               err_msg=name)
    assert np.abs(dequantised - value).max() > 0  # the export is of the quantised base

  # SIGKILL after step 4's checkpoint + auto_resume: the base quantised again, the same steps.
  killed = resumed_config(cfg, str(tmp_path / "killed"))
  proc = subprocess.run([python(), "-c", _KILL_DRIVER, to_json(killed), "4"], cwd=tmp_path,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  killed = ConfigDict(killed.to_dict())
  killed.auto_resume = True
  resumed = Trainer(killed).fit()
  assert resumed["steps_this_session"] == 2
  assert exact(read_metrics(resumed["run_dir"])) == exact(read_metrics(summary["run_dir"]))


def _mini_lora(tmp_path, steps: int):
  from jaxtune.recipes import sft_mini_lora  # pylint: disable=import-outside-toplevel
  cfg = sft_mini_lora.get_config()
  cfg.work_dir = str(tmp_path / "work")
  cfg.progress_bar, cfg.epoch_num, cfg.total_steps = False, None, steps
  cfg.eval_datasets, cfg.eval_interval = [], -1
  cfg.global_batch_size, cfg.data.pack_max_length = 4, 1024
  return cfg


def test_sft_mini_lora_recipe_is_the_seed_recipe_with_lora():
  from jaxtune.recipes import sft_mini, sft_mini_lora  # pylint: disable=import-outside-toplevel
  real, seed = (m.get_config("load_from=/nonexistent/Intern-S1-mini")
                for m in (sft_mini_lora, sft_mini))
  assert (real.lora.rank, real.lora.alpha, real.optim.lr) == (16, 32.0, 1e-4)
  assert real.lora.targets == seed.lora.targets  # every projection of the language model
  assert real.model.freeze_vision and real.model.freeze_projector
  assert real.data.to_dict() == seed.data.to_dict()
  assert sft_mini_lora.get_config().model.type == "intern_s1"


@pytest.mark.slow
def test_sft_mini_lora_plans_the_adapters_only_and_trains(tmp_path):
  """The planner's figures are the LoRA model's: the adapters train (optimizer state for them
  alone), the rest is frozen; the miniature trains two steps, the vision tower and projector
  and every untargeted tensor exported as the base's."""
  from jaxtune.plan import format_report, plan  # pylint: disable=import-outside-toplevel
  cfg = _mini_lora(tmp_path, steps=2)
  report = plan(cfg, num_devices=1)
  family = models.family(cfg.model.type)
  base = models.param_count(cfg.model)
  shapes = lora._param_shapes(family, cfg.model)  # pylint: disable=protected-access
  adapted = lora.lora_targets(family, cfg.model, tuple(cfg.lora.targets))
  expected = sum(int(np.prod(shapes[p][:-1])) * 16 + int(np.prod(shapes[p][:-2])) * 16
                 * shapes[p][-1] for p in adapted)
  assert report["trainable_param_count"] == expected
  assert report["param_count"] == base + expected
  assert report["frozen_param_count"] == base
  assert report["opt_state_bytes"] == 2 * 4 * expected + 4
  assert report["lora"]["adapted"] == len(adapted) == 7
  assert "trainable" in format_report(report) and "LoRA: rank 16" in format_report(report)

  summary = Trainer(cfg).fit()
  run_dir = summary["run_dir"]
  assert os.path.isdir(os.path.join(run_dir, "adapter-2"))
  with open(os.path.join(run_dir, "adapter-2", "adapter_config.json")) as f:
    targets = json.load(f)["target_modules"]
  # The vision tower has q_proj etc. too: PEFT gets a regex of the language model's modules.
  import re  # pylint: disable=import-outside-toplevel
  assert isinstance(targets, str)
  assert re.fullmatch(targets, "model.language_model.layers.1.mlp.down_proj")
  assert re.fullmatch(targets, "model.language_model.layers.0.self_attn.q_proj")
  assert not any(re.fullmatch(targets, n.removesuffix(".weight"))
                 for n in _tensors(os.path.join(run_dir, "hf-2")) if "language_model" not in n)
  # The random base the run started from, exported without adapters.
  model = models.create_model(cfg.model, make_mesh({}, jax.devices()[:1]),
                              param_dtype="float32", compute_dtype="float32", seed=cfg.seed)
  start = models.export_hf(model, cfg.model, str(tmp_path / "start"), dtype="float32")
  before, after = _tensors(start), _tensors(os.path.join(run_dir, "hf-2"))
  assert sorted(before) == sorted(after)
  for name, value in before.items():
    targeted = ".language_model.layers." in name and "_proj." in name
    assert (after[name].tobytes() == value.tobytes()) != targeted, name


@pytest.mark.slow
def test_init_from_an_exported_adapter_starts_at_the_merged_models_loss(lora_run, tmp_path):
  """lora.init_from=adapter-6 on the base: step 1's loss (taken before the update) equals that
  of a full fine-tune starting from the merged hf-6 on the same batch."""
  ref_cfg, ref_summary, _ = lora_run
  run_dir = ref_summary["run_dir"]
  cfg = resumed_config(ref_cfg, str(tmp_path / "lora"), total_steps=1, checkpoint_interval=-1)
  cfg.lora.init_from = os.path.join(run_dir, "adapter-6")
  lora_loss = read_metrics(Trainer(cfg).fit()["run_dir"])[0]["loss"]
  full = resumed_config(ref_cfg, str(tmp_path / "full"), total_steps=1, checkpoint_interval=-1,
                        load_from=os.path.join(run_dir, "hf-6"))
  full.lora.rank = 0
  full_loss = read_metrics(Trainer(full).fit()["run_dir"])[0]["loss"]
  first_loss = read_metrics(run_dir)[0]["loss"]
  np.testing.assert_allclose(lora_loss, full_loss, rtol=1e-5)
  assert lora_loss < first_loss  # the adapters' training is there
