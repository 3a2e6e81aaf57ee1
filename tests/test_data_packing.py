"""Packing plans (soft / hard / none) and packed rows, against hand-computed values."""

import numpy as np
import pytest

from jaxtune.data import packing

T = np.uint32(1 << 31)   # the trained bit


def groups(plan):
  return [plan.sample[plan.bounds[p]:plan.bounds[p + 1]].tolist() for p in range(plan.num_packs)]


def test_soft_pack_fills_gaps_with_the_smallest_lookahead_samples():
  plan = packing.soft_pack(np.array([6, 5, 3, 1, 4, 2]), 10)
  # 6 fits; 5 does not: the gap of 4 takes the smallest ahead (1, then 2; 3 no longer fits);
  # 5 opens the next pack, 3 joins it, 4 does not fit and nothing ahead is left.
  assert groups(plan) == [[0, 3, 5], [1, 2], [4]]
  assert plan.pack_tokens().tolist() == [9, 8, 4]
  assert plan.offset.tolist() == [0] * 6                     # samples are never split
  # Without a look-ahead it is plain greedy.
  assert groups(packing.soft_pack(np.array([6, 5, 3, 1, 4, 2]), 10, buffer=0)) == [
      [0], [1, 2, 3], [4, 5]]


def test_soft_pack_lookahead_is_bounded():
  # Only the next `buffer` samples are searched: the 1 at position 4 is out of reach of 2.
  lengths = np.array([8, 5, 5, 5, 1])
  assert groups(packing.soft_pack(lengths, 10, buffer=2))[0] == [0]
  assert groups(packing.soft_pack(lengths, 10, buffer=4))[0] == [0, 4]


@pytest.mark.parametrize("seed", range(3))
def test_soft_pack_invariants_on_random_lengths(seed):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 300, size=2000)
  plan = packing.soft_pack(lengths, 512)
  assert sorted(plan.sample.tolist()) == list(range(2000))    # each sample exactly once
  assert (plan.length == lengths[plan.sample]).all()          # whole
  assert plan.pack_tokens().max() <= 512
  assert plan.pack_tokens().sum() == lengths.sum()
  assert plan.pack_tokens().sum() / (plan.num_packs * 512) > 0.9


def test_none_pack_is_one_sample_per_row():
  plan = packing.none_pack(np.array([3, 7, 1]), 8)
  assert groups(plan) == [[0], [1], [2]]
  with pytest.raises(ValueError, match="exceeds pack_max_length"):
    packing.none_pack(np.array([9]), 8)


def test_hard_pack_cuts_exact_rows_and_drops_the_tail():
  plan = packing.hard_pack(np.array([5, 5, 5]), 4)
  assert plan.num_packs == 3                                  # 15 tokens: 3 rows, 3 dropped
  spans = [list(zip(plan.sample[plan.bounds[p]:plan.bounds[p + 1]].tolist(),
                    plan.offset[plan.bounds[p]:plan.bounds[p + 1]].tolist(),
                    plan.length[plan.bounds[p]:plan.bounds[p + 1]].tolist()))
           for p in range(3)]
  assert spans == [[(0, 0, 4)], [(0, 4, 1), (1, 0, 3)], [(1, 3, 2), (2, 0, 2)]]


def test_hard_pack_random_rows_are_exactly_full():
  lengths = np.random.default_rng(0).integers(1, 900, size=500)
  plan = packing.hard_pack(lengths, 1024)
  assert (plan.pack_tokens() == 1024).all()
  assert plan.num_packs == lengths.sum() // 1024
  # Spans walk the stream in order with no gap or overlap.
  stream = np.concatenate([[0], np.cumsum(lengths)])[plan.sample] + plan.offset
  assert (stream == np.concatenate([[0], np.cumsum(plan.length)[:-1]])).all()


def store(*samples):
  """Token store of samples given as [(id, trained), ...]."""
  flat = [np.uint32(i) | (T if t else np.uint32(0)) for s in samples for i, t in s]
  lens = [len(s) for s in samples]
  return np.array(flat, np.uint32), np.concatenate([[0], np.cumsum(lens)[:-1]]), np.array(lens)


def test_rows_shift_labels_inside_each_sample_only():
  tokens, starts, lens = store([(10, False), (11, True), (12, True)], [(20, False), (21, True)])
  plan = packing.soft_pack(lens, 7)
  row = packing.build_rows(plan, np.array([0]), tokens, starts, 7, pad_id=0)
  assert row["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0, 0]]
  assert row["labels"].tolist() == [[11, 12, -100, 21, -100, -100, -100]]
  assert row["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0]]
  assert row["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0]]
  assert all(v.dtype == np.int32 and v.shape == (1, 7) for v in row.values())


def test_untrained_next_token_gets_no_label():
  tokens, starts, lens = store([(1, False), (2, False), (3, True), (4, False), (5, True)])
  row = packing.build_rows(packing.none_pack(lens, 5), np.array([0]), tokens, starts, 5, 0)
  assert row["labels"].tolist() == [[-100, 3, -100, 5, -100]]


def test_hard_rows_mask_every_cut():
  tokens, starts, lens = store([(1, True)] * 5, [(2, True)] * 5, [(3, True)] * 5)
  plan = packing.hard_pack(lens, 4)
  rows = packing.build_rows(plan, np.arange(3), tokens, starts, 4, pad_id=0)
  assert rows["input_ids"].tolist() == [[1, 1, 1, 1], [1, 2, 2, 2], [2, 2, 3, 3]]
  assert rows["labels"].tolist() == [[1, 1, 1, -100], [-100, 2, 2, -100], [2, -100, 3, -100]]
  assert rows["segment_ids"].tolist() == [[1, 1, 1, 1], [1, 2, 2, 2], [1, 1, 2, 2]]
  assert rows["positions"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2], [0, 1, 0, 1]]
