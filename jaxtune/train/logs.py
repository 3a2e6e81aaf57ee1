"""Logging for a run: jaxtune's own lines on the console and in train.log, libraries quiet.

Orbax and JAX log through absl / Python logging at INFO (dozens of lines per checkpoint);
those are raised to WARNING. jaxtune's logger gets its own handlers and stops propagating
while a run is active, so its lines appear once, in one format, both under `absl.app.run`
(which puts a handler on the root logger) and in a notebook (which has none). Console lines go
through `tqdm.write`, so they never tear the progress bar.

Fatal errors. The error that ends a run goes to train.log with its full traceback
(`log_fatal`, file only); the command line then prints one short report on the console
(`error_report`: what, where, what to do, and where the traceback is), the traceback itself only
with --verbose or JAXTUNE_VERBOSE=1 (jaxtune.main).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
from typing import Iterator

from tqdm import tqdm

LOGGER = "jaxtune"
STEP_LOGGER = "jaxtune.steps"       # one line per logged step: file always, console w/o bar
_NOISY = ("absl", "orbax")          # absl carries Orbax's and Grain's INFO chatter
_NOISY_IF_UNSET = ("jax",)          # "Unable to initialize backend 'tpu'", ...
_FILE_ONLY = "jaxtune_file_only"    # a record attribute: this record is for train.log only
_RUN_LOG = "jaxtune_run_log"        # a handler attribute: the run's train.log
VERBOSE_ENV = "JAXTUNE_VERBOSE"
_REPORT_LINES = 3                   # lines of an error's message shown on the console
_REPORT_LINE_CHARS = 2000


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


class _DropFileOnly(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not getattr(record, _FILE_ONLY, False)


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
  console.addFilter(_DropFileOnly())
  name = "train.log" if is_main else f"train.{_process_index()}.log"
  path = os.path.join(run_dir, name)
  file = logging.FileHandler(path, encoding="utf-8")
  file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  setattr(file, _RUN_LOG, True)
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


# ---- fatal errors ---------------------------------------------------------------------------

def describe(exc: BaseException) -> str:
  text = str(exc).strip()
  return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def log_fatal(exc: BaseException) -> bool:
  """Writes the error that ends the run, with its full traceback, to the run's train.log only
  (the console gets `error_report` from the command line, or the exception in a notebook).
  Returns whether a run log was open to take it. Never raises."""
  logger = logging.getLogger(LOGGER)
  if not any(getattr(h, _RUN_LOG, False) for h in logger.handlers):
    return False
  try:
    what = ("aborted (a second Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
            else f"the run failed: {describe(exc)}")
    logger.error(what, exc_info=exc, extra={_FILE_ONLY: True})
  except Exception:  # pylint: disable=broad-except  (reporting must not hide the error)
    return False
  return True


def verbose_from_env() -> bool:
  return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def raised_at(exc: BaseException) -> str | None:
  """`file:line` where `exc` was raised: the innermost frame in jaxtune's own code (paths
  relative to the source tree), else the innermost frame."""
  frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
  if not frames:
    return None
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../jaxtune
  root = os.path.dirname(package)
  ours = [f for f in frames if os.path.abspath(f.filename).startswith(package + os.sep)]
  frame = (ours or frames)[-1]
  path = os.path.abspath(frame.filename)
  if path.startswith(root + os.sep):
    path = os.path.relpath(path, root)
  return f"{path}:{frame.lineno}"


def _clip(line: str) -> str:
  return line if len(line) <= _REPORT_LINE_CHARS else line[:_REPORT_LINE_CHARS] + " [...]"


def error_report(exc: BaseException, *, log_file: str | None = None,
                 verbose: bool = False) -> str:
  """The console's account of a fatal error, without its traceback.

  The error's message (which says what and where: file:line, key or path, and what to do;
  its first 3 lines), its cause, where in jaxtune it was raised, and where the full traceback
  is: at most 5 lines. A configuration error's message is shown whole (it lists every
  mistaken key) and without the code location."""
  from jaxtune.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jaxtune.launch import LaunchError  # pylint: disable=import-outside-toplevel
  lines = [l for l in str(exc).strip().splitlines() if l.strip()] or [type(exc).__name__]
  config = isinstance(exc, (ConfigError, LaunchError))
  head = "configuration error" if config else f"error ({type(exc).__name__})"
  shown = [_clip(l) for l in (lines if config else lines[:_REPORT_LINES])]
  if len(lines) > len(shown):
    rest = "in the log" if log_file else "shown with --verbose"
    shown[-1] += f" [{len(lines) - len(shown)} more line(s) {rest}]"
  out = [f"jaxtune: {head}: {shown[0]}"] + [f"  {l.strip()}" for l in shown[1:]]
  cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
  if cause is not None and not config:
    first = (str(cause).strip().splitlines() or [""])[0]
    out.append(_clip(f"  caused by {type(cause).__name__}" + (f": {first}" if first else "")))
  notes = []
  where = None if config else raised_at(exc)
  if where:
    notes.append(f"raised at {where}")
  if log_file:
    notes.append(f"the full error and traceback: {log_file}")
  if not verbose and not config:
    notes.append(f"--verbose or {VERBOSE_ENV}=1 shows the traceback here")
  if notes:
    out.append("  (" + "; ".join(notes) + ")")
  return "\n".join(out)
