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

Text none of this touches (no tag, nothing detected, no `▁`) is encoded by the plain BPE
encoder in one call, which keeps ordinary chat text as fast as with a Qwen tokenizer.
"""

from __future__ import annotations

import hashlib
import logging
import re
import unicodedata
from typing import NamedTuple

import numpy as np
import regex

from jaxtune.data.tokenizer import TokenEncoder, bytes_to_unicode
from jaxtune.data.tokenizer_files import TokenizerFiles, read_tokenizer_files

log = logging.getLogger(__name__)

# Fixed in the official code, not stored in any file of the checkpoint.
OFFSETS = {"SMILES": 151669, "IUPAC": 151929, "FASTA": 152443}
TAG_MODELS = {"SMILES": "SMILES", "SELFIES": "SMILES", "IUPAC": "IUPAC", "FASTA": "FASTA"}
PROTECT_OPEN, PROTECT_CLOSE = "<MOLFORMULA>", "</MOLFORMULA>"
SP_SPACE = "\u2581"          # SentencePiece's whitespace mark
_VERDICTS = 1 << 16          # SMILES candidates whose check is remembered

# --- SMILES auto-detection -------------------------------------------------------------------
_TWO_LETTER = (
    "Ac Ag Al Am Ar As At Au Ba Be Bh Bi Bk Br Ca Cd Ce Cf Cl Cm Cn Co Cr Cs Cu Db Ds Dy Er Es "
    "Eu Fe Fl Fm Fr Ga Gd Ge He Hf Hg Ho Hs In Ir Kr La Li Lr Lu Lv Mc Md Mg Mn Mo Mt Na Nb Nd "
    "Ne Nh Ni No Np Og Os Pa Pb Pd Pm Po Pr Pt Pu Ra Rb Re Rf Rg Rh Rn Ru Sb Sc Se Sg Si Sm Sn "
    "Sr Ta Tb Tc Te Th Ti Tl Tm Ts Xe Yb Zn Zr").split()
_ONE_LETTER = "B C F H I K N O P S U V W Y b c n o p s".split()
_SPECIALS = r"[\(\)\.=\-#@\d\$\%\*:\+\-\/\\]"


def _symbol_alternation() -> str:
  """The official regex tries every two-letter symbol before any one-letter one, in an atomic
  group: at a capital, the two-letter symbol if there is one, else the letter. Grouped by first
  letter (`C[adeflmnorsu]?`), the same choice is ~4x faster to match."""
  out = []
  for first in sorted({e[0] for e in _TWO_LETTER} | set(_ONE_LETTER)):
    seconds = "".join(sorted(e[1] for e in _TWO_LETTER if e[0] == first))
    tail = f"[{seconds}]" if seconds else ""
    out.append(first + (tail + "?" if tail and first in _ONE_LETTER else tail))
  return "|".join(out)


_UNIT = r"(?:\[[^\]]+\]|" + _symbol_alternation() + "|" + _SPECIALS + ")"
SMILES_RE = re.compile(rf"((?![:.=])(?>{_UNIT}){{10,}}(?<![:.=]))")
FASTA_RE = regex.compile(r"([A-Z]{27,})")   # the `regex` module scans this ~10x faster
# Every character a unit outside brackets can hold; and a superset of the unit grammar (any
# capital with an optional small letter, the aromatic letters, bonds, digits, bracket atoms).
# A SMILES match lies inside one region of 10+ superset units, and such a region (outside
# brackets) inside one run of these characters: the costly regex runs only there, which gives
# exactly its matches over the whole text (tests/test_intern_s1_tokenizer.py checks it).
_UNIT_CHARS = r"A-Za-z\d()\.=\-#@$%*:+/\\"
# Runs of 10+ such characters that can hold 10 units: a run of small letters only (a long
# word) holds them only as 10 of "bcnops" in a row, so it needs one of those or a character
# other than a small letter. Anchored on the character before the run (~1.5x faster to scan).
_NOT_SMALL = r"A-Z\d()\.=\-#@$%*:+/\\"
_RUN = rf"(?=[{_UNIT_CHARS}]{{10}})[a-z]*(?:[{_NOT_SMALL}]|[bcnops]{{10}})[{_UNIT_CHARS}]*"
_RUN_AT_START = re.compile(_RUN)
_RUN_AFTER = re.compile(rf"[^{_UNIT_CHARS}]({_RUN})")
_REGIONS = re.compile(r"(?:\[[^\]]+\]|[A-Z][a-z]?|[bcnops]|[\d()\.=\-#@$%*:+/\\]){10,}")

# The rule-based check's tables (the official code's lists).
_BONDS = frozenset("-=#:/\\.$")
_ORGANIC = ("B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I")
_AROMATIC = ("b", "c", "n", "o", "s", "p")
_ALLOWED = frozenset(_ORGANIC + _AROMATIC + tuple("-=#:/\\.$") + tuple("[]();"))
_ELEMENTS = frozenset((
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As "
    "Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd "
    "Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am "
    "Cm Bk Cf Es Fm Md No Lr Rf Db Sg Bh Hs Mt Ds Rg Cn Nh Fl Mc Lv Ts Og").split())
_BRACKET_BAN_LETTERS = re.compile(r"(?:[A-GI-Z]|[a-z]){3,}")
_BRACKET_BAN_DIGITS = re.compile(r"\d{4,}")
_BRACKET_PARTS = re.compile(r"\[([^\[\]]*)\]")
_NUMBERS = re.compile(r"\d+")
_LETTERS = re.compile(r"[A-Za-z]")


def smiles_candidates(text: str) -> list:
  """`SMILES_RE`'s matches over `text`, searched only where one can be (see _REGIONS)."""
  found: list = []
  if "[" in text:
    for region in _REGIONS.finditer(text):
      found += SMILES_RE.finditer(text, region.start(), region.end())
    return found
  first = _RUN_AT_START.match(text)
  runs = [first.span()] if first else []
  runs += [m.span(1) for m in _RUN_AFTER.finditer(text, first.end() if first else 0)]
  for start, end in runs:
    for region in _REGIONS.finditer(text, start, end):
      found += SMILES_RE.finditer(text, region.start(), region.end())
  return found


