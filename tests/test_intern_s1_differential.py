"""Intern-S1's scientific tokenizer against a slow reference of the same rules, on random text.

`InternS1Encoder` encodes a message with one tiktoken call, finds SMILES candidates through a
byte scan and shortcuts the rule-based check; `Reference` below is the encoder as it was written
first, part by part (each BPE part its own tiktoken call, each span its own SentencePiece call),
with the regex-only candidate search and the character-by-character check. On thousands of
generated science strings (tags, nesting, guards, added tokens, the separator token itself,
"▁", non-ASCII text and digits, NFC-changing text) both must give the same ids, with RDKit's
check and with the rule-based one.
"""

import random
import re
import unicodedata

import numpy as np
import pytest

from interns1_layout import write_tokenizer
from jaxtune.data import intern_s1_tokenizer as s1
from jaxtune.data import science_text as detection
from jaxtune.data.encoders import open_encoder
from jaxtune.data.tokenizer import TokenEncoder

# --- the reference: the first implementation, kept here ---------------------------------------
_UNIT_CHARS = r"A-Za-z\d()\.=\-#@$%*:+/\\"
_NOT_SMALL = r"A-Z\d()\.=\-#@$%*:+/\\"
_RUN = rf"(?=[{_UNIT_CHARS}]{{10}})[a-z]*(?:[{_NOT_SMALL}]|[bcnops]{{10}})[{_UNIT_CHARS}]*"
_RUN_AT_START = re.compile(_RUN)
_RUN_AFTER = re.compile(rf"[^{_UNIT_CHARS}]({_RUN})")


def reference_candidates(text):
  """SMILES_RE's matches: regions of 10+ superset units in runs that can hold them."""
  found = []
  if "[" in text:
    for region in detection._REGIONS.finditer(text):  # pylint: disable=protected-access
      found += detection.SMILES_RE.finditer(text, region.start(), region.end())
    return found
  first = _RUN_AT_START.match(text)
  runs = [first.span()] if first else []
  runs += [m.span(1) for m in _RUN_AFTER.finditer(text, first.end() if first else 0)]
  for start, end in runs:
    regions = detection._REGIONS  # pylint: disable=protected-access
    for region in regions.finditer(text, start, end):
      found += detection.SMILES_RE.finditer(text, region.start(), region.end())
  return found


# The official character loop, which the production check keeps for text with brackets or "%";
# its bracket-free shortcut (_plain_smiles_ok) is checked against it below, and the loop itself
# against hand-derived ids in test_intern_s1_tokenizer.py.
reference_rules = detection._rings_and_brackets_ok  # pylint: disable=protected-access


class Reference(s1.InternS1Encoder):
  """The rules part by part, as first written (the same spans, a slower road)."""

  def __init__(self, path, use_rdkit):
    super().__init__(path, use_rdkit=use_rdkit)
    if not use_rdkit:
      self._mol_ok = reference_rules

  def _molecules(self, text, runs=None):
    found = []
    for m in reference_candidates(text):
      start, end = m.span(1)
      if not (len(re.findall(r"[A-Za-z]", m.group(1))) >= 5 and self._mol_ok(m.group(1))):
        continue
      glued = lambda c: c.isascii() and c.isalpha()  # pylint: disable=unnecessary-lambda-assignment
      if (start > 0 and glued(text[start - 1])) or (end < len(text) and glued(text[end])):
        continue
      found.append((start, end))
    return found

  def _detect(self, text):
    parts, pos = [], 0
    for start, end in self._molecules(text):
      if start > pos:
        parts.append(s1.Span(text[pos:start]))
      parts.append(s1.Span(text[start:end], "SMILES", True))
      pos = end
    if pos < len(text):
      parts.append(s1.Span(text[pos:]))
    out = []
    for part in parts:
      pos = 0
      for m in detection.FASTA_RE.finditer(part.text):
        start, end = m.span(1)
        if start > pos:
          out.append(part._replace(text=part.text[pos:start]))
        out.append(s1.Span(part.text[start:end], "FASTA", True) if part.domain is None
                   else s1.Span(part.text[start:end], ("FASTA", part.domain), True))
        pos = end
      if pos == 0:
        out.append(part)
      elif pos < len(part.text):
        out.append(part._replace(text=part.text[pos:]))
    return out

  def _plain(self, text):
    if self.stateful_pattern.search(text):
      return False
    if any(self._molecules(part) for part in self._split_re.split(text)[::2]):
      return False
    return not (s1.SP_SPACE in text or detection.FASTA_RE.search(text))

  def _encode_spans(self, spans):
    ids = []
    for span in spans:
      if span.token:
        ids.append(self.added[span.text])
      elif span.domain is None:
        ids.extend(self._bpe(span.text))
      else:
        model = s1.TAG_MODELS[span.domain]
        sp, offset = self._sp[model], s1.OFFSETS[model]
        if span.text in (s1.PROTECT_OPEN, s1.PROTECT_CLOSE):
          ids.extend(self._in_domain(self._bpe_token(i), sp, offset, i)
                     for i in self._bpe(span.text))
          continue
        for piece, pid in zip(sp.encode(span.text, out_type=str), sp.encode(span.text)):
          if pid != 0:
            ids.append(self.added.get(piece, pid + offset))
          else:
            ids.extend(self._in_domain(self._bpe_token(i), sp, offset, i)
                       for i in self._bpe(piece))
    return ids

  def encode(self, text):
    text = unicodedata.normalize("NFC", text)   # first, as the official code
    if self._plain(text):
      return TokenEncoder.encode(self, text)
    return self._encode_spans(self.spans(text))


