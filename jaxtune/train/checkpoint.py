"""Orbax checkpoints of a run: parameters, optimizer state, progress, data position, config.

One checkpoint is `checkpoints/<step>/` with four items:
  state      {"params": the model parameters} (each stored once; frozen ones included, they
             have no optimizer state: the train state keeps it for the trainable ones only);
  optimizer  the optimizer state and the applied-update counter that drives the LR schedule;
  progress   JSON: step, epoch, consumed tokens, seeds, the data iterator state;
  config     JSON: the resolved recipe the run was started with.
Keeping params apart from the optimizer lets a weights-only load read just the parameters.
A LoRA run saves the adapters alone as its `state` (the trainer passes them; the frozen base is
rebuilt from `load_from` on restore: jaxtune.train.lora_run).

Saving is asynchronous: `save` returns once the arrays are copied to host memory and Orbax
writes them in the background into `<step>.orbax-checkpoint-tmp`, renamed to `<step>` only when
every item is on disk. So a crash while saving leaves no directory under the step's name, and
the leftover temporary directory is ignored (and cleaned up by the next run). A step directory
that still fails to restore (files damaged or deleted later) is skipped with a warning; after a
successful restore of an older step, the broken newer ones are moved to `checkpoints-skipped/`
so that the resumed run can save those steps again.

A failed save (disk full, permissions, a lost file system) is a CheckpointError naming the step
directory and the cause, raised in the training loop: at once when Orbax refuses the save,
else at the next step boundary (`check`), when the background write has failed. With several
hosts Orbax's background write then waits at a barrier for the failed host for its timeout
(10 minutes), so the error is caught from Orbax's own error report (its log record) instead.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Restored(NamedTuple):
  step: int                  # the trainer step the checkpoint was taken after
  params: Any                # nnx.State of the parameters, placed as the target asked
  optimizer: Any | None      # {"opt_state": ..., "step": ...}; None for a weights-only load
  progress: dict
  config: dict | None


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none in a directory that should hold one restores."""


class _BackgroundErrors(logging.Handler):
  """Catches the errors Orbax's background save threads report (and keep to themselves) for
  saves into `directory`; keeps their text only (an exception would keep Orbax's coroutines
  and frames alive)."""

  def __init__(self, directory: str):
    super().__init__(level=logging.ERROR)
    self.directory = directory
    self.error: str | None = None
    self.armed = False

  def emit(self, record: logging.LogRecord) -> None:
    if not (self.armed and self.error is None and record.exc_info
            and record.exc_info[1] is not None and "orbax" in record.pathname
            and record.threadName != "MainThread"):
      return
    error = record.exc_info[1]
    text = f"{type(error).__name__}: {_first_line(error)}"
    if self.directory in record.getMessage() or self.directory in text:
      self.error = text


def checkpoint_location(path: str) -> tuple[str, int | None]:
  """`resume_from` -> (checkpoints directory, step or None for the newest).

  Accepts a step directory (`.../checkpoints/12`), a checkpoints directory, or a run directory
  holding `checkpoints/`.
  """
  path = os.path.abspath(path)
  name = os.path.basename(path)
  if name.isdigit() and os.path.isdir(path):
    return os.path.dirname(path), int(name)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  return path, None


