"""Intern-S1's scientific tokenizer on an official-layout directory, id for id.

Expected ids are derived by hand from the official rules (jaxtune.data.intern_s1_tokenizer's
docstring) out of independent parts: transformers' fast tokenizer for the Qwen BPE (built from
tokenizer.json, a different code path from the encoder's) and the SentencePiece models read
directly, at the official offsets.
"""

import os
import pickle
import sys
import tempfile
import unicodedata

import pytest
import sentencepiece as spm

from interns1_layout import write_tokenizer
from jaxtune.data import intern_s1_tokenizer as s1
from jaxtune.data import science_text
from jaxtune.data.encoders import open_encoder
from jaxtune.data.tokenizer import TokenEncoder, build_qwen_tokenizer, load_tokenizer
from jaxtune.data.tokenizer_files import TokenizerFilesError, read_tokenizer_files

QWEN_DIR = os.path.join(tempfile.gettempdir(), "jaxtune-tests", "qwen3-tokenizer")
ASPIRIN = "CC(=O)Oc1ccccc1C(=O)O"
CAFFEINE = "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"
PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return write_tokenizer(str(tmp_path_factory.mktemp("interns1-tokenizer")))


@pytest.fixture(scope="module", params=["rdkit", "rules"])
def enc(request, tok_dir):
  return open_encoder(tok_dir, use_rdkit=request.param == "rdkit")


@pytest.fixture(scope="module")
def hf_bpe():
  return load_tokenizer(build_qwen_tokenizer(QWEN_DIR))


@pytest.fixture(scope="module")
def sp(tok_dir):
  return {d: spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, f"tokenizer_{d}.model"))
          for d in ("SMILES", "IUPAC", "FASTA")}


@pytest.fixture(scope="module")
def ids(tok_dir, hf_bpe, sp):
  """Hand-written rule pieces -> ids: ("bpe", text), ("tag", token), (domain, text)."""
  added = {t["content"]: t["id"] for t in read_tokenizer_files(tok_dir).spec["added_tokens"]}
  offsets = {"SMILES": 151669, "IUPAC": 151929, "FASTA": 152443}

  def build(*parts):
    out = []
    for kind, text in parts:
      if kind == "bpe":
        out += hf_bpe.encode(text, add_special_tokens=False)
      elif kind == "tag":
        out.append(added[text])
      else:
        model = sp[kind]
        for piece_id in model.encode(text):
          assert piece_id != 0, f"{text!r} has a piece the {kind} model does not know"
          out.append(piece_id + offsets[kind])
    return out
  return build


def test_layout_is_recognised_and_no_shipped_code_runs(tok_dir, enc):
  files = read_tokenizer_files(tok_dir)
  assert files.layout == "intern-s1"
  assert isinstance(enc, s1.InternS1Encoder)
  assert "tokenization_interns1" not in sys.modules
  assert enc.token_id("<IMG_CONTEXT>") == 152957
  assert enc.eos_token == "<|im_end|>"


def test_plain_text_and_special_tokens_are_qwen_bpe(enc, ids):
  for text in ("Hello world", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
               "Describe the image: <img><IMG_CONTEXT></img>", "   spaces\n\n and tabs\t"):
    assert enc.encode(text) == enc.encode_array(text).tolist() == ids(*_qwen_parts(text)), text
  assert enc.encode("Hello world") == [9707, 1879]


def _qwen_parts(text):
  """Text split at Qwen/Intern-S1 added tokens, each part encoded on its own."""
  import re  # pylint: disable=import-outside-toplevel
  pattern = re.compile(r"(<\|im_start\|>|<\|im_end\|>|<img>|</img>|<IMG_CONTEXT>)")
  return [("tag" if i % 2 else "bpe", part) for i, part in enumerate(pattern.split(text)) if part]


@pytest.mark.parametrize("tag,domain", [("SMILES", "SMILES"), ("SELFIES", "SMILES"),
                                        ("IUPAC", "IUPAC"), ("FASTA", "FASTA")])
