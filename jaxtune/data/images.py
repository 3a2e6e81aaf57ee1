"""Images for Intern-S1 / InternVL dynamic tiling: token counts, loading, tiles, normalisation.

Candidate grids (i, j) satisfy min_patch <= i * j <= max_patch; the grid whose aspect ratio is
closest to the image's wins (ties: the later, larger grid when the image area exceeds half the
grid's area). More than one tile adds a thumbnail tile. Each tile becomes tokens_per_tile
<IMG_CONTEXT> tokens (Intern-S1: 256 per 448-pixel tile).

The pixels follow XTuner (intern_s1_vl_tokenize_fn + intern_s1_vl_process.dynamic_preprocess):
EXIF orientation applied, convert("RGB") (alpha dropped, not composited), Pillow bicubic resize
of the 8-bit image to the grid, 448 x 448 crops row-major, thumbnail last, then torchvision's
ToTensor + Normalize (ImageNet mean/std) in float32 -- reproduced here bit for bit, channels-last.
Counting (image_tokens, from the size in the data) and loading (load_tiles) share one rule, so
the <IMG_CONTEXT> tokens laid out before any pixel is read always match the tiles made later.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
  from PIL import Image

# Intern-S1's numbers, the defaults of these functions for tools and tests; the pipeline takes
# its own from the model family (jaxtune.data.media.MediaSpec) and passes them in.
TILE = 448
TOKENS_PER_TILE = 256   # (448 / 14)^2 * 0.5^2 after pixel shuffle
# The model normalises the uint8 tiles batches carry (normalize_pixels in
# jaxtune.models.intern_s1.vision holds the same constants); `normalize` here is the host-side
# twin, for tools and tests.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_ORIENTATION = 0x0112   # EXIF tag; values 5-8 turn the image a quarter (width <-> height)


class ImageError(ValueError):
  """An image in the data that cannot be used; the message names the file and the fix."""


@functools.lru_cache(maxsize=64)
def _grids(min_patch: int, max_patch: int) -> tuple[tuple[int, int], ...]:
  grids = {(i, j) for n in range(min_patch, max_patch + 1)
           for i in range(1, n + 1) for j in range(1, n + 1) if min_patch <= i * j <= max_patch}
  return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(width: int, height: int, min_patch: int = 1, max_patch: int = 12, *,
              size: int = TILE) -> tuple[int, int]:
  """(columns, rows) of the tiling InternVL picks for a width x height image."""
  aspect = width / height
  area = width * height
  best, best_diff = (1, 1), float("inf")
  for cols, rows in _grids(min_patch, max_patch):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * size * size * cols * rows:
      best = (cols, rows)
  return best


def num_tiles(width: int, height: int, min_patch: int = 1, max_patch: int = 12, *,
              size: int = TILE, use_thumbnail: bool = True) -> int:
  cols, rows = best_grid(width, height, min_patch, max_patch, size=size)
  tiles = cols * rows
  return tiles + 1 if use_thumbnail and tiles > 1 else tiles


def tile_budget(n_images: int, min_patch: int, max_patch: int) -> tuple[int, int]:
  """(min, max) tiles of each image of a sample holding `n_images`: they share max_patch.

  As in XTuner, the min is not lowered to the share: when min_patch > max_patch // n_images no
  grid qualifies and each image gets the fallback 1x1 grid, one tile and no thumbnail."""
  return min_patch, max(1, max_patch // max(1, n_images))


def image_tokens(width: int, height: int, n_images: int, min_patch: int = 1,
                 max_patch: int = 12, *, size: int = TILE,
                 tokens_per_tile: int = TOKENS_PER_TILE, use_thumbnail: bool = True) -> int:
  """<IMG_CONTEXT> tokens for one image of a sample holding `n_images` images."""
  lo, hi = tile_budget(n_images, min_patch, max_patch)
  return tokens_per_tile * num_tiles(width, height, lo, hi, size=size,
                                     use_thumbnail=use_thumbnail)


# ---------------------------------------------------------------- files
def _missing(path: str) -> ImageError:
  return ImageError(f"image '{path}' does not exist: fix its path in the data (relative paths "
                    "are joined to data.media_root) or add the file")


def _oriented_size(im) -> tuple[int, int]:
  """Size after EXIF orientation, from the header alone (no pixels decoded)."""
  from PIL import PngImagePlugin  # pylint: disable=import-outside-toplevel
  if isinstance(im, PngImagePlugin.PngImageFile) and "exif" not in im.info:
    # Pillow's PNG getexif() decodes the whole image to look for an eXIf chunk after the
    # pixels; such a (rare, non-conforming) file is still caught by load_image's size check.
    return im.size
  w, h = im.size
  return (h, w) if im.getexif().get(_ORIENTATION) in (5, 6, 7, 8) else (w, h)


def _check_wh(path: str, image_wh, actual: tuple[int, int]) -> None:
  if image_wh is not None and tuple(int(v) for v in image_wh) != tuple(actual):
    raise ImageError(
        f"image '{path}': image_wh in the data is [{image_wh[0]}, {image_wh[1]}] but the image "
        f"is [{actual[0]}, {actual[1]}] (width, height after EXIF orientation): fix image_wh, "
        "or the path if it points at another image")


def image_size(path: str) -> tuple[int, int]:
  """(width, height) after EXIF orientation -- what image_wh means -- read from the file
  header alone; raises ImageError (a ValueError) naming the file."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise _missing(path)
  try:
    with Image.open(path) as im:
      return _oriented_size(im)
  except Exception as e:  # PIL raises many types for corrupt files
    raise ImageError(f"image '{path}' cannot be read ({type(e).__name__}: {e}): replace the "
                     "file or drop the sample") from e


