"""Intern-S1's scientific tokenizer: the rules of its official custom code, id for id.

The official checkpoints encode with `InternS1Tokenizer` (custom code on the Hub; the same class
is in transformers' main branch, `models/intern_s1/tokenization_intern_s1.py`). jaxtune runs no
shipped code; this module implements the same rules:

1. NFC-normalise the text; split it on the added tokens and on `<MOLFORMULA>` / `</MOLFORMULA>`
   (which get no ids of their own: they are encoded as plain text).
2. Outside `<SMILES>`, `<SELFIES>`, `<IUPAC>`, `<FASTA>` and `<MOLFORMULA>` spans (counted, so
   spans nest), auto-detect SMILES (a regex over element symbols, bracket atoms, bonds and
   digits, 10 units or more; checked by RDKit's `MolFromSmiles` when RDKit imports, by a
   rule-based ring/bracket check otherwise; not when glued to an ASCII letter), then protein
   sequences (27 or more capital letters) in every resulting part. Detected spans are marked;
   the marks switch the tokenizer but get no ids.
3. Inside a tagged or detected span the innermost domain's SentencePiece model encodes: piece
   id + the domain's offset. A piece the model does not know (id 0) falls back to byte-level
   BPE tokens of its text (`▁` read as a space), each looked up in that model first.
4. Everything else: Qwen's byte-level BPE (tiktoken, as `TokenEncoder`), `▁` read as a space.

Speed, with the same ids (tests/test_intern_s1_differential.py holds the part-by-part reference):
a text is encoded with one tiktoken call, its BPE parts and added tokens joined with a separator
token where each domain span goes (`_Joined`); text none of the rules touch is that call alone,
as with a Qwen tokenizer. SMILES candidates are searched only inside runs of characters that
SMILES units can hold, found by translating the text to bytes (`science_text.unit_runs`; the
detection rules and checks live in `science_text`); proteins only in runs of 27 or more. A
candidate glued to a letter is dropped before its check, each check's verdict and each span's
ids are remembered, and the rule-based check reads a bracket-free SMILES without walking it
character by character. Text is NFC-normalised before any rule reads it, as the official
code does; when the separator cannot be used (e.g. the `transformers` backend) it goes part by
part (`spans`).
"""

from __future__ import annotations

import array
import hashlib
import logging
import re
import string
import unicodedata
from typing import NamedTuple

import numpy as np

from jaxtune.data.science_text import (FASTA_RE, rdkit_check, rings_and_brackets_ok,
                                       smiles_candidates, unit_runs)
from jaxtune.data.tokenizer import TokenEncoder, bytes_to_unicode
from jaxtune.data.tokenizer_files import TokenizerFiles, read_tokenizer_files

log = logging.getLogger(__name__)

# Fixed in the official code, not stored in any file of the checkpoint.
OFFSETS = {"SMILES": 151669, "IUPAC": 151929, "FASTA": 152443}
TAG_MODELS = {"SMILES": "SMILES", "SELFIES": "SMILES", "IUPAC": "IUPAC", "FASTA": "FASTA"}
PROTECT_OPEN, PROTECT_CLOSE = "<MOLFORMULA>", "</MOLFORMULA>"
SP_SPACE = "\u2581"          # SentencePiece's whitespace mark
_VERDICTS = 1 << 16          # SMILES candidates whose check is remembered
_SPANS = 1 << 14             # domain spans (per model) whose ids are remembered

_ASCII_LETTERS = frozenset(string.ascii_letters)
_NO_SPECIALS: frozenset = frozenset()
_U32 = next((c for c in "IL" if array.array(c).itemsize == 4), None)


def _u32(ids: list[int]) -> bytes:
  """Ids as native uint32 bytes (array's conversion is ~3x cheaper than numpy's for a few)."""
  return array.array(_U32, ids).tobytes() if _U32 else np.asarray(ids, np.uint32).tobytes()


_LETTERS = re.compile(r"[A-Za-z]")


