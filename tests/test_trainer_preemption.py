"""SIGTERM to `python -m jaxtune.main`: the step in flight finishes, a checkpoint of it is
written, the process exits 75 (a scheduler's cue to requeue; 0 means finished) and says how to
resume; the console stays free of Orbax/absl INFO chatter."""

import glob
import json
import os
import re
import signal
import subprocess
import time

import pytest
from test_trainer_utils import REPO, python, read_metrics, subprocess_env, use_compile_cache

pytestmark = pytest.mark.slow

_RECIPE = """
import sys
sys.path.insert(0, {tests!r})
from test_trainer_utils import tiny_config

def get_config(arg=None):
  # Far more steps than the test waits for: the run only ends by the signal.
  return tiny_config({root!r}, total_steps=100000, checkpoint_interval=-1, tensorboard=False)
"""


def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  root = str(tmp_path / "run")
  recipe = tmp_path / "recipe.py"
  recipe.write_text(_RECIPE.format(tests=os.path.join(REPO, "tests"), root=root))
  proc = subprocess.Popen([python(), "-m", "jaxtune.main", f"--config={recipe}"], cwd=tmp_path,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      metrics = glob.glob(os.path.join(root, "work", "*", "metrics.jsonl"))
      if metrics and len(read_metrics(os.path.dirname(metrics[0]))) >= 2:
        break
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the signal was sent"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 75, stderr[-3000:]  # preempted with a checkpoint, not finished

  summary = json.loads(stdout[stdout.index("{"):])
  assert summary["stopped_by_signal"] and 2 <= summary["steps"] < 100000
  run_dir, step = summary["run_dir"], summary["steps"]
  assert [r["step"] for r in read_metrics(run_dir)][-1] == step
  assert summary["checkpoint"] == os.path.join(run_dir, "checkpoints", str(step))
  assert os.listdir(os.path.join(run_dir, "checkpoints")) == [str(step)]  # complete, renamed
  assert "received SIGTERM" in stderr and "--config.auto_resume=True" in stderr
  # Quiet console: jaxtune's own lines, no absl-formatted INFO lines (Orbax, JAX backends).
  assert not re.search(r"^I\d{4} ", stderr, re.MULTILINE), stderr[:2000]
  assert "checkpoint_manager" not in stderr and "run directory:" in stderr
