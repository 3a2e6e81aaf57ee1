"""Step metrics: device peak FLOP/s for MFU (each family counts its FLOPs), memory figures,
and the `metrics.jsonl` writer."""

from __future__ import annotations

import json
import math
import os
import resource

import jax

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
_PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12,
    "b200": 2250e12, "a100": 312e12, "a800": 312e12, "l40s": 362e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """The device's peak, or None where none is known (a CPU): `mfu` is then null, not a
  number made up from a nominal figure."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind.replace(" ", ""):
      return flops
  return None


def mfu(flops: float, step_time: float, peak: float | None, n_devices: int) -> float | None:
  """Model FLOPs utilisation of one step, None without a known peak."""
  return None if peak is None else flops / step_time / (peak * n_devices)


def device_memory_gib() -> dict:
  """Bytes in use and peak on the first local device, where the backend reports them."""
  stats = jax.local_devices()[0].memory_stats() or {}
  gib = 1024 ** 3
  out = {}
  if "bytes_in_use" in stats:
    out["mem_gib"] = round(stats["bytes_in_use"] / gib, 3)
  if "peak_bytes_in_use" in stats:
    out["mem_peak_gib"] = round(stats["peak_bytes_in_use"] / gib, 3)
  return out


def host_memory_gib() -> dict:
  """Peak resident memory of this process (the CPU's "device memory" on a CPU run)."""
  peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {"host_mem_peak_gib": round(peak_kib / 1024 ** 2, 3)}


def _finite_or_none(value):
  """NaN / Inf -> null: strict JSON readers (jq, JavaScript) reject bare NaN tokens."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class MetricsWriter:
  """Appends one JSON object per line and flushes, so a crash loses at most the current line.

  Non-finite numbers (a skipped step's loss) are written as null.
  """

  def __init__(self, path: str, enabled: bool = True):
    self.enabled = enabled
    self._file = open(path, "a", encoding="utf-8") if enabled else None

  def write(self, record: dict) -> None:
    if self._file is not None:
      clean = {k: _finite_or_none(v) for k, v in record.items()}
      self._file.write(json.dumps(clean, sort_keys=True, allow_nan=False) + "\n")
      self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


def truncate_jsonl(path: str, after_step: int) -> None:
  """Drops records of steps > after_step (a resumed run rewrites them); atomic replace.

  A line cut short by a crash is dropped too.
  """
  if not os.path.exists(path):
    return
  kept = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        step = json.loads(line).get("step", 0)
      except ValueError:
        continue
      if step <= after_step:
        kept.append(line if line.endswith("\n") else line + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(kept)
  os.replace(tmp, path)