def _nfc(text: str) -> str:
  """The official code normalises the whole text first: every rule then reads the NFC form
  (e.g. a KELVIN SIGN becomes the capital K of a protein)."""
  if text.isascii() or unicodedata.is_normalized("NFC", text):
    return text
  return unicodedata.normalize("NFC", text)


class Span(NamedTuple):
  """A part of the text and how it is encoded: `domain` None for the BPE, else the tag or
  auto-detected domain whose SentencePiece model encodes it (`auto`: detected, not tagged)."""
  text: str
  domain: str | None = None
  auto: bool = False
  token: bool = False        # an added token (its own id)


class InternS1Encoder(TokenEncoder):
  """`TokenEncoder`'s interface with Intern-S1's rules (module docstring)."""

  def __init__(self, path: str, *, allow_tiktoken: bool = True,
               files: TokenizerFiles | None = None, use_rdkit: bool | None = None):
    files = files or read_tokenizer_files(path)
    super().__init__(path, allow_tiktoken=allow_tiktoken, files=files)
    self._protos = {}
    for domain, file in files.sp_models.items():
      with open(file, "rb") as f:
        self._protos[domain] = f.read()
    # Added tokens that eat the white space beside them (HF's lstrip / rstrip).
    self._strip = {t["content"]: (t["lstrip"], t["rstrip"]) for t in files.spec["added_tokens"]
                   if t.get("lstrip") or t.get("rstrip")}
    rdkit = rdkit_check() if use_rdkit in (None, True) else None
    if use_rdkit and rdkit is None:
      raise ImportError("use_rdkit=True but RDKit is not installed: pip install rdkit")
    self._mol_ok = rdkit or rings_and_brackets_ok
    self.smiles_check = "rdkit" if rdkit is not None else "rules"
    # Which check runs changes the ids, so the data cache keys on it (and on the rules'
    # revision: "nfc-first" since NFC moved before detection).
    self.fingerprint = hashlib.sha256(
        f"{self.fingerprint}:intern-s1:nfc-first:{self.smiles_check}".encode()).hexdigest()[:16]
    self._setup()

  def _setup(self) -> None:
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    self._sp = {d: spm.SentencePieceProcessor(model_proto=b) for d, b in self._protos.items()}
    self.begin = {f"<{t}>": m for t, m in TAG_MODELS.items() if f"<{t}>" in self.added}
    self.end = {f"</{t}>": m for t, m in TAG_MODELS.items() if f"</{t}>" in self.added}
    self._split_re = re.compile("(" + "|".join(
        re.escape(t) for t in sorted(set(self.added) | {PROTECT_OPEN, PROTECT_CLOSE},
                                     key=len, reverse=True)) + ")")
    # Text holding one of these is stateful across added tokens (see splice_safe).
    self.stateful_pattern = re.compile("|".join(re.escape(t) for t in (
        *self.begin, *self.end, PROTECT_OPEN, PROTECT_CLOSE)))
    self._memo, self._verdicts, self._unknown = {}, {}, {}
    self._sp_memo: dict[str, dict[str, bytes]] = {m: {} for m in self._sp}   # span ids
    # Pieces spelled like an added token take the added token's id (per model; usually none).
    self._spelled_added = {d: {m.piece_to_id(t) for t in self.added} - {m.unk_id()}
                           for d, m in self._sp.items()}
    self._reverse_added = {i: t for t, i in self.added.items()}
    self._sep = self._choose_separator()
    if self._sep is not None:
      self._sep_id = self.added[self._sep]
      self._sep_ids = _u32([self._sep_id])
      self._sep_only = frozenset((self._sep,))

  def _choose_separator(self) -> str | None:
    """The added token that `_Joined` puts where BPE text stops (see there); None when the added
    tokens do not allow that (then each part is encoded on its own).

    The ids equal those of separate calls when tiktoken splits the joined text at exactly the
    added tokens put there and those in the text: every added token is a tiktoken special (and
    so splits its text), none overlaps another or itself (so no two ways to split), none holds
    a space or "▁" (the BPE text's "▁" become spaces) or begins or ends with an ASCII letter
    (so no run of capitals or SMILES units crosses one)."""
    if self._buffer is None or self._strip or not self.added:
      return None
    tokens = sorted(self.added)
    if set(tokens) != set(self._tiktoken._special_tokens):  # pylint: disable=protected-access
      return None
    letters = set(string.ascii_letters)
    for a in tokens:
      if " " in a or SP_SPACE in a or a[0] in letters or a[-1] in letters:
        return None
      for b in tokens:
        if (a != b and b in a) or any(b.startswith(a[k:]) for k in range(1, len(a))):
          return None
    # One unlikely in text (a text holding it is still right: see _Joined.token and _splice).
    for sep in ("<|fim_pad|>", "<|video_pad|>", "<|image_pad|>", "<|vision_pad|>"):
      if sep in self.added:
        return sep
    return tokens[0]

  def __getstate__(self):
    return dict(super().__getstate__(), protos=self._protos, smiles_check=self.smiles_check,
                intern_fingerprint=self.fingerprint, strip=self._strip)

  def __setstate__(self, state):
    if "ranks" not in state:
      self.__init__(state["path"], allow_tiktoken=state["allow_tiktoken"],
                    use_rdkit=state["smiles_check"] == "rdkit")
      return
    super().__setstate__(state)
    self._protos, self._strip = state["protos"], state["strip"]
    rdkit = rdkit_check() if state["smiles_check"] == "rdkit" else None
    self._mol_ok = rdkit or rings_and_brackets_ok
    self.smiles_check, self.fingerprint = state["smiles_check"], state["intern_fingerprint"]
    self._setup()

  # --- detection ------------------------------------------------------------------------------
  def _is_molecule(self, candidate: str) -> bool:
    verdict = self._verdicts.get(candidate)
    if verdict is None:    # RDKit's parse costs ~40 us: molecules that recur are checked once
      if len(self._verdicts) >= _VERDICTS:
        self._verdicts.clear()
      verdict = self._verdicts[candidate] = (
          len(_LETTERS.findall(candidate)) >= 5 and self._mol_ok(candidate))
    return verdict

  def _molecules(self, text: str, runs: list[tuple[int, int]] | None = None
                 ) -> list[tuple[int, int]]:
    """(start, end) of each auto-detected SMILES span of plain text."""
    found = []
    n = len(text)
    for m in smiles_candidates(text, runs):
      start, end = m.span(1)
      # Glued to a letter: not a molecule whatever the check says (so it is not run).
      if (start > 0 and text[start - 1] in _ASCII_LETTERS) or (
          end < n and text[end] in _ASCII_LETTERS):
        continue
      if self._is_molecule(m.group(1)):
        found.append((start, end))
    return found

  def _detected(self, text: str) -> list[tuple[int, int, str | tuple]]:
    """(start, end, domain) of the spans detected in plain text, in order: "SMILES", "FASTA", or
    ("FASTA", "SMILES") for a protein inside a detected molecule (its innermost domain wins).

    The official code looks for proteins in each part the SMILES spans leave, spans included.
    A run of capitals never crosses a span's end (a span is not glued to a letter), so the
    proteins found in the whole text are the same, each inside one part; and it lies inside a
    run of unit characters of its length or more."""
    runs = unit_runs(text)
    if not runs:
      return []
    molecules = self._molecules(text, runs)
    proteins = [m.span(1) for start, end in runs if end - start >= 27
                for m in FASTA_RE.finditer(text, start, end)]
    if not proteins:
      return [(start, end, "SMILES") for start, end in molecules]
    out: list[tuple[int, int, str | tuple]] = []
    k = 0
    for start, end in molecules:
      while k < len(proteins) and proteins[k][0] < start:    # proteins before this molecule
        out.append((*proteins[k], "FASTA"))
        k += 1
      pos = start
      while k < len(proteins) and proteins[k][1] <= end:     # proteins inside it
        if proteins[k][0] > pos:
          out.append((pos, proteins[k][0], "SMILES"))
        out.append((*proteins[k], ("FASTA", "SMILES")))
        pos = proteins[k][1]
        k += 1
      if pos < end:
        out.append((pos, end, "SMILES"))
    out += [(*p, "FASTA") for p in proteins[k:]]
    return out

  def _detect(self, text: str) -> list[Span]:
    """Plain text -> BPE parts and auto-detected SMILES / protein spans."""
    out, pos = [], 0
    for start, end, domain in self._detected(text):
      if start > pos:
        out.append(Span(text[pos:start]))
      out.append(Span(text[start:end], domain, True))
      pos = end
    if pos < len(text):
      out.append(Span(text[pos:]))
    return out

  # --- encoding -------------------------------------------------------------------------------
  def spans(self, text: str) -> list[Span]:
    """How `text` is read: each part with the domain that encodes it, in order."""
    text = unicodedata.normalize("NFC", text)
    pieces = [p for p in self._split_re.split(text) if p]
    pieces = self._apply_strip(pieces)
    guarded, out = 0, []
    stack: list[str] = []
    for piece in pieces:
      if piece in (PROTECT_OPEN, PROTECT_CLOSE):
        guarded = guarded + 1 if piece == PROTECT_OPEN else max(0, guarded - 1)
        # Inside a tag: BPE tokens looked up in its model (see _encode_spans).
        out.append(Span(piece, stack[-1][0] if stack else None, bool(stack) and stack[-1][1]))
        continue
      if piece in self.begin:
        guarded += 1
        out.append(Span(piece, token=True))
        stack.append((piece[1:-1], False))
        continue
      if piece in self.end:
        guarded = max(0, guarded - 1)
        out.append(Span(piece, token=True))
        if stack:
          stack.pop()
        continue
      if piece in self.added:
        out.append(Span(piece, token=True))
        continue
      found = [Span(piece)] if guarded else self._detect(piece)
      for part in found:
        if part.domain is None:
          out.append(part._replace(domain=stack[-1][0] if stack else None,
                                   auto=bool(stack) and stack[-1][1]))
        elif isinstance(part.domain, tuple):     # a protein inside a detected SMILES span
          out.append(part._replace(domain=part.domain[0]))
        else:
          out.append(part)
    return out

  def splice_safe(self, text: str) -> bool:
    """True when the tags in `text` leave no span open at its end (none, or balanced): its ids
    then do not depend on what the template puts after it."""
    if not self.stateful_pattern.search(text):
      return True
    guarded = depth = 0
    for m in self.stateful_pattern.finditer(text):
      tag = m.group()
      if tag in self.begin or tag == PROTECT_OPEN:
        guarded += 1
        depth += tag in self.begin
      else:
        guarded = max(0, guarded - 1)
        depth = max(0, depth - (tag in self.end))
    return guarded == 0 and depth == 0

  def _apply_strip(self, pieces: list[str]) -> list[str]:
    if not self._strip:
      return pieces
    for i, piece in enumerate(pieces):
      lstrip, rstrip = self._strip.get(piece, (False, False))
      if rstrip and i + 1 < len(pieces):
        pieces[i + 1] = pieces[i + 1].lstrip()
      if lstrip and i > 0:
        pieces[i - 1] = pieces[i - 1].rstrip()
    return [p for p in pieces if p]

  def _plain(self, text: str) -> bool:
    """True when no rule touches `text`: it is then the plain BPE's."""
    if self.stateful_pattern.search(text) or SP_SPACE in text or FASTA_RE.search(text):
      return False
    # Detection runs between added tokens: the same parts here.
    return not any(self._molecules(part) for part in self._split_re.split(text)[::2])

  def encode(self, text: str) -> list[int]:
    text = _nfc(text)
    ids = self._fast(text)
    if ids is not None:
      return np.frombuffer(ids, np.uint32).tolist()
    if self._plain(text):
      return super().encode(text)
    return self._encode_spans(self.spans(text))

  def encode_array(self, text: str) -> np.ndarray:
    text = _nfc(text)
    ids = self._fast(text)
    if ids is not None:
      return np.frombuffer(ids, np.uint32).copy()
    if self._plain(text):
      return super().encode_array(text)
    return np.asarray(self._encode_spans(self.spans(text)), dtype=np.uint32)

  def _encode_bytes(self, text: str):
    text = _nfc(text)
    ids = self._fast(text)
    if ids is not None:
      return ids
    if self._plain(text):
      return super()._encode_bytes(text)
    return np.asarray(self._encode_spans(self.spans(text)), dtype=np.uint32).tobytes()

  def _fast(self, text: str):
    """The ids of NFC-normalised `text` as uint32 bytes with one tiktoken call (see _Joined);
    None where that does not apply (no separator, lone surrogates): the part-by-part path
    (`spans`, `_encode_spans`) then encodes it."""
    if self._sep is None:
      return None
    try:
      token = self._split_re.search(text)   # the tags and guards are among these
      if token is not None:
        if self.stateful_pattern.search(text, token.start()):
          return self._tagged(text)
        return self._untagged_with_tokens(text)
      found = self._detected(text)
      if not found:
        if SP_SPACE in text:
          text = text.replace(SP_SPACE, " ")
        # What a plain Qwen tokenizer encodes (with no added token in it).
        return memoryview(self._buffer(text, _NO_SPECIALS)).cast("B")
      parts, fills, pos = [], [], 0
      for start, end, domain in found:
        parts += (text[pos:start], self._sep)
        fills.append(self._domain_ids(domain if type(domain) is str else domain[0],
                                      text[start:end]))
        pos = end
      parts.append(text[pos:])
      return _splice(self, "".join(parts), fills, self._sep_only)
    except UnicodeEncodeError:
      return None

  def _untagged_with_tokens(self, text: str):
    """`_fast` for text with added tokens but no tags: detection runs between the tokens."""
    out = _Joined(self)
    for k, piece in enumerate(self._split_re.split(text)):
      if k % 2:
        out.token(piece)
        continue
      pos = 0
      for start, end, domain in self._detected(piece):
        out.bpe(piece[pos:start])
        out.domain(domain[0] if type(domain) is tuple else domain, piece[start:end])
        pos = end
      out.bpe(piece[pos:])
    return out.ids()

  def _tagged(self, text: str):
    """`_fast` for text with tags or guards: `spans`'s rules, written into a _Joined."""
    out = _Joined(self)
    guarded, stack = 0, []
    for piece in self._split_re.split(text):
      if not piece:
        continue
      if piece in (PROTECT_OPEN, PROTECT_CLOSE):
        guarded = guarded + 1 if piece == PROTECT_OPEN else max(0, guarded - 1)
        if stack:
          out.domain(stack[-1], piece)
        else:
          out.bpe(piece)
        continue
      if piece in self.added:
        if piece in self.begin:
          guarded += 1
          stack.append(self.begin[piece])
        elif piece in self.end:
          guarded = max(0, guarded - 1)
          if stack:
            stack.pop()
        out.token(piece)
        continue
      model = stack[-1] if stack else None
      pos = 0
      for start, end, domain in () if guarded else self._detected(piece):
        out.text(piece[pos:start], model)
        out.domain(domain[0] if type(domain) is tuple else domain, piece[start:end])
        pos = end
      out.text(piece[pos:], model)
    return out.ids()

  def _domain_ids(self, model: str, text: str) -> bytes:
    """The ids of a span that `model` encodes, as uint32 bytes; remembered (spans recur)."""
    memo = self._sp_memo[model]
    ids = memo.get(text)
    if ids is not None:
      return ids
    if len(memo) >= _SPANS:
      memo.clear()
    if text in (PROTECT_OPEN, PROTECT_CLOSE):
      ids = memo[text] = _u32(self._encode_spans([Span(text, model)]))
      return ids
    sp, offset, spelled = self._sp[model], OFFSETS[model], self._spelled_added[model]
    pids = sp.encode(text)
    if 0 not in pids and not (spelled and spelled.intersection(pids)):   # the common case
      ids = memo[text] = _u32([pid + offset for pid in pids])
      return ids
    out = []   # as _encode_spans, with each unknown piece's ids remembered
    for piece, pid in zip(sp.encode(text, out_type=str), pids):
      if pid != 0:
        out.append(self.added.get(piece, pid + offset))
        continue
      unknown = self._unknown.get((model, piece))
      if unknown is None:
        if len(self._unknown) >= _SPANS:
          self._unknown.clear()
        unknown = self._unknown[(model, piece)] = [
            self._in_domain(self._bpe_token(i), sp, offset, i) for i in self._bpe(piece)]
      out += unknown
    ids = memo[text] = _u32(out)
    return ids

  def _bpe(self, text: str) -> list[int]:
    text = text.replace(SP_SPACE, " ")
    if self._tiktoken is not None:
      return self._tiktoken.encode_ordinary(text)
    return self._hf.encode(text, add_special_tokens=False)

  def _bpe_token(self, i: int) -> str:
    """The byte-level string of BPE id `i` (what the official code looks up in a model)."""
    if self._tiktoken is not None:
      return "".join(map(_BYTE_CHARS.__getitem__, self._tiktoken.decode_single_token_bytes(i)))
    return self._hf.convert_ids_to_tokens(i)

  def _in_domain(self, token: str, sp, offset: int, fallback: int | None) -> int:
    """The official lookup of a token inside a domain span: an added token's id, else the
    model's piece id + offset, else (unknown to the model) the BPE id."""
    if token in self.added:
      return self.added[token]
    pid = sp.piece_to_id(token)
    return fallback if pid == sp.unk_id() else pid + offset

  def _encode_spans(self, spans: list[Span]) -> list[int]:
    ids: list[int] = []
    for span in spans:
      if span.token:
        ids.append(self.added[span.text])
        continue
      if span.domain is None:
        ids.extend(self._bpe(span.text))
        continue
      model = TAG_MODELS[span.domain]
      sp, offset = self._sp[model], OFFSETS[model]
      if span.text in (PROTECT_OPEN, PROTECT_CLOSE):   # plain BPE tokens, looked up in the model
        ids.extend(self._in_domain(self._bpe_token(i), sp, offset, i)
                   for i in self._bpe(span.text))
        continue
      pids = sp.encode(span.text)
      spelled = self._spelled_added[model]
      if 0 not in pids and not (spelled and spelled.intersection(pids)):   # the common case
        ids += [pid + offset for pid in pids]
        continue
      for piece, pid in zip(sp.encode(span.text, out_type=str), pids):
        if pid != 0:   # a piece of the model (an added token's id if it is spelled as one)
          ids.append(self.added.get(piece, pid + offset))
        else:
          ids.extend(self._in_domain(self._bpe_token(i), sp, offset, i) for i in self._bpe(piece))
    return ids

  def _domain_of(self, i: int) -> str | None:
    """The SentencePiece model whose id range holds `i` (added tokens excepted)."""
    if i in self._reverse_added:
      return None
    for model, offset in OFFSETS.items():
      if offset <= i < offset + self._sp[model].get_piece_size():
        return model
    return None

  def decode(self, ids) -> str:
    return "".join(text for text, _ in self._decoded_runs(ids))

  def _decoded_runs(self, ids) -> list[tuple[str, str | None]]:
    """(text, domain) runs: consecutive ids of one model (None: BPE and added tokens)."""
    runs: list[tuple[str, str | None]] = []
    plain: list[int] = []
    for i in (int(i) for i in ids):
      model = self._domain_of(i)
      if model is None:
        plain.append(i)
        continue
      if plain:
        runs.append((super().decode(plain), None))
        plain = []
      piece = self._sp[model].id_to_piece(i - OFFSETS[model]).replace(SP_SPACE, " ")
      if runs and runs[-1][1] == model:
        runs[-1] = (runs[-1][0] + piece, model)
      else:
        runs.append((piece, model))
    if plain:
      runs.append((super().decode(plain), None))
    return runs

  def decode_marked(self, ids) -> str:
    """`decode` with each run read by a scientific model shown as ⟪SMILES: ...⟫, or
    ⟪SMILES auto: ...⟫ when it was auto-detected (no tag before it)."""
    out = []
    for text, model in self._decoded_runs(ids):
      if model is None:
        out.append(text)
        continue
      tagged = out and any(out[-1].endswith(f"<{t}>") for t, m in TAG_MODELS.items()
                           if m == model)
      out.append(f"⟪{model}{'' if tagged else ' auto'}: {text}⟫")
    return "".join(out)

  @property
  def max_id(self) -> int:
    """The largest id: the BPE's and added tokens', and each domain model's last piece."""
    return max(super().max_id, *(OFFSETS[d] + m.get_piece_size() - 1
                                 for d, m in self._sp.items()))

  def describe(self) -> str:
    check = ("RDKit's MolFromSmiles" if self.smiles_check == "rdkit" else
             "the rule-based ring/bracket check (RDKit is not installed; pip install rdkit for "
             "the official tokenizer's preferred check)")
    return f"Intern-S1 scientific tokenizer at {self.path}: SMILES auto-detection checked by {check}"


