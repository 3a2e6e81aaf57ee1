"""The training data order does not depend on the host count (SFTData(global_order=True)).

Every host builds the order of one host reading all rows and takes its own rows of each batch,
so P hosts together read exactly the batches one host reads, and a position saved with P
hosts is valid with any other count: a run resumed on another topology sees exactly the
remaining batches of the epoch. No JAX processes are needed to check that: the shares of P
hosts are computed here side by side.
"""

import collections

import numpy as np
import pytest

from jaxtune.config import dataset
from jaxtune.data import SFTData
from data_section import data_section
from test_trainer_utils import write_byte_tokenizer, write_chats

KEYS = ("input_ids", "labels", "segment_ids", "positions")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("hosts")
  tok = write_byte_tokenizer(str(root / "tokenizer"))
  path = write_chats(str(root / "train.jsonl"), 150, seed=3)
  cfg = data_section(**dict(datasets=[dataset("chats", path)], sample_max_length=64,
                        pack_max_length=128, pack_level="soft", num_workers=1, seed=5))
  return cfg, tok


def _hosts(cfg, tok, count, **kw):
  return [SFTData(cfg, tok, global_batch_size=8, process_index=i, process_count=count,
                  global_order=True, allgather=lambda n, c=count: [n] * c, **kw)
          for i in range(count)]


@pytest.mark.parametrize("count", [2, 4])
def test_hosts_together_read_the_batches_of_one_host(setup, count):
  cfg, tok = setup
  (one,), many = _hosts(cfg, tok, 1), _hosts(cfg, tok, count)
  assert one.steps_per_epoch >= 3  # several steps: a resume lands mid-epoch
  assert {d.steps_per_epoch for d in many} == {one.steps_per_epoch}
  assert {d.data_hash for d in many} == {one.data_hash}
  for epoch in (0, 1):  # every epoch's reshuffle too
    for step in range(one.steps_per_epoch):
      whole = one.batch(epoch, step)
      parts = [d.batch(epoch, step) for d in many]
      for key in KEYS:
        assert all(len(p[key]) == 8 // count for p in parts)
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_a_position_saved_by_two_hosts_resumes_on_one_and_on_four(setup):
  cfg, tok = setup
  (one,), two, four = _hosts(cfg, tok, 1), _hosts(cfg, tok, 2), _hosts(cfg, tok, 4)
  saved = two[1].iterator(0, 2).get_state()  # process 1's state after 2 steps of epoch 0
  it = one.iterator()
  it.set_state(saved)  # raises when the position is not valid here
  for d in four:
    d.iterator().set_state(saved)
  # The resumed single host reads what the two hosts would have read next, to the epoch's end.
  rest = [next(it) for _ in range(one.steps_per_epoch - 2)]
  for k, batch in enumerate(rest, start=2):
    np.testing.assert_array_equal(
        batch["input_ids"],
        np.concatenate([d.batch(0, k)["input_ids"] for d in two]))
  # ...and together they are exactly the epoch's rows not yet seen (counted: with round_up the
  # last batch is topped up with packs from the epoch's start).
  rows = lambda batches: collections.Counter(tuple(r) for b in batches for r in b["input_ids"])
  seen = rows(d.batch(0, k) for k in range(2) for d in two)
  everything = rows(one.batch(0, k) for k in range(one.steps_per_epoch))
  assert seen + rows(rest) == everything


def test_explicit_host_rows_follow_the_sharding(setup):
  # A mesh can give a host rows that are not one block (e.g. rows 0-1 and 4-5 of 8).
  cfg, tok = setup
  (one,) = _hosts(cfg, tok, 1)
  rows = [0, 1, 4, 5]
  (host,) = [SFTData(cfg, tok, global_batch_size=8, process_index=0, process_count=2,
                     global_order=True, host_rows=rows, allgather=lambda n: [n, n])]
  np.testing.assert_array_equal(host.batch(0, 1)["input_ids"], one.batch(0, 1)["input_ids"][rows])


def test_per_host_shares_stay_the_default(setup):
  # Evaluation keeps each host reading only its own share of the samples.
  cfg, tok = setup
  hosts = [SFTData(cfg, tok, global_batch_size=2, process_index=i, process_count=2,
                   allgather=lambda n: [n, n]) for i in range(2)]
  assert hosts[0].data_hash != hosts[1].data_hash
  assert "process_count" in hosts[0].signature()


def test_hosts_that_read_different_data_stop_with_a_clear_error(setup, monkeypatch):
  from jaxtune.data import DataError  # pylint: disable=import-outside-toplevel
  from jaxtune.train import multihost, trainer  # pylint: disable=import-outside-toplevel
  cfg, tok = setup
  (one,) = _hosts(cfg, tok, 1)
  trainer._check_same_data(one)  # pylint: disable=protected-access
  monkeypatch.setattr(multihost, "allgather_text", lambda text: [text, "0123456789abcdef"])
  with pytest.raises(DataError, match="processes see different training data"):
    trainer._check_same_data(one)  # pylint: disable=protected-access
