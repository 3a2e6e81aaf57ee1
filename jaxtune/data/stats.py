"""The stats stage: what start-up read, kept, cut, dropped and packed, per dataset and overall,
with one warning per kind of loss (not one per sample), and the refusal of an epoch with no
batch. `SFTData.stats` is the dict these build; image decode failures are added at batch time.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np

from jaxtune.data.corpus import Corpus
from jaxtune.data.packing import PackPlan
from jaxtune.data.selection import Selection
from jaxtune.data.sources import DataError, DatasetSpec

log = logging.getLogger("jaxtune.data.pipeline")
SHOWN_LOCATIONS = 5


def per_dataset(specs: Sequence[DatasetSpec], corpus: Corpus, sel: Selection,
                max_lengths: Sequence[int | None], *, tile_bound: int,
                transform: bool) -> dict[str, dict[str, Any]]:
  """stats["datasets"]: per dataset name, its counts (docs/data.md); warns once per loss.
  max_lengths: each dataset's sample_max_length in effect (None: unlimited, hard packing)."""
  occ_ds, keep, loss = corpus.occ_ds, sel.keep, sel.occ_loss[sel.keep]
  out = {}
  for d, spec in enumerate(specs):
    mask_ds, of_ds = sel.sample_ds == d, occ_ds == d
    bad_ds = [m for p, m in corpus.bad if corpus.u_ds[p] == d]
    entry = dict(
        files=len(corpus.files[d]), lines=corpus.ds_lines[d], sample_ratio=spec.sample_ratio,
        samples=int(of_ds.sum()), packed_samples=int(mask_ds.sum()),
        tokens=int(sel.lengths[mask_ds].sum()), loss_tokens=int(loss[mask_ds].sum()),
        truncated=int((sel.truncated & of_ds).sum()),
        image_samples=int(sel.image_samples[d]), image_tiles=int(sel.tiles[mask_ds].sum()),
        dropped_image_cut=int((sel.dropped & of_ds).sum()),
        dropped_tile_bound=int((sel.over_tiles & of_ds).sum()),
        bad=int(((~keep) & ~sel.dropped & ~sel.over_tiles & ~sel.filtered & of_ds).sum()),
        bad_lines=len(bad_ds),
        bad_locations=bad_ds[:SHOWN_LOCATIONS],
        sample_max_length=max_lengths[d])
    if transform:
      entry["filtered"] = int((sel.filtered & of_ds).sum())
    out[spec.name] = entry
    _warn(spec.name, entry, bad_ds, tile_bound)
  return out


def _warn(name: str, entry: dict[str, Any], bad_ds: list[str], tile_bound: int) -> None:
  if entry["truncated"]:
    log.warning("dataset '%s': %d sample(s) longer than %d tokens were truncated",
                name, entry["truncated"], entry["sample_max_length"])
  if entry["dropped_image_cut"]:
    log.warning("dataset '%s': %d multimodal sample(s) dropped: truncation would cut "
                "their image tokens", name, entry["dropped_image_cut"])
  if entry["dropped_tile_bound"]:
    log.warning("dataset '%s': %d multimodal sample(s) dropped: more than %d image tiles "
                "(data.max_tiles_per_pack), so they fit no row; raise the bound or lower "
                "data.max_dynamic_patch", name, entry["dropped_tile_bound"], tile_bound)
  if bad_ds:
    log.warning("dataset '%s': skipped %d bad line(s) (skip_bad_samples=True), first: %s",
                name, len(bad_ds), "; ".join(bad_ds[:SHOWN_LOCATIONS]))


def packing_stats(plan: PackPlan, *, level: str, pack_len: int, steps_per_epoch: int,
                  rows: int, global_batch_size: int, round_up: bool) -> dict[str, Any]:
  """The packs and how the epoch uses them."""
  tokens, packs = int(plan.pack_tokens().sum()), plan.num_packs
  used = steps_per_epoch * rows
  if packs > used:
    log.info("data: %d pack(s) per epoch left out (data.round_up=False: the last incomplete "
             "batch of %d rows is dropped; which ones changes every epoch)", packs - used, rows)
  return dict(
      pack_level=level, pack_max_length=pack_len, packs=packs,
      pack_efficiency=tokens / max(1, packs * pack_len),
      steps_per_epoch=steps_per_epoch, rows_per_step=global_batch_size,
      rows_per_host=rows, round_up=round_up,
      packs_dropped_per_epoch=max(0, packs - used),
      packs_repeated_per_epoch=max(0, used - packs))


def image_stats(plan: PackPlan, tiles: np.ndarray, datasets: dict[str, dict[str, Any]], *,
                tile_size: int, tile_bound: int, tile_slots: int) -> dict[str, Any]:
  """How the images were packed, and the batch-time decode failures (zero so far)."""
  per_pack, packs = plan.pack_tiles(tiles), plan.num_packs
  return dict(
      image_size=tile_size, max_tiles_per_pack=tile_bound, tile_slots=tile_slots,
      image_samples=sum(d["image_samples"] for d in datasets.values()),
      image_tiles=int(per_pack.sum()), packs_with_images=int((per_pack > 0).sum()),
      tiles_per_pack_max=int(per_pack.max()) if packs else 0,
      tiles_per_pack_mean=float(per_pack.mean()) if packs else 0.0,
      tile_slot_use=float(per_pack.sum() / max(1, packs * tile_slots)),
      packs_closed_by_tile_limit=int(plan.closed_by_tiles),
      dropped_tile_bound=sum(d["dropped_tile_bound"] for d in datasets.values()),
      image_decode_failures=0, image_decode_skipped_samples=0,
      image_decode_failure_locations=[])


def check_epoch(stats: dict[str, Any]) -> None:
  """An epoch without a batch is a DataError that says why (nothing left, or too few packs)."""
  steps, packs, rows = stats["steps_per_epoch"], stats["packs"], stats["rows_per_host"]
  if steps == 0 and packs == 0:   # round_up cannot help: nothing to pack
    why = []
    for name, d in stats["datasets"].items():
      lost = [f"{d['bad_lines']} bad line(s) skipped (data.skip_bad_samples=True), the "
              f"first: {d['bad_locations'][0]}" if d["bad_lines"] else "",
              f"{d['dropped_image_cut']} dropped: truncation would cut their image tokens "
              "(raise sample_max_length)" if d["dropped_image_cut"] else "",
              f"{d['dropped_tile_bound']} dropped: more image tiles than "
              "data.max_tiles_per_pack" if d["dropped_tile_bound"] else "",
              f"{d.get('filtered', 0)} removed by sample_transform" if d.get("filtered")
              else ""]
      why.append(f"dataset '{name}' ({d['samples']} sample(s)): "
                 + ("; ".join(w for w in lost if w) or "none left"))
    raise DataError("no sample is left to train on: " + " | ".join(why) + ". Fix the "
                    "data: no batch or round_up setting helps while nothing is left to pack.")
  if steps == 0:
    raise DataError(f"only {packs} pack(s) of {stats['pack_max_length']} tokens on this host "
                    f"but {rows} rows per step: an epoch has no full batch. Add data, "
                    "raise sample_ratio, lower global_batch_size / pack_max_length or set "
                    "data.round_up=True.")


class Clock:
  """Start-up timings: stats['startup_seconds'] = {stage: seconds}."""

  def __init__(self):
    self.laps: dict[str, float] = {}
    self._t = time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name] = round(now - self._t, 3)
    self._t = now
