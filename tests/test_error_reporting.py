"""Errors people can read (issue 23, item 4): a fatal error goes to train.log with its full
traceback; the console gets a short report (what, where, what to do) and the traceback only
with --verbose or JAXTUNE_VERBOSE=1; a failed start leaves no plain run directory behind; the
bad-line messages give advice that applies."""

import glob
import logging
import os
import subprocess

import pytest

from jaxtune.config import ConfigError, base_config, dataset
from jaxtune.data.pipeline import SFTData
from jaxtune.data.sources import DataError
from jaxtune.train import logs
from jaxtune.train.startup_checks import FAILED_SUFFIX
from test_trainer_utils import REPO, python, subprocess_env, write_byte_tokenizer, write_chats

BAD_LINE = 7
_RECIPE = """
import sys
sys.path.insert(0, {tests!r})
from test_trainer_utils import tiny_config
from jaxtune.config import dataset

def get_config(arg=None):
  c = tiny_config({root!r})
  c.data.datasets = [dataset("chats", {data!r})]
  return c
"""


def _with_bad_line(path: str) -> str:
  write_chats(path, 24, 0)
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  lines[BAD_LINE - 1] = '{"messages": [{"role": "user"'          # cut short: not JSON
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


@pytest.fixture(name="bad_recipe")
def _bad_recipe(tmp_path):
  root = str(tmp_path / "run")
  data = _with_bad_line(str(tmp_path / "bad.jsonl"))
  recipe = tmp_path / "recipe.py"
  recipe.write_text(_RECIPE.format(tests=os.path.join(REPO, "tests"), root=root, data=data))
  return recipe, os.path.join(root, "work"), data


def _run(recipe, tmp_path, *flags, **env):
  return subprocess.run([python(), "-m", "jaxtune.main", f"--config={recipe}", *flags],
                        capture_output=True, text=True, timeout=300, cwd=tmp_path,
                        env={**subprocess_env(), **env})


def _error_lines(console: str) -> list[str]:
  """The report: from its first line ('jaxtune: ...') to the end."""
  lines = console.rstrip("\n").splitlines()
  first = next(i for i, l in enumerate(lines) if l.startswith("jaxtune: error"))
  return lines[first:]


def test_a_bad_line_is_reported_briefly_and_logged_in_full(bad_recipe, tmp_path):
  recipe, work, data = bad_recipe
  proc = _run(recipe, tmp_path)
  console = proc.stdout + proc.stderr
  assert proc.returncode == 1, console[-3000:]
  assert "Traceback" not in console, console[-3000:]
  report = _error_lines(proc.stderr)
  assert len(report) <= 5, report
  text = "\n".join(report)
  assert f"{data}:{BAD_LINE}" in text and "data.skip_bad_samples=True" in text, text
  assert "--verbose" in text and "DataError" in text, text
  # The run directory of a failed start is marked, and holds the whole error.
  (run_dir,) = glob.glob(os.path.join(work, "*"))
  assert run_dir.endswith(FAILED_SUFFIX), run_dir
  assert os.path.join(run_dir, "train.log") in text
  with open(os.path.join(run_dir, "train.log"), encoding="utf-8") as f:
    log = f.read()
  assert "Traceback (most recent call last)" in log, log
  assert f"DataError: {data}:{BAD_LINE}" in log and "data.skip_bad_samples=True" in log, log
  assert "jaxtune/data/pipeline.py" in log, log                   # the frames, in full


@pytest.mark.parametrize("how", ["flag", "env"])
def test_verbose_shows_the_traceback_on_the_console(bad_recipe, tmp_path, how):
  recipe, work, data = bad_recipe
  proc = (_run(recipe, tmp_path, "--verbose") if how == "flag"
          else _run(recipe, tmp_path, JAXTUNE_VERBOSE="1"))
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback (most recent call last)" in proc.stderr, proc.stderr[-3000:]
  assert f"{data}:{BAD_LINE}" in _error_lines(proc.stderr)[0]
  assert "--verbose" not in "\n".join(_error_lines(proc.stderr))   # no hint to do what it did
  assert all(d.endswith(FAILED_SUFFIX) for d in glob.glob(os.path.join(work, "*")))


# ---- the data messages --------------------------------------------------------------------------

