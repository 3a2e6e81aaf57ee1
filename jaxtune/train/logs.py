"""Logging for a run: jaxtune's own lines on the console and in train.log, libraries quiet.

Orbax and JAX log through absl / Python logging at INFO (dozens of lines per checkpoint);
those are raised to WARNING. jaxtune's logger gets its own handlers and stops propagating
while a run is active, so its lines appear once, in one format, both under `absl.app.run`
(which puts a handler on the root logger) and in a notebook (which has none). Console lines go
through `tqdm.write`, so they never tear the progress bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Iterator

from tqdm import tqdm

LOGGER = "jaxtune"
STEP_LOGGER = "jaxtune.steps"       # one line per logged step: file always, console w/o bar
_NOISY = ("absl", "orbax")          # absl carries Orbax's and Grain's INFO chatter
_NOISY_IF_UNSET = ("jax",)          # "Unable to initialize backend 'tpu'", ...


def quiet_libraries() -> None:
  """Raises library loggers to WARNING; call before JAX initialises its backends."""
  for name in _NOISY:
    logging.getLogger(name).setLevel(logging.WARNING)
  for name in _NOISY_IF_UNSET:
    logger = logging.getLogger(name)
    if logger.level == logging.NOTSET:
      logger.setLevel(logging.WARNING)


class _TqdmHandler(logging.Handler):
  def emit(self, record: logging.LogRecord) -> None:
    try:
      tqdm.write(self.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except  (logging must never raise)
      self.handleError(record)


class _DropSteps(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not record.name.startswith(STEP_LOGGER)


@contextlib.contextmanager
def run_logging(run_dir: str, *, is_main: bool, step_lines_on_console: bool) -> Iterator[str]:
  """jaxtune's INFO lines to the console (process 0) and to `<run_dir>/train.log`.

  Yields the log file's path; handlers and propagation are restored on exit.
  """
  logger = logging.getLogger(LOGGER)
  console = _TqdmHandler(level=logging.INFO if is_main else logging.WARNING)
  console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
  if not step_lines_on_console:
    console.addFilter(_DropSteps())
  name = "train.log" if is_main else f"train.{_process_index()}.log"
  path = os.path.join(run_dir, name)
  file = logging.FileHandler(path, encoding="utf-8")
  file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  saved = logger.level, logger.propagate
  logger.setLevel(logging.INFO)
  logger.propagate = False
  logger.addHandler(console)
  logger.addHandler(file)
  try:
    yield path
  finally:
    logger.removeHandler(console)
    logger.removeHandler(file)
    file.close()
    logger.setLevel(saved[0])
    logger.propagate = saved[1]


def _process_index() -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index()
