"""Weights & Biases logging (optional: `pip install jaxtune[wandb]`), on process 0 only.

`observability.wandb_project` switches it on. The W&B run gets the resolved recipe as its
config and every metrics.jsonl record, field for field, at `step=record["step"]`. Its id is
kept in `<run>/wandb_id.txt`: a resumed run (auto_resume, or resume_from in the same run
directory) continues the same W&B run. `wandb` is imported only when switched on.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import string
import sys

from ml_collections import ConfigDict

from jaxtune import config as config_lib

log = logging.getLogger(__name__)

ID_FILE = "wandb_id.txt"


def run_id(run_dir: str) -> str:
  """The W&B run id of this run directory: the one stored there, else a new one (stored)."""
  path = os.path.join(run_dir, ID_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      stored = f.read().strip()
    if stored:
      return stored
  except FileNotFoundError:
    pass
  new = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(new + "\n")
  os.replace(tmp, path)
  return new


class WandbRun:
  """One W&B run for one training session; `finish()` closes it (a failed one if raised)."""

  def __init__(self, recipe: ConfigDict, run_dir: str):
    os.environ.setdefault("WANDB_SILENT", "true")  # no banner, no sync hints on the console
    logging.getLogger("wandb").setLevel(logging.WARNING)  # nor its INFO lines in train.log
    import wandb  # pylint: disable=import-outside-toplevel
    obs = recipe.observability
    self.id = run_id(run_dir)
    self._run = wandb.init(
        project=obs.wandb_project, entity=obs.wandb_entity,
        name=obs.wandb_run_name or os.path.basename(os.path.normpath(run_dir)),
        tags=list(obs.wandb_tags) or None, mode=obs.wandb_mode,
        config=json.loads(config_lib.to_json(recipe)),  # = config.json
        dir=run_dir, id=self.id, resume="allow",
        settings=wandb.Settings(silent=True, console="off"))
    log.info("W&B run %s (project %s, mode %s)", self.id, obs.wandb_project,
             self._run.settings.mode)

  def log(self, record: dict) -> None:
    """One metrics.jsonl record, its values as written there; a null there (no value, or a
    non-finite number: a skipped step's loss) is left out here."""
    self._run.log({k: v for k, v in record.items()
                   if v is not None and not (isinstance(v, float) and not math.isfinite(v))},
                  step=record["step"])

  def finish(self) -> None:
    """Exit code 1 when called while an exception propagates (a failed run), else 0."""
    if self._run is not None:
      failed = sys.exc_info()[1] is not None
      run, self._run = self._run, None
      run.finish(exit_code=1 if failed else 0)


def start(recipe: ConfigDict, run_dir: str, is_main: bool) -> WandbRun | None:
  """A WandbRun where `observability.wandb_project` is set and this is process 0."""
  if not is_main or recipe.observability.wandb_project is None:
    return None
  return WandbRun(recipe, run_dir)