# --- random science text ----------------------------------------------------------------------
WORDS = ("the of and molecule protein binds information attention is in a to with observed "
         "Python JSON CCO benzene Na Cl Co Sc NaCl H2O pH 7.4 (see) [1] 2024 x=3 -> and/or "
         "C-C C=O a:b 3.14 CH4 DNA ATP mRNA KCl").split()
SMILES = ("CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "OC[C@H]1OC(O)[C@H](O)[C@@H]1O",
          "CCCCCCCC(=O)NCCCc1ccc(Cl)c(Br)c1", "c1ccc2ccccc2c1", "CCC(C)(C)(C)(C)CC",
          "C1CC%10CCC1CC%10", "CC(=O)Oc1ccccc2C(=O)O", "[Na+].[Cl-]CCCCCCCC", "N#Cc1ccccc1C#N",
          "ClC(Cl)(Cl)C(Cl)(Cl)Cl", "O=C(O)CCCCCCCCCCC", "CCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
          "C/C=C/C(=O)OCCCCCC", "c1ccncc1CCCCCC", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
          "[2H]C([2H])([2H])OCCCCC", "C1=CC=CC=C1C2=CC=CC=C2", "OCCOCCOCCOCCO", "CCCC)(CCCCCC")
PROTEINS = ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV", "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMF",
            "GIVEQCCTSICSLYQLENYCNGIVEQCCTSIC", "ACDEFGHIKLMNPQRSTVWYACDEFGHIK")
IUPAC = ("2-acetyloxybenzoic acid", "ethanol", "1,3,7-trimethylpurine-2,6-dione", "éthanol")
TOKENS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>", "<|fim_pad|>", "<IMG_CONTEXT>",
          "<think>", "<SMILES>", "</SMILES>", "<SELFIES>", "</SELFIES>", "<IUPAC>", "</IUPAC>",
          "<FASTA>", "</FASTA>", "<MOLFORMULA>", "</MOLFORMULA>")
ODD = (" ", "  ", "\n", "\n\n", ".", ",", "x", "A", "\u2581", "é", "e\u0301", "\u212a", "１２",
       "٣", "中文", "Å", "(", ")", "[", "]", "%12", "=", "#", ":", "café", "\t", "'s")


def science_text(rng: random.Random) -> str:
  out = []
  for _ in range(rng.randint(1, 25)):
    r = rng.random()
    if r < 0.35:
      out.append(rng.choice(WORDS))
    elif r < 0.5:
      out.append(rng.choice(SMILES))
    elif r < 0.58:
      p = rng.choice(PROTEINS)
      out.append(p[:rng.randint(20, len(p))])
    elif r < 0.7:
      out.append(rng.choice(TOKENS))
    elif r < 0.75:
      tag = rng.choice(("SMILES", "IUPAC", "FASTA", "SELFIES"))
      body = rng.choice(IUPAC if tag == "IUPAC" else PROTEINS if tag == "FASTA" else SMILES)
      out.append(f"<{tag}>{body}</{tag}>")
    else:
      out.append(rng.choice(ODD))
    out.append(rng.choice(("", " ", " ", "\n", ", ")))
  return "".join(out)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return write_tokenizer(str(tmp_path_factory.mktemp("interns1-tokenizer")))


@pytest.mark.parametrize("check", ["rdkit", "rules"])
def test_one_call_encoding_matches_the_part_by_part_reference(tok_dir, check):
  if check == "rdkit":
    pytest.importorskip("rdkit")
  enc = open_encoder(tok_dir, use_rdkit=check == "rdkit")
  ref = Reference(tok_dir, use_rdkit=check == "rdkit")
  assert enc._sep is not None    # pylint: disable=protected-access
  rng = random.Random(1 if check == "rdkit" else 2)
  fast = 0
  for k in range(3000):
    text = science_text(rng)
    if k % 7 == 0:   # a message between template texts, as the chat templates encode it
      text = f"user\n{text}<|im_end|>\n"
    expected = ref.encode(text)
    fast += enc._fast(text) is not None   # pylint: disable=protected-access
    assert enc.encode(text) == expected, text
    assert np.frombuffer(enc.encode_bytes(text), np.uint32).tolist() == expected, text
    assert enc.encode_array(text).tolist() == expected, text
  assert fast > 2000    # the one-call path took nearly all