def _ascii_letter(c: str) -> bool:
  return c.isascii() and c.isalpha()


def rings_and_brackets_ok(text: str) -> bool:
  """The official rule-based SMILES check (used when RDKit is not installed): ring-closure
  digits paired, square brackets balanced and plausible, only organic-subset symbols outside
  brackets, no bond at either end or two in a row."""
  rings: dict[str, bool] = {}        # ring label -> open
  left_sq = right_sq = left_paren = right_paren = digits = 0
  all_lower = True
  n, pos = len(text), 0
  while pos < n:
    c, step = text[pos], 0
    if "A" <= c <= "Z":
      all_lower = False
    if (pos == n - 1 or pos == 0) and c in _BONDS:
      return False
    if pos > 0 and text[pos - 1] in _BONDS and c in _BONDS:
      return False
    if c == "[":
      step, left_sq = 1, left_sq + 1
      if left_sq > right_sq + 1 or pos == n - 1 or "]" not in text[pos + 1:]:
        return False
      inside = text[pos + 1:text.find("]")]   # up to the text's first "]", as the original
      if (_BRACKET_BAN_LETTERS.search(inside) or _BRACKET_BAN_DIGITS.search(inside)
          or len(_NUMBERS.findall(inside)) > 2):
        return False
    if c == "]":
      step, right_sq = 1, right_sq + 1
      if right_sq > left_sq:
        return False
    if c == "(":
      step, left_paren = 1, left_paren + 1
    if c == ")":
      step, right_paren = 1, right_paren + 1
      if right_paren > left_paren:
        return False
    if left_sq == right_sq:
      if c.isdigit():
        digits, step = digits + 1, 1
        if (pos == 0 or (pos == 1 and text[0] != "%")
            or (pos > 1 and text[pos - 1] != "%" and text[pos - 2] != "%")):
          rings[c] = not rings.get(c, False)
      if c == "%":
        if pos >= n - 2 or not text[pos + 1].isdigit() or not text[pos + 2].isdigit():
          return False
        step, digits = 3, digits + 1
        label = text[pos + 1:pos + 3]
        rings[label] = not rings.get(label, False)
      if step == 0:
        if pos < n - 1 and text[pos:pos + 2] in _ALLOWED:
          step = 2
        elif c in _ALLOWED:
          step = 1
        else:
          return False
    pos += step or 1
  if left_sq != right_sq or any(rings.values()):
    return False
  if all_lower and digits < 2:
    return False
  for part in _BRACKET_PARTS.findall(text):
    if "(" in part or ")" in part or not part:
      return False
    if part[0] in _ELEMENTS or part[0] in _AROMATIC or part[:2] in _ELEMENTS:
      return True
  return True


