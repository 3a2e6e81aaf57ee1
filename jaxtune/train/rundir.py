"""Where a run writes and where it starts from; the snapshot that makes it reproducible.

- auto_resume=True: the newest run directory under work_dir holding a complete checkpoint is
  continued in place (its metrics.jsonl past the checkpoint is rewritten).
- otherwise a new `<work_dir>/<YYYYmmdd-HHMMSS>/`; with resume_from=<path> it starts from that
  checkpoint (all of it, or the weights only with load_weights_only=True).
With several processes, process 0 decides and the others take its decision.

Process 0 holds the run directory's lock (jaxtune.train.runlock) from the moment it is chosen,
before anything in it is written: a second start on a live run stops with exit code 2.

A resumed run's recipe is compared with the one its checkpoints were written with before
anything is restored (`check_recipe`): keys that cannot change under a checkpoint (the model,
the tokenizer, the shapes or types of the stored arrays) stop the start with exit code 2 and
the list; other changes are a warning naming each key. The run's `config.json` is rewritten
only once the restore succeeded, the previous one kept as `config.prev.json`.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from typing import Any, NamedTuple

import jax
from ml_collections import ConfigDict

from jaxtune import config as config_lib
from jaxtune.config import ConfigError
from jaxtune.train import multihost, runlock
from jaxtune.train.checkpoint import Checkpointer, checkpoint_location, complete_steps

log = logging.getLogger("jaxtune")

_STAMP = "%Y%m%d-%H%M%S"
CONFIG = "config.json"
PREVIOUS_CONFIG = "config.prev.json"


class Start(NamedTuple):
  run_dir: str
  checkpoint_dir: str | None   # where to restore from; None = a fresh start
  step: int | None             # that step; None = the newest one that restores
  weights_only: bool
  own: bool                    # the run's own checkpoints (auto_resume): broken ones are moved
  lock: runlock.RunLock | None = None  # the run directory's lock (process 0 only)


def choose_start(cfg: ConfigDict) -> Start:
  """The run directory and where to start from; on process 0 it returns with the run
  directory's lock held (release it with `release`). RunLockedError (exit code 2, on every
  process) when another process holds the run that auto_resume picked."""
  work_dir = os.path.abspath(cfg.work_dir)
  lock, refused = None, None
  if jax.process_index() == 0:
    run_dir = _resumable_run(work_dir) if cfg.auto_resume else None
    own = run_dir is not None
    try:
      run_dir = run_dir or _new_run_dir(work_dir)
      lock = runlock.acquire(run_dir)  # before anything in the run directory is written
      decision = f"{int(own)}{run_dir}"
    except runlock.RunLockedError as e:
      refused = e
      decision = "L" + _fit_bytes(str(e), 4000)  # every process stops with the same error
  else:
    decision = ""
  try:
    agreed = multihost.broadcast_text(decision)
    if agreed[0] == "L":
      raise refused or runlock.RunLockedError(agreed[1:])
    own, run_dir = agreed[0] == "1", agreed[1:]
    if own:
      return Start(run_dir, os.path.join(run_dir, "checkpoints"), None, False, True, lock)
    if cfg.resume_from:
      checkpoint_dir, step = checkpoint_location(cfg.resume_from)
      return Start(run_dir, checkpoint_dir, step, bool(cfg.load_weights_only), False, lock)
    return Start(run_dir, None, None, False, False, lock)
  except BaseException:
    if lock is not None:
      lock.release()
    raise


def release(start: Start | None) -> None:
  """Releases the run directory's lock, if this process holds it (idempotent)."""
  if start is not None and start.lock is not None:
    start.lock.release()


def _fit_bytes(text: str, size: int) -> str:
  raw = text.encode()
  return text if len(raw) <= size else raw[:size].decode(errors="ignore")


def _resumable_run(work_dir: str) -> str | None:
  if not os.path.isdir(work_dir):
    return None
  for name in sorted(os.listdir(work_dir), reverse=True):
    if complete_steps(os.path.join(work_dir, name, "checkpoints")):
      return os.path.join(work_dir, name)
  return None


