"""Fault injection for the multi-host tests: on the PYTHONPATH of the test's subprocesses only.

Python imports `sitecustomize` at start-up, so the real command (`python -m jaxtune.main`,
started through scripts/launch_*.sh) runs unmodified, with one fault planted by
JAXTUNE_TEST_FAULT = {"kind": ..., "process": i, "step": n}:
  sigterm     SIGTERM to process i once step n is logged;
  export      process i's HF export hits a full disk writing its first shard;
  checkpoint  process i's checkpoint of step n hits a full disk (in Orbax's background write);
  prefetch    process i's prefetch thread fails building the batch of step n.
When the fault fires, "<time> <kind> <process>" is appended to JAXTUNE_TEST_FAULT_FIRED; so is
"<time> announce <process>" when a process announces its failure to the others (the moment of
failure for faults that need no planting, e.g. a malformed data line).
"""

import errno
import json
import os
import time

_FAULT = json.loads(os.environ.get("JAXTUNE_TEST_FAULT") or "null")


def _here(process: int) -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index() == process


def _fired(kind: str | None = None, process=None) -> None:
  path = os.environ.get("JAXTUNE_TEST_FAULT_FIRED")
  if path:
    kind = kind or _FAULT["kind"]
    process = _FAULT.get("process") if process is None else process
    with open(path, "a", encoding="utf-8") as f:
      f.write(f"{time.time()} {kind} {process}\n")


def _record_announcements() -> None:
  from jaxtune.train import multihost  # pylint: disable=import-outside-toplevel
  announce = multihost.announce

  def recorded(exc):
    import jax  # pylint: disable=import-outside-toplevel
    if multihost._state.announced is None:  # pylint: disable=protected-access
      _fired("announce", jax.process_index())
    return announce(exc)
  multihost.announce = recorded


def _full_disk(path: str) -> OSError:
  _fired()
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def _plant(fault: dict) -> None:
  kind, process, step = fault["kind"], fault.get("process", 0), fault.get("step", 0)
  if kind == "sigterm":
    import signal  # pylint: disable=import-outside-toplevel
    from jaxtune.train import observability  # pylint: disable=import-outside-toplevel
    log_step = observability.RunMonitor.log_step

    def log_then_signal(self, record):
      log_step(self, record)
      if record["step"] == step and _here(process):
        _fired()
        os.kill(os.getpid(), signal.SIGTERM)
    observability.RunMonitor.log_step = log_then_signal
  elif kind == "export":
    from jaxtune.hf import export  # pylint: disable=import-outside-toplevel
    write_header = export._write_header  # pylint: disable=protected-access

    def full_disk(f, *args, **kwargs):
      if _here(process):
        raise _full_disk(f.name)
      return write_header(f, *args, **kwargs)
    export._write_header = full_disk  # pylint: disable=protected-access
  elif kind == "checkpoint":
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as handler  # pylint: disable=import-outside-toplevel
    save_fn = handler.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

    async def full_disk(self, item, directory):
      if isinstance(item, dict) and item.get("step") == step and _here(process):
        raise _full_disk(str(directory / self._filename))  # pylint: disable=protected-access
      return await save_fn(self, item, directory)
    handler.JsonCheckpointHandler._save_fn = full_disk  # pylint: disable=protected-access
  elif kind == "prefetch":
    from jaxtune.data import pipeline  # pylint: disable=import-outside-toplevel
    batch = pipeline.SFTData.batch

    def broken(self, epoch, in_epoch, order=None):
      if self.global_order and epoch == 0 and in_epoch == step - 1 and _here(process):
        _fired()
        raise RuntimeError(f"injected fault building batch {in_epoch} of epoch {epoch}")
      return batch(self, epoch, in_epoch, order)
    pipeline.SFTData.batch = broken
  else:
    raise ValueError(f"unknown fault kind {kind!r}")


if os.environ.get("JAXTUNE_TEST_FAULT_FIRED"):
  _record_announcements()
if _FAULT:
  _plant(_FAULT)
