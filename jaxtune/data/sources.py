"""JSONL sources: finding files, indexing lines, `sample_ratio`, and validating samples.

A line is one sample: a list of OpenAI-style messages, an object with `messages` (optionally
`id`, `tools`), or a pretraining line `{"content": "..."}` (`"text"` works too). Every problem
is a `DataError` that names `file:line`, the dataset and what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
from typing import Any, NamedTuple

import numpy as np

try:  # orjson parses ~3x faster; the standard library gives the same objects
  from orjson import loads as _loads
except ImportError:
  from json import loads as _loads

from jaxtune.data import images
from jaxtune.data.templates import IMG_CONTEXT, ROLES, Message


_SHORT_LINE = 256   # bytes: lines shorter on average are indexed by a numpy scan


class DataError(ValueError):
  """Bad training data; the message names the file, line and dataset."""


class OutsideMediaRoot(images.ImageError):
  """An image path that resolves outside its dataset's media_root (and the dataset does not
  set allow_outside_media_root). An ImageError: the verdict depends on the file system
  (symbolic links), not only on the line, so a cached bad line is checked again."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  name: str
  anno_path: str
  sample_ratio: float = 1.0
  media_root: str = ""
  chat_template: str = "qwen3"
  sample_max_length: int | None = None
  allow_outside_media_root: bool = False   # image paths may resolve outside media_root

  @classmethod
  def from_config(cls, entry: Any, index: int) -> "DatasetSpec":
    entry = dict(entry)
    if "anno_path" not in entry:
      raise DataError(f"data.datasets[{index}] has no 'anno_path'")
    return cls(name=str(entry.get("name") or f"dataset{index}"), anno_path=entry["anno_path"],
               sample_ratio=float(entry.get("sample_ratio", 1.0)),
               media_root=entry.get("media_root") or "",
               chat_template=entry.get("chat_template") or "qwen3",
               sample_max_length=entry.get("sample_max_length"),
               allow_outside_media_root=bool(entry.get("allow_outside_media_root", False)))

  def parse_options(self, min_dynamic_patch: int = 1, max_dynamic_patch: int = 12,
                    media=None) -> "ParseOptions":
    """The ParseOptions of this dataset's lines (its media_root and boundary); `media` (a
    MediaSpec) sets the tile size and tokens per tile, else InternVL's tiling numbers (a text
    model only needs to see that a sample has images, to refuse it)."""
    tiling = {} if media is None else dict(tile_size=int(media.tile_size),
                                           tokens_per_tile=int(media.tokens_per_tile))
    return ParseOptions(self.media_root, min_dynamic_patch, max_dynamic_patch,
                        self.allow_outside_media_root, **tiling)


def list_jsonl(anno_path: str, dataset: str) -> list[str]:
  """`anno_path` itself, or every *.jsonl below the folder (recursively, sorted)."""
  if os.path.isfile(anno_path):
    return [anno_path]
  if not os.path.isdir(anno_path):
    raise DataError(f"dataset '{dataset}': anno_path '{anno_path}' does not exist")
  found = []
  for root, dirs, files in os.walk(anno_path, followlinks=True):
    dirs.sort()
    found.extend(os.path.join(root, f) for f in files if f.endswith(".jsonl"))
  if not found:
    raise DataError(f"dataset '{dataset}': folder '{anno_path}' holds no *.jsonl file")
  return sorted(found)


