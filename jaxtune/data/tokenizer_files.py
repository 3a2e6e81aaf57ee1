"""Which tokenizer a checkpoint directory holds, read from its files alone.

Published checkpoints lay their tokenizer out in one of three ways, recognised here by file name:

  tokenizer.json  the `tokenizers` library's file (Qwen3 and most recent checkpoints)
  vocab+merges    `vocab.json` + `merges.txt` of a byte-level BPE, its added tokens in
                  `tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json`
  intern-s1       vocab+merges plus `tokenizer_SMILES.model`, `tokenizer_IUPAC.model` and
                  `tokenizer_FASTA.model`: the official Intern-S1 / Intern-S1-mini checkpoints,
                  whose `tokenizer_config.json` points at custom code (jaxtune.data.intern_s1_tokenizer
                  implements its rules)

Code shipped in a checkpoint directory (`auto_map`, `*.py`) is never imported or run. Every
layout is returned as one tokenizer.json-shaped spec, which the fast encoder reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

LAYOUTS = ("tokenizer.json", "vocab+merges", "intern-s1")
# Intern-S1's SentencePiece models of the scientific domains, by the domain they encode.
INTERN_S1_MODELS = {"SMILES": "tokenizer_SMILES.model", "IUPAC": "tokenizer_IUPAC.model",
                    "FASTA": "tokenizer_FASTA.model"}

# Qwen's pre-tokenizer: letters, single digits, punctuation runs, newlines, spaces.
QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# The slow tokenizer class named in tokenizer_config.json decides what vocab+merges do not say:
# (pre-tokenizer pattern, whether text is NFC-normalised first).
_BPE_CLASSES = {
    "Qwen2Tokenizer": (QWEN_PATTERN, True), "Qwen2TokenizerFast": (QWEN_PATTERN, True),
    "InternS1Tokenizer": (QWEN_PATTERN, True),
    "GPT2Tokenizer": (GPT2_PATTERN, False), "GPT2TokenizerFast": (GPT2_PATTERN, False),
}


class TokenizerFilesError(ValueError):
  """A directory holds no tokenizer jaxtune can read (the message says what it found)."""


@dataclasses.dataclass
class TokenizerFiles:
  path: str
  layout: str                   # one of LAYOUTS
  spec: dict[str, Any]          # tokenizer.json-shaped: model (vocab, merges), added_tokens, ...
  raw: bytes                    # the bytes that define the ids (what fingerprints hash)
  eos_token: str | None         # tokenizer_config.json's eos_token
  files: tuple[str, ...]        # paths of the files that make up the tokenizer
  sp_models: dict[str, str]     # intern-s1: domain -> SentencePiece model path


def _listing(path: str) -> list[str]:
  try:
    return sorted(os.listdir(path))
  except OSError as e:
    raise TokenizerFilesError(f"tokenizer directory '{path}' cannot be read: {e}") from None


def detect_layout(path: str) -> str:
  """The layout of `path`, from file names only; raises TokenizerFilesError naming the files
  found and the layouts jaxtune reads when there is none."""
  names = set(_listing(path))
  if "tokenizer.json" in names:
    return "tokenizer.json"
  if {"vocab.json", "merges.txt"} <= names:
    if set(INTERN_S1_MODELS.values()) <= names:
      return "intern-s1"
    return "vocab+merges"
  shown = ", ".join(sorted(names)[:20]) + (" ..." if len(names) > 20 else "") or "nothing"
  missing = ""
  if "vocab.json" in names or "merges.txt" in names:
    missing = f" ({'merges.txt' if 'vocab.json' in names else 'vocab.json'} is missing)"
  raise TokenizerFilesError(
      f"tokenizer directory '{path}' holds no tokenizer jaxtune can read{missing}. Found: "
      f"{shown}. jaxtune reads: tokenizer.json; vocab.json + merges.txt (added tokens from "
      f"tokenizer_config.json); the Intern-S1 layout (vocab.json + merges.txt + "
      f"{' + '.join(INTERN_S1_MODELS.values())}). Point tokenizer_path (or load_from) at the "
      f"checkpoint directory that has them.")


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _json(path: str, what: str) -> Any:
  try:
    return json.loads(_read(path))
  except ValueError as e:
    raise TokenizerFilesError(f"{path} is not valid JSON ({e}); it should hold the {what}.") \
        from None


def _tokenizer_config(path: str) -> dict[str, Any]:
  file = os.path.join(path, "tokenizer_config.json")
  return _json(file, "tokenizer settings") if os.path.isfile(file) else {}


def _eos(config: dict[str, Any]) -> str | None:
  eos = config.get("eos_token")
  return eos.get("content") if isinstance(eos, dict) else eos


def read_tokenizer_files(path: str) -> TokenizerFiles:
  """The tokenizer of directory `path` in any layout of LAYOUTS (no code of it is run)."""
  layout = detect_layout(path)
  config = _tokenizer_config(path)
  config_file = os.path.join(path, "tokenizer_config.json")
  config_bytes = _read(config_file) if os.path.isfile(config_file) else b""
  if layout == "tokenizer.json":
    file = os.path.join(path, "tokenizer.json")
    raw = _read(file)
    try:
      from orjson import loads  # pylint: disable=import-outside-toplevel
    except ImportError:
      loads = json.loads
    return TokenizerFiles(path, layout, loads(raw), raw, _eos(config), (file,), {})
  return _read_vocab_merges(path, layout, config, config_bytes)


def _read_vocab_merges(path: str, layout: str, config: dict[str, Any],
                       config_bytes: bytes) -> TokenizerFiles:
  cls = config.get("tokenizer_class") or "Qwen2Tokenizer"
  if cls not in _BPE_CLASSES:
    raise TokenizerFilesError(
        f"{os.path.join(path, 'tokenizer_config.json')}: tokenizer_class '{cls}' with "
        f"vocab.json + merges.txt is not one jaxtune knows the pre-tokenizer of (it reads "
        f"{', '.join(sorted(_BPE_CLASSES))}); save the tokenizer with a tokenizer.json.")
  pattern, nfc = _BPE_CLASSES[cls]
  vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  vocab = _json(vocab_file, "BPE vocabulary (token -> id)")
  merges_raw = _read(merges_file)
  merges = []
  for i, line in enumerate(merges_raw.decode("utf-8").splitlines()):
    line = line.strip()
    if not line or (i == 0 and line.startswith("#version")):
      continue
    pair = line.split()
    if len(pair) != 2:
      raise TokenizerFilesError(f"{merges_file}:{i + 1}: a merge is two tokens separated by a "
                                f"space, got {line!r}.")
    merges.append(pair)
  added = _added_tokens(path, config)
  files = [vocab_file, merges_file] + ([os.path.join(path, "tokenizer_config.json")]
                                       if config_bytes else [])
  raw = _read(vocab_file) + merges_raw + config_bytes
  extra = os.path.join(path, "added_tokens.json")
  if os.path.isfile(extra):
    files.append(extra)
    raw += _read(extra)
  sp_models = {}
  if layout == "intern-s1":
    for domain, name in INTERN_S1_MODELS.items():
      sp_models[domain] = os.path.join(path, name)
      files.append(sp_models[domain])
      raw += _read(sp_models[domain])
  spec = bpe_spec(vocab, merges, added, pattern, nfc)
  return TokenizerFiles(path, layout, spec, raw, _eos(config), tuple(files), sp_models)


def bpe_spec(vocab: dict[str, int], merges: list, added_tokens: list[dict[str, Any]],
             pattern: str = QWEN_PATTERN, nfc: bool = True) -> dict[str, Any]:
  """A byte-level BPE as tokenizer.json describes it (Qwen's pre-tokenizer by default)."""
  byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
  return {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
      "normalizer": {"type": "NFC"} if nfc else None,
      "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
          {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
           "invert": False},
          {"type": "ByteLevel", **byte_level}]},
      "post_processor": {"type": "ByteLevel", **byte_level},
      "decoder": {"type": "ByteLevel", **byte_level},
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": "", "end_of_word_suffix": "", "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": False, "vocab": vocab,
                "merges": merges},
  }


def _added_tokens(path: str, config: dict[str, Any]) -> list[dict[str, Any]]:
  """Added tokens as tokenizer.json lists them, from `added_tokens_decoder` and
  `added_tokens.json`. `normalized` is dropped: the slow tokenizers these files belong to
  match added tokens in the raw text."""
  out: dict[int, dict[str, Any]] = {}
  for key, tok in (config.get("added_tokens_decoder") or {}).items():
    content = tok if isinstance(tok, str) else tok.get("content")
    flags = {} if isinstance(tok, str) else tok
    out[int(key)] = dict(id=int(key), content=content, single_word=bool(flags.get("single_word")),
                         lstrip=bool(flags.get("lstrip")), rstrip=bool(flags.get("rstrip")),
                         normalized=False, special=bool(flags.get("special", True)))
  extra = os.path.join(path, "added_tokens.json")
  if os.path.isfile(extra):
    for content, i in _json(extra, "added tokens (token -> id)").items():
      out.setdefault(int(i), dict(id=int(i), content=content, single_word=False, lstrip=False,
                                  rstrip=False, normalized=False, special=True))
  return [out[i] for i in sorted(out)]
