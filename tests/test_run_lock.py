"""One run, one process group (issue 23, item 1): a start on a run directory that a live process
holds stops with exit code 2 naming the holder and touches nothing there; a stale lock (its
process is gone) is taken over with a warning; a run holds its lock while it trains and lets
go of it on every way out."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from jaxtune import launch
from jaxtune.config import to_json
from jaxtune.train import metrics as metrics_lib
from jaxtune.train import runlock
from jaxtune.train.trainer import Trainer
from test_trainer_utils import REPO, python, reference_run, resumed_config, subprocess_env

# An Orbax read that failed in an earlier test (damaged checkpoints) can leave objects that
# are reported when garbage-collected, in whichever test runs then (harmless).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


# A recipe file for the command line: the recipe of the JSON file beside it.
_RECIPE = """
import json, os
from ml_collections import ConfigDict

def get_config(arg=None):
  with open(os.path.join(os.path.dirname(__file__), "recipe.json"), encoding="utf-8") as f:
    return ConfigDict(json.load(f))
"""


def run_command_line(cfg, directory) -> subprocess.CompletedProcess:
  """`python -m jaxtune.main` on `cfg` (written to a recipe file in `directory`)."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "recipe.json"), "w", encoding="utf-8") as f:
    f.write(to_json(cfg))
  recipe = os.path.join(directory, "recipe.py")
  with open(recipe, "w", encoding="utf-8") as f:
    f.write(_RECIPE)
  return subprocess.run([python(), "-m", "jaxtune.main", f"--config={recipe}"], cwd=REPO,
                        env=subprocess_env(), capture_output=True, text=True, timeout=120)