@dataclasses.dataclass
class SourceFile:
  """A JSONL file's non-blank lines: byte spans and 1-based line numbers.

  Nothing of the file stays open or mapped once it is indexed (a folder may hold thousands of
  files): lines are read back with `line(i)`, the content hash is computed on demand."""
  path: str
  starts: np.ndarray   # int64
  ends: np.ndarray     # int64
  lineno: np.ndarray   # int64, 1-based
  _hash: str | None = None

  @classmethod
  def read(cls, path: str) -> "SourceFile":
    with open(path, "rb") as f:
      try:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
      except ValueError:   # an empty file cannot be mapped
        data = b""
    try:
      return cls._index(path, data)
    finally:
      if isinstance(data, mmap.mmap):
        data.close()

  @classmethod
  def _index(cls, path: str, data: bytes | mmap.mmap) -> "SourceFile":
    nl = _newlines(data)
    starts = np.concatenate([[0], nl + 1]).astype(np.int64)
    ends = np.concatenate([nl, [len(data)]]).astype(np.int64)
    # Blank lines are not samples; everything else is one, even if it fails to parse. Only
    # lines that start with whitespace need a closer look.
    keep = ends > starts
    raw = np.frombuffer(data, dtype=np.uint8) if len(data) else np.zeros(1, np.uint8)
    first = raw[np.minimum(starts, len(raw) - 1)]
    del raw
    unsure = keep & np.isin(first, np.frombuffer(b" \t\r\x0b\x0c", np.uint8))
    for i in np.flatnonzero(unsure):
      keep[i] = bool(data[starts[i]:ends[i]].strip())
    return cls(path, starts[keep], ends[keep], np.flatnonzero(keep) + 1)

  def __len__(self) -> int:
    return len(self.starts)

  def line(self, i: int) -> bytes:
    with open(self.path, "rb") as f:
      return os.pread(f.fileno(), int(self.ends[i] - self.starts[i]), int(self.starts[i]))

  @property
  def content_hash(self) -> str:
    """sha1 of the file's bytes (read in blocks, never held whole)."""
    if self._hash is None:
      with open(self.path, "rb") as f:
        self._hash = hashlib.file_digest(f, "sha1").hexdigest()
    return self._hash


def _newlines(data: bytes | mmap.mmap) -> np.ndarray:
  """Offsets of every b"\\n". Chat lines are long (KBs): finding each newline (memchr) is ~5x
  faster than comparing every byte in numpy; for short lines the per-line loop costs more."""
  head = data[:1 << 20]
  if head.count(b"\n") * _SHORT_LINE > len(head):
    return np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
  out, find = [], data.find
  at = find(b"\n")
  while at >= 0:
    out.append(at)
    at = find(b"\n", at + 1)
  return np.array(out, np.int64)


def ratio_indices(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
  """XTuner's sample_ratio: target int(n * ratio); the integer part repeats every sample, the
  fractional remainder is a seeded subset without replacement (below 1 it subsamples)."""
  target = int(n * ratio)
  whole, rest = divmod(target, n) if n else (0, 0)
  extra = np.sort(rng.choice(n, size=rest, replace=False)) if rest else np.zeros(0, np.int64)
  return np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole), extra.astype(np.int64)])


@dataclasses.dataclass(frozen=True)
class ParseOptions:
  """How a line's images are found and tiled. Image urls are joined to media_root (relative
  to the current directory when it is "", as os.path.join does) and must resolve, symbolic
  links followed, inside that directory: else the line is bad (`OutsideMediaRoot`), before
  any file is opened, unless allow_outside_media_root. tile_size / tokens_per_tile: the model
  family's (jaxtune.data.media.MediaSpec); an image of n tiles becomes n x tokens_per_tile
  <IMG_CONTEXT> tokens."""
  media_root: str = ""
  min_dynamic_patch: int = 1
  max_dynamic_patch: int = 12
  allow_outside_media_root: bool = False
  tile_size: int = images.TILE
  tokens_per_tile: int = images.TOKENS_PER_TILE


def _text_of(content: Any, what: str) -> tuple[str, list[dict]]:
  """(text, image parts) of a message's content."""
  if isinstance(content, str):
    return content, []
  if not isinstance(content, list):
    raise ValueError(f"{what}: content must be a string or a list of parts, got "
                     f"{type(content).__name__}")
  texts, imgs = [], []
  for k, part in enumerate(content):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      texts.append(part["text"])
    elif kind == "image_url" and isinstance(part.get("image_url"), dict) \
        and isinstance(part["image_url"].get("url"), str):
      imgs.append(part["image_url"])
    else:
      raise ValueError(f"{what}: content part {k} must be {{'type': 'text', 'text': str}} or "
                       f"{{'type': 'image_url', 'image_url': {{'url': str}}}}, got {part!r:.80}")
  return "".join(texts), imgs


