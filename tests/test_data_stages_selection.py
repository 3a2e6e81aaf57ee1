"""The selection stage (jaxtune.data.selection) on a corpus built by hand: truncation limits,
label counts after a cut, image drops (a cut through image tokens, too many tiles), bad lines
and a sample_transform filter, every count checked against values worked out here."""

import numpy as np
import pytest

from jaxtune.data import selection
from jaxtune.data.corpus import Corpus
from jaxtune.data.encoding import TRAINED_BIT
from jaxtune.data.media import MediaSpec
from jaxtune.data.sources import DataError, DatasetSpec

IMG = 9
MEDIA = MediaSpec(tile_size=16, tokens_per_tile=2, image_token_id=IMG)
T = int(TRAINED_BIT)


def make_corpus(samples, occ_uid, bad=()):
  """samples: per unique line, (ids, trained flags); one dataset, occurrence k -> occ_uid[k]."""
  ids = [np.asarray(i, np.uint32) | np.where(np.asarray(f, bool), T, 0).astype(np.uint32)
         for i, f in samples]
  lengths = np.array([len(i) for i in ids], np.int64)
  starts = np.cumsum(lengths) - lengths
  tokens = np.concatenate(ids).astype(np.uint32)
  loss = np.array([int(np.sum(f[1:])) for _, f in samples], np.int64)
  n_image = np.array([int(np.sum(np.asarray(i) == IMG)) for i, _ in samples], np.int64)
  occ_uid = np.asarray(occ_uid, np.int64)
  n = len(samples)
  return Corpus(files=[[]], ds_lines=[n], occ_ds=np.zeros(len(occ_uid), np.int64),
                occ_line=occ_uid.copy(), occ_uid=occ_uid, u_ds=np.zeros(n, np.int64),
                u_line=np.arange(n), u_file=np.zeros(n, np.int64), u_local=np.arange(n),
                tokens=tokens, starts=starts, lengths=lengths, loss=loss, n_image=n_image,
                bad=list(bad))


SPECS = [DatasetSpec(name="d", anno_path="/d")]


def test_max_length_per_dataset_and_level():
  own = DatasetSpec(name="o", anno_path="/o", sample_max_length=10)
  assert selection.max_length(SPECS[0], "soft", 20, 64) == 20
  assert selection.max_length(own, "none", 20, 64) == 10
  assert selection.max_length(DatasetSpec(name="x", anno_path="/x", sample_max_length=99),
                              "soft", 20, 64) == 64          # never longer than a row
  assert selection.max_length(own, "hard", 20, 64) == selection.UNLIMITED


def test_truncation_recounts_labels_and_drops_cut_images():
  text = ([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1])        # 4 labels; cut to 4 tokens: 2 left
  img_early = ([IMG, IMG, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1])   # its image survives a cut at 4
  img_late = ([1, 2, 3, 4, IMG, IMG], [0, 0, 0, 0, 1, 1])    # a cut at 4 loses its image
  short = ([7, 8], [0, 1])
  c = make_corpus([text, img_early, img_late, short], [0, 1, 2, 3, 0])
  sel = selection.select(c, SPECS, np.array([4]), level="soft", media=MEDIA, tile_bound=4,
                         image_id=IMG, transform=None)
  assert sel.truncated.tolist() == [True, True, True, False, True]
  assert sel.dropped.tolist() == [False, False, True, False, False]
  assert sel.keep.tolist() == [True, True, False, True, True]
  assert sel.lengths.tolist() == [4, 4, 2, 4]
  assert sel.occ_loss[sel.keep].tolist() == [2, 1, 1, 2]
  assert sel.tiles.tolist() == [0, 1, 0, 0]                  # 2 image tokens = 1 tile of 2
  assert sel.samples.tolist() == [0, 1, 3, 0] and sel.image_samples.tolist() == [1]
  np.testing.assert_array_equal(sel.sample_starts, c.starts[[0, 1, 3, 0]])
  assert sel.tokens is c.tokens and not sel.transformed


def test_tile_bound_drops_and_text_models_refuse_images():
  two_tiles = ([IMG] * 4 + [5], [0, 0, 0, 0, 1])
  one_tile = ([IMG] * 2 + [5], [0, 0, 1])
  c = make_corpus([two_tiles, one_tile], [0, 1])
  sel = selection.select(c, SPECS, np.array([64]), level="none", media=MEDIA, tile_bound=1,
                         image_id=IMG, transform=None)
  assert sel.over_tiles.tolist() == [True, False] and sel.tiles.tolist() == [1]
  with pytest.raises(DataError, match="text model"):
    selection.select(c, SPECS, np.array([64]), level="soft", media=None, tile_bound=0,
                     image_id=IMG, transform=None)
  with pytest.raises(DataError, match="pack_level='hard'"):
    selection.select(c, SPECS, np.array([64]), level="hard", media=MEDIA, tile_bound=4,
                     image_id=IMG, transform=None)


def test_bad_lines_stop_or_are_skipped():
  c = make_corpus([([1, 2], [0, 1]), ([], [])], [0, 1], bad=[(1, "f:2 (dataset 'd'): bad")])
  with pytest.raises(DataError, match=r"^f:2 \(dataset 'd'\): bad\. Fix the line"):
    selection.check_bad(c, skip_bad=False)
  selection.check_bad(c, skip_bad=True)
  sel = selection.select(c, SPECS, np.array([8]), level="soft", media=None, tile_bound=0,
                         image_id=None, transform=None)
  assert sel.keep.tolist() == [True, False] and sel.samples.tolist() == [0]


def test_a_transform_filter_drops_exactly_what_it_removes():
  c = make_corpus([([1, 2, 3], [0, 1, 1]), ([4, 5], [0, 1]), ([6, 7, 8, 10], [0, 0, 1, 1])],
                  [0, 1, 2, 1])
  sel = selection.select(c, SPECS, np.array([8]), level="soft", media=None, tile_bound=0,
                         image_id=None,
                         transform=lambda ds: ds.filter(lambda s: len(s["input_ids"]) != 2))
  assert sel.filtered.tolist() == [False, True, False, True]
  assert sel.samples.tolist() == [0, 2] and not sel.transformed
