"""Tiny host-to-host collectives over the JAX job: every process calls them at the same point.

With one process they return at once without touching the devices. The trainer's agreements
(`jaxtune.train.multihost`) and the data pipeline's (hosts agree on the steps of an epoch) both
use these; jax is imported on first use, so importing this module stays cheap for data tools.
"""

from __future__ import annotations

import numpy as np


def _jax():
  import jax  # pylint: disable=import-outside-toplevel
  return jax


def _collectives():
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return multihost_utils


def process_count() -> int:
  return _jax().process_count()


def allgather_ints(value: int) -> list[int]:
  """Every process's `value` (int32 range: JAX runs without x64), in process order."""
  if process_count() == 1:
    return [int(value)]
  out = _collectives().process_allgather(np.asarray([value], np.int32))
  return [int(v) for v in np.asarray(out).reshape(-1)]


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  return max(allgather_ints(int(flag))) > 0


def _encode(text: str, size: int) -> np.ndarray:
  raw = text.encode()
  if len(raw) > size:
    raise ValueError(f"{len(raw)} bytes do not fit the {size}-byte exchange buffer: {text!r}")
  return np.frombuffer(raw.ljust(size, b"\0"), np.uint8)


def _decode(buffer: np.ndarray) -> str:
  return bytes(np.asarray(buffer, np.uint8)).rstrip(b"\0").decode()


def broadcast_text(text: str, size: int = 4096) -> str:
  """Process 0's `text` on every process (e.g. the run directory it chose)."""
  if process_count() == 1:
    return text
  return _decode(_collectives().broadcast_one_to_all(_encode(text, size)))


def allgather_text(text: str, size: int = 256) -> list[str]:
  """Every process's `text`, in process order."""
  if process_count() == 1:
    return [text]
  out = np.asarray(_collectives().process_allgather(_encode(text, size)))
  return [_decode(row) for row in out.reshape(-1, size)]