def complete_steps(directory: str) -> list[int]:
  """Steps with a finished checkpoint directory (temporary ones excluded), oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


class Checkpointer:
  """Saves and restores checkpoints of one run, keyed by trainer step.

  read_only: open another run's checkpoints (`resume_from`): nothing is created or cleaned up
  there, and `save` is never called on it.
  """

  def __init__(self, directory: str, *, max_to_keep: int = -1, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep if max_to_keep > 0 else None,
        enable_async_checkpointing=async_save,
        create=not read_only,
        # Leftovers of a crash during a save; never touched in a directory we only read from.
        cleanup_tmp_directories=not read_only,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._saving: int | None = None  # the step being written in the background
    self._errors = _BackgroundErrors(self.directory)
    logging.getLogger("absl").addHandler(self._errors)  # Orbax logs through absl

  def save(self, step: int, state, progress: dict, config: dict) -> None:
    """Starts saving `state` (a TrainState) after `step`; returns when arrays are on host."""
    self._wait_previous()
    self._saving, self._errors.armed = step, True
    try:
      self._manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": state.params}),
          optimizer=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step}),
          progress=ocp.args.JsonSave(progress),
          config=ocp.args.JsonSave(config)))
    except Exception as e:  # pylint: disable=broad-except  (named, then raised)
      raise self._save_error(step, e) from e

  def _save_error(self, step: int, error: BaseException | str) -> CheckpointError:
    done = [s for s in complete_steps(self.directory) if s != step]
    if isinstance(error, BaseException):
      error = f"{type(error).__name__}: {_first_line(error)}"
    return CheckpointError(
        f"checkpoint {self.directory}/{step} could not be written (process "
        f"{jax.process_index()}): {error}. Check the "
        f"space and permissions under {self.directory}; the newest complete checkpoint is "
        f"{f'step {done[-1]}' if done else 'none'}.")

  def _wait_previous(self) -> None:
    """Waits for the save in flight, raising as soon as its failure is reported: with several
    hosts a failed save is never finished on the others (Orbax waits at a barrier)."""
    saving = getattr(self._manager, "is_saving_in_progress", None)  # older Orbax: no poll
    while self._saving is not None and saving is not None and saving():
      self.check()
      time.sleep(0.02)
    self.check()

  def check(self) -> None:
    """Raises CheckpointError if a background save has failed (cheap: call every step)."""
    if self._errors.error is not None:
      error, self._errors.error, self._errors.armed = self._errors.error, None, False
      raise self._save_error(self._saving, error)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def saved_config(self, step: int | None = None) -> dict | None:
    """The recipe stored with checkpoint `step` (default: the newest complete one), read
    alone (no arrays); None when there is no such checkpoint or it cannot be read."""
    steps = self.all_steps()
    step = steps[-1] if step is None and steps else step
    if step is None or step not in steps:
      return None
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  (restore_latest reports damage)
      log.warning("the recipe stored with checkpoint %s/%d cannot be read (%s: %s)",
                  self.directory, step, type(e).__name__, _first_line(e))
      return None
    config = out.get("config")
    return dict(config) if config is not None else None

  def restore(self, step: int, abstract_state, *, weights_only: bool = False) -> Restored:
    """Restores `step` into the shapes, dtypes and shardings of `abstract_state`.

    abstract_state: a TrainState of jax.ShapeDtypeStruct with shardings, so every array is
    read straight into its place on the mesh. weights_only: read the params and progress only.
    """
    items = dict(state=ocp.args.StandardRestore({"params": abstract_state.params}),
                 progress=ocp.args.JsonRestore())
    if not weights_only:
      items.update(optimizer=ocp.args.StandardRestore(
          {"opt_state": abstract_state.opt_state, "step": abstract_state.step}),
          config=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step=step, params=out["state"]["params"], optimizer=out.get("optimizer"),
                    progress=dict(out["progress"]),
                    config=dict(out["config"]) if out.get("config") is not None else None)

  def restore_latest(self, abstract_state, *, step: int | None = None,
                     weights_only: bool = False, quarantine: bool = False) -> Restored | None:
    """The newest checkpoint (at most `step`) that restores; None when there is none.

    A checkpoint that fails to restore is skipped with a warning and the next older one is
    tried. quarantine: move the skipped ones out of the way once an older one restored (only
    for the run's own directory). When checkpoints exist but none restores, that is an error
    (more likely a changed recipe than damage everywhere), never a silent fresh start.
    """
    steps = [s for s in self.all_steps() if step is None or s <= step]
    if step is not None and step not in steps:
      raise CheckpointError(f"{self.directory} has no complete checkpoint for step {step} "
                            f"(complete: {self.all_steps()})")
    failures = []
    for candidate in reversed(steps):
      try:
        restored = self.restore(candidate, abstract_state, weights_only=weights_only)
      except Exception as e:  # pylint: disable=broad-except  (any damage: skip, report)
        failures.append((candidate, e))
        log.warning("checkpoint %s/%d cannot be restored (%s: %s); trying an older one",
                    self.directory, candidate, type(e).__name__, _first_line(e))
        continue
      if failures and quarantine:
        self._quarantine([s for s, _ in failures])
      return restored
    if failures:
      listing = "; ".join(f"step {s}: {type(e).__name__}: {_first_line(e)}" for s, e in failures)
      raise CheckpointError(
          f"no checkpoint in {self.directory} can be restored ({listing}). If the recipe's "
          "model, optimizer or mesh changed since they were written, restore with the old "
          "recipe, or start from the weights only with --config.resume_from=<step dir> "
          "--config.load_weights_only=True.")
    return None

  def _quarantine(self, steps: list[int]) -> None:
    """Moves unrestorable step directories to `<directory>-skipped/` (kept for inspection)."""
    target = self.directory + "-skipped"
    if jax.process_index() == 0:
      os.makedirs(target, exist_ok=True)
      for step in steps:
        dest = os.path.join(target, str(step))
        suffix = 1
        while os.path.exists(dest):
          dest, suffix = os.path.join(target, f"{step}-{suffix}"), suffix + 1
        shutil.move(os.path.join(self.directory, str(step)), dest)
        log.warning("moved unrestorable checkpoint %d to %s", step, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxtune quarantine {self.directory}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the last save is complete on disk; CheckpointError if it failed."""
    self._wait_previous()
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._saving, self._errors.error or e) from e
    self.check()
    self._errors.armed = False

  def drain(self, timeout_s: float) -> bool:
    """Waits at most `timeout_s` for the save in flight (on the way out after an error);
    True when nothing is left unwritten. Never raises."""
    if self._saving is None:
      return True
    waiter = threading.Thread(target=self._wait_quietly, name="jaxtune-checkpoint-drain",
                              daemon=True)
    waiter.start()
    waiter.join(timeout_s)
    return not waiter.is_alive() and self._errors.error is None

  def _wait_quietly(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception:  # pylint: disable=broad-except  (drain reports it as not finished)
      self._errors.error = self._errors.error or "the save failed"

  def close(self) -> None:
    """Waits for the last save, then closes; CheckpointError if that save failed."""
    error = None
    try:
      self.wait()
    except CheckpointError as e:
      error = e
    logging.getLogger("absl").removeHandler(self._errors)
    try:
      self._manager.close()
    except Exception as e:  # pylint: disable=broad-except  (the same failed save, again)
      error = error or self._save_error(self._saving, e)
    if error is not None:
      raise error


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0][:300] if text else ""
