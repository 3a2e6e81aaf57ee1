"""media_root is a boundary (issue 23, item 6): an image path that resolves outside its
dataset's media_root -- by `../`, an absolute path or a symbolic link -- is a bad line, found
before any file is opened, unless the dataset sets allow_outside_media_root=True."""

import os

import pytest

from jaxtune import config as config_lib
from jaxtune.config import ConfigError, dataset
from jaxtune.data import DataError, SFTData, images, sources
from jaxtune.recipes.qwen3_mini import get_config
from data_section import intern_media
from test_data_multimodal import cfg_of, enc, image_line, make_image, write_jsonl  # noqa: F401  pylint: disable=unused-import

HINT = "set allow_outside_media_root=True on the dataset if this is intended"
W = H = 32         # square and small: one tile each (1x1 grid, no thumbnail)


@pytest.fixture
def tree(tmp_path):
  """media/ (the media_root) with an image, a nested one, a link out and a link in; outside/
  with the image a hostile dataset points at."""
  media, outside = tmp_path / "media", tmp_path / "outside"
  (media / "sub" / "deep").mkdir(parents=True)
  outside.mkdir()
  make_image(media / "img.png", W, H, 0)
  make_image(media / "sub" / "deep" / "nested.png", W, H, 1)
  make_image(outside / "secret.png", W, H, 2)
  os.symlink(outside / "secret.png", media / "link_out.png")
  os.symlink(os.path.join("sub", "deep", "nested.png"), media / "link_in.png")
  return dict(media=str(media), secret=str(outside / "secret.png"), tmp=tmp_path)


OUTSIDE = {"dotdot": "../outside/secret.png", "absolute": None, "symlink": "link_out.png"}


def _url(kind, tree):
  return tree["secret"] if kind == "absolute" else OUTSIDE[kind]


def _line(url):
  return image_line("x", [(url, W, H)])


@pytest.fixture
def opened(monkeypatch):
  """Every path the start-up image check is asked to open."""
  seen = []
  real = images.check_image
  monkeypatch.setattr(images, "check_image", lambda path, wh: (seen.append(path),
                                                               real(path, wh))[1])
  return seen


def _mm(path, root, **kw):
  return dataset("mm", path, media_root=root, chat_template="intern-s1", **kw)


@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_parse_refuses_a_path_outside_before_opening_it(tree, kind, opened):
  url = _url(kind, tree)
  opts = sources.ParseOptions(tree["media"])
  with pytest.raises(sources.OutsideMediaRoot) as err:
    sources.parse_sample(_line(url), opts, check_images=True)
  msg = str(err.value)
  assert f"image '{url}' resolves to '{tree['secret']}'" in msg, msg
  assert f"outside the dataset's media_root '{tree['media']}'" in msg and HINT in msg, msg
  assert isinstance(err.value, images.ImageError)    # rechecked when a cached entry is reused
  with pytest.raises(sources.OutsideMediaRoot):      # batches read the refs the same way
    sources.sample_images(_line(url), opts)
  assert opened == []                                # nothing was opened
  allowed = sources.ParseOptions(tree["media"], allow_outside_media_root=True)
  sources.parse_sample(_line(url), allowed, check_images=True)
  assert [os.path.realpath(p) for p in opened] == [tree["secret"]]


def test_paths_inside_pass(tree, opened):
  opts = sources.ParseOptions(tree["media"])
  for url in ("img.png", "sub/deep/nested.png", "sub/deep/../../img.png", "link_in.png",
              os.path.join(tree["media"], "img.png")):
    refs = sources.sample_images(_line(url), opts)
    assert refs[0].path == os.path.join(tree["media"], url)
    sources.parse_sample(_line(url), opts, check_images=True)
  # A missing file inside is still reported as missing, not as outside.
  with pytest.raises(images.ImageError, match="does not exist") as err:
    sources.parse_sample(_line("sub/none.png"), opts, check_images=True)
  assert not isinstance(err.value, sources.OutsideMediaRoot)


def test_a_symlinked_media_root_bounds_its_target(tree):
  link = tree["tmp"] / "media_link"
  os.symlink(tree["media"], link)
  opts = sources.ParseOptions(str(link))
  sources.parse_sample(_line("img.png"), opts, check_images=True)
  with pytest.raises(sources.OutsideMediaRoot, match=rf"media_root '{link}' \({tree['media']}\)"):
    sources.parse_sample(_line("../outside/secret.png"), opts, check_images=True)