class _Joined:
  """A text's ids put together with one tiktoken call.

  The BPE parts and added tokens are joined into one text, with the separator token where a
  domain span is (its ids are its SentencePiece model's) and between two BPE parts (which the
  official code encodes apart). tiktoken encodes the text between special tokens on its own,
  exactly as separate calls would (InternS1Encoder._choose_separator says when it does); each
  separator's id is then replaced by the ids of what it stands for."""

  __slots__ = ("enc", "parts", "fills", "tokens", "bpe_before")

  def __init__(self, enc: "InternS1Encoder"):
    self.enc, self.parts, self.fills, self.tokens, self.bpe_before = enc, [], [], None, False

  def bpe(self, text: str) -> None:
    """A BPE part (none when empty), encoded apart from the BPE part before it."""
    if not text:
      return
    if self.bpe_before:
      self.parts.append(self.enc._sep)   # pylint: disable=protected-access
      self.fills.append(b"")
    self.parts.append(text)
    self.bpe_before = True

  def domain(self, model: str, text: str) -> None:
    """A span that `model` encodes."""
    enc = self.enc
    self.parts.append(enc._sep)   # pylint: disable=protected-access
    self.fills.append(enc._domain_ids(model, text))   # pylint: disable=protected-access
    self.bpe_before = False

  def text(self, text: str, model: str | None) -> None:
    if model is None:
      self.bpe(text)
    elif text:
      self.domain(model, text)

  def token(self, token: str) -> None:
    """An added token (its own id)."""
    enc = self.enc
    self.parts.append(token)
    if self.tokens is None:
      self.tokens = {enc._sep}   # pylint: disable=protected-access
    self.tokens.add(token)
    if token == enc._sep:   # pylint: disable=protected-access
      self.fills.append(enc._sep_ids)   # pylint: disable=protected-access
    self.bpe_before = False

  def ids(self):
    """The ids as uint32 bytes; None when the separators are not all where they were put."""
    allowed = self.tokens or self.enc._sep_only   # pylint: disable=protected-access
    return _splice(self.enc, "".join(self.parts), self.fills, allowed)


def _splice(enc: InternS1Encoder, text: str, fills: list[bytes], allowed):
  """tiktoken's ids of `text` (only the special tokens in `allowed`: tiktoken converts the set
  on every call) with the k-th separator's id replaced by `fills[k]`, as uint32 bytes; None
  when the separators are not all where they were put."""
  if SP_SPACE in text:
    text = text.replace(SP_SPACE, " ")
  ids = bytes(enc._buffer(text, allowed))   # pylint: disable=protected-access
  sep, out, pos = enc._sep_ids, [], 0   # pylint: disable=protected-access
  for fill in fills:
    at = ids.find(sep, pos)
    while at > 0 and at & 3:             # across two ids: look on
      at = ids.find(sep, at + 1)
    if at < 0:
      return None
    out += (ids[pos:at], fill)
    pos = at + 4
  at = ids.find(sep, pos)
  while at > 0 and at & 3:
    at = ids.find(sep, at + 1)
  if at >= 0:                            # one more than were put
    return None
  out.append(ids[pos:])
  return b"".join(out)


_BYTE_CHARS = bytes_to_unicode()
