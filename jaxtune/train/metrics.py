"""Step metrics: FLOP accounting for MFU, memory figures, and the `metrics.jsonl` writer."""

from __future__ import annotations

import json
import math
import os
import resource

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
_PEAK_FLOPS = {
    "h100": 989e12, "h200": 989e12, "h800": 989e12, "gh200": 989e12,
    "b200": 2250e12, "a100": 312e12, "a800": 312e12, "l40s": 362e12,
}
# No meaningful peak exists for the CPU; a nominal figure keeps `mfu` a number there. MFU is
# only meaningful on accelerators.
_NOMINAL_CPU_FLOPS = 1e11


def peak_flops_per_device(device: jax.Device | None = None) -> float:
  kind = (device or jax.devices()[0]).device_kind.lower()
  for name, flops in _PEAK_FLOPS.items():
    if name in kind.replace(" ", ""):
      return flops
  return _NOMINAL_CPU_FLOPS


def matmul_params(model_cfg) -> int:
  """Parameters that take part in a matmul per token (embedding lookup excluded, LM head in)."""
  m = model_cfg
  d, h = m.hidden_size, m.head_dim
  attn = d * h * (m.num_attention_heads * 2 + m.num_key_value_heads * 2)
  mlp = 3 * d * m.intermediate_size
  return m.num_hidden_layers * (attn + mlp) + d * m.vocab_size


def train_flops(model_cfg, tokens: int, sum_sq_seq_lens: int) -> float:
  """Model FLOPs of one training step (forward + backward, no recomputation counted).

  6 FLOPs per matmul parameter per token, plus causal attention: QK^T and AV each cost
  2 * len^2 * N * H per layer forward over a causal half, times 3 for forward + backward.
  Packed samples attend only within themselves, so the attention term sums len_i^2.
  """
  m = model_cfg
  attention = 6 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * sum_sq_seq_lens
  return 6 * matmul_params(model_cfg) * tokens + attention


def sum_sq_segment_lengths(segment_ids: np.ndarray) -> int:
  """Sum over packed samples of length^2, from [B, T] segment ids (0 = padding)."""
  total = 0
  for row in np.asarray(segment_ids):
    counts = np.bincount(row[row > 0])
    total += int((counts.astype(np.int64) ** 2).sum())
  return total


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
