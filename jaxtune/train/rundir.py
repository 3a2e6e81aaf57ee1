"""Where a run writes and where it starts from; the snapshot that makes it reproducible.

- auto_resume=True: the newest run directory under work_dir holding a complete checkpoint is
  continued in place (its metrics.jsonl past the checkpoint is rewritten).
- otherwise a new `<work_dir>/<YYYYmmdd-HHMMSS>/`; with resume_from=<path> it starts from that
  checkpoint (all of it, or the weights only with load_weights_only=True).
With several processes, process 0 decides and the others take its decision.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from typing import NamedTuple

import jax
from ml_collections import ConfigDict

import jaxtune
from jaxtune import config as config_lib
from jaxtune.train import multihost
from jaxtune.train.checkpoint import checkpoint_location, complete_steps

_STAMP = "%Y%m%d-%H%M%S"


class Start(NamedTuple):
  run_dir: str
  checkpoint_dir: str | None   # where to restore from; None = a fresh start
  step: int | None             # that step; None = the newest one that restores
  weights_only: bool
  own: bool                    # the run's own checkpoints (auto_resume): broken ones are moved


def choose_start(cfg: ConfigDict) -> Start:
  work_dir = os.path.abspath(cfg.work_dir)
  if jax.process_index() == 0:
    run_dir = _resumable_run(work_dir) if cfg.auto_resume else None
    own = run_dir is not None
    run_dir = run_dir or _new_run_dir(work_dir)
  else:
    run_dir, own = "", False
  agreed = multihost.broadcast_text(f"{int(own)}{run_dir}")
  own, run_dir = agreed[0] == "1", agreed[1:]
  if own:
    return Start(run_dir, os.path.join(run_dir, "checkpoints"), None, False, True)
  if cfg.resume_from:
    checkpoint_dir, step = checkpoint_location(cfg.resume_from)
    return Start(run_dir, checkpoint_dir, step, bool(cfg.load_weights_only), False)
  return Start(run_dir, None, None, False, False)


def _resumable_run(work_dir: str) -> str | None:
  if not os.path.isdir(work_dir):
    return None
  for name in sorted(os.listdir(work_dir), reverse=True):
    if complete_steps(os.path.join(work_dir, name, "checkpoints")):
      return os.path.join(work_dir, name)
  return None


def _new_run_dir(work_dir: str) -> str:
  stamp = datetime.datetime.now().strftime(_STAMP)
  run_dir, suffix = os.path.join(work_dir, stamp), 1
  while os.path.exists(run_dir):
    run_dir, suffix = os.path.join(work_dir, f"{stamp}-{suffix}"), suffix + 1
  os.makedirs(run_dir)
  return run_dir


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                         cwd=os.path.dirname(jaxtune.__file__))
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def write_snapshot(run_dir: str, cfg: ConfigDict, start: Start) -> None:
  """`config.json` (the resolved recipe) and `run_info.json` (versions, git, hosts, command).

  A resumed run keeps the earlier starts' info under "previous_starts".
  """
  with open(os.path.join(run_dir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(cfg))
  revision = _git("rev-parse", "HEAD")
  dirty = _git("status", "--porcelain", "--untracked-files=no") if revision else None
  info = dict(
      jaxtune_version=jaxtune.__version__, git_revision=revision,
      git_dirty=bool(dirty) if dirty is not None else None, jax_version=jax.__version__,
      python=sys.version.split()[0], devices=[str(d) for d in jax.devices()],
      process_count=jax.process_count(), command=sys.argv,
      started=datetime.datetime.now().isoformat(timespec="seconds"),
      start_from=dict(checkpoint_dir=start.checkpoint_dir, step=start.step,
                      weights_only=start.weights_only, auto_resume=start.own))
  path = os.path.join(run_dir, "run_info.json")
  if os.path.exists(path):
    try:
      with open(path, encoding="utf-8") as f:
        before = json.load(f)
      info["previous_starts"] = before.pop("previous_starts", []) + [before]
    except ValueError:
      pass
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, path)