def _data_cfg(path, **overrides):
  c = base_config().data
  c.datasets = [dataset("mine", path)]
  c.pack_max_length, c.sample_max_length, c.num_workers = 128, 64, 1
  for key, value in overrides.items():
    c[key] = value
  return c


def test_one_bad_line_names_skip_bad_samples(tmp_path):
  tok = write_byte_tokenizer(str(tmp_path / "tok"))
  path = _with_bad_line(str(tmp_path / "bad.jsonl"))
  with pytest.raises(DataError) as err:
    SFTData(_data_cfg(path), tok, global_batch_size=2)
  msg = str(err.value)
  assert msg.startswith(f"{path}:{BAD_LINE} (dataset 'mine'): not valid JSON"), msg
  assert "Fix the line, or set data.skip_bad_samples=True" in msg and "more bad" not in msg


def test_every_line_bad_and_skipped_does_not_advise_round_up(tmp_path):
  tok = write_byte_tokenizer(str(tmp_path / "tok"))
  path = str(tmp_path / "all_bad.jsonl")
  with open(path, "w", encoding="utf-8") as f:
    f.write('not json\n{"messages": 3}\n')
  with pytest.raises(DataError) as err:
    SFTData(_data_cfg(path, skip_bad_samples=True), tok, global_batch_size=2)
  msg = str(err.value)
  assert "round_up=True" not in msg, msg
  assert "no sample is left to train on" in msg and "2 bad line(s) skipped" in msg, msg
  assert f"{path}:1 (dataset 'mine')" in msg, msg
  with pytest.raises(DataError, match="Fix the lines, or set data.skip_bad_samples=True"):
    SFTData(_data_cfg(path), tok, global_batch_size=2)


# ---- the pieces ----------------------------------------------------------------------------------

def _raise(exc, cause=None):
  try:
    raise exc from cause
  except BaseException as e:  # pylint: disable=broad-except
    return e


def test_error_report_is_short_and_names_cause_location_and_log():
  long = _raise(RuntimeError("\n".join(f"line {i}" for i in range(10))),
                cause=FileNotFoundError("commit_success.txt"))
  report = logs.error_report(long, log_file="/w/run/train.log").splitlines()
  assert len(report) == 5, report
  assert report[0] == "jaxtune: error (RuntimeError): line 0"
  assert report[2].endswith("line 2 [7 more line(s) in the log]"), report
  assert report[3] == "  caused by FileNotFoundError: commit_success.txt"
  assert "raised at tests/test_error_reporting.py:" in report[4], report
  assert "/w/run/train.log" in report[4] and "--verbose" in report[4], report
  config = _raise(ConfigError("a: wrong\nb: wrong\nc: wrong\nd: wrong"))
  report = logs.error_report(config, verbose=True)
  assert report.startswith("jaxtune: configuration error: a: wrong") and "d: wrong" in report
  assert "raised at" not in report and "--verbose" not in report


def test_log_fatal_writes_the_traceback_to_train_log_only(tmp_path, capsys):
  error = _raise(ValueError("broken"))
  assert not logs.log_fatal(error)            # no run log open: nothing, and no console output
  with logs.run_logging(str(tmp_path), is_main=True, step_lines_on_console=True):
    logging.getLogger("jaxtune").info("visible")
    assert logs.log_fatal(error)
  console = capsys.readouterr()
  assert "visible" in console.err and "broken" not in console.err + console.out
  text = (tmp_path / "train.log").read_text(encoding="utf-8")
  assert "the run failed: ValueError: broken" in text and "Traceback" in text, text


def test_a_configuration_error_at_validation_writes_nothing(tmp_path):
  """Before a run directory exists: exit 2, the message, no traceback, no work_dir."""
  recipe = tmp_path / "recipe.py"
  data = write_chats(str(tmp_path / "chats.jsonl"), 8, 0)
  recipe.write_text(_RECIPE.format(tests=os.path.join(REPO, "tests"), root=str(tmp_path / "r"),
                                   data=data))
  proc = _run(recipe, tmp_path, "--config.data.sample_max_length=100000")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "data.sample_max_length" in proc.stderr
  assert not glob.glob(str(tmp_path / "r" / "work" / "*"))
