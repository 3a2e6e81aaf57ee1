"""The memory planner (`python -m jaxtune.plan`): the trainer's step compiled from abstract
state, with no data files, tokenizer or weights, and figures that add up."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxtune import models
from jaxtune.config import ConfigError, base_config
from jaxtune.models import presets
from jaxtune.plan import GIB, format_report, plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("params_bytes", "opt_state_bytes", "batch_bytes", "other_argument_bytes", "temp_bytes",
         "unaliased_output_bytes")
RECIPE = '''
from jaxtune.config import base_config
from jaxtune.models import presets


def get_config(arg=None):
  c = base_config()   # no datasets, no tokenizer: the planner needs neither
  c.model = presets.qwen3_tiny()
  c.data.pack_max_length = c.data.sample_max_length = 256
  c.global_batch_size = 8
  c.total_steps = 1
  c.remat = "full"
  return c
'''


def _tiny(**model_overrides):
  c = base_config()  # data.datasets empty and tokenizer_path unset: stood in for
  c.model = presets.qwen3_tiny(**model_overrides)
  c.data.pack_max_length = c.data.sample_max_length = 256
  c.global_batch_size = 8
  c.total_steps = 1
  return c


@pytest.fixture(scope="module")
def cli_8_devices(tmp_path_factory):
  """The 8-device CLI run, started first so it compiles while the in-process tests run."""
  recipe = tmp_path_factory.mktemp("plan") / "tiny_recipe.py"
  recipe.write_text(RECIPE)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
  proc = subprocess.Popen([sys.executable, "-m", "jaxtune.plan", f"--config={recipe}",
                           "--devices=8", "--device_memory_gib=100", "--json"], env=env, cwd=REPO, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  yield proc
  if proc.poll() is None:
    proc.kill()
    proc.communicate()


@pytest.fixture(scope="module")
def one_device(cli_8_devices):  # pylint: disable=unused-argument,redefined-outer-name
  return plan(_tiny(), num_devices=1)


@pytest.mark.slow
def test_parts_add_up_and_match_the_model(one_device):
  report = one_device
  count = models.param_count(presets.qwen3_tiny())
  assert report["param_count"] == report["trainable_param_count"] == count
  assert report["params_bytes"] == count * 4  # float32 master weights, one device holds all
  assert report["opt_state_bytes"] == 2 * count * 4 + 4  # AdamW's mu and nu, plus its count
  assert report["batch_bytes"] == 4 * 8 * 256 * 4  # four int32 [8, 256] arrays
  assert report["per_device_bytes"] == sum(report[k] for k in PARTS)
  assert report["per_device_gib"] == pytest.approx(report["per_device_bytes"] / GIB, rel=1e-12)
  assert report["temp_bytes"] > 0 and report["other_argument_bytes"] >= 0
  assert report["tokens_per_step"] == 8 * 256 and report["micro_batches"] == 8
  full_rows = {"segment_ids": np.ones((8, 256), np.int32)}
  assert report["model_flops"] == models.family("qwen3").train_flops(_tiny().model, full_rows)
  assert report["fits"] is None and report["device_memory_gib"] is None  # a CPU: unknown
  assert report["attention"] == "blockwise" and report["remat"] == "full"
  text = format_report(report)
  assert "optimizer state" in text and "temporaries" in text and "fits: unknown" in text


def test_bfloat16_optimizer_state_halves_the_moments():
  cfg = _tiny()
  cfg.optim.state_dtype = "bfloat16"
  report = plan(cfg, num_devices=1, device_memory_gib=1e-3)
  count = models.param_count(cfg.model)
  assert report["opt_state_bytes"] == 2 * count * 2 + 4
  assert report["optimizer_state_dtype"] == "bfloat16"
  assert report["fits"] is False  # 1 MiB of device memory


@pytest.mark.slow
def test_image_model_plans_with_its_tile_slots_and_frozen_tower():
  cfg = _tiny()
  cfg.model = presets.intern_s1_tiny(freeze_vision=True, freeze_projector=True)
  cfg.data.pack_max_length = cfg.data.sample_max_length = 512
  cfg.global_batch_size = 4
  report = plan(cfg, num_devices=1)
  assert report["max_tiles"] == 512 // 256  # no max_tiles_per_pack: a row's token bound
  pixels = 4 * 2 * 448 * 448 * 3  # uint8 [rows, tiles, 448, 448, 3]
  assert report["batch_bytes"] == 4 * 4 * 512 * 4 + pixels + 4 * 2 * 4
  # Only the language model trains: the frozen tower and projector have no optimizer state.
  assert report["trainable_param_count"] < report["param_count"]
  assert report["opt_state_bytes"] == 2 * 4 * report["trainable_param_count"] + 4
  assert report["params_bytes"] == 4 * report["param_count"]
  assert report["per_device_bytes"] == sum(report[k] for k in PARTS)


def test_more_devices_than_there_are_is_a_clear_error():
  with pytest.raises(ConfigError, match="--devices=64"):
    plan(_tiny(), num_devices=64)


# pylint: disable-next=redefined-outer-name
@pytest.mark.slow
def test_cli_json_line_on_8_simulated_devices(cli_8_devices, one_device):
  out, err = cli_8_devices.communicate(timeout=300)
  assert cli_8_devices.returncode == 0, err[-3000:]
  lines = out.strip().splitlines()
  assert len(lines) == 1, out  # one JSON line, nothing else on stdout
  report = json.loads(lines[0])
  assert report["devices"] == 8 and report["mesh"]["fsdp"] == 8
  assert report["micro_batches"] == 1 and report["tokens_per_step"] == 8 * 256
  # Matrices split 8 ways; the norms' few weights stay whole on every device.
  one = one_device
  assert one["params_bytes"] / 8 <= report["params_bytes"] < one["params_bytes"] / 7.9
  assert report["opt_state_bytes"] < one["opt_state_bytes"] / 7.9
  assert report["per_device_bytes"] < one["per_device_bytes"]
  assert report["per_device_bytes"] == sum(report[k] for k in PARTS)
  assert math.isclose(report["per_device_gib"], report["per_device_bytes"] / GIB)
  assert report["fits"] is True and report["device_memory_gib"] == 100.0


@pytest.mark.slow
def test_recipe_rules_reach_the_planned_step():
  """mesh.logical_axis_rules is the table the planned (= the trainer's) step is built with:
  turning FSDP off on 2 devices doubles the per-device params; moving the batch onto `data`
  alone halves the data-parallel size, so the micro-batch count doubles."""
  sharded = plan(_tiny(), num_devices=2)
  cfg = _tiny()
  cfg.mesh.logical_axis_rules = (("embed", None), ("vocab", None))
  whole = plan(cfg, num_devices=2)
  assert whole["params_bytes"] == models.param_count(cfg.model) * 4
  assert sharded["params_bytes"] < 0.6 * whole["params_bytes"]
  cfg = _tiny()
  cfg.mesh.logical_axis_rules = (("activation_batch", "data"),)
  assert sharded["micro_batches"] == 4 and plan(cfg, num_devices=2)["micro_batches"] == 8


@pytest.mark.slow
def test_sequence_axis_shards_the_model_and_keeps_whole_rows_per_rank(one_device):
  """mesh.sequence=4 on 4 devices: one data-parallel rank (every row on all four, split by
  tokens), params and optimizer state split four ways, like fsdp=4."""
  cfg = _tiny()
  cfg.mesh.update(dict(fsdp=1, sequence=4))
  report = plan(cfg, num_devices=4)
  assert report["mesh"]["sequence"] == 4 and report["micro_batches"] == 8
  assert report["params_bytes"] < one_device["params_bytes"] / 3.9
  assert report["opt_state_bytes"] < one_device["opt_state_bytes"] / 3.9
  cfg.data.pack_max_length = 254
  cfg.data.sample_max_length = 254
  with pytest.raises(ConfigError, match="multiple of mesh.sequence"):
    plan(cfg, num_devices=4)


@pytest.mark.slow
def test_the_128k_recipe_plans_within_its_budget():
  """configs/sft_qwen3_8b_128k.py on 8 simulated devices: Qwen3-8B, one 131,072-token row split
  over mesh.sequence=8, <= 40 GiB a device (issue 19's budget; docs/benchmarks.md)."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "PYTHONPATH": os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)}
  proc = subprocess.run([sys.executable, "-m", "jaxtune.plan",
                         "--config=configs/sft_qwen3_8b_128k.py", "--devices=8", "--json",
                         "--config.global_batch_size=1"], env=env, cwd=REPO, text=True,
                        capture_output=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["mesh"]["sequence"] == 8 and report["pack_max_length"] == 131072
  assert report["param_count"] > 8e9
  assert report["per_device_gib"] <= 40.0
