"""`config.validate` checks work_dir (issue 23, item 5): a directory, or creatable below one;
writable (a read-only file system caught, also as root); nothing created or left behind; a
warning when its disk has less free space than one checkpoint; exit 2 from the command line."""

import collections
import errno
import logging
import os
import re
import subprocess
import sys

import pytest

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.config import ConfigError
from jaxtune.recipes.qwen3_mini import get_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Usage = collections.namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def recipe():
  return get_config()


def _with_work_dir(recipe, work_dir):
  cfg = config_lib.ConfigDict(recipe.to_dict())
  cfg.work_dir = str(work_dir)
  return cfg


def _listing(path):
  return sorted(os.listdir(path))


def test_missing_work_dir_below_a_writable_directory_passes_and_is_not_created(
    recipe, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for work_dir in ("work_dirs", "runs/a/b", str(tmp_path / "abs" / "c")):
    out = config_lib.validate(_with_work_dir(recipe, work_dir))
    assert out.work_dir == work_dir
  assert _listing(tmp_path) == []          # neither work_dir nor a probe file was left


def test_existing_work_dir_passes_and_nothing_is_left(recipe, tmp_path):
  (tmp_path / "runs").mkdir()
  config_lib.validate(_with_work_dir(recipe, tmp_path / "runs"))
  assert _listing(tmp_path / "runs") == []


def test_work_dir_that_is_a_file(recipe, tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  with pytest.raises(ConfigError) as err:
    config_lib.validate(_with_work_dir(recipe, path))
  msg = str(err.value)
  assert msg.startswith(f"work_dir '{path}' is a file, not a directory"), msg
  assert "--config.work_dir=" in msg
  # Below a file: it cannot be created, and the file on its path is named.
  with pytest.raises(ConfigError, match=re.escape(f"work_dir '{path}/runs/x' cannot be "
                                                 f"created: '{path}' is a file, not a "
                                                 "directory")):
    config_lib.validate(_with_work_dir(recipe, path / "runs" / "x"))


def test_work_dir_below_a_broken_symlink(recipe, tmp_path):
  os.symlink(tmp_path / "gone", tmp_path / "link")
  with pytest.raises(ConfigError, match=r"work_dir .* cannot be created: .*link' is a symbolic "
                                        r"link to .*gone', which does not exist"):
    config_lib.validate(_with_work_dir(recipe, tmp_path / "link" / "runs"))


def test_empty_work_dir(recipe):
  with pytest.raises(ConfigError, match="work_dir must name a directory"):
    config_lib.validate(_with_work_dir(recipe, ""))


def test_read_only_probe_failure_names_work_dir_and_fix(recipe, tmp_path, monkeypatch):
  """The message path for EROFS / EACCES, whatever this machine allows (the probe raises)."""
  for code, words in ((errno.EROFS, "is on a read-only file system"),
                      (errno.EACCES, "is not writable (permission denied)")):
    def probe(directory, code=code):
      raise OSError(code, os.strerror(code), directory)
    monkeypatch.setattr(config_lib, "_write_probe", probe)
    with pytest.raises(ConfigError) as err:
      config_lib.validate(_with_work_dir(recipe, tmp_path))
    assert str(err.value).startswith(f"work_dir '{tmp_path}' {words}"), str(err.value)
    with pytest.raises(ConfigError) as err:
      config_lib.validate(_with_work_dir(recipe, tmp_path / "new" / "runs"))
    assert (f"work_dir '{tmp_path}/new/runs' does not exist and cannot be created: its nearest "
            f"existing parent '{tmp_path}' {words}") in str(err.value)
    assert "Point work_dir at a writable directory" in str(err.value)


@pytest.fixture
def read_only_dir(tmp_path):
  """A directory nothing can be written to: a read-only tmpfs where mounting is allowed (root
  ignores permission bits), else mode 0o500 (not root). None when neither works."""
  path = tmp_path / "ro"
  path.mkdir()
  mounted = False
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                             capture_output=True, timeout=30).returncode == 0
  except (OSError, subprocess.SubprocessError):
    pass
  if mounted:
    yield path, "is on a read-only file system"
    subprocess.run(["umount", str(path)], check=True, timeout=30)
  elif os.geteuid() != 0:
    path.chmod(0o500)
    yield path, "is not writable (permission denied)"
    path.chmod(0o700)
  else:
    yield None, None


def test_read_only_work_dir_is_a_config_error(recipe, read_only_dir, monkeypatch):
  path, words = read_only_dir
  if path is None:   # root without mount: the probe's failure, as that file system gives it
    path, words = os.getcwd(), "is on a read-only file system"
    def probe(directory):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), directory)
    monkeypatch.setattr(config_lib, "_write_probe", probe)
  with pytest.raises(ConfigError) as err:
    config_lib.validate(_with_work_dir(recipe, path))
  assert str(err.value).startswith(f"work_dir '{path}' {words}"), str(err.value)
  with pytest.raises(ConfigError, match=re.escape(f"nearest existing parent '{path}' {words}")):
    config_lib.validate(_with_work_dir(recipe, os.path.join(path, "runs")))


def test_low_free_space_is_a_warning(recipe, tmp_path, monkeypatch, caplog):
  params = models.param_count(recipe.model)
  assert config_lib.checkpoint_bytes_estimate(recipe) == params * (4 + 2 * 4)
  half = _with_work_dir(recipe, tmp_path)
  half.optim.state_dtype = "bfloat16"
  assert config_lib.checkpoint_bytes_estimate(half) == params * (4 + 2 * 2)

  need = params * 12
  monkeypatch.setattr(config_lib.shutil, "disk_usage", lambda p: Usage(10 * need, 0, need - 1))
  with caplog.at_level(logging.WARNING, logger="jaxtune.config"):
    config_lib.validate(_with_work_dir(recipe, tmp_path))          # a warning, not an error
  (record,) = [r for r in caplog.records if r.name == "jaxtune.config"]
  assert record.levelno == logging.WARNING
  assert f"work_dir '{tmp_path}'" in record.getMessage()
  assert "less than one checkpoint" in record.getMessage()

  caplog.clear()
  monkeypatch.setattr(config_lib.shutil, "disk_usage", lambda p: Usage(10 * need, 0, need))
  with caplog.at_level(logging.WARNING, logger="jaxtune.config"):
    config_lib.validate(_with_work_dir(recipe, tmp_path))
  assert not [r for r in caplog.records if r.name == "jaxtune.config"]


def test_cli_work_dir_that_is_a_file_exits_2_without_traceback(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "jaxtune.main", f"--config={REPO}/configs/sft_qwen3_mini.py",
       f"--config.work_dir={path}"],
      capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert f"work_dir '{path}' is a file, not a directory" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert path.read_text() == "" and _listing(tmp_path) == ["a_file"]