def test_each_tag_switches_to_its_model(enc, ids, tag, domain):
  body = {"SMILES": "CCO", "IUPAC": "2-acetyloxybenzoic acid", "FASTA": "MKTAYIAK"}[domain]
  text = f"Name <{tag}>{body}</{tag}> here"
  assert enc.encode(text) == ids(("bpe", "Name "), ("tag", f"<{tag}>"), (domain, body),
                                 ("tag", f"</{tag}>"), ("bpe", " here"))


def test_nested_tags_use_the_innermost_model(enc, ids):
  text = "<SMILES>CC<IUPAC>ethanol</IUPAC>O</SMILES>"
  assert enc.encode(text) == ids(("tag", "<SMILES>"), ("SMILES", "CC"), ("tag", "<IUPAC>"),
                                 ("IUPAC", "ethanol"), ("tag", "</IUPAC>"), ("SMILES", "O"),
                                 ("tag", "</SMILES>"))


def test_molformula_guards_text_from_detection_and_has_no_id(enc, ids):
  text = f"Formula <MOLFORMULA>{ASPIRIN}</MOLFORMULA> end"
  assert enc.encode(text) == ids(("bpe", "Formula "), ("bpe", "<MOLFORMULA>"), ("bpe", ASPIRIN),
                                 ("bpe", "</MOLFORMULA>"), ("bpe", " end"))


def test_molformula_inside_a_tag_is_read_by_the_tags_model(enc, ids, sp, hf_bpe):
  """Inside a tag the guards' BPE tokens are looked up in the tag's model (its piece id +
  offset, else the BPE id), as the official convert_tokens_to_ids does with its stack."""
  def guard(text):
    bpe = hf_bpe.encode(text, add_special_tokens=False)
    pieces = [sp["SMILES"].piece_to_id(t) for t in hf_bpe.convert_ids_to_tokens(bpe)]
    return [i if p == sp["SMILES"].unk_id() else p + 151669 for i, p in zip(bpe, pieces)]
  text = "<SMILES>CC<MOLFORMULA>O</MOLFORMULA>C</SMILES>"
  assert enc.encode(text) == (ids(("tag", "<SMILES>"), ("SMILES", "CC")) + guard("<MOLFORMULA>")
                              + ids(("SMILES", "O")) + guard("</MOLFORMULA>")
                              + ids(("SMILES", "C"), ("tag", "</SMILES>")))


@pytest.mark.parametrize("molecule", [ASPIRIN, CAFFEINE])
def test_smiles_in_plain_text_is_detected(enc, ids, molecule):
  text = f"The molecule {molecule} is common."
  assert enc.encode(text) == ids(("bpe", "The molecule "), ("SMILES", molecule),
                                 ("bpe", " is common."))
  assert [s.domain for s in enc.spans(text)] == [None, "SMILES", None]
  assert enc.spans(text)[1].auto


@pytest.mark.parametrize("text", [
    "Ethanol is CCO and acetone CC(C)=O.",            # fewer than 10 units
    f"x{ASPIRIN} glued to a letter before",            # glued to letters
    f"glued after {ASPIRIN}x",
    "CC(=O)Oc1ccccc2C(=O)O has unpaired ring labels",  # fails the ring check (and RDKit)
    "Call 1234567890-1234 now",                        # 10+ units but fewer than 5 letters
])
def test_smiles_near_misses_stay_bpe(enc, ids, text):
  assert enc.encode(text) == ids(("bpe", text))


def test_rdkit_switch_decides_valence_errors(tok_dir, ids):
  """A five-bonded carbon passes the rule-based check but not RDKit's parser."""
  text = "Odd CCC(C)(C)(C)(C)CC here"
  with_rdkit = open_encoder(tok_dir, use_rdkit=True)
  rules = open_encoder(tok_dir, use_rdkit=False)
  assert (with_rdkit.smiles_check, rules.smiles_check) == ("rdkit", "rules")
  assert with_rdkit.encode(text) == ids(("bpe", text))
  assert rules.encode(text) == ids(("bpe", "Odd "), ("SMILES", "CCC(C)(C)(C)(C)CC"),
                                   ("bpe", " here"))
  assert with_rdkit.fingerprint != rules.fingerprint     # cached ids depend on the check
  assert "RDKit" in with_rdkit.describe() and "rule-based" in rules.describe()