# Holds the lock of run directory argv[1] until killed.
_HOLDER = """
import sys, time
from jaxtune.train import runlock
lock = runlock.acquire(sys.argv[1])
print("held", flush=True)
time.sleep(300)
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return reference_run(tmp_path_factory)  # also turns on the compilation cache


def _dead_pid() -> int:
  proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  return int(proc.stdout)


def _write_lock(run_dir, **holder):
  with open(os.path.join(run_dir, runlock.LOCK_NAME), "w", encoding="utf-8") as f:
    json.dump(holder, f)


def _files(run_dir) -> dict:
  """Every file under run_dir: (size, mtime) and, for the small text ones, the content."""
  out = {}
  for root, _, names in os.walk(run_dir):
    for name in names:
      path = os.path.join(root, name)
      st = os.lstat(path)
      content = None
      if name.endswith((".json", ".jsonl", ".log", ".lock")):
        with open(path, "rb") as f:
          content = f.read()
      out[os.path.relpath(path, run_dir)] = (st.st_size, st.st_mtime_ns, content)
  return out


def test_lock_names_its_holder_refuses_a_second_holder_and_is_removed_on_release(tmp_path):
  lock = runlock.acquire(str(tmp_path))
  path = tmp_path / runlock.LOCK_NAME
  holder = json.loads(path.read_text())
  assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
  assert holder["since"] and lock.notice is None
  with pytest.raises(runlock.RunLockedError) as refused:  # this process again: a second start
    runlock.acquire(str(tmp_path))
  assert f"pid {os.getpid()}" in str(refused.value) and str(path) in str(refused.value)
  assert launch.exit_code_for(refused.value) == 2
  lock.release()
  lock.release()  # idempotent
  assert not path.exists()
  with runlock.acquire(str(tmp_path)) as again:
    assert again.held and again.notice is None
  assert not path.exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_notice(tmp_path):
  dead = _dead_pid()
  _write_lock(tmp_path, host=socket.gethostname(), pid=dead, since="2026-01-01T00:00:00",
              pid_start=None)
  with runlock.acquire(str(tmp_path)) as lock:
    assert f"pid {dead}" in lock.notice and "no longer running" in lock.notice
    assert json.loads((tmp_path / runlock.LOCK_NAME).read_text())["pid"] == os.getpid()
  # A live pid that is another process than the one that wrote the lock (pid reuse): stale.
  _write_lock(tmp_path, host=socket.gethostname(), pid=os.getppid(), since="then",
              pid_start=-1)
  with runlock.acquire(str(tmp_path)) as lock:
    assert "no longer running" in lock.notice


def test_a_lock_from_another_host_or_half_written_is_refused(tmp_path):
  _write_lock(tmp_path, host="elsewhere-7", pid=4242, since="2026-01-01T00:00:00")
  with pytest.raises(runlock.RunLockedError) as refused:
    runlock.acquire(str(tmp_path))
  message = str(refused.value)
  assert "host elsewhere-7, pid 4242, since 2026-01-01T00:00:00" in message
  assert f"delete {tmp_path / runlock.LOCK_NAME}" in message
  (tmp_path / runlock.LOCK_NAME).write_text("")  # made a moment ago, its name not yet written
  with pytest.raises(runlock.RunLockedError):
    runlock.acquire(str(tmp_path))
  old = os.path.getmtime(tmp_path / runlock.LOCK_NAME) - 3600  # ... or its maker died
  os.utime(tmp_path / runlock.LOCK_NAME, (old, old))
  with runlock.acquire(str(tmp_path)) as lock:
    assert "no longer running" in lock.notice


@pytest.mark.slow
def test_auto_resume_of_a_live_run_exits_2_and_touches_nothing_then_takes_over_when_it_died(
    reference, tmp_path):
  ref_cfg, ref_summary = reference
  work = tmp_path / "work"
  shutil.copytree(os.path.dirname(ref_summary["run_dir"]), work, symlinks=True)
  run_dir = str(work / os.path.basename(ref_summary["run_dir"]))
  holder = subprocess.Popen([python(), "-c", _HOLDER, run_dir], env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    before, runs = _files(run_dir), sorted(os.listdir(work))
    cfg = resumed_config(ref_cfg, str(work), auto_resume=True)
    second = run_command_line(cfg, str(tmp_path / "recipe"))
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert f"run directory {run_dir} is in use" in second.stderr
    assert f"host {socket.gethostname()}, pid {holder.pid}, since " in second.stderr
    assert _files(run_dir) == before and sorted(os.listdir(work)) == runs
  finally:
    holder.kill()
    holder.wait()

  # The holder died without letting go: the next start takes the lock over and resumes.
  summary = Trainer(resumed_config(ref_cfg, str(work), auto_resume=True)).fit()
  assert summary["run_dir"] == run_dir and summary["steps_this_session"] == 0
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    log_text = f.read()
  assert f"pid {holder.pid}" in log_text and "no longer running" in log_text
  assert f"resumed from {run_dir}/checkpoints/6" in log_text
  assert not os.path.exists(os.path.join(run_dir, runlock.LOCK_NAME))


@pytest.mark.slow
def test_a_run_holds_its_lock_while_training_and_releases_it_on_error_and_on_sigterm(
    reference, tmp_path, monkeypatch):
  ref_cfg, _ = reference
  cfg = resumed_config(ref_cfg, str(tmp_path / "work"))
  write, seen = metrics_lib.MetricsWriter.write, {}

  def write_then_fail(self, record):
    write(self, record)
    path = os.path.join(os.path.dirname(self._file.name), runlock.LOCK_NAME)
    with open(path, encoding="utf-8") as f:
      seen[record["step"]] = json.load(f)
    if record["step"] == 3:
      raise RuntimeError("boom")

  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write_then_fail)
  with pytest.raises(RuntimeError, match="boom"):
    Trainer(cfg).fit()
  assert seen[1]["pid"] == os.getpid() and seen[1]["host"] == socket.gethostname()
  (run_dir,) = [str(p) for p in (tmp_path / "work").iterdir()]
  assert not os.path.exists(os.path.join(run_dir, runlock.LOCK_NAME))
  # A later start finds a running run's lock: auto_resume of a new run is refused meanwhile.
  with runlock.acquire(run_dir), pytest.raises(runlock.RunLockedError):
    Trainer(resumed_config(ref_cfg, cfg.work_dir, auto_resume=True)).fit()

  def write_then_sigterm(self, record):
    write(self, record)
    if record["step"] == 4:
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics_lib.MetricsWriter, "write", write_then_sigterm)
  summary = Trainer(resumed_config(ref_cfg, cfg.work_dir, auto_resume=True)).fit()
  monkeypatch.undo()
  assert summary["run_dir"] == run_dir and summary["stopped_by_signal"]
  assert summary["steps"] == 4
  assert not os.path.exists(os.path.join(run_dir, runlock.LOCK_NAME))
