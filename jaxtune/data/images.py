"""Image token counts for Intern-S1 / InternVL dynamic tiling (no pixels are decoded here).

Candidate grids (i, j) satisfy min_patch <= i * j <= max_patch; the grid whose aspect ratio is
closest to the image's wins (ties: the later, larger grid when the image area exceeds half the
grid's area). More than one tile adds a thumbnail tile. Each tile is 256 <IMG_CONTEXT> tokens.
"""

from __future__ import annotations

import functools
import os

TILE = 448
TOKENS_PER_TILE = 256   # (448 / 14)^2 * 0.5^2 after pixel shuffle


@functools.lru_cache(maxsize=64)
def _grids(min_patch: int, max_patch: int) -> tuple[tuple[int, int], ...]:
  grids = {(i, j) for n in range(min_patch, max_patch + 1)
           for i in range(1, n + 1) for j in range(1, n + 1) if min_patch <= i * j <= max_patch}
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(width: int, height: int, min_patch: int = 1, max_patch: int = 12) -> tuple[int, int]:
  """(columns, rows) of the tiling InternVL picks for a width x height image."""
  aspect = width / height
  area = width * height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in _grids(min_patch, max_patch):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * TILE * TILE * cols * rows:
      best = (cols, rows)
  return best


def num_tiles(width: int, height: int, min_patch: int = 1, max_patch: int = 12) -> int:
  cols, rows = best_grid(width, height, min_patch, max_patch)
  tiles = cols * rows
  return tiles + 1 if tiles > 1 else tiles


def image_tokens(width: int, height: int, n_images: int, min_patch: int = 1,
                 max_patch: int = 12) -> int:
  """<IMG_CONTEXT> tokens for one image of a sample holding `n_images` images."""
  budget = max(1, max_patch // max(1, n_images))
  return TOKENS_PER_TILE * num_tiles(width, height, min(min_patch, budget), budget)


def image_size(path: str) -> tuple[int, int]:
  """(width, height) read from the file header; raises ValueError naming the file."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise ValueError(f"image '{path}' does not exist")
  try:
    with Image.open(path) as im:
      return im.size
  except Exception as e:  # PIL raises many types for corrupt files
    raise ValueError(f"image '{path}' cannot be read: {e}") from e