def _new_run_dir(work_dir: str) -> str:
  """A new `<work_dir>/<stamp>[-n]/`, made by this process alone (mkdir is atomic: two starts
  in the same second get different directories)."""
  stamp = datetime.datetime.now().strftime(_STAMP)
  os.makedirs(work_dir, exist_ok=True)
  run_dir, suffix = os.path.join(work_dir, stamp), 1
  while True:
    try:
      os.mkdir(run_dir)
      return run_dir
    except FileExistsError:
      run_dir, suffix = os.path.join(work_dir, f"{stamp}-{suffix}"), suffix + 1


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # jaxtune/


def _version() -> str | None:
  """The installed jaxtune's version (from its metadata: the package's __init__ is a layer
  above train)."""
  try:
    return importlib.metadata.version("jaxtune")
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                         cwd=_PACKAGE_DIR)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def write_snapshot(run_dir: str, cfg: ConfigDict, start: Start) -> None:
  """`config.json` (the resolved recipe) and `run_info.json` (versions, git, hosts, command).

  A resumed run keeps the earlier starts' info under "previous_starts", and a config.json
  that differs from the new one as `config.prev.json`. A resumed run calls this only once
  its checkpoint restored.
  """
  path = os.path.join(run_dir, CONFIG)
  text = config_lib.to_json(cfg)
  try:
    with open(path, encoding="utf-8") as f:
      before = f.read()
  except OSError:
    before = None
  if before is not None and before != text:
    os.replace(path, os.path.join(run_dir, PREVIOUS_CONFIG))
  _write_atomically(path, text)
  revision = _git("rev-parse", "HEAD")
  dirty = _git("status", "--porcelain", "--untracked-files=no") if revision else None
  info = dict(
      jaxtune_version=_version(), git_revision=revision,
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
  _write_atomically(path, json.dumps(info, indent=2))


def _write_atomically(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


# ---- a resumed run's recipe against the one its checkpoints were written with -------------

# Keys that may change between a checkpoint and its resumption without changing the run.
RESUME_NEUTRAL = ("work_dir", "auto_resume", "resume_from", "load_weights_only", "progress_bar",
                  "log_interval", "tensorboard", "profile_steps", "checkpoint_interval",
                  "checkpoint_maxkeep", "hf_interval", "hf_max_keep", "eval_interval",
                  "eval_datasets", "max_consecutive_nonfinite", "data.num_workers",
                  "data.cache_dir", "observability")
# Keys that cannot change under a checkpoint: they decide the tree, the shapes or the types of
# the stored parameters and optimizer state (the tokenizer is compared by its files, and
# optim.max_grad_norm only where clipping is switched on or off: that adds or drops a state).
FIXED = ("model", "param_dtype", "optim.state_dtype")
_ABSENT = object()


class RecipeChangedError(ConfigError):
  """A resume whose recipe changed a key that cannot change under a checkpoint (exit code 2);
  `keys` lists them as 'key (old -> new)'."""

  def __init__(self, message: str, keys: list[str]):
    super().__init__(message)
    self.keys = keys


def saved_recipe(start: Start) -> tuple[dict | None, str]:
  """(the recipe the start's checkpoints belong to, where it was read); (None, "") for a fresh
  start or a weights-only load. The run's own config.json for auto_resume (the checkpoint's
  copy when it is missing), the checkpoint's copy for resume_from."""
  if start.checkpoint_dir is None or start.weights_only:
    return None, ""
  if start.own:
    path = os.path.join(start.run_dir, CONFIG)
    try:
      with open(path, encoding="utf-8") as f:
        saved = json.load(f)
      if isinstance(saved, dict):
        return saved, path
    except (OSError, ValueError):
      pass
  source = Checkpointer(start.checkpoint_dir, read_only=True)
  try:
    steps = source.all_steps()
    step = start.step if start.step is not None else (steps[-1] if steps else None)
    return source.saved_config(step), f"{start.checkpoint_dir}/{step} (its config item)"
  finally:
    source.close()


def check_recipe(start: Start, cfg: ConfigDict) -> list[str]:
  """Compares the recipe with the one the start's checkpoints were written with, before
  anything is restored. Raises RecipeChangedError naming every key that cannot change under
  a checkpoint; logs a warning naming the other changed keys and returns them."""
  saved, where = saved_recipe(start)
  if saved is None:
    if start.checkpoint_dir is not None and not start.weights_only:
      log.warning("the recipe %s's checkpoints were written with cannot be read: the new "
                  "recipe is not compared with it", start.checkpoint_dir)
    return []
  fixed, other = recipe_changes(saved, cfg.to_dict())
  if fixed:
    more = f" It also changes: {', '.join(other)}." if other else ""
    raise RecipeChangedError(
        f"the recipe differs from the one the checkpoints in {start.checkpoint_dir} were "
        f"written with ({where}) in keys that cannot change under a checkpoint: "
        f"{', '.join(fixed)}.{more} Nothing was restored or rewritten. To continue that run, "
        f"use its recipe ({where}); to train the new recipe, start a new run (without "
        "auto_resume, or in another work_dir); where the model is the same, "
        "--config.resume_from=<step dir> --config.load_weights_only=True starts it from these "
        "weights.", fixed)
  if other:
    log.warning("the recipe differs from the one the checkpoints in %s were written with (%s) "
                "in: %s. The run continues with the new values.", start.checkpoint_dir, where,
                ", ".join(other))
  return other


def recipe_changes(saved: dict, now: dict) -> tuple[list[str], list[str]]:
  """(fixed, other): every differing key as 'dotted.key (old -> new)', split into those that
  cannot change under a checkpoint and the rest; the RESUME_NEUTRAL keys are left out."""
  before, after = _flatten(_json(saved)), _flatten(_json(now))
  defaults = _flatten(_json(config_lib.base_config().to_dict()))
  fixed, other = [], []
  for key in sorted(set(before) | set(after)):
    old, new = before.get(key, _ABSENT), after.get(key, _ABSENT)
    if old == new or _under(key, RESUME_NEUTRAL):
      continue
    if old is _ABSENT and (new is None or new == defaults.get(key, _ABSENT)):
      continue  # a key added by a later jaxtune, at its default (mesh.sequence, rope_scaling)
    change = f"{key} ({_show(old)} -> {_show(new)})"
    if key == "tokenizer_path":
      same, change = _same_tokenizer(old, new, change)
      (other if same else fixed).append(change)
    elif _under(key, FIXED) or (key == "optim.max_grad_norm" and _clips(old) != _clips(new)):
      fixed.append(change)
    else:
      other.append(change)
  return fixed, other


def _json(tree: Any) -> Any:
  """What a value looks like after a JSON save and load (tuples become lists)."""
  return json.loads(json.dumps(tree, default=str))


def _flatten(tree: Any, prefix: str = "") -> dict:
  """Dotted keys; lists of sections are numbered (`data.datasets[0].anno_path`)."""
  out = {}
  if isinstance(tree, dict):
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  elif isinstance(tree, list) and tree and all(isinstance(v, dict) for v in tree):
    for i, value in enumerate(tree):
      out.update(_flatten(value, f"{prefix}[{i}]"))
  else:
    out[prefix] = tree
  return out


def _under(key: str, names: tuple[str, ...]) -> bool:
  return any(key == n or key.startswith((n + ".", n + "[")) for n in names)


def _show(value: Any) -> str:
  if value is _ABSENT:
    return "absent"
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def _clips(value: Any) -> bool:
  try:
    return float(value) > 0
  except (TypeError, ValueError):
    return False


def _same_tokenizer(old: Any, new: Any, change: str) -> tuple[bool, str]:
  """A moved tokenizer (same files) is a harmless change; other ids are not."""
  if old is _ABSENT or new is _ABSENT or old is None or new is None:
    return False, change
  before, after = _tokenizer_fingerprint(str(old)), _tokenizer_fingerprint(str(new))
  if before is None:
    return True, f"{change[:-1]}; the old tokenizer cannot be read, not compared)"
  if before == after:
    return True, f"{change[:-1]}; the same tokenizer files)"
  return False, f"{change[:-1]}; another tokenizer: fingerprint {before} -> {after})"


def _tokenizer_fingerprint(path: str) -> str | None:
  """What jaxtune.data.tokenizer.TokenEncoder.fingerprint hashes, from the files alone."""
  from jaxtune.data.tokenizer_files import read_tokenizer_files  # pylint: disable=import-outside-toplevel
  try:
    files = read_tokenizer_files(path)
  except Exception:  # pylint: disable=broad-except  (missing, moved, unreadable)
    return None
  return hashlib.sha256(files.raw + repr(files.eos_token).encode()).hexdigest()[:16]