def _tool_calls_text(calls: Any, what: str) -> str:
  """XTuner's `function_formatter`: each call's arguments parsed (a JSON string, or already an
  object) and re-serialised with its name as one JSON object inside <tool_call> tags."""
  if not isinstance(calls, list):
    raise ValueError(f"{what}: tool_calls must be a list")
  out = []
  for call in calls:
    fn = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
      raise ValueError(f"{what}: each tool call needs a function name, got {call!r:.80}")
    args = fn.get("arguments", {})
    if isinstance(args, str):
      try:
        args = json.loads(args)
      except ValueError as e:
        raise ValueError(f"{what}: tool call '{fn['name']}' has arguments that are not JSON "
                         f"({e}): {args!r:.80}") from None
    text = json.dumps({"name": fn["name"], "arguments": args}, ensure_ascii=False)
    out.append(f"<tool_call>\n{text}\n</tool_call>")
  return "\n".join(out)


_PLAIN_ROLES = frozenset(ROLES)


class ImageRef(NamedTuple):
  """One image of a sample, in the order of its <IMG_CONTEXT> tokens."""
  path: str                # the url joined to the dataset's media_root
  image_wh: tuple[int, int]
  n_images: int            # images of the sample: they share max_dynamic_patch tiles
  tiles: int               # tiles it gets (its <IMG_CONTEXT> tokens // tokens_per_tile)


def parse_sample(obj: Any, opts: ParseOptions, *,
                 check_images: bool = False) -> tuple[list[Message], list | None]:
  """Validated messages and tools of one decoded JSON line; ValueError says what is wrong.

  check_images: also check every image's file (it exists, its header reads, its size after
  EXIF orientation is image_wh; no pixel is decoded). A failure is an `images.ImageError`."""
  messages, tools, _ = _parse(obj, opts, check_images)
  return messages, tools


def sample_images(obj: Any, opts: ParseOptions) -> list[ImageRef]:
  """The images of one decoded JSON line, in the order of its <IMG_CONTEXT> tokens (and so of
  its tiles); [] for a text sample. The same rules as parse_sample (ValueError if invalid)."""
  return _parse(obj, opts, False)[2]


def _parse(obj: Any, opts: ParseOptions,
           check_images: bool) -> tuple[list[Message], list | None, list[ImageRef]]:
  tools = None
  if isinstance(obj, dict):
    if "messages" in obj or "dialogs" in obj:   # XTuner reads either key
      tools, obj = obj.get("tools"), obj.get("messages", obj.get("dialogs"))
    elif isinstance(obj.get("content", obj.get("text")), str):
      return [Message("pretrain", obj.get("content", obj.get("text")))], None, []
    else:
      raise ValueError("no 'messages' (and no pretraining 'content'): expected a list of "
                       "messages, {\"messages\": [...]} or {\"content\": \"...\"}")
  if not isinstance(obj, list) or not obj:
    raise ValueError(f"messages must be a non-empty list, got {type(obj).__name__}")
  if tools is not None and not isinstance(tools, list):
    raise ValueError("'tools' must be a list of function schemas")

  messages, image_refs, n_placeholders = [], [], []
  for i, m in enumerate(obj):
    if type(m) is dict and len(m) == 2 and type(m.get("content")) is str \
        and type(m.get("role")) is str and m["role"] in _PLAIN_ROLES:
      # The common case (role + string content, nothing else): no further checks needed.
      text = m["content"]
      messages.append(Message(m["role"], text))
      n_placeholders.append(text.count(IMG_CONTEXT) if IMG_CONTEXT in text else 0)
      continue
    if not isinstance(m, dict):
      raise ValueError(f"message {i} must be an object with 'role' and 'content', got "
                       f"{type(m).__name__}")
    role = m.get("role")
    what = f"message {i} ({role})"
    if role not in ROLES:
      raise ValueError(f"message {i}: unknown role {role!r}; expected one of {list(ROLES)}")
    content = m.get("content")
    if content is None and role == "assistant" and m.get("tool_calls"):
      content = ""
    text, imgs = _text_of(content, what)
    if role == "assistant" and m.get("tool_calls"):
      calls = _tool_calls_text(m["tool_calls"], what)
      # XTuner: a newline between text and calls unless the text already ends a paragraph.
      text = text + "\n" + calls if text and not text.endswith("\n\n") else text + calls
    loss = m.get("loss")
    if loss is not None and not isinstance(loss, bool):
      raise ValueError(f"{what}: 'loss' must be true or false, got {loss!r}")
    image_refs.extend(imgs)
    n_placeholders.append(text.count(IMG_CONTEXT))
    messages.append(Message(role, text, loss))

  total = sum(n_placeholders)
  if total != len(image_refs):
    raise ValueError(f"{total} {IMG_CONTEXT} placeholder(s) but {len(image_refs)} image(s); "
                     "the text needs exactly one placeholder per image, in order")
  refs = []
  if image_refs:
    refs = _image_refs(image_refs, opts, check_images)
    k = 0
    for i, n in enumerate(n_placeholders):
      if n:
        messages[i] = messages[i]._replace(image_tokens=tuple(
            r.tiles * opts.tokens_per_tile for r in refs[k:k + n]))
        k += n
  return messages, tools, refs