def check_image(path: str, image_wh) -> None:
  """Start-up check without decoding pixels: the file exists, its header reads, and its size
  after EXIF orientation is `image_wh` (when given). A file cut short after its header passes
  here; load_image, which decodes every pixel, reports it."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise _missing(path)
  try:
    with Image.open(path) as im:
      actual = _oriented_size(im)
  except Exception as e:  # PIL raises many types for corrupt files
    raise ImageError(f"image '{path}' is not a readable image ({type(e).__name__}: {e}): "
                     "replace the file or drop the sample") from e
  _check_wh(path, image_wh, actual)


def load_image(path: str, image_wh: tuple[int, int] | None = None) -> Image.Image:
  """The decoded RGB image as XTuner sees it: EXIF orientation applied, alpha dropped (not
  composited on any background), every pixel decoded so that a truncated file raises here,
  not in the middle of a batch. `image_wh` is the size after orientation, checked when given.
  Relies on Pillow's default ImageFile.LOAD_TRUNCATED_IMAGES = False."""
  from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise _missing(path)
  try:
    im = Image.open(path)
  except Exception as e:  # PIL raises many types for corrupt files
    raise ImageError(f"image '{path}' is not a readable image ({type(e).__name__}: {e}): "
                     "replace the file or drop the sample") from e
  with im:
    try:
      im.load()
    except Exception as e:
      truncated = "truncated" in str(e) or isinstance(e, (EOFError, SyntaxError))
      what = "is truncated or corrupt" if truncated else "cannot be decoded"
      raise ImageError(f"image '{path}' {what} ({type(e).__name__}: {e}): re-download or "
                       "re-encode the file, or drop the sample") from e
    try:
      ImageOps.exif_transpose(im, in_place=True)
    except Exception as e:  # a malformed EXIF block
      raise ImageError(f"image '{path}' has unreadable EXIF data ({type(e).__name__}: {e}): "
                       "re-encode the file") from e
    # convert("RGB") drops alpha, as XTuner's load_image does; an RGB image is kept as is.
    rgb = im if im.mode == "RGB" else im.convert("RGB")
  _check_wh(path, image_wh, rgb.size)
  return rgb


# ---------------------------------------------------------------- pixels
def _tiles_view(arr: np.ndarray, cols: int, rows: int, size: int) -> np.ndarray:
  """A view of [rows * size, cols * size, 3] as [rows, cols, size, size, 3]: tiles row-major."""
  return arr.reshape(rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)


def _grid_and_thumb(image, min_patch: int, max_patch: int, size: int, use_thumbnail: bool):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if image.mode != "RGB":
    image = image.convert("RGB")
  cols, rows = best_grid(image.width, image.height, min_patch, max_patch, size=size)
  resized = np.asarray(image.resize((size * cols, size * rows), Image.Resampling.BICUBIC))
  thumb = None
  if use_thumbnail and cols * rows > 1:
    thumb = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
  return cols, rows, resized, thumb


def tile_image(image: Image.Image, min_patch: int, max_patch: int, size: int = TILE,
               use_thumbnail: bool = True) -> np.ndarray:
  """uint8 [n, size, size, 3]: InternVL's dynamic_preprocess (grid tiles row-major, then the
  thumbnail when there is more than one tile)."""
  return _assemble(*_grid_and_thumb(image, min_patch, max_patch, size, use_thumbnail), size)