def rdkit_check():
  """RDKit's SMILES parser as a check (None when RDKit is not installed), as the official code
  switches on whether `from rdkit import Chem` succeeds."""
  try:
    from rdkit import Chem, RDLogger  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  RDLogger.DisableLog("rdApp.*")
  return lambda smiles: Chem.MolFromSmiles(smiles) is not None


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
    # Which check runs changes the ids, so the data cache keys on it.
    self.fingerprint = hashlib.sha256(
        f"{self.fingerprint}:intern-s1:{self.smiles_check}".encode()).hexdigest()[:16]
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
    self._memo, self._found, self._verdicts = {}, {}, {}
    # Pieces spelled like an added token take the added token's id (per model; usually none).
    self._spelled_added = {d: {m.piece_to_id(t) for t in self.added} - {m.unk_id()}
                           for d, m in self._sp.items()}
    self._reverse_added = {i: t for t, i in self.added.items()}

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

  def _detect(self, text: str) -> list[Span]:
    """Plain text -> BPE parts and auto-detected SMILES / protein spans."""
    parts, pos = [], 0
    found = self._found.get(text)
    for start, end in found if found is not None else self._molecules(text):
      if start > pos:
        parts.append(Span(text[pos:start]))
      parts.append(Span(text[start:end], "SMILES", True))
      pos = end
    if pos < len(text):
      parts.append(Span(text[pos:]))
    out = []
    for part in parts:   # proteins in every part, SMILES spans included (then nested)
      pos = 0
      for m in FASTA_RE.finditer(part.text):
        start, end = m.span(1)
        if start > pos:
          out.append(part._replace(text=part.text[pos:start]))
        out.append(Span(part.text[start:end], "FASTA", True) if part.domain is None
                   else Span(part.text[start:end], ("FASTA", part.domain), True))
        pos = end
      if pos == 0:
        out.append(part)
      elif pos < len(part.text):
        out.append(part._replace(text=part.text[pos:]))
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
        out.append(Span(piece, stack[-1] if stack else None, bool(stack) and stack[-1][1]))
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
    if self.stateful_pattern.search(text):
      return False
    # Detection runs between added tokens: the same parts here. What is found is kept for
    # `spans`, which the encoder calls next on the same text.
    self._found = {part: self._molecules(part) for part in self._split_re.split(text)[::2]}
    return not (any(self._found.values()) or SP_SPACE in text or FASTA_RE.search(text))

  def _molecules(self, text: str) -> list[tuple[int, int]]:
    """(start, end) of each auto-detected SMILES span of plain text."""
    found = []
    for m in smiles_candidates(text):
      start, end = m.span(1)
      if not self._is_molecule(m.group(1)):
        continue
      if (start > 0 and _ascii_letter(text[start - 1])) or (
          end < len(text) and _ascii_letter(text[end])):
        continue
      found.append((start, end))
    return found

  def encode(self, text: str) -> list[int]:
    if self._plain(text):
      return super().encode(text)
    return self._encode_spans(self.spans(text))

  def encode_array(self, text: str) -> np.ndarray:
    if self._plain(text):
      return super().encode_array(text)
    return np.asarray(self._encode_spans(self.spans(text)), dtype=np.uint32)

  def _encode_bytes(self, text: str):
    if self._plain(text):
      return super()._encode_bytes(text)
    return np.asarray(self._encode_spans(self.spans(text)), dtype=np.uint32).tobytes()

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


_BYTE_CHARS = bytes_to_unicode()
