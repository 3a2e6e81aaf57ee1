"""The batches stage (jaxtune.data.batches): the rank layout, epoch length and host agreement,
the epoch order (round_up, micro-batch layout, host rows) and the checkpointable position,
checked against hand-worked examples and naive re-implementations."""

import numpy as np
import pytest

from jaxtune.data import batches, packing
from jaxtune.data.corpus import rng
from jaxtune.data.sources import DataError


def test_rank_layout_by_hand():
  assert batches.rank_layout(16, 1, None, 1) == (16, 1)
  assert batches.rank_layout(16, 1, 4, 1) == (4, 4)      # 4 ranks, 4 micro-batches
  assert batches.rank_layout(16, 2, 4, 1) == (2, 4)      # this host: 2 ranks x 4 = 8 rows
  assert batches.rank_layout(16, 1, 4, 2) == (8, 2)
  assert batches.rank_layout(12, 1, 8, 1) == (12, 1)     # 8 ranks do not divide 12 rows


def test_steps_and_agreement():
  # docs/data.md: 10 packs, 4 rows: 3 steps rounded up, 2 without; 3 packs, 4 rows: 1 / 0.
  assert batches.local_steps(10, 4, True) == 3 and batches.local_steps(10, 4, False) == 2
  assert batches.local_steps(3, 4, True) == 1 and batches.local_steps(3, 4, False) == 0
  gather = lambda n: [n, 5, 2]
  assert batches.agree_steps(3, True, 3, gather) == 5
  assert batches.agree_steps(3, False, 3, gather) == 2
  assert batches.agree_steps(3, True, 1, None) == 3       # one host asks no one


def layout(rows, steps, *, group=False, group_rows=None, micro=1, host_rows=None):
  return batches.Layout(seed=5, rows=rows, steps_per_epoch=steps, group_by_length=group,
                        group_rows=group_rows or rows, micro_steps=micro, host_rows=host_rows)


def test_shuffled_order_is_topped_up_from_its_start():
  lay = layout(4, 3)
  order = lay.epoch_order(2, 10, lambda: pytest.fail("no flops without length grouping"))
  perm = rng(5, 2, 2).permutation(10)
  assert order.tolist() == perm.tolist() + perm[:2].tolist()
  assert lay.step_packs(order, 2).tolist() == [perm[8], perm[9], perm[0], perm[1]]
  with pytest.raises(IndexError):
    lay.step_packs(order, 3)
  assert not np.array_equal(order, lay.epoch_order(3, 10, None))   # every epoch reshuffles


def test_length_grouped_order_lays_groups_on_ranks():
  flops = np.arange(16, dtype=np.float64) ** 2
  lay = layout(8, 2, group=True, group_rows=2, micro=4)
  got = lay.epoch_order(0, 16, lambda: flops)
  plain = packing.length_grouped_order(flops, 8, 2, rng(5, 3, 0))
  # Position j of a batch (micro-step j // G, slot j % G) goes to row (j % G) * A + j // G.
  want = np.empty(16, np.int64)
  for b in range(2):
    for j in range(8):
      want[b * 8 + (j % 2) * 4 + j // 2] = plain[b * 8 + j]
  np.testing.assert_array_equal(got, want)


def test_host_rows_take_their_share_of_each_step():
  lay = layout(4, 2, host_rows=np.array([1, 3]))
  order = np.array([10, 11, 12, 13, 14, 15, 16, 17])
  assert lay.step_packs(order, 1).tolist() == [15, 17]
  assert lay.host_order(order).tolist() == [[11, 13], [15, 17]]


class _Data:
  """What DataIterator reads: 3 steps per epoch, batches named (epoch, step)."""
  steps_per_epoch = 3

  def batches(self, epoch, start):
    return iter([(epoch, k) for k in range(start, 3)])

  def signature(self):
    return dict(seed=1, data_hash="abc")


def test_iterator_and_state_round_trip_across_epochs():
  it = batches.DataIterator(_Data(), 0, 2)
  assert [next(it) for _ in range(3)] == [(0, 2), (1, 0), (1, 1)]
  saved = it.get_state()
  assert saved == dict(epoch=1, step=2, seed=1, data_hash="abc")
  assert saved == batches.state(_Data().signature(), 1, 2)
  again = batches.DataIterator(_Data())
  again.set_state(saved)
  assert next(again) == (1, 2) and next(again) == (2, 0)
  assert batches.position_of(_Data().signature(), saved) == (1, 2)
  with pytest.raises(DataError, match=r"saved vs now: \{'data_hash': \('xyz', 'abc'\)\}"):
    batches.position_of(_Data().signature(), dict(saved, data_hash="xyz"))
