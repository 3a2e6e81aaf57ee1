"""How a vision family's images enter the data: the family says, the pipeline follows.

A model family with a vision tower returns a `MediaSpec` from `media(model_cfg)`; a text
family returns None. The data pipeline takes every image number from it (tile size, tokens a
tile becomes, the image token), so a new vision family plugs in without editing the pipeline.
"""

from __future__ import annotations

from typing import NamedTuple

from jaxtune.data.sources import DataError


class MediaSpec(NamedTuple):
  """tile_size:       pixels per side of one square tile (Intern-S1: 448);
  tokens_per_tile: image-context tokens one tile becomes in the text (Intern-S1: 256);
  image_token_id:  the model's image-context token id, checked against the tokenizer's (None:
                   the tokenizer's, unchecked);
  channels:        colour channels of a tile (3: RGB)."""
  tile_size: int
  tokens_per_tile: int
  image_token_id: int | None
  channels: int = 3


def tiles_bound(data_cfg, media: MediaSpec | None) -> int:
  """Tile slots per packed row: `data.max_tiles_per_pack`, else pack_max_length //
  tokens_per_tile (a row can hold no more); 0 for a text model (no pixels)."""
  if media is None:
    return 0
  bound = data_cfg.max_tiles_per_pack
  if bound is None:
    return max(1, int(data_cfg.pack_max_length) // media.tokens_per_tile)
  if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
    raise DataError(f"data.max_tiles_per_pack must be a positive integer (image tiles per "
                    f"packed row) or None (pack_max_length // {media.tokens_per_tile}), got "
                    f"{bound!r}")
  return bound
