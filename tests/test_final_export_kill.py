"""The last checkpoint commits before the final export starts (issue 23, item 7): a SIGKILL
during the final HF export loses only the export, and auto_resume continues from the last step
(not from step 0) and writes the export."""

import json
import os
import signal
import subprocess

import pytest

from jaxtune.config import to_json
from jaxtune.train.checkpoint import complete_steps
from jaxtune.train.trainer import Trainer
from test_trainer_utils import (python, read_metrics, subprocess_env, tiny_config,
                                use_compile_cache)

# An Orbax read that failed in an earlier test (damaged checkpoints) can leave objects that
# are reported when garbage-collected, in whichever test runs then (harmless).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# Runs the trainer with the HF export patched: as soon as the final export starts, it notes
# which checkpoints are complete on disk and SIGKILLs the process (the harshest stop there is,
# at the earliest moment of the export).
_KILL_IN_EXPORT = """
import json, os, signal, sys
from ml_collections import ConfigDict
from jaxtune.train import checkpoint, hf_exports
from jaxtune.train.trainer import Trainer

cfg, marker = ConfigDict(json.loads(sys.argv[1])), sys.argv[2]

def export_then_die(model, model_cfg, out_dir, **kwargs):
  run_dir = os.path.dirname(out_dir)
  with open(marker, "w") as f:
    json.dump(dict(export=out_dir, checkpoints=sorted(os.listdir(
        os.path.join(run_dir, "checkpoints")))), f)
  os.kill(os.getpid(), signal.SIGKILL)

hf_exports.export_hf = export_then_die
Trainer(cfg).fit()
"""


@pytest.mark.slow
def test_sigkill_during_the_final_export_then_auto_resume_keeps_the_last_step(
    tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  # One checkpoint, at the end: the one the final export must not race with.
  cfg = tiny_config(str(tmp_path), checkpoint_interval=-1, tensorboard=False)
  marker = str(tmp_path / "in_export.json")
  proc = subprocess.run([python(), "-c", _KILL_IN_EXPORT, to_json(cfg), marker], cwd=tmp_path,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  with open(marker, encoding="utf-8") as f:
    seen = json.load(f)
  (run_dir,) = [os.path.join(cfg.work_dir, d) for d in os.listdir(cfg.work_dir)]
  assert seen["export"] == os.path.join(run_dir, "hf-6")
  assert seen["checkpoints"] == ["6"]  # complete (not 6.orbax-checkpoint-tmp) at the start
  assert complete_steps(os.path.join(run_dir, "checkpoints")) == [6]
  assert not os.path.exists(os.path.join(run_dir, "hf-6"))

  cfg.auto_resume = True
  summary = Trainer(cfg).fit()
  assert summary["run_dir"] == run_dir and summary["steps"] == 6
  assert summary["steps_this_session"] == 0
  assert summary["hf_export"] == os.path.join(run_dir, "hf-6")
  assert os.path.isfile(os.path.join(run_dir, "hf-6", "config.json"))
  assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    assert f"resumed from {run_dir}/checkpoints/6" in f.read()
