"""Scientific text in Intern-S1's tokenizer: where SMILES and protein sequences are detected
in plain text, and the checks a SMILES candidate must pass (RDKit's parser when RDKit imports,
else the official code's rule-based ring / bracket check). The rules are those of transformers'
`models/intern_s1/tokenization_intern_s1.py`; `intern_s1_tokenizer` encodes with them.
"""

from __future__ import annotations

import re
import string

import regex

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
# A superset of the unit grammar (any capital with an optional small letter, the aromatic
# letters, bonds, digits, bracket atoms): a SMILES match lies inside one region of 10+ of these
# units, and such a region inside one run of characters a unit can hold (unit_runs). The costly
# regex runs only there, which gives exactly its matches over the whole text (tests: against the
# official regex in test_intern_s1_tokenizer.py, against the first search of the runs in
# test_intern_s1_differential.py).
_REGIONS = re.compile(r"(?:\[[^\]]+\]|[A-Z][a-z]?|[bcnops]|[\d()\.=\-#@$%*:+/\\]){10,}")
# `\d` is any Unicode decimal digit: text with one beyond 0-9 is searched whole.
_OTHER_DIGIT = re.compile(r"[^\D0-9]")

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


# Runs found in bytes: the text one byte per character (latin-1, any other character replaced
# by "?"), each character a unit can hold outside brackets made "a" and every other one " ";
# a run that can hold 10 units has 10 "a"s in a row. A bracket atom holds any character but
# "]": each "[" up to the next "]" is marked "a" too. Translating and searching bytes is ~10x
# faster than a regex scan over the text, and most text has no such run at all.
_RUN_TABLE = bytes(ord("a") if chr(i) in string.ascii_letters + string.digits + "().=-#@$%*:+/\\"
                   else ord(" ") for i in range(256))
_TEN = b"a" * 10


def unit_runs(text: str) -> list[tuple[int, int]]:
  """(start, end) of each maximal run of 10+ characters that SMILES units can hold (every
  region of 10+ units lies inside one); the whole text when it has a digit beyond 0-9."""
  if not text.isascii() and _OTHER_DIGIT.search(text):
    return [(0, len(text))]
  marks = text.encode("latin-1", "replace").translate(_RUN_TABLE)
  if "[" in text:
    marks = bytearray(marks)
    at = text.find("[")
    while at >= 0:
      close = text.find("]", at + 1)
      if close < 0:
        break
      marks[at:close + 1] = b"a" * (close + 1 - at)
      at = text.find("[", close + 1)
  runs = []
  start = marks.find(_TEN)
  while start >= 0:
    end = marks.find(b" ", start + 10)
    if end < 0:
      runs.append((start, len(marks)))
      break
    runs.append((start, end))
    start = marks.find(_TEN, end)
  return runs


def smiles_candidates(text: str, runs: list[tuple[int, int]] | None = None) -> list:
  """`SMILES_RE`'s matches over `text`, searched only where one can be: in regions of 10+
  superset units (_REGIONS), which lie in runs of unit characters (`runs`: unit_runs's)."""
  found: list = []
  for start, end in unit_runs(text) if runs is None else runs:
    for region in _REGIONS.finditer(text, start, end):
      found += SMILES_RE.finditer(text, region.start(), region.end())
  return found


def rings_and_brackets_ok(text: str) -> bool:
  """The official rule-based SMILES check (used when RDKit is not installed): ring-closure
  digits paired, square brackets balanced and plausible, only organic-subset symbols outside
  brackets, no bond at either end or two in a row."""
  if text.isascii() and _PLAIN_SMILES.fullmatch(text):
    return _plain_smiles_ok(text)
  return _rings_and_brackets_ok(text)


# Organic-subset symbols, bonds, branches and ring digits only: no brackets, "%" or other
# character. Read left to right, the official loop then visits every character but the second
# of "Cl" / "Br" and its checks come down to these (tests/test_intern_s1_differential.py
# compares them with the loop on random strings).
_PLAIN_SMILES = re.compile(r"(?:Cl|Br|[BCNOPSFIbcnosp()\-=#:/\\.$;0-9])+")
_TWO_BONDS = re.compile(r"[\-=#:/\\.$]{2}")
_PARENS = re.compile(r"[()]")
_UPPER = re.compile(r"[A-Z]")


def _plain_smiles_ok(text: str) -> bool:
  if text[0] in _BONDS or text[-1] in _BONDS or _TWO_BONDS.search(text):
    return False
  depth = 0
  for c in _PARENS.findall(text):    # never more ")" than "(" so far
    depth += 1 if c == "(" else -1
    if depth < 0:
      return False
  digits = 0
  for d in "0123456789":             # each ring label opened and closed
    count = text.count(d)
    if count & 1:
      return False
    digits += count
  return digits >= 2 or bool(_UPPER.search(text))


def _rings_and_brackets_ok(text: str) -> bool:
  """The official check, character by character."""
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


# Hydrogen (an H atom, or a symbol or H count holding "H") or stereo marks: RDKit's full parse.
_FULL_PARSE = re.compile(r"[H@/\\]")


def rdkit_check():
  """The official check, `Chem.MolFromSmiles(smiles) is not None` (None when RDKit is not
  installed: the official code switches on whether `from rdkit import Chem` succeeds).

  MolFromSmiles parses, then removes H atoms and sanitises (valences, rings, kekulisation), then
  assigns stereochemistry; any failure gives None. With no "H" and no stereo mark in the text
  there are no H atoms to remove and no stereo to assign, so the verdict is the parse's and
  `SanitizeMol`'s: ~30% cheaper (tests/test_intern_s1_differential.py compares the two on
  thousands of strings)."""
  try:
    from rdkit import Chem, RDLogger  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  RDLogger.DisableLog("rdApp.*")
  parse, sanitize, clean = Chem.MolFromSmiles, Chem.SanitizeMol, Chem.SanitizeFlags.SANITIZE_NONE

  def check(smiles: str) -> bool:
    if _FULL_PARSE.search(smiles):
      return parse(smiles) is not None
    mol = parse(smiles, sanitize=False)
    return mol is not None and sanitize(mol, catchErrors=True) == clean

  return check
