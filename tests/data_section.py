"""Test helper: the data section SFTData reads, built the way a run builds it.

`data_section(**overrides)` is `jaxtune.config.base_config().data` (every key at its default)
with the given keys set, so tests state only what they change and SFTData restates no default.
`intern_media()` is Intern-S1's MediaSpec (its image token left to the tokenizer, unchecked).
"""

from jaxtune.config import base_config
from jaxtune.data.media import MediaSpec


def data_section(**overrides):
  c = base_config().data
  for key, value in overrides.items():
    c[key] = value
  return c


def intern_media() -> MediaSpec:
  """448-pixel tiles of 256 tokens; the image token is the tokenizer's <IMG_CONTEXT>."""
  return MediaSpec(tile_size=448, tokens_per_tile=256, image_token_id=None)
