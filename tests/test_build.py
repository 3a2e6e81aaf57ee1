"""One builder (jaxtune.train.build): the trainer, the planner, eval and the data CLI make the
run and its data through it, so what the planner compiles is the step that trains and the row
the data CLI shows is the row that trains."""

import subprocess
import sys

import jax
import pytest

from jaxtune import config as config_lib
from jaxtune.config import dataset
from jaxtune.data.inspect import render_row
from jaxtune.plan import plan
from jaxtune.train import build
from jaxtune.train.trainer import Trainer
from test_trainer_utils import (REPO, subprocess_env, tiny_config, use_compile_cache,
                                write_chats)

pytestmark = pytest.mark.slow  # a training run and a CLI subprocess


@pytest.fixture
def recorded(monkeypatch):
  """Every build_run and build_data call: (kind, arguments, result)."""
  calls = []
  real_run, real_data = build.build_run, build.build_data

  def build_run(resolved, mesh, **kwargs):
    run = real_run(resolved, mesh, **kwargs)
    calls.append(("run", resolved, run))
    return run

  def build_data(resolved, tokenizer, **kwargs):
    data = real_data(resolved, tokenizer, **kwargs)
    calls.append((kwargs.get("role", "train"), resolved, data))
    return data

  monkeypatch.setattr(build, "build_run", build_run)
  monkeypatch.setattr(build, "build_data", build_data)
  return calls


def _signature(resolved, run: build.Run) -> dict:
  """What the compiled step takes and is: argument shapes, dtypes, shardings, its HLO."""
  leaves = lambda tree: [(x.shape, str(x.dtype), str(x.sharding.spec))
                         for x in jax.tree.leaves(tree)]
  with build.run_context(resolved, run.mesh):
    hlo = run.step.lower(run.abstract_state, run.abstract_batch).as_text()
  return dict(state=leaves(run.abstract_state), batch=leaves(run.abstract_batch),
              num_micro=run.num_micro, layout=run.batch_layout, hlo=hlo)


def test_planner_eval_and_trainer_share_the_builder(tmp_path, tmp_path_factory, recorded):
  use_compile_cache(tmp_path_factory)
  held = write_chats(str(tmp_path / "held.jsonl"), 4, seed=1)
  cfg = tiny_config(str(tmp_path), total_steps=1, checkpoint_interval=-1,
                    eval_datasets=[dataset("held", held)])
  cfg.global_batch_size = 8  # 4 devices, fsdp=4: data-parallel 4, 2 micro-batches
  report = plan(cfg, num_devices=jax.device_count())
  Trainer(cfg).fit()
  runs = [(resolved, r) for kind, resolved, r in recorded if kind == "run"]
  assert len(runs) == 2  # the planner's, then the trainer's
  planned, trained = (_signature(*r) for r in runs)
  assert planned == trained and report["micro_batches"] == trained["num_micro"] == 2
  roles = [kind for kind, _, _ in recorded if kind != "run"]
  assert roles == ["train", "eval"]  # the trainer's data, then the Evaluator's


def test_data_cli_shows_the_row_that_trains(tmp_path, tmp_path_factory, recorded):
  """With length grouping the order depends on the data-parallel size: the CLI follows the
  mesh on --devices devices, as the trainer does, so its row K is the trainer's row K."""
  use_compile_cache(tmp_path_factory)
  cfg = tiny_config(str(tmp_path), total_steps=1, checkpoint_interval=-1)
  cfg.global_batch_size = 8
  Trainer(cfg).fit()
  ((_, resolved, trained),) = [c for c in recorded if c[0] == "train"]
  assert resolved.data_parallel == 4
  decode = getattr(trained.encoder, "decode_marked", trained.encoder.decode)  # as the CLI's
  first = trained.batch(0, 0)
  rows = [render_row(first, k, decode) for k in range(cfg.global_batch_size)]
  # A row whose place differs on one device, so that the check is not vacuous.
  one_device = build.build_data(config_lib.resolve(cfg, 1), cfg.tokenizer_path)
  alone = one_device.batch(0, 0)
  row = next(k for k in range(len(rows)) if render_row(alone, k, decode) != rows[k])

  recipe = tmp_path / "recipe.py"
  (tmp_path / "recipe.json").write_text(config_lib.to_json(cfg))
  recipe.write_text("import json, os\nfrom ml_collections import ConfigDict\n"
                    "def get_config(arg=None):\n"
                    "  path = os.path.join(os.path.dirname(__file__), 'recipe.json')\n"
                    "  return ConfigDict(json.load(open(path)))\n")
  out = subprocess.run([sys.executable, "-m", "jaxtune.data", f"--config={recipe}",
                        f"--devices={jax.device_count()}", f"--show_row={row}"], cwd=REPO,
                       env=subprocess_env(), capture_output=True, text=True, timeout=600,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  shown = out.stdout.split(f"row {row} (pack ", 1)[1].split("\n", 1)[1]
  assert shown.rstrip("\n") == rows[row]
  assert "data-parallel size 4 on 4 device(s)" in out.stdout