def test_proteins_need_27_capitals(enc, ids):
  assert enc.encode(f"seq {PROTEIN[:26]} end") == ids(("bpe", f"seq {PROTEIN[:26]} end"))
  assert enc.encode(f"seq {PROTEIN[:27]} end") == ids(("bpe", "seq "), ("FASTA", PROTEIN[:27]),
                                                      ("bpe", " end"))
  # Proteins are found without word boundaries (the official module truncates freely).
  assert enc.encode(f"x{PROTEIN}") == ids(("bpe", "x"), ("FASTA", PROTEIN))


def test_a_protein_inside_a_detected_molecule_is_encoded_as_protein(enc, ids):
  chain = "C" * 30      # a valid alkane, and 27+ capitals: the innermost (protein) model
  assert enc.encode(f"chain {chain} end") == ids(("bpe", "chain "), ("FASTA", chain),
                                                 ("bpe", " end"))


def test_unknown_pieces_fall_back_to_bpe_tokens_looked_up_in_the_model(enc, sp, hf_bpe):
  # "é" is not a piece of the IUPAC model; its BPE token "Ã©" is one: that piece's id.
  got = enc.encode("<IUPAC>éthanol</IUPAC>")
  e_id = sp["IUPAC"].piece_to_id("Ã©")
  assert e_id != sp["IUPAC"].unk_id()
  rest = [i + 151929 for i in sp["IUPAC"].encode("thanol")]
  assert got == [152441, e_id + 151929] + rest + [152442]
  # A space is no piece of the SMILES model: "▁" is read as a space, BPE " " (220).
  got = enc.encode("<SMILES>CC O</SMILES>")
  assert got == [151925] + [i + 151669 for i in sp["SMILES"].encode("CC")] + [220] + [
      i + 151669 for i in sp["SMILES"].encode("O")] + [151926]
  # An unknown character with no piece for its BPE tokens: the BPE ids themselves.
  got = enc.encode("<FASTA>MKTAqq</FASTA>")
  assert got == [152953] + [i + 152443 for i in sp["FASTA"].encode("MKTA")] + \
      hf_bpe.encode("qq", add_special_tokens=False) + [152954]


def test_nfc_and_the_sentencepiece_space_mark(enc, ids):
  decomposed = "cafe\u0301 <IUPAC>e\u0301thanol</IUPAC>"
  assert enc.encode(decomposed) == enc.encode(unicodedata.normalize("NFC", decomposed))
  # NFC comes before detection: a KELVIN SIGN (U+212A) is the capital K, so the 26 capitals
  # after it make a protein of 27.
  assert enc.encode(f"seq \u212a{PROTEIN[:26]} end") == ids(
      ("bpe", "seq "), ("FASTA", "K" + PROTEIN[:26]), ("bpe", " end"))
  assert enc.encode_array(f"seq \u212a{PROTEIN[:26]} end").tolist() == ids(
      ("bpe", "seq "), ("FASTA", "K" + PROTEIN[:26]), ("bpe", " end"))
  assert enc.encode("a\u2581b") == ids(("bpe", "a b"))     # "▁" in plain text is a space


def test_decode_and_pickling_keep_the_rules(enc):
  text = f"Aspirin {ASPIRIN} and <IUPAC>ethanol</IUPAC>, protein {PROTEIN}."
  assert enc.decode(enc.encode(text)) == text
  clone = pickle.loads(pickle.dumps(enc))
  assert clone.encode(text) == enc.encode(text) and clone.fingerprint == enc.fingerprint


def test_qwen_vocab_merges_layout_reads_like_tokenizer_json(tmp_path, tok_dir):
  """vocab.json + merges.txt + added tokens in tokenizer_config.json (no tokenizer.json)."""
  plain = tmp_path / "qwen-vocab-merges"
  plain.mkdir()
  for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
    os.symlink(os.path.join(tok_dir, name), plain / name)
  enc, reference = open_encoder(str(plain)), TokenEncoder(build_qwen_tokenizer(QWEN_DIR))
  assert read_tokenizer_files(str(plain)).layout == "vocab+merges"
  assert type(enc) is TokenEncoder and enc.backend == "tiktoken"
  text = f"<|im_start|>user\nHi {ASPIRIN} café<|im_end|>"
  assert enc.encode(text) == reference.encode(text)
  hf = load_tokenizer(str(plain))   # the HF fast tokenizer built from the same files
  assert hf.encode(text, add_special_tokens=False) == reference.encode(text)


