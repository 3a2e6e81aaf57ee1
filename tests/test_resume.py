"""Exact resume: after SIGKILL, after SIGINT, past a damaged checkpoint, from another run's
checkpoint, and weights only. "Exact" = the metrics.jsonl fields that do not depend on timing
equal those of an uninterrupted run, step for step."""

import gc
import glob
import json
import os
import shutil
import signal
import subprocess

import pytest

from jaxtune.config import to_json
from jaxtune.train import metrics as metrics_lib
from jaxtune.train.trainer import Trainer
from test_trainer_utils import (exact, python, read_metrics, reference_run, resumed_config,
                                subprocess_env)

# A failed Orbax read leaves an un-awaited coroutine behind (harmless); it is reported when
# garbage-collected, so the test that provokes one collects before it ends.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]

# Runs the trainer with `Checkpointer.save` patched to SIGKILL the process as soon as the
# checkpoint of step `kill_at` is complete on disk: the harshest stop there is.
_KILL_DRIVER = """
import json, os, signal, sys
from ml_collections import ConfigDict
from jaxtune.train import checkpoint
from jaxtune.train.trainer import Trainer

cfg, kill_at = ConfigDict(json.loads(sys.argv[1])), int(sys.argv[2])
save = checkpoint.Checkpointer.save

def save_then_die(self, step, *args, **kwargs):
  save(self, step, *args, **kwargs)
  if step == kill_at:
    self.wait()
    os.kill(os.getpid(), signal.SIGKILL)

checkpoint.Checkpointer.save = save_then_die
Trainer(cfg).fit()
"""


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  return reference_run(tmp_path_factory)  # also turns on the compilation cache


def _only_run_dir(work_dir):
  runs = glob.glob(os.path.join(work_dir, "*", "metrics.jsonl"))
  assert len(runs) == 1, runs
  return os.path.dirname(runs[0])


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_auto_resume_is_exact(reference, tmp_path):
  ref_cfg, ref_summary = reference
  cfg = resumed_config(ref_cfg, str(tmp_path / "work"))
  proc = subprocess.run([python(), "-c", _KILL_DRIVER, to_json(cfg), "4"], cwd=tmp_path,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
  run_dir = _only_run_dir(cfg.work_dir)
  assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]

  cfg.auto_resume = True
  summary = Trainer(cfg).fit()
  assert summary["run_dir"] == run_dir and summary["steps"] == 6
  assert summary["steps_this_session"] == 2
  assert exact(read_metrics(run_dir)) == exact(read_metrics(ref_summary["run_dir"]))
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    assert f"resumed from {run_dir}/checkpoints/4" in f.read()


@pytest.mark.slow
def test_sigint_stops_at_a_boundary_with_a_checkpoint_and_resumes_exactly(reference, tmp_path,
                                                                          monkeypatch):
  ref_cfg, ref_summary = reference
  cfg = resumed_config(ref_cfg, str(tmp_path / "work"))
  write = metrics_lib.MetricsWriter.write

  def write_then_interrupt(self, record):
    write(self, record)
    if record["step"] == 3:  # a step that is not a checkpoint step (interval 2)
      os.kill(os.getpid(), signal.SIGINT)

  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write_then_interrupt)
  # Whatever was installed before (Python's default, or SIG_IGN in a background job) comes back.
  handler_before = signal.getsignal(signal.SIGINT)
  summary = Trainer(cfg).fit()
  monkeypatch.undo()
  assert summary["stopped_by_signal"] and summary["steps"] == 3
  run_dir = summary["run_dir"]
  assert summary["checkpoint"] == os.path.join(run_dir, "checkpoints", "3")
  assert not glob.glob(os.path.join(run_dir, "hf-*"))  # no export on the way out
  assert signal.getsignal(signal.SIGINT) is handler_before  # handlers restored
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    log_text = f.read()
  assert "received SIGINT" in log_text and "--config.auto_resume=True" in log_text

  summary = Trainer(resumed_config(ref_cfg, cfg.work_dir, auto_resume=True)).fit()
  assert summary["steps"] == 6 and summary["steps_this_session"] == 3
  assert exact(read_metrics(run_dir)) == exact(read_metrics(ref_summary["run_dir"]))

  # Resuming a finished run does nothing (and keeps its outputs).
  again = Trainer(resumed_config(ref_cfg, cfg.work_dir, auto_resume=True)).fit()
  assert again["steps"] == 6 and again["steps_this_session"] == 0
  assert again["hf_export"] == os.path.join(run_dir, "hf-6") and len(read_metrics(run_dir)) == 6


@pytest.mark.slow
def test_damaged_newest_checkpoint_is_skipped_and_the_run_still_exact(reference, tmp_path):
  ref_cfg, ref_summary = reference
  work = tmp_path / "work"
  shutil.copytree(os.path.dirname(ref_summary["run_dir"]), work, symlinks=True)
  run_dir = str(work / os.path.basename(ref_summary["run_dir"]))
  for path in glob.glob(os.path.join(run_dir, "checkpoints", "6", "state", "d", "*")):
    with open(path, "r+b") as f:  # same size, garbage content
      f.write(b"\0" * os.path.getsize(path))
  os.makedirs(os.path.join(run_dir, "checkpoints", "8.orbax-checkpoint-tmp"))  # cut-off save

  summary = Trainer(resumed_config(ref_cfg, str(work), auto_resume=True)).fit()
  assert summary["run_dir"] == run_dir and summary["steps_this_session"] == 2
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    log_text = f.read()
  assert "checkpoints/6 cannot be restored" in log_text
  assert f"resumed from {run_dir}/checkpoints/4" in log_text
  assert os.path.isdir(os.path.join(run_dir, "checkpoints-skipped", "6"))
  assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["4", "6"]
  assert exact(read_metrics(run_dir)) == exact(read_metrics(ref_summary["run_dir"]))
  gc.collect()


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint_continues_in_a_new_run_dir(reference, tmp_path):
  ref_cfg, ref_summary = reference
  source = os.path.join(ref_summary["run_dir"], "checkpoints", "4")
  summary = Trainer(resumed_config(ref_cfg, str(tmp_path / "work"), resume_from=source)).fit()
  assert summary["run_dir"].startswith(str(tmp_path / "work"))
  assert summary["resumed_from"] == os.path.dirname(source)
  assert exact(read_metrics(summary["run_dir"])) == exact(read_metrics(ref_summary["run_dir"])[4:])
  with open(os.path.join(summary["run_dir"], "run_info.json"), encoding="utf-8") as f:
    assert json.load(f)["start_from"]["step"] == 4


@pytest.mark.slow
def test_weights_only_restarts_optimizer_schedule_and_data(reference, tmp_path):
  ref_cfg, ref_summary = reference
  source = os.path.join(ref_summary["run_dir"], "checkpoints", "6")
  summary = Trainer(resumed_config(ref_cfg, str(tmp_path / "work"), resume_from=source,
                                   load_weights_only=True)).fit()
  records, ref = read_metrics(summary["run_dir"]), read_metrics(ref_summary["run_dir"])
  assert [r["step"] for r in records] == list(range(1, 7))
  # The reference's batches and schedule from the start, but from trained weights.
  assert [(r["tokens"], r["lr"]) for r in records] == [(r["tokens"], r["lr"]) for r in ref]
  assert records[0]["lr"] == 0.0 and records[0]["loss"] < ref[0]["loss"] - 0.2
