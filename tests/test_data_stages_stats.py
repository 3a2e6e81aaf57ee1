"""The stats stage (jaxtune.data.stats): pack counts and efficiency, per-dataset counts and the
refusal of an epoch without a batch, against values worked out by hand."""

import numpy as np
import pytest

from jaxtune.data import packing, selection, stats
from jaxtune.data.sources import DataError
from test_data_stages_selection import SPECS, make_corpus


def test_packing_stats_by_hand():
  plan = packing.soft_pack(np.array([3, 5, 2, 6]), 8, buffer=100)   # [3, 5], [2, 6]
  assert plan.num_packs == 2
  s = stats.packing_stats(plan, level="soft", pack_len=8, steps_per_epoch=2, rows=2,
                          global_batch_size=2, round_up=True)
  assert s["packs"] == 2 and s["pack_efficiency"] == 16 / 16
  assert s["packs_dropped_per_epoch"] == 0 and s["packs_repeated_per_epoch"] == 2
  s = stats.packing_stats(packing.none_pack(np.array([3, 5, 2]), 8), level="none", pack_len=8,
                          steps_per_epoch=1, rows=2, global_batch_size=2, round_up=False)
  assert s["pack_efficiency"] == 10 / 24 and s["packs_dropped_per_epoch"] == 1


def test_per_dataset_counts():
  c = make_corpus([([1, 2, 3, 4, 5], [0, 1, 1, 1, 1]), ([6, 7], [0, 1]), ([], [])],
                  [0, 1, 0, 2], bad=[(2, "f:3 (dataset 'd'): bad")])
  sel = selection.select(c, SPECS, np.array([3]), level="soft", media=None, tile_bound=0,
                         image_id=None, transform=None)
  got = stats.per_dataset(SPECS, c, sel, [3], tile_bound=0, transform=False)["d"]
  assert got["samples"] == 4 and got["packed_samples"] == 3 and got["truncated"] == 2
  assert got["tokens"] == 3 + 2 + 3 and got["loss_tokens"] == 2 + 1 + 2
  assert got["bad"] == 1 and got["bad_lines"] == 1
  assert got["bad_locations"] == ["f:3 (dataset 'd'): bad"]
  assert got["sample_max_length"] == 3 and "filtered" not in got


def test_an_epoch_without_a_batch_says_why():
  base = dict(steps_per_epoch=0, packs=0, rows_per_host=4, pack_max_length=8,
              datasets={"d": dict(samples=2, bad_lines=2, bad_locations=["f:1"],
                                  dropped_image_cut=0, dropped_tile_bound=0)})
  with pytest.raises(DataError, match=r"no sample is left.*2 bad line\(s\) skipped.*f:1"):
    stats.check_epoch(base)
  with pytest.raises(DataError, match="only 3 pack.*4 rows per step"):
    stats.check_epoch(dict(base, packs=3))
  stats.check_epoch(dict(base, steps_per_epoch=1, packs=3))