def test_a_directory_without_a_tokenizer_says_what_it_found(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "vocab.json").write_text("{}")
  with pytest.raises(TokenizerFilesError) as err:
    open_encoder(str(tmp_path))
  message = str(err.value)
  for part in (str(tmp_path), "config.json, vocab.json", "merges.txt is missing",
               "tokenizer.json", "tokenizer_SMILES.model"):
    assert part in message


def test_the_smiles_search_finds_exactly_the_official_regex_matches():
  """For speed, jaxtune's SMILES regex groups element symbols by first letter and only runs of
  unit characters are searched; on random near-SMILES text the matches equal those of the
  official regex (written here as the official code builds it) over the whole text."""
  import random  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  symbols = sorted(science_text._TWO_LETTER + science_text._ONE_LETTER,  # pylint: disable=protected-access
                   key=lambda s: (-len(s), s))
  unit = (r"(?:\[[^\]]+\]|" + "|".join(symbols) + r"|[\(\)\.=\-#@\d\$\%\*:\+\-\/\\])")
  official = re.compile(rf"((?![:.=])(?>{unit}){{10,}}(?<![:.=]))")
  alphabet = list("CcNnOoSsBbPpHhaeilxZ1234567890()[]=#@+-.:/\\%$* \n") + [
      "Cl", "Br", "[nH]", "[C@@H]", "Si", "Na", "Sc", "Co", "Xe", "é", "information ",
      "cococonsbp", "Ethanol"]
  rng = random.Random(0)
  for _ in range(5000):
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(5, 60)))
    assert ([m.span(1) for m in science_text.smiles_candidates(text)]
            == [m.span(1) for m in official.finditer(text)]), text


def test_show_row_marks_what_each_model_read(enc):
  text = f"Aspirin {ASPIRIN} and <IUPAC>ethanol</IUPAC>, protein {PROTEIN}."
  assert enc.decode_marked(enc.encode(text)) == (
      f"Aspirin ⟪SMILES auto: {ASPIRIN}⟫ and <IUPAC>⟪IUPAC: ethanol⟫</IUPAC>, protein "
      f"⟪FASTA auto: {PROTEIN}⟫.")


def test_chat_samples_encode_as_whole_messages(tmp_path, enc):
  """The encoder's template splicing gives each message's ids as if the message were encoded
  whole, as XTuner does; tags left open inside a message reach its template suffix."""
  import json  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jaxtune.data import encoding, sources, templates  # pylint: disable=import-outside-toplevel
  lines = [
      [{"role": "user", "content": f"What is {ASPIRIN}?"},
       {"role": "assistant", "content": f"Aspirin. Also <SMILES>CCO</SMILES> and {PROTEIN}."}],
      [{"role": "user", "content": "Open <SMILES>CCO"},   # never closed in the message
       {"role": "assistant", "content": "ok"}],
  ]
  path = tmp_path / "chat.jsonl"
  path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
  data = path.read_bytes()
  ends = np.cumsum([len(l) for l in data.splitlines(keepends=True)])
  spans = np.stack([np.concatenate([[0], ends[:-1]]), ends], 1)
  job = encoding.EncodeJob("intern-s1", sources.ParseOptions())
  chunk = encoding.encode_lines(enc, job, str(path), spans)
  template = templates.get_template("intern-s1")
  start = 0
  for messages, n in zip(lines, chunk.lengths):
    parsed, _ = sources.parse_sample({"messages": messages}, sources.ParseOptions())
    pieces = templates.render(parsed, template, None, enc.eos_token)
    expected = [i for p in pieces for i in enc.encode(p.text)]
    assert (chunk.tokens[start:start + n] & encoding.ID_MASK).tolist() == expected
    start += n
  # The open tag's SMILES model also reads the message's template suffix ("\n" after im_end).
  suffix = enc.encode("Open <SMILES>CCO<|im_end|>\n")
  assert suffix[-1] != enc.encode("\n")[0]
