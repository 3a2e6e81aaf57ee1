"""The wheel works outside the checkout: built, installed into a fresh venv, `jaxtune train` of
the embedded default recipe runs one step from a folder far from the repository.

Offline and quick: the wheel goes in with --no-deps, and the new venv sees this venv's
site-packages (its dependencies) through a .pth line. Such a line only extends sys.path, so the
editable install's own .pth finder there is not run: jaxtune is imported from the wheel.
"""

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, **kw):
  r = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
  assert r.returncode == 0, f"{cmd}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
  return r


def _build_wheel(tmp):
  """From a copy of the sources, so the build writes nothing into the checkout."""
  src = os.path.join(tmp, "src")
  os.makedirs(src)
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(ROOT, name), src)
  shutil.copytree(os.path.join(ROOT, "jaxtune"), os.path.join(src, "jaxtune"),
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
  out = os.path.join(tmp, "dist")
  _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, src],
       cwd=tmp, timeout=300)
  wheels = glob.glob(os.path.join(out, "jaxtune-*.whl"))
  assert len(wheels) == 1, wheels
  return wheels[0]


def _package_files(subdir, keep=lambda name: True):
  base = os.path.join(ROOT, "jaxtune")
  found = set()
  for dirpath, dirnames, filenames in os.walk(os.path.join(base, subdir)):
    dirnames[:] = [d for d in dirnames if d != "__pycache__"]
    for f in filenames:
      if keep(f):
        found.add("jaxtune/" + os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep,
                                                                                         "/"))
  return found


@pytest.mark.slow
def test_wheel_installs_and_trains_outside_the_checkout(tmp_path):
  tmp = str(tmp_path)
  wheel = _build_wheel(tmp)

  # Everything the embedded default recipe reads ships in the wheel.
  names = set(zipfile.ZipFile(wheel).namelist())
  missing = (_package_files("assets") | _package_files("recipes", lambda f: f.endswith(".py"))
             | {"jaxtune/cli.py", "jaxtune/main.py"}) - names
  assert not missing, f"not in the wheel: {sorted(missing)}"
  entry_points = zipfile.ZipFile(wheel).read("jaxtune-0.1.0.dist-info/entry_points.txt").decode()
  assert "jaxtune = jaxtune.cli:main" in entry_points

  venv = os.path.join(tmp, "venv")
  _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
  python = os.path.join(venv, "bin", "python")
  _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
        "--no-index", "-q", wheel], timeout=300)
  new_site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
                  ).stdout.strip()
  with open(os.path.join(new_site, "_jaxtune_test_deps.pth"), "w", encoding="utf-8") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")   # a path line: its .pth files don't run

  work = os.path.join(tmp, "elsewhere")
  os.makedirs(work)
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "XLA_FLAGS", "VIRTUAL_ENV", "PYTHONHOME")}
  env.update(JAX_PLATFORMS="cpu", JAXTUNE_CACHE=os.path.join(tmp, "cache"),
             PATH=os.path.join(venv, "bin") + os.pathsep + env.get("PATH", ""))
  where = _run([python, "-c", "import jaxtune, jaxtune.recipes.sft_mini as r; "
                "print(jaxtune.__file__); print(r.ASSETS)"], cwd=work, env=env).stdout.split()
  assert all(p.startswith(venv) for p in where), where   # the wheel's copy, not the checkout

  script = os.path.join(venv, "bin", "jaxtune")
  assert os.path.isfile(script)
  r = subprocess.run([script, "train", "--config.total_steps=1", "--config.epoch_num=0",
                      "--config.progress_bar=False"], cwd=work, env=env, capture_output=True,
                     text=True, timeout=400, check=False)
  assert r.returncode == 0, r.stderr[-5000:]
  runs = glob.glob(os.path.join(work, "work_dirs", "sft_mini", "*", "metrics.jsonl"))
  assert len(runs) == 1, os.listdir(work)
  with open(runs[0], encoding="utf-8") as f:
    assert len(f.read().splitlines()) == 1
  with open(os.path.join(os.path.dirname(runs[0]), "config.json"), encoding="utf-8") as f:
    assert ROOT not in f.read()   # data, images and tokenizer all came from outside the repo
