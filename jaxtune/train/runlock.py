"""One run, one process group: the lock file that keeps a second start out of a live run.

`<run_dir>/run.lock` names its holder as JSON: host, pid, the time it was taken and the
process's start time (Linux: clock ticks since boot, which tells a live holder from another
process that later got the same pid). It is created atomically (O_CREAT | O_EXCL) and the
holder keeps an `fcntl.flock` on it for as long as it runs, so:

  - a holder that is alive holds the flock: a second start cannot take it and stops with
    RunLockedError (exit code 2) naming the holder, before it writes anything;
  - a holder that died without releasing (SIGKILL, a crash) left the file but no flock (the
    kernel drops it with the process). On the same host, a holder pid that no longer runs
    (or now belongs to another process) makes the lock stale: it is taken over, with a notice
    the caller logs. A holder on another host cannot be checked from here: the lock is
    refused, and the message says to delete the file if that process is gone.

The trainer takes the lock on process 0 only (the run directory is on a shared file system;
the other hosts follow process 0's decision) and releases it when `fit` ends, also on an
exception or after a SIGTERM stop; the file is removed on release.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time

from jaxtune.config import ConfigError

LOCK_NAME = "run.lock"
_CLAIM_GRACE_S = 10.0  # a lock file still empty this long after it was made: its maker died
_ATTEMPTS = 20


class RunLockedError(ConfigError):
  """The run directory is held by another process (exit code 2, like a recipe mistake: the
  start is refused before anything is loaded or written)."""

  def __init__(self, message: str, holder: dict | None = None):
    super().__init__(message)
    self.holder = holder


def describe(holder: dict | None) -> str:
  """'host H, pid P, since T' (what a message names the holder by)."""
  if not holder:
    return "a process that has not written its name yet"
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
          f"since {holder.get('since', '?')}")


def _process_start(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (Linux); None where unknown."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3 (the state)
  except (OSError, IndexError, ValueError):
    return None


def _running(pid: int, start: int | None) -> bool:
  """Whether `pid` is alive on this host and is the process that started at `start`."""
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    pass
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
        return False
  except (OSError, IndexError):
    pass
  now = _process_start(pid)
  return start is None or now is None or now == start


def _me() -> dict:
  return dict(host=socket.gethostname(), pid=os.getpid(),
              since=datetime.datetime.now().isoformat(timespec="seconds"),
              pid_start=_process_start(os.getpid()))


def _flock(fd: int) -> bool:
  """A non-blocking exclusive flock; False when another open file holds it. A file system
  without flock support counts as free (the pid checks still apply)."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
      return False
    return True


def _read(fd: int) -> dict | None:
  try:
    raw = os.pread(fd, 65536, 0)
    holder = json.loads(raw.decode("utf-8")) if raw.strip() else None
  except (OSError, ValueError):
    return None
  return holder if isinstance(holder, dict) else None


def _write(fd: int, holder: dict) -> None:
  data = (json.dumps(holder) + "\n").encode()
  os.ftruncate(fd, 0)
  os.pwrite(fd, data, 0)
  os.fsync(fd)


def _same_file(fd: int, path: str) -> bool:
  try:
    here, there = os.fstat(fd), os.stat(path)
  except OSError:
    return False
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


class RunLock:
  """A held lock; `release()` (idempotent) removes the file and drops the flock."""

  def __init__(self, path: str, fd: int, holder: dict, notice: str | None = None):
    self.path, self.holder = path, holder
    self.notice = notice  # set when a stale lock was taken over: for the run's log
    self._fd: int | None = fd

  @property
  def held(self) -> bool:
    return self._fd is not None

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is None:
      return
    try:
      if _same_file(fd, self.path):  # never remove a file someone else holds by now
        os.unlink(self.path)
    except OSError:
      pass
    finally:
      os.close(fd)  # drops the flock

  def __enter__(self) -> "RunLock":
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def acquire(run_dir: str) -> RunLock:
  """Takes `<run_dir>/run.lock` for this process; RunLockedError when a live process holds
  it (or one on another host that cannot be checked). A stale lock is taken over: the
  returned lock's `notice` says so."""
  path = os.path.join(run_dir, LOCK_NAME)
  for _ in range(_ATTEMPTS):
    me = _me()
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
      lock = _take_over(path, me)
      if lock is not None:
        return lock
      time.sleep(0.05)  # the file changed under us (released, or taken over): look again
      continue
    # Made it. Someone inspecting the new file may hold its flock for a moment.
    deadline = time.monotonic() + 2.0
    while not _flock(fd):
      if time.monotonic() > deadline:  # a process took it over between our create and flock
        os.close(fd)
        break
      time.sleep(0.01)
    else:
      _write(fd, me)
      return RunLock(path, fd, me)
  raise RunLockedError(f"run directory {run_dir} is in use: its lock {path} keeps changing "
                       "hands (several processes starting at once?). Start one at a time.")


def _take_over(path: str, me: dict) -> RunLock | None:
  """Inspects an existing lock file: raises when its holder lives (or cannot be checked),
  takes it over when stale, None when the file changed meanwhile (the caller retries)."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
  except FileNotFoundError:
    return None
  keep = False
  try:
    locked = not _flock(fd)
    holder = _read(fd)
    run_dir = os.path.dirname(path)
    if locked:
      raise _locked(run_dir, path, holder, "")
    if not _same_file(fd, path):  # released (removed) or replaced while we opened it
      return None
    if holder is None:
      age = time.time() - os.fstat(fd).st_mtime
      if age < _CLAIM_GRACE_S:  # being written by a process that just made it
        raise _locked(run_dir, path, None, "")
    elif holder.get("host") != me["host"]:
      raise _locked(run_dir, path, holder,
                    f" That host's processes cannot be checked from {me['host']}: if that "
                    f"process is no longer running (e.g. its node failed), delete {path} and "
                    "start again.")
    elif (_running(int(holder.get("pid") or -1), holder.get("pid_start"))
          and holder.get("pid") != me["pid"]):
      # Alive without its flock: releasing right now, or not a jaxtune lock holder. Refuse.
      raise _locked(run_dir, path, holder, "")
    _write(fd, me)
    keep = True
    notice = (f"took over the lock {path} of a process that is no longer running "
              f"({describe(holder)}); check that nothing else writes to {run_dir}")
    return RunLock(path, fd, me, notice=notice)
  finally:
    if not keep:
      os.close(fd)


def _locked(run_dir: str, path: str, holder: dict | None, advice: str) -> RunLockedError:
  pid = holder.get("pid") if holder else None
  stop = f" (e.g. kill {pid} on {holder.get('host')})" if pid else ""
  return RunLockedError(
      f"run directory {run_dir} is in use by another jaxtune process ({describe(holder)}; "
      f"lock file {path}); this start changed nothing there. Wait for that run to end, or stop "
      f"it{stop}, then start again.{advice}", holder)