def _image_refs(parts: list[dict], opts: ParseOptions, check: bool) -> list[ImageRef]:
  """Each image part's path, size and tile count. `image_wh` is required: the tokens are laid
  out from it before any pixel is read (XTuner gives a sample without it 0 tokens and drops
  it); a missing file is reported as such first."""
  refs = []
  for part in parts:
    path = os.path.join(opts.media_root, part["url"])
    if not opts.allow_outside_media_root:
      check_inside_media_root(part["url"], path, opts.media_root)
    wh = part.get("image_wh")
    if wh is None:
      images.check_image(path, None)
      raise ValueError(f"image '{path}': image_url has no image_wh; add \"image_wh\": "
                       "[width, height] (the size after EXIF orientation) to it: the "
                       "<IMG_CONTEXT> tokens are counted from it without decoding the image")
    if (not isinstance(wh, (list, tuple)) or len(wh) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in wh)):
      raise ValueError(f"image '{path}': image_wh must be [width, height] (positive "
                       f"integers), got {wh!r}")
    if check:
      images.check_image(path, wh)
    tiles = images.num_tiles(wh[0], wh[1], *images.tile_budget(len(parts),
                                                                opts.min_dynamic_patch,
                                                                opts.max_dynamic_patch),
                             size=opts.tile_size)
    refs.append(ImageRef(path, (int(wh[0]), int(wh[1])), len(parts), tiles))
  return refs


def check_inside_media_root(url: str, path: str, media_root: str) -> None:
  """Raises OutsideMediaRoot unless `path` (`url` joined to `media_root`) resolves inside
  media_root (the current directory when media_root is ""), both with symbolic links
  followed. Only names are resolved (lstat, readlink): no file is opened."""
  base = os.path.abspath(media_root or os.curdir)
  root = os.path.realpath(base)
  real = os.path.realpath(path)
  if os.path.commonpath([root, real]) == root:
    return
  if media_root:
    boundary = f"outside the dataset's media_root '{media_root}'"
    if root != media_root:
      boundary += f" ({root})"
    fix = "Fix the path in the data, point media_root at the folder that holds the images"
  else:
    boundary = (f"outside the current directory '{root}' (the dataset sets no media_root, so "
                "image paths are taken from there)")
    fix = ("Fix the path in the data, set the dataset's media_root to the folder that holds "
           "the images")
  raise OutsideMediaRoot(
      f"image '{url}' resolves to '{real}' (symbolic links followed), {boundary}; it was not "
      f"opened. {fix}, or set allow_outside_media_root=True on the dataset if this "
      "is intended")


def decode_line(raw: bytes) -> Any:
  try:
    return _loads(raw)
  except (UnicodeDecodeError, ValueError) as e:  # orjson.JSONDecodeError is a ValueError
    raise ValueError(f"not valid JSON ({e}): {raw[:80]!r}") from None


def where(path: str, lineno: int, dataset: str) -> str:
  return f"{path}:{lineno} (dataset '{dataset}')"
