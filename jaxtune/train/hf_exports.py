"""The run's HF exports: `hf-<step>/`, `hf-latest` pointing at the newest, `hf_max_keep`.

`export_hf` streams one tensor at a time from the sharded parameters (no host ever holds the
whole model) into `hf-<step>.partial/` and renames it when complete; only then is `hf-latest`
re-pointed, by renaming a new symlink over the old one, so a reader always finds a complete
export behind it. Pruning removes the oldest exports beyond `hf_max_keep`, never the latest.
"""

from __future__ import annotations

import logging
import os
import shutil

import jax

from jaxtune.models import export_hf

log = logging.getLogger(__name__)

LATEST = "hf-latest"


class HFExportError(RuntimeError):
  """An HF export could not be written; names the export directory and the cause."""


def export_steps(run_dir: str) -> list[int]:
  """Steps of the complete exports in `run_dir`, oldest first."""
  return sorted(int(d[3:]) for d in os.listdir(run_dir)
                if d.startswith("hf-") and d[3:].isdigit()
                and os.path.isdir(os.path.join(run_dir, d)))


def point_latest(run_dir: str, target: str) -> None:
  """Atomically makes `<run_dir>/hf-latest` a relative symlink to `target`."""
  link = os.path.join(run_dir, LATEST)
  tmp = link + ".tmp"
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(os.path.basename(target), tmp)
  os.replace(tmp, link)


class HFExporter:
  """Writes exports of one run; `max_keep <= 0` keeps all."""

  def __init__(self, run_dir: str, model_cfg, *, dtype: str, tokenizer_path: str | None,
               max_keep: int, source_dir: str | None = None):
    """source_dir: the HF directory the run loaded (load_from), for the family's config."""
    self.run_dir, self.model_cfg, self.dtype = run_dir, model_cfg, dtype
    self.source_dir = source_dir
    self.tokenizer_path, self.max_keep = tokenizer_path, max_keep

  def export(self, model_def, params, step: int) -> str:
    """model_def: the `ModelDef` the params belong to."""
    out_dir = os.path.join(self.run_dir, f"hf-{step}")
    try:
      export_hf(model_def.merge(params), self.model_cfg, out_dir, dtype=self.dtype,
                tokenizer_path=self.tokenizer_path, source_dir=self.source_dir)
    except Exception as e:  # pylint: disable=broad-except  (named, then raised)
      # The cause names the file or tensor (OSError's filename, export_hf's tensor names).
      raise HFExportError(
          f"HF export of step {step} to {out_dir} failed (process {jax.process_index()}): "
          f"{type(e).__name__}: {e}. Nothing was renamed into place ({out_dir}.partial holds "
          "what was written); the checkpoints are unaffected.") from e
    if jax.process_index() == 0:  # export_hf returns on all processes once the files are in
      point_latest(self.run_dir, out_dir)
      self._prune()
    log.info("HF export (%s) written to %s", self.dtype, out_dir)
    return out_dir

  def _prune(self) -> None:
    if self.max_keep <= 0:
      return
    latest = os.path.realpath(os.path.join(self.run_dir, LATEST))
    for step in export_steps(self.run_dir)[:-self.max_keep]:
      old = os.path.join(self.run_dir, f"hf-{step}")
      if os.path.realpath(old) != latest:
        shutil.rmtree(old, ignore_errors=True)
