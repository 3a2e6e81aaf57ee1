"""The few host-to-host agreements the trainer needs, cheap and exact on one process, and
the rule that a failure on one host stops every host.

The agreements are tiny collectives over the JAX job (every process must call them at the same
point); with one process they return at once without touching the devices.

Failures. A process that raises cannot join the next collective, so the others would wait in
it forever (a gloo or NCCL collective has no timeout, and Python's exit then waits in JAX's
shutdown barrier). Instead, with several processes:
  - the failing process writes its error, exit code and last step into the JAX coordination
    service's key-value store (`announce`), lets an in-flight checkpoint finish (bounded),
    logs, and exits with that code (`fail`);
  - every process runs a watchdog thread that polls the store (every 0.5 s, also while its
    main thread is blocked inside a collective); seeing another process's failure, it logs
    the cause, lets its own in-flight checkpoint finish, and exits with the same code;
  - process 0 exits last, because it hosts the coordination service: once it is gone JAX
    aborts every other process (SIGABRT, a C++ stack trace instead of the cause).
A process that dies without a word (SIGKILL, out of memory) is found by JAX's heartbeats
(`--heartbeat_timeout`, 100 s by default), which then abort every process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from typing import Callable, NoReturn

import jax

# The agreements are plain collectives, shared with the data pipeline; callers keep reaching
# them here (multihost.allgather_text, ...).
from jaxtune.parallel.collectives import (allgather_ints, allgather_text, any_process,
                                          broadcast_text)  # pylint: disable=unused-import

log = logging.getLogger("jaxtune")


# ---- a failure on one host stops every host ------------------------------------------------

_FAILED = "jaxtune/failed/"         # + process index: {"process", "code", "error", "step"}
_DOWN = "jaxtune/down/"             # + process index: about to exit
POLL_S = 0.5                        # how often the watchdog looks for another host's failure
DRAIN_S = 20.0                      # an in-flight checkpoint gets this long to complete
PEERS_EXIT_S = 30.0                 # process 0 waits this long for the others to exit
LOST_COORDINATOR_S = 15.0           # the store unreachable this long: process 0 is gone


class _State:
  def __init__(self):
    self.lock = threading.Lock()
    self.step = 0                   # the last step this process completed
    self.total_steps: int | None = None
    self.checkpoints: str | None = None   # where the run's complete checkpoints are listed
    self.drain: Callable[[float], bool] | None = None
    self.announced: dict | None = None
    self.ending = False             # one thread (main or watchdog) owns the exit
    self.watchdog: threading.Thread | None = None
    self.stop = threading.Event()


_state = _State()


def _client():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  client = distributed.global_state.client
  if client is None:
    raise RuntimeError("jax.distributed is not initialized, yet JAX runs "
                       f"{jax.process_count()} processes")
  return client


def note_step(step: int) -> None:
  """The loop calls this after each completed step (reported with a failure)."""
  _state.step = int(step)


def set_run(*, total_steps: int | None = None, checkpoints: str | None = None,
            drain: Callable[[float], bool] | None = None) -> None:
  """What a failure report names (the step count, the checkpoints) and how an in-flight
  checkpoint is waited for (`drain(timeout_s) -> finished`) before a process exits."""
  _state.total_steps, _state.checkpoints, _state.drain = total_steps, checkpoints, drain


def watch() -> None:
  """Starts this process's watchdog (idempotent; nothing with one process)."""
  if jax.process_count() == 1 or _state.watchdog is not None:
    return
  _client()  # fail now, in the caller, if there is no store
  _state.watchdog = threading.Thread(target=_watch, name="jaxtune-failure-watchdog", daemon=True)
  _state.watchdog.start()


def _stop_watch() -> None:  # at exit: before JAX's own shutdown, registered earlier, runs
  _state.stop.set()
  if _state.watchdog is not None:
    _state.watchdog.join(timeout=2 * POLL_S)


atexit.register(_stop_watch)


def _failures() -> list[dict]:
  """Every process's failure record, first written first (process order on ties)."""
  out = []
  for _, value in _client().key_value_dir_get(_FAILED):
    try:
      out.append(json.loads(value))
    except ValueError:
      continue
  return sorted(out, key=lambda r: (r.get("time", 0.0), r.get("process", 0)))


def _watch() -> None:
  me, lost_since = jax.process_index(), None
  while not _state.stop.wait(POLL_S):
    try:
      others = [r for r in _failures() if r.get("process") != me]
      lost_since = None
    except Exception as e:  # pylint: disable=broad-except  (the store is on process 0)
      lost_since = lost_since or time.monotonic()
      if time.monotonic() - lost_since > LOST_COORDINATOR_S and not _state.stop.is_set():
        _end(dict(process=0, code=1, step=None,
                  error=f"the coordination service on process 0 is unreachable ({e}); "
                        "process 0 has probably died, see its log"), peer=True)
      continue
    if others:
      _end(others[0], peer=True)


