"""The run's HF exports: `hf-<step>/`, `hf-latest` pointing at the newest, `hf_max_keep`.

A LoRA run (`lora.rank > 0`) writes two exports per step: `hf-<step>/`, the merged model
(W + A @ B * alpha / rank, the layout of a full fine-tune; a QLoRA base dequantised first),
and `adapter-<step>/`, the PEFT adapter directory (`jaxtune.hf.peft`), with `adapter-latest`
pointing at the newest; both kept by the same `hf_max_keep` rule.

`export_hf` streams one tensor at a time from the sharded parameters (no host ever holds the
whole model) into `hf-<step>.partial/` and renames it when complete; only then is `hf-latest`
re-pointed, by renaming a new symlink over the old one, so a reader always finds a complete
export behind it. Pruning removes the oldest exports beyond `hf_max_keep`, never the latest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil

from typing import NamedTuple

import jax

from jaxtune.hf import peft
from jaxtune.models import export_hf, family
from jaxtune.models import lora as lora_lib

log = logging.getLogger(__name__)

LATEST = "hf-latest"
ADAPTER_LATEST = "adapter-latest"


class LoRAExport(NamedTuple):
  """What the exports of a LoRA run need: the adapters and their PEFT config values."""
  adapters: dict              # base param path -> (A path, B path)
  rank: int
  alpha: float
  dropout: float
  base: str | None            # load_from: the adapter's base_model_name_or_path


class HFExportError(RuntimeError):
  """An HF export could not be written; names the export directory and the cause."""


def export_steps(run_dir: str, prefix: str = "hf-") -> list[int]:
  """Steps of the complete exports in `run_dir` (`adapter-`: the adapters), oldest first."""
  n = len(prefix)
  return sorted(int(d[n:]) for d in os.listdir(run_dir)
                if d.startswith(prefix) and d[n:].isdigit()
                and os.path.isdir(os.path.join(run_dir, d)))


def point_latest(run_dir: str, target: str, name: str = LATEST) -> None:
  """Atomically makes `<run_dir>/<name>` (hf-latest) a relative symlink to `target`."""
  link = os.path.join(run_dir, name)
  tmp = link + ".tmp"
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(os.path.basename(target), tmp)
  os.replace(tmp, link)


class HFExporter:
  """Writes exports of one run; `max_keep <= 0` keeps all."""

  def __init__(self, run_dir: str, model_cfg, *, dtype: str, tokenizer_path: str | None,
               max_keep: int, source_dir: str | None = None, lora: LoRAExport | None = None):
    """source_dir: the HF directory the run loaded (load_from), for the family's config.
    lora: a LoRA run's adapters: the merged model and the PEFT adapter are exported."""
    self.run_dir, self.model_cfg, self.dtype = run_dir, model_cfg, dtype
    self.source_dir, self.lora = source_dir, lora
    self.tokenizer_path, self.max_keep = tokenizer_path, max_keep

  def export(self, model_def, params, step: int) -> str:
    """model_def: the `ModelDef` the params belong to."""
    out_dir = os.path.join(self.run_dir, f"hf-{step}")
    model = model_def.merge(params)
    lora = self.lora
    merge = dict(adapters=lora.adapters, scale=lora.alpha / lora.rank) if lora else {}
    try:
      # A QLoRA base is dequantised for the export (its float kernels, then merged).
      with lora_lib.float_base(model) if lora else contextlib.nullcontext():
        export_hf(model, self.model_cfg, out_dir, dtype=self.dtype,
                  tokenizer_path=self.tokenizer_path, source_dir=self.source_dir, **merge)
    except Exception as e:  # pylint: disable=broad-except  (named, then raised)
      # The cause names the file or tensor (OSError's filename, export_hf's tensor names).
      raise HFExportError(
          f"HF export of step {step} to {out_dir} failed (process {jax.process_index()}): "
          f"{type(e).__name__}: {e}. Nothing was renamed into place ({out_dir}.partial holds "
          "what was written); the checkpoints are unaffected.") from e
    if jax.process_index() == 0:  # export_hf returns on all processes once the files are in
      point_latest(self.run_dir, out_dir)
      self._prune("hf-", LATEST)
    log.info("HF export (%s) written to %s", self.dtype, out_dir)
    if lora is not None:
      self._export_adapter(model, step)
    return out_dir

  def _export_adapter(self, model, step: int) -> str:
    """`adapter-<step>/`: the PEFT adapter directory (float32, as the adapters train)."""
    lora = self.lora
    out_dir = os.path.join(self.run_dir, f"adapter-{step}")
    try:
      peft.write_adapter(model, family(self.model_cfg.type).hf_weight_map(self.model_cfg),
                         lora.adapters, out_dir, rank=lora.rank, alpha=lora.alpha,
                         dropout=lora.dropout, base_model_name_or_path=lora.base)
    except Exception as e:  # pylint: disable=broad-except  (named, then raised)
      raise HFExportError(
          f"adapter export of step {step} to {out_dir} failed (process "
          f"{jax.process_index()}): {type(e).__name__}: {e}. The checkpoints are "
          "unaffected.") from e
    if jax.process_index() == 0:
      point_latest(self.run_dir, out_dir, ADAPTER_LATEST)
      self._prune("adapter-", ADAPTER_LATEST)
    log.info("PEFT adapter written to %s", out_dir)
    return out_dir

  def _prune(self, prefix: str, latest_name: str) -> None:
    if self.max_keep <= 0:
      return
    latest = os.path.realpath(os.path.join(self.run_dir, latest_name))
    for step in export_steps(self.run_dir, prefix)[:-self.max_keep]:
      old = os.path.join(self.run_dir, f"{prefix}{step}")
      if os.path.realpath(old) != latest:
        shutil.rmtree(old, ignore_errors=True)
