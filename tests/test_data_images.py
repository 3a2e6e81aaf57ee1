"""Image loading, InternVL tiling and normalisation against independent references: InternVL's
dynamic_preprocess rewritten here, transformers' GotOcr2 processor, XTuner's own test images,
hand-made EXIF rotations, alpha images and broken files."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from jaxtune.data import images
from jaxtune.data.images import ImageError

# XTuner's example pictures, shipped with the package (jaxtune/assets/xtuner).
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "jaxtune", "assets", "xtuner",
                        "resource")
DOG = os.path.join(FIXTURES, "mscoco_dog_000000319154.jpg")        # 375 x 500
CATS = os.path.join(FIXTURES, "mscoco_twocat_000000039769.jpg")    # 640 x 480
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# wide, tall, square, tiny, very elongated (both ways), the dog's 3:4, a 4:3 photo
SIZES = [(1000, 300), (300, 900), (512, 512), (20, 13), (2000, 100), (90, 1500), (375, 500),
         (640, 480)]
BUDGETS = [(1, 12), (1, 6), (1, 1), (4, 12)]   # max 12; 6 = 12 shared by two images; 1; min 4


def picture(w, h, seed=0, mode="RGB"):
  """Gradients plus noise: detail at every scale, so a wrong filter or offset shows."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  grad = np.stack([x * 255 / max(1, w - 1), y * 255 / max(1, h - 1),
                   (x + y) * 127 / max(1, w + h - 2)], -1)
  px = np.clip(grad + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
  im = Image.fromarray(px)
  return im if mode == "RGB" else im.convert(mode)


def reference_dynamic_preprocess(image, min_num, max_num, image_size=448, use_thumbnail=True):
  """InternVL's dynamic_preprocess, written out plainly (PIL only)."""
  w, h = image.size
  aspect = w / h
  ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                   for j in range(1, n + 1) if min_num <= i * j <= max_num},
                  key=lambda r: r[0] * r[1])
  best, best_diff = (1, 1), float("inf")
  for r in ratios:
    diff = abs(aspect - r[0] / r[1])
    if diff < best_diff:
      best, best_diff = r, diff
    elif diff == best_diff and w * h > 0.5 * image_size * image_size * r[0] * r[1]:
      best = r
  tw, th = image_size * best[0], image_size * best[1]
  resized = image.resize((tw, th))   # Pillow's default filter for RGB is bicubic
  out = []
  for i in range(best[0] * best[1]):
    c, r = i % (tw // image_size), i // (tw // image_size)
    out.append(resized.crop((c * image_size, r * image_size, (c + 1) * image_size,
                             (r + 1) * image_size)))
  if use_thumbnail and len(out) != 1:
    out.append(image.resize((image_size, image_size)))
  return np.stack([np.asarray(t) for t in out])


def reference_normalize(tiles):
  """torchvision's ToTensor + Normalize step by step in float32 (what XTuner runs)."""
  x = tiles.astype(np.float32) / np.float32(255)
  return (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)


def save(im, path, **kw):
  im.save(path, **kw)
  return path


# ---------------------------------------------------------------- tiling vs InternVL
@pytest.mark.parametrize("wh", SIZES)
def test_tiles_equal_internvl_dynamic_preprocess(wh):
  im = picture(*wh, seed=wh[0])
  for lo, hi in BUDGETS:
    tiles = images.tile_image(im, lo, hi)
    ref = reference_dynamic_preprocess(im, lo, hi)
    assert tiles.dtype == np.uint8 and tiles.shape == ref.shape, (wh, lo, hi)
    assert np.array_equal(tiles, ref), (wh, lo, hi)
    assert len(tiles) == images.num_tiles(*wh, lo, hi)


def test_tiles_other_tile_size_and_no_thumbnail():
  # 500 x 500 at size 224: the tie-break (area > half the grid's) picks 3x3; at 448 it is 1x1.
  im = picture(500, 500, seed=5)
  assert images.best_grid(500, 500, 1, 12, size=224) == (3, 3)
  assert images.best_grid(500, 500, 1, 12) == (1, 1)
  tiles = images.tile_image(im, 1, 12, size=224)
  assert np.array_equal(tiles, reference_dynamic_preprocess(im, 1, 12, 224))
  assert len(tiles) == 10 == images.num_tiles(500, 500, size=224)
  assert images.image_tokens(500, 500, 1, size=224, tokens_per_tile=64) == 640
  bare = images.tile_image(picture(900, 300), 1, 12, use_thumbnail=False)
  assert np.array_equal(bare, reference_dynamic_preprocess(picture(900, 300), 1, 12,
                                                           use_thumbnail=False))
  assert len(bare) == 3 == images.num_tiles(900, 300, use_thumbnail=False)


# ---------------------------------------------------------------- vs transformers
@pytest.fixture(scope="module")
def got_ocr2():
  mod = pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")
  # The PIL/numpy processor: no torchvision needed (the fast one requires it).
  return lambda lo, hi: mod.GotOcr2ImageProcessorPil(
      crop_to_patches=True, size={"height": 448, "width": 448}, min_patches=lo,
      max_patches=hi, image_mean=MEAN, image_std=STD, resample=3)   # 3 = PIL bicubic


def test_tiles_equal_transformers_got_ocr2(got_ocr2):
  """Same grid rule (tie-break included), thumbnail last, Pillow bicubic on uint8 and float32
  normalisation: the values are identical bit for bit, not merely within one uint8 step
  (transformers rescales in float64 then casts, which lands on the same float32 for all 256
  byte values)."""
  for wh in [(1000, 300), (300, 900), (512, 512), (20, 13), (2000, 100), (375, 500)]:
    im = picture(*wh, seed=wh[1])
    for lo, hi in [(1, 12), (1, 6), (1, 1)]:
      out = got_ocr2(lo, hi)(images=[im])
      theirs = np.stack(out["pixel_values"]).transpose(0, 2, 3, 1)   # CHW -> HWC
      ours = images.normalize(images.tile_image(im, lo, hi))
      assert out["num_patches"] == [len(ours)], (wh, lo, hi)
      assert np.array_equal(theirs, ours), (wh, lo, hi)


def test_transformers_differences(got_ocr2, tmp_path):
  # 1. InternVLProcessor hands all of a sample's images to the image processor with the same
  #    max_patches: two 375x500 images get 13 + 13 tiles; XTuner splits the budget, 7 + 7.
  dog = images.load_image(DOG)
  assert got_ocr2(1, 12)(images=[dog, dog])["num_patches"] == [13, 13]
  assert images.image_tokens(375, 500, 2) == 7 * 256
  assert len(images.load_tiles(DOG, (375, 500), 2, 1, 12)) == 7
  # 2. transformers' convert_to_rgb composites transparency on white; XTuner (and we) drop
  #    alpha and keep the stored colour under it.
  rgba = np.asarray(picture(300, 200, seed=2)).copy()
  rgba = np.concatenate([rgba, np.full((200, 300, 1), 255, np.uint8)], -1)
  rgba[:, :150, 3] = 0
  path = save(Image.fromarray(rgba, "RGBA"), str(tmp_path / "a.png"))
  ours = images.load_tiles(path, (300, 200), 1, 1, 12)
  theirs = np.stack(got_ocr2(1, 12)(images=[Image.open(path)])["pixel_values"]).transpose(
      0, 2, 3, 1)
  assert theirs.shape == ours.shape
  white = images.normalize(np.full((1, 1, 3), 255, np.uint8))[0, 0]
  assert np.allclose(theirs[0, :, :100], white, atol=1e-6)   # left tile: all white to them
  assert not np.allclose(ours[0, :, :100], white, atol=1e-3)
  assert np.array_equal(ours, images.normalize(
      reference_dynamic_preprocess(Image.fromarray(rgba[..., :3]), 1, 12)))


# ---------------------------------------------------------------- XTuner's images
def test_xtuner_dog_and_cats():
  assert images.image_size(DOG) == (375, 500) and images.image_size(CATS) == (640, 480)
  assert images.image_tokens(375, 500, 1) == 3328
  images.check_image(DOG, (375, 500))
  tiles = images.load_tiles(DOG, (375, 500), 1, 1, 12)
  assert tiles.shape == (13, 448, 448, 3) and tiles.dtype == np.float32
  # XTuner's path: open + convert("RGB"), dynamic_preprocess, ToTensor + Normalize.
  with Image.open(DOG) as im:
    ref = reference_normalize(reference_dynamic_preprocess(im.convert("RGB"), 1, 12))
  assert np.array_equal(tiles, ref)
  cats = images.load_tiles(CATS, [640, 480], 2, 1, 12)   # a list, as JSON gives it
  assert len(cats) * 256 == images.image_tokens(640, 480, 2) == 7 * 256


def test_xtuner_transform_in_torch():
  """The normalisation bit for bit against torch ops as torchvision's ToTensor/Normalize run
  them (CHW, float32 div by 255, then in-place sub mean / div std)."""
  torch = pytest.importorskip("torch")
  tiles = images.tile_image(images.load_image(DOG), 1, 12)
  t = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
  t.sub_(torch.tensor(MEAN).view(-1, 1, 1)).div_(torch.tensor(STD).view(-1, 1, 1))
  assert np.array_equal(images.normalize(tiles), t.permute(0, 2, 3, 1).numpy())


def test_load_tiles_counts_match_image_tokens(tmp_path):
  for k, wh in enumerate([(1000, 300), (20, 13), (2000, 100), (512, 512)]):
    path = save(picture(*wh, seed=k), str(tmp_path / f"{k}.png"))
    for n_images in (1, 2, 3, 6, 13):   # 6 or 13 with min 4: the share is below the min
      for lo, hi in [(1, 12), (4, 12), (1, 6)]:
        for size in (448, 224):
          got = images.load_tiles(path, wh, n_images, lo, hi, size)
          assert got.shape[1:] == (size, size, 3)
          assert len(got) * 256 == images.image_tokens(*wh, n_images, lo, hi, size=size)
          budget = max(1, hi // n_images)   # XTuner: the sample's images share max_patch
          assert np.array_equal(got, reference_normalize(reference_dynamic_preprocess(
              Image.open(path), lo, budget, size)))
  # min 4 > 12 // 6: XTuner keeps the min, no grid qualifies, the 1x1 fallback (no thumbnail)
  # wins -- not a 2x1 grid + thumbnail, as lowering the min to the share would give.
  assert images.image_tokens(1000, 300, 6, 4, 12) == 256
  assert images.image_tokens(1000, 300, 3, 4, 12) == 5 * 256   # share 4 = min: 4x1 + thumbnail


# ---------------------------------------------------------------- EXIF orientation
MANUAL = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1],
          4: lambda a: a[::-1], 5: lambda a: a.transpose(1, 0, 2),
          6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
          8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation(tmp_path, orientation):
  stored = picture(64, 40, seed=orientation)
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = save(stored, str(tmp_path / "o.jpg"), exif=exif.tobytes(), quality=95)
  with Image.open(path) as im:
    raw = np.asarray(im.convert("RGB"))   # decoded as stored, orientation not applied
  want = MANUAL[orientation](raw)
  wh = (want.shape[1], want.shape[0])
  assert wh == ((40, 64) if orientation >= 5 else (64, 40))
  loaded = images.load_image(path, wh)
  assert loaded.size == wh and np.array_equal(np.asarray(loaded), want)
  images.check_image(path, wh)
  assert images.image_size(path) == wh
  if orientation >= 5:
    with pytest.raises(ImageError, match=r"\[64, 40\].*\[40, 64\]"):
      images.check_image(path, (64, 40))   # the stored size is not the size after rotation
    with pytest.raises(ImageError, match="o.jpg"):
      images.load_image(path, (64, 40))


def test_png_exif_read_from_header(tmp_path):
  exif = Image.Exif()
  exif[0x0112] = 6
  path = save(picture(30, 20), str(tmp_path / "o.png"), exif=exif.tobytes())
  images.check_image(path, (20, 30))
  assert images.load_image(path, (20, 30)).size == (20, 30)


# ---------------------------------------------------------------- alpha and palettes
def test_alpha_dropped_not_composited(tmp_path):
  rgb = np.asarray(picture(50, 30, seed=3))
  alpha = np.full((30, 50), 255, np.uint8)
  alpha[:, :25] = 0
  alpha[:5] = 128
  path = save(Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), str(tmp_path / "a.png"))
  got = np.asarray(images.load_image(path))
  assert np.array_equal(got, rgb)
  assert got[:, :25].std() > 10   # not flattened onto white or black
  la = np.dstack([rgb[..., 0], alpha])
  path = save(Image.fromarray(la, "LA"), str(tmp_path / "la.png"))
  assert np.array_equal(np.asarray(images.load_image(path)), np.repeat(rgb[..., :1], 3, -1))
  pal = Image.new("P", (8, 8), 1)
  pal.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
  path = save(pal, str(tmp_path / "p.png"), transparency=1)
  assert images.load_image(path).getpixel((3, 3)) == (200, 100, 50)