def test_the_run_scan_finds_the_reference_candidates_in_bracket_free_text():
  """The byte scan of runs against the regex-only search on text like the tests' random
  near-SMILES but mostly without brackets, with words, non-ASCII letters and digits."""
  alphabet = list("CcNnOoSsBbPpHhaeilxZ1234567890()=#@+-.:/\\%$* \n,;é中") + [
      "Cl", "Br", "Si", "Na", "Sc", "Co", "Xe", "information ", "cococonsbp", "Ethanol",
      "١", "５", "\u212a", "[nH]", "MKTAYIAKQRQISFVKSHFSRQLEERLG"]
  rng = random.Random(3)
  for k in range(6000):
    chars = alphabet if k % 3 else alphabet[:-2] + ["]"]
    text = "".join(rng.choice(chars) for _ in range(rng.randint(5, 80)))
    assert ([m.span(1) for m in detection.smiles_candidates(text)]
            == [m.span(1) for m in reference_candidates(text)]), text


def test_the_rule_based_check_matches_the_character_loop():
  alphabet = list("CNOSPFIBcnosp()=#-:/\\.$123456789%[]@+H") + ["Cl", "Br", "[nH]", "[C@@H]",
                                                                 "[Na+]", "l", "r", "%12"]
  rng = random.Random(4)
  seen = {True: 0, False: 0}
  for _ in range(40000):
    text = "".join(rng.choice(alphabet[:24] if rng.random() < 0.7 else alphabet)
                   for _ in range(rng.randint(1, 30)))
    verdict = detection.rings_and_brackets_ok(text)
    assert verdict == reference_rules(text), text
    seen[verdict] += 1
  for text in ("CC(=O)Oc1ccccc1C(=O)O", "CCC(C)(C)(C)(C)CC", "c1ccccc1", "cccccc12", "C1CC1Cl",
               "BClr", "CCl", "ClC(Cl)Cl", "C(C", "C)C(", "C=#C", "=CC", "CC-", "cc11"):
    assert detection.rings_and_brackets_ok(text) == reference_rules(text), text
  assert min(seen.values()) > 1000


def test_nfc_is_what_the_reference_sees(tok_dir):
  enc = open_encoder(tok_dir, use_rdkit=False)
  for text in ("\u212aKKKKKKKKKKKKKKKKKKKKKKKKKKKKKK", "e\u0301 <SMILES>CCO</SMILES>",
               "Å " + "C" * 30):
    assert enc.encode(text) == Reference(tok_dir, use_rdkit=False).encode(text)


# Pieces of SMILES that parse and sanitise in many ways: charges, isotopes, aromatic rings that
# kekulise or not, hypervalent atoms, metals, wildcards, "%" rings, dots, H counts, stereo.
SMILES_PIECES = ("C", "C", "C", "c", "c", "n", "o", "s", "N", "O", "S", "P", "F", "Cl", "Br",
                 "I", "B", "(", ")", "(", ")", "=", "#", "$", "1", "1", "2", "3", "%10", ".",
                 "-", ":", "*", "[N+](=O)[O-]", "N(=O)=O", "[13C]", "[Na+]", "[Cl-]", "[Fe+2]",
                 "[Si]", "[Cu]", "[nH]", "[C@@H]", "[C@H]", "/", "\\", "[2H]", "[H]", "[NH4+]",
                 "[se]", "[te]", "[B-]", "[O-]", "S(=O)(=O)", "P(=O)(O)", "[CH2]", "[c-]")


def test_the_rdkit_shortcut_gives_mol_from_smiles_verdicts():
  """science_text.rdkit_check skips removeHs and stereo perception where the text has no "H"
  and no stereo mark: on random and mutated SMILES its verdict is `MolFromSmiles(s) is not None`."""
  chem = pytest.importorskip("rdkit.Chem")
  check = detection.rdkit_check()
  rng = random.Random(5)
  seen = {(True, True): 0, (True, False): 0, (False, True): 0, (False, False): 0}
  for k in range(24000):
    if k % 2:
      text = "".join(rng.choice(SMILES_PIECES) for _ in range(rng.randint(3, 25)))
    else:   # a valid molecule with a few random edits
      chars = list(rng.choice(SMILES))
      for _ in range(rng.randint(0, 3)):
        at = rng.randrange(len(chars) + 1)
        edit = rng.random()
        if edit < 0.4 and chars:
          del chars[min(at, len(chars) - 1)]
        elif edit < 0.8:
          chars.insert(at, rng.choice(SMILES_PIECES))
        elif chars:
          chars[min(at, len(chars) - 1)] = rng.choice(SMILES_PIECES)
      text = "".join(chars)
    verdict = chem.MolFromSmiles(text) is not None
    assert check(text) == verdict, text
    seen[(not detection._FULL_PARSE.search(text), verdict)] += 1   # pylint: disable=protected-access
  assert min(seen.values()) > 500, seen    # both verdicts, with and without the shortcut
