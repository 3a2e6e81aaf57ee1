"""The selection stage: which of the corpus's samples are packed, and how long each is.

In order: bad lines stop the start-up (or are skipped with data.skip_bad_samples); a sample
longer than its dataset's sample_max_length is truncated (not with pack_level 'hard', which
splits it across rows instead); a multimodal sample whose image tokens truncation would cut,
or that has more tiles than a row holds, is dropped; then the user's sample_transform may
filter or change the rest (`stages.apply_sample_transform`). Every decision is kept per sample
occurrence, for the stats.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from jaxtune.data import encoding, stages
from jaxtune.data.corpus import Corpus
from jaxtune.data.sources import DataError, DatasetSpec

UNLIMITED = np.iinfo(np.int64).max


def max_length(spec: DatasetSpec, level: str, sample_max_length: int, pack_len: int) -> int:
  """Tokens a sample of `spec` keeps: its own sample_max_length or data's (at most
  pack_max_length); unlimited with pack_level 'hard', which splits a long sample across rows."""
  if level == "hard":
    return UNLIMITED
  return int(min(spec.sample_max_length or sample_max_length, pack_len))


@dataclasses.dataclass
class Selection:
  """Per occurrence (the corpus's samples): the decisions. Per packed sample k (the kept
  occurrences, in mixed order): where its ids are and what it holds."""
  keep: np.ndarray          # bool [occurrences]: packed
  truncated: np.ndarray     # bool: cut to its dataset's limit
  dropped: np.ndarray       # bool: multimodal, truncation would cut its image tokens
  over_tiles: np.ndarray    # bool: multimodal, more tiles than a row holds
  filtered: np.ndarray      # bool: removed by sample_transform
  occ_loss: np.ndarray      # int64: label tokens left after truncation / transform
  samples: np.ndarray       # int64 [packed]: its unique line in the corpus
  lengths: np.ndarray       # int64 [packed]: tokens
  sample_ds: np.ndarray     # int64 [packed]: dataset
  sample_line: np.ndarray   # int64 [packed]: line in the dataset
  tiles: np.ndarray         # int64 [packed]: image tiles (zeros for a text model)
  tokens: np.ndarray        # the ids packed rows are built from (the corpus's unless changed)
  sample_starts: np.ndarray  # int64 [packed]: where its ids begin in `tokens`
  image_samples: np.ndarray  # int64 [datasets]: packed samples with images
  transformed: bool         # sample_transform changed ids (they are the data now)


def check_bad(corpus: Corpus, skip_bad: bool) -> None:
  """The first bad line in file order stops the start-up unless bad lines are skipped."""
  bad = corpus.bad
  if bad and not skip_bad:
    more = f" (and {len(bad) - 1} more bad line(s))" if len(bad) > 1 else ""
    raise DataError(f"{bad[0][1].rstrip('.')}{more}. Fix the line{'s' if more else ''}, or "
                    "set data.skip_bad_samples=True to skip bad lines (then counted, and the "
                    "first few named in the log)")


def image_cut(tokens: np.ndarray, starts: np.ndarray, lengths: np.ndarray, occ_uid: np.ndarray,
              cut: np.ndarray, candidates: np.ndarray, image_id: int | None) -> np.ndarray:
  """Which candidate occurrences lose an <IMG_CONTEXT> token to truncation (dropped instead)."""
  out = np.zeros(len(occ_uid), bool)
  for k in np.flatnonzero(candidates):
    u = occ_uid[k]
    cut_off = tokens[starts[u] + cut[k]:starts[u] + lengths[u]]
    out[k] = bool(((cut_off & encoding.ID_MASK) == image_id).any())
  return out


def check_images_allowed(specs: Sequence[DatasetSpec], per_ds: np.ndarray, media,
                         level: str) -> None:
  """Samples with images need an image model and a packing that keeps them whole."""
  if not per_ds.any():
    return
  names = [s.name for s, n in zip(specs, per_ds) if n]
  if media is None:
    raise DataError(
        f"dataset(s) {names} hold samples with images, but this data is built for a text "
        "model (SFTData without media): train them with a model type whose family has a "
        "vision tower (an Intern-S1 model type), whose data carries pixel tiles, or remove "
        "the image samples from these datasets")
  if level == "hard":
    raise DataError(
        f"dataset(s) {names} hold samples with images, and data.pack_level='hard' splits "
        "samples across rows, which would separate an image's <IMG_CONTEXT> tokens from its "
        "tiles: set data.pack_level='soft' (XTuner's default for multimodal data) or 'none'")


def select(corpus: Corpus, specs: Sequence[DatasetSpec], limits: np.ndarray, *, level: str,
           media, tile_bound: int, image_id: int | None,
           transform: Callable[[Any], Any] | None) -> Selection:
  """The samples to pack (module docstring); `limits` is each dataset's max_length."""
  c = corpus
  full = c.lengths[c.occ_uid]
  keep = full > 0                                   # bad lines are skipped
  cut = np.minimum(full, limits[c.occ_ds])
  truncated = keep & (full > cut)
  occ_loss = c.loss[c.occ_uid]
  if truncated.any():                               # labels left after the cut
    first = c.starts[c.occ_uid[truncated]]
    occ_loss[truncated] = encoding.range_sums(c.tokens >= encoding.TRAINED_BIT, first + 1,
                                              first + cut[truncated])
  occ_images = c.n_image[c.occ_uid]
  dropped = image_cut(c.tokens, c.starts, c.lengths, c.occ_uid, cut,
                      truncated & (occ_images > 0), image_id)
  keep &= ~dropped
  check_images_allowed(specs, np.bincount(c.occ_ds[keep & (occ_images > 0)],
                                          minlength=len(specs)), media, level)
  occ_tiles = (occ_images // media.tokens_per_tile if media is not None
               else np.zeros(len(keep), np.int64))
  # A sample with more tiles than a row holds is dropped (reported), like a cut image.
  over_tiles = keep & (occ_tiles > tile_bound) if media is not None \
      else np.zeros(len(keep), bool)
  keep &= ~over_tiles
  tokens, occ_start = c.tokens, c.starts[c.occ_uid]
  filtered, transformed = np.zeros(len(keep), bool), False
  if transform is not None:
    tokens, occ_start, cut, transformed = stages.apply_sample_transform(
        transform, tokens, occ_start, cut, c.occ_ds, c.occ_line,
        occ_tiles if media is not None else None, keep, filtered, occ_loss, limits)
    keep &= ~filtered
  return Selection(
      keep=keep, truncated=truncated, dropped=dropped, over_tiles=over_tiles, filtered=filtered,
      occ_loss=occ_loss, samples=c.occ_uid[keep], lengths=cut[keep], sample_ds=c.occ_ds[keep],
      sample_line=c.occ_line[keep], tiles=occ_tiles[keep], tokens=tokens,
      sample_starts=occ_start[keep],
      image_samples=np.bincount(c.occ_ds[keep & (occ_images > 0)], minlength=len(specs)),
      transformed=transformed)