# ---------------------------------------------------------------- broken files
def test_bad_images(tmp_path):
  missing = str(tmp_path / "nowhere.jpg")
  for fn in (images.load_image, images.check_image, images.image_size):
    with pytest.raises(ImageError, match="nowhere.jpg.*does not exist"):
      fn(missing) if fn is images.image_size else fn(missing, None)
  text = tmp_path / "notes.jpg"
  text.write_text("not an image\n")
  for fn in (lambda p: images.load_image(p), lambda p: images.check_image(p, None),
             images.image_size):
    with pytest.raises(ImageError, match="notes.jpg.*(not a readable image|cannot be read)"):
      fn(str(text))
  with pytest.raises(ImageError, match=r"dog.*\[376, 500\].*\[375, 500\]"):
    images.load_image(DOG, (376, 500))
  assert issubclass(ImageError, ValueError)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path, fmt):
  buf = io.BytesIO()
  picture(300, 200, seed=9).save(buf, fmt)
  data = buf.getvalue()
  path = tmp_path / f"cut.{fmt.lower()}"
  path.write_bytes(data[:len(data) * 6 // 10])
  # The header is intact: the cheap start-up check passes; decoding every pixel catches it.
  images.check_image(str(path), (300, 200))
  with pytest.raises(ImageError, match=f"cut.{fmt.lower()}.*truncated"):
    images.load_image(str(path))
  with pytest.raises(ImageError):
    images.load_tiles(str(path), (300, 200), 1, 1, 12)


# ---------------------------------------------------------------- normalisation
def test_normalize_vs_float64():
  rng = np.random.default_rng(0)
  tiles = rng.integers(0, 256, (3, 448, 448, 3), dtype=np.uint8)
  tiles[0, 0, :256, 0] = tiles[0, 0, :256, 1] = tiles[0, 0, :256, 2] = np.arange(256)
  got = images.normalize(tiles)
  want = (tiles / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
  assert got.dtype == np.float32 and got.shape == tiles.shape
  assert np.abs(got - want).max() <= 1e-6
  assert np.array_equal(got, reference_normalize(tiles))
  # Any leading shape, strided input, a single pixel.
  assert np.array_equal(images.normalize(tiles[:, ::2, 1::3]), got[:, ::2, 1::3])
  assert np.array_equal(images.normalize(tiles[0, 0, 5]), got[0, 0, 5])
  with pytest.raises(ValueError):
    images.normalize(tiles.astype(np.float32))