def _describe(exc: BaseException) -> str:
  text = str(exc).strip()
  return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def announce(exc: BaseException) -> dict | None:
  """Tells the other processes that this one failed with `exc` (once; the first error is the
  cause). Returns the record; None with one process. Never raises."""
  if jax.process_count() == 1:
    return None
  from jaxtune.launch import exit_code_for  # pylint: disable=import-outside-toplevel
  from jaxtune.train.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  with _state.lock:
    if _state.announced is not None:
      return _state.announced
    # After a failed save, the save in flight elsewhere waits for the failed host: no drain.
    record = dict(process=jax.process_index(), code=exit_code_for(exc), error=_describe(exc),
                  step=_state.step, time=time.time(),
                  drain=not isinstance(exc, CheckpointError))
    try:
      others = [r for r in _failures() if r["process"] != record["process"]]
      if others:  # ours is a consequence (e.g. a collective broken by the exit of the first)
        record = dict(others[0], consequence=_describe(exc))
      else:
        _client().key_value_set(f"{_FAILED}{record['process']}", json.dumps(record))
    except Exception as e:  # pylint: disable=broad-except
      _say(logging.ERROR, f"could not tell the other processes about the failure ({e}); they "
                          "stop when JAX's heartbeats time out")
    _state.announced = record
    return record


def fail(exc: BaseException) -> NoReturn:
  """Ends this process after `exc` so that every process stops (several processes only):
  announces it, waits for an in-flight checkpoint (bounded), logs, exits with its code."""
  record = announce(exc)
  assert record is not None, "fail() is for multi-process jobs; re-raise with one process"
  _end(record, peer=record["process"] != jax.process_index(), exc=exc)


def _end(record: dict, *, peer: bool, exc: BaseException | None = None) -> NoReturn:
  with _state.lock:
    already, _state.ending = _state.ending, True
  while already:  # the other thread (main or watchdog) is on its way out: it exits for both
    time.sleep(60)
  me, count = jax.process_index(), jax.process_count()
  drained = _drain() if record.get("drain", True) else False
  total = f" of {_state.total_steps}" if _state.total_steps else ""
  where = (f"; its last step: {record['step']}" if peer and record.get("step") is not None
           else "")
  error = record["error"].rstrip(".")
  if peer:
    _say(logging.ERROR, f"process {record['process']} of {count} failed: {error}{where}. "
                        f"This process stops after step {_state.step}{total} "
                        f"(exit code {record['code']}).")
  else:  # the traceback too, but not for a recipe mistake (the message says it all)
    from jaxtune.launch import EXIT_CONFIG  # pylint: disable=import-outside-toplevel
    _say(logging.ERROR, f"process {me} of {count} failed: {error}. This process stops after "
                        f"step {_state.step}{total}; every process stops "
                        f"(exit code {record['code']}).",
         exc_info=exc if record["code"] != EXIT_CONFIG else None)
  if _state.checkpoints is not None:  # once training was set up: where to resume from
    _say(logging.ERROR, _resume_hint(drained))
  try:
    _client().key_value_set(f"{_DOWN}{me}", "1", allow_overwrite=True)
    if me == 0:  # the coordination service lives here: the others go first
      deadline = time.monotonic() + PEERS_EXIT_S
      while time.monotonic() < deadline:
        if len(_client().key_value_dir_get(_DOWN)) >= count:
          break
        time.sleep(0.1)
      time.sleep(0.5)  # their os._exit after the mark
  except Exception:  # pylint: disable=broad-except  (the store may be gone already)
    pass
  _exit(int(record["code"]))


def _drain() -> bool:
  if _state.drain is None:
    return True
  try:
    return bool(_state.drain(DRAIN_S))
  except Exception as e:  # pylint: disable=broad-except
    _say(logging.WARNING, f"the checkpoint being written could not be completed: {e}")
    return False


def _resume_hint(drained: bool) -> str:
  from jaxtune.train.checkpoint import complete_steps  # pylint: disable=import-outside-toplevel
  steps = complete_steps(_state.checkpoints) if _state.checkpoints else []
  newest = (f"the newest complete checkpoint is {_state.checkpoints}/{steps[-1]}" if steps
            else "no checkpoint is complete yet")
  lost = "" if drained else " (the one being written when this happened did not finish)"
  return (f"{newest}{lost}. Fix the cause, then run the same command with "
          "--config.auto_resume=True to continue from it.")


def _say(level: int, message: str, exc_info: BaseException | None = None) -> None:
  """To jaxtune's log (console and train.log) while a run logs; to stderr before that."""
  if log.handlers:
    log.log(level, message, exc_info=exc_info)
  else:
    print(f"jaxtune: {message}", file=sys.stderr, flush=True)
    if exc_info is not None:
      import traceback  # pylint: disable=import-outside-toplevel
      traceback.print_exception(exc_info, file=sys.stderr)


def _exit(code: int) -> NoReturn:
  for handler in list(log.handlers) + logging.getLogger().handlers:
    try:
      handler.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  sys.stdout.flush()
  sys.stderr.flush()
  # Not sys.exit: Python's exit would wait in JAX's shutdown barrier for processes that are
  # gone, and other threads may be stuck in a collective that never completes.
  os._exit(code)  # pylint: disable=protected-access