def _assemble(cols: int, rows: int, resized: np.ndarray, thumb: np.ndarray | None,
              size: int) -> np.ndarray:
  """uint8 [n, size, size, 3]: the grid's tiles row-major, then the thumbnail if any."""
  n = cols * rows
  out = np.empty((n + (thumb is not None), size, size, 3), np.uint8)
  out[:n].reshape(rows, cols, size, size, 3)[...] = _tiles_view(resized, cols, rows, size)
  if thumb is not None:
    out[n] = thumb
  return out


_CHUNK = 64 * TILE * 3   # values per step: ~340 KB of float32, in L2 through all four passes


@functools.lru_cache(maxsize=8)
def _row_constants(width: int) -> tuple[np.ndarray, np.ndarray]:
  """ImageNet mean and std in float32, repeated along one image row of `width` RGB pixels."""
  return (np.tile(np.asarray(IMAGENET_MEAN, np.float32), width),
          np.tile(np.asarray(IMAGENET_STD, np.float32), width))


def _normalize_into(out: np.ndarray, src: np.ndarray) -> None:
  """out[...] = (src / 255 - mean) / std for uint8 src, float32 out, both [..., h, w, 3].

  The steps are torchvision's ToTensor then Normalize, each in float32 as torch does them, so
  the values equal XTuner's bit for bit. Casting and three in-place ufuncs over cache-sized
  blocks of whole rows run near memory speed, ~3.5x faster than a per-channel lookup table
  (numpy gathers through an intp copy of the indices)."""
  if src.ndim < 3:   # a bare pixel list: nothing to block
    src, out = src[None, None], out[None, None]
  h, w = src.shape[-3:-1]
  mean, std = _row_constants(w)
  step = max(1, _CHUNK // (3 * w))
  for idx in np.ndindex(src.shape[:-3]):
    s = np.reshape(src[idx], (h, 3 * w), copy=False)   # raises rather than write to a copy
    o = np.reshape(out[idx], (h, 3 * w), copy=False)
    for k in range(0, h, step):
      block = o[k:k + step]
      np.copyto(block, s[k:k + step], casting="unsafe")
      np.divide(block, np.float32(255), out=block)
      np.subtract(block, mean, out=block)
      np.divide(block, std, out=block)


def normalize(tiles_uint8: np.ndarray) -> np.ndarray:
  """float32 [..., 3], channels-last: (x / 255 - ImageNet mean) / ImageNet std."""
  tiles = np.asarray(tiles_uint8)
  if tiles.dtype != np.uint8 or tiles.shape[-1:] != (3,):
    raise ValueError(f"normalize wants uint8 [..., 3] tiles, got {tiles.dtype} {tiles.shape}")
  out = np.empty(tiles.shape, np.float32)
  _normalize_into(out, np.ascontiguousarray(tiles))
  return out


def load_tiles(path: str, image_wh, n_images: int, min_patch: int, max_patch: int,
               size: int = TILE, normalized: bool = True) -> np.ndarray:
  """float32 [n, size, size, 3]: one image of a sample holding `n_images`, loaded, tiled with
  the sample's shared budget and normalised; n is what image_tokens counted for image_wh.

  normalized=False: the uint8 tiles instead (what batches carry: 4x fewer bytes to cache and
  to send, normalised on the device by the model: jaxtune.models.intern_s1.vision's
  normalize_pixels)."""
  image = load_image(path, image_wh)
  lo, hi = tile_budget(n_images, min_patch, max_patch)
  cols, rows, resized, thumb = _grid_and_thumb(image, lo, hi, size, True)
  n = cols * rows
  total = n + (thumb is not None)
  wh = image.size if image_wh is None else image_wh
  expected = num_tiles(wh[0], wh[1], lo, hi, size=size)
  if total != expected:
    raise ImageError(f"image '{path}': {total} tiles but {expected} were counted for its "
                     "<IMG_CONTEXT> tokens: a jaxtune bug, please report it")
  if not normalized:
    return _assemble(cols, rows, resized, thumb, size)
  out = np.empty((total, size, size, 3), np.float32)
  # Normalise straight from the resized image into tile order: no uint8 tile copy.
  _normalize_into(out[:n].reshape(rows, cols, size, size, 3), _tiles_view(resized, cols, rows,
                                                                          size))
  if thumb is not None:
    _normalize_into(out[n], thumb)
  return out