def test_without_media_root_the_current_directory_is_the_boundary(tree, monkeypatch):
  monkeypatch.chdir(tree["media"])
  opts = sources.ParseOptions()
  sources.parse_sample(_line("sub/deep/nested.png"), opts, check_images=True)
  with pytest.raises(sources.OutsideMediaRoot) as err:
    sources.parse_sample(_line("../outside/secret.png"), opts, check_images=True)
  msg = str(err.value)
  assert f"outside the current directory '{tree['media']}'" in msg and HINT in msg, msg
  assert "set the dataset's media_root" in msg


def test_dataset_key_reaches_the_parse_options():
  spec = sources.DatasetSpec.from_config(dataset("d", "x.jsonl", media_root="/m",
                                                 allow_outside_media_root=True), 0)
  assert spec.parse_options(2, 6) == sources.ParseOptions("/m", 2, 6, True)
  assert not sources.DatasetSpec.from_config(dataset("d", "x.jsonl"), 0).parse_options() \
      .allow_outside_media_root


def test_config_accepts_the_key_and_checks_its_type(tmp_path):
  cfg = get_config()
  cfg.data.datasets = [dict(cfg.data.datasets[0], allow_outside_media_root=True)]
  cfg.work_dir = str(tmp_path)
  config_lib.validate(cfg)
  cfg.data.datasets = [dict(cfg.data.datasets[0], allow_outside_media_root="yes")]
  with pytest.raises(ConfigError, match=r"data.datasets\[0\].allow_outside_media_root must be "
                                        "True or False"):
    config_lib.validate(cfg)


# ---------------------------------------------------------------- through SFTData
@pytest.mark.parametrize("kind", sorted(OUTSIDE))
def test_outside_image_is_a_bad_line_naming_file_line_and_fix(enc, tree, kind, opened):
  url = _url(kind, tree)
  path = write_jsonl(tree["tmp"] / "data.jsonl", [_line("img.png"), _line(url)])
  with pytest.raises(DataError) as err:
    SFTData(cfg_of(_mm(path, tree["media"])), enc, global_batch_size=1, media=intern_media())
  msg = str(err.value)
  assert msg.startswith(f"{path}:2 (dataset 'mm'): image '{url}' resolves to "
                        f"'{tree['secret']}'"), msg
  assert HINT in msg and "data.skip_bad_samples=True" not in msg.split(HINT)[0], msg
  assert tree["secret"] not in [os.path.realpath(p) for p in opened]


def test_skip_bad_samples_skips_and_counts_outside_images(enc, tree, opened):
  lines = [_line("img.png"), _line("../outside/secret.png"), _line("sub/deep/nested.png"),
           _line(tree["secret"]), _line("link_out.png"), _line("link_in.png")]
  path = write_jsonl(tree["tmp"] / "data.jsonl", lines)
  data = SFTData(cfg_of(_mm(path, tree["media"]), skip_bad_samples=True), enc,
                 global_batch_size=1, media=intern_media())
  stats = data.stats["datasets"]["mm"]
  assert stats["bad_lines"] == 3 and stats["image_samples"] == 3
  assert len(stats["bad_locations"]) == 3
  for n, loc in zip((2, 4, 5), stats["bad_locations"]):
    assert loc.startswith(f"{path}:{n} (dataset 'mm'): image ") and HINT in loc, loc
  assert tree["secret"] not in [os.path.realpath(p) for p in opened]
  for row in range(data.steps_per_epoch):   # the good samples' pixels load
    data.pack_rows([data.epoch_order(0)[row]])


def test_a_cached_bad_line_is_checked_again(enc, tree):
  """The verdict depends on a symbolic link, which the cache key does not cover."""
  path = write_jsonl(tree["tmp"] / "data.jsonl", [_line("img.png"), _line("link_out.png")])
  cfg = cfg_of(_mm(path, tree["media"]), skip_bad_samples=True,
               cache_dir=str(tree["tmp"] / "cache"))
  assert SFTData(cfg, enc, global_batch_size=1, media=intern_media()) \
      .stats["datasets"]["mm"]["bad_lines"] == 1
  os.remove(os.path.join(tree["media"], "link_out.png"))
  os.symlink("img.png", os.path.join(tree["media"], "link_out.png"))
  assert SFTData(cfg, enc, global_batch_size=1, media=intern_media()) \
      .stats["datasets"]["mm"]["bad_lines"] == 0


def test_allow_outside_media_root_loads(enc, tree):
  lines = [_line("img.png"), _line("../outside/secret.png"), _line(tree["secret"]),
           _line("link_out.png")]
  path = write_jsonl(tree["tmp"] / "data.jsonl", lines)
  cfg = cfg_of(_mm(path, tree["media"], allow_outside_media_root=True))
  data = SFTData(cfg, enc, global_batch_size=1, media=intern_media())
  stats = data.stats["datasets"]["mm"]
  assert stats["bad_lines"] == 0 and stats["image_samples"] == 4
