"""An official-layout Intern-S1 tokenizer directory, built offline for the tests.

Laid out as the published Intern-S1 / Intern-S1-mini checkpoints are: `vocab.json` +
`merges.txt` (written from the bundled Qwen BPE ranks), `tokenizer_config.json` with the added
tokens (Qwen3's, the domain tags, the image tokens; `<IMG_CONTEXT>` at 152957 as in the
153,216-token official vocabulary) and an `auto_map` to custom code, three SentencePiece models
trained here on small corpora, and a `tokenization_interns1.py` that raises if anything imports
it (jaxtune must never run a checkpoint's code).

`write_checkpoint` adds a tiny model to it (config.json of model_type `interns1`, weights under
the official tensor names, custom model code), a whole checkpoint directory as published;
`as_internvl` views one as transformers' own InternVL checkpoint.
"""

from __future__ import annotations

import io
import json
import os

import sentencepiece as spm

from jaxtune.data.tokenizer import (QWEN3_ADDED_TOKENS, _tokenizer_json, load_ranks,
                                    qwen_ranks_path)

VOCAB_SIZE = 153216
IMAGE_TOKEN = 152957
# Domain tags and image tokens beyond Qwen3's added tokens (ids outside the SentencePiece ranges
# at the official offsets 151669 / 151929 / 152443).
EXTRA_TOKENS = (("<SMILES>", 151925), ("</SMILES>", 151926), ("<SELFIES>", 151927),
                ("</SELFIES>", 151928), ("<IUPAC>", 152441), ("</IUPAC>", 152442),
                ("<FASTA>", 152953), ("</FASTA>", 152954), ("<img>", 152955), ("</img>", 152956),
                ("<IMG_CONTEXT>", IMAGE_TOKEN))
CUSTOM_CODE = "raise RuntimeError(\"a checkpoint directory's custom code was imported\")\n"

SMILES_CORPUS = ["CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C", "C1=CC=CC=C1",
                 "CCO", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "O=C(O)c1ccccc1O", "C1CCCCC1", "CC=O",
                 "N#Cc1ccccc1", "CC(=O)NC1=CC=C(O)C=C1", "OC[C@H]1OC(O)[C@H](O)[C@@H](O)[C@@H]1O",
                 "c1ccc2ccccc2c1", "CCN(CC)CC", "ClC(Cl)Cl", "BrCCBr"]
IUPAC_CORPUS = ["2-acetyloxybenzoic acid", "1,3,7-trimethylpurine-2,6-dione", "ethanol",
                "benzene", "cyclohexane", "propan-2-ol", "2-methylpropanoic acid",
                "N-(4-hydroxyphenyl)acetamide", "trichloromethane", "1,2-dibromoethane",
                "naphthalene", "N,N-diethylethanamine"]
FASTA_CORPUS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ",
                "MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALTNAVAHV",
                "GIVEQCCTSICSLYQLENYCN", "FVNQHLCGSHLVEALYLVCGERGFFYTPKT",
                "MEEPQSDPSVEPPLSQETFSDLWKLLPENNVLSPLPSQAMDDLMLSPDDIEQWFTEDPGP"]


def _train_sentencepiece(lines: list[str], vocab_size: int, **options) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines * 20), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", character_coverage=1.0, num_threads=1, minloglevel=2,
      split_digits=False, add_dummy_prefix=False, remove_extra_whitespaces=False,
      hard_vocab_limit=False, **options)
  return model.getvalue()


def write_tokenizer(path: str) -> str:
  """Writes the official-layout tokenizer files into `path` (idempotent); returns `path`."""
  os.makedirs(path, exist_ok=True)
  if os.path.isfile(os.path.join(path, "tokenizer_FASTA.model")):
    return path
  spec = _tokenizer_json(load_ranks(qwen_ranks_path()), ())
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(spec["model"]["vocab"], f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in spec["model"]["merges"])
  added = [(i, c, s) for i, c, s in QWEN3_ADDED_TOKENS] + [(i, c, True) for c, i in EXTRA_TOKENS]
  config = {
      "tokenizer_class": "InternS1Tokenizer",
      "auto_map": {"AutoTokenizer": ["tokenization_interns1.InternS1Tokenizer", None]},
      "added_tokens_decoder": {str(i): dict(content=c, lstrip=False, normalized=False,
                                            rstrip=False, single_word=False, special=s)
                               for i, c, s in added},
      "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
      "model_max_length": 32768, "split_special_tokens": False, "errors": "replace",
  }
  with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  # A byte-level BPE token spelled as an IUPAC piece: the unknown-piece fallback looks BPE
  # tokens up in the domain's model first ("é", unknown to the model, is the BPE token "Ã©").
  for name, lines, size, options in (
      ("SMILES", SMILES_CORPUS, 60, {}), ("IUPAC", IUPAC_CORPUS, 90, {"user_defined_symbols": ["Ã©"]}),
      ("FASTA", FASTA_CORPUS, 40, {})):
    with open(os.path.join(path, f"tokenizer_{name}.model"), "wb") as f:
      f.write(_train_sentencepiece(lines, size, **options))
  with open(os.path.join(path, "tokenization_interns1.py"), "w") as f:
    f.write(CUSTOM_CODE)
  return path


# --- a whole checkpoint directory ------------------------------------------------------------
MODEL_CODE = ("raise RuntimeError(\"custom code shipped in a checkpoint directory was imported: "
              "jaxtune must read the directory's files, never run its code\")\n")
AUTO_MAP = {"AutoConfig": "configuration_interns1.InternS1Config",
            "AutoModel": "modeling_interns1.InternS1Model",
            "AutoModelForCausalLM": "modeling_interns1.InternS1ForConditionalGeneration"}
CODE_FILES = ("configuration_interns1.py", "modeling_interns1.py")
# special_tokens_map.json as the published checkpoints ship it (beside tokenizer_config.json).
SPECIAL_TOKENS_MAP = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                      "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<img>",
                                                    "</img>", "<IMG_CONTEXT>"]}


def write_checkpoint(path: str, *, image_size: int = 448, hidden_size: int = 32,
                     num_hidden_layers: int = 2, seed: int = 0) -> str:
  """Writes a tiny Intern-S1 checkpoint in the published layout into `path`; returns `path`.

  config.json: model_type `interns1` (vision_config `interns1_vision`), architectures
  `InternS1ForConditionalGeneration`, an `auto_map` to custom code, the official 153,216-token
  vocabulary with `<IMG_CONTEXT>` = 152957; tiny widths (`image_size`: the tile in pixels; the
  data pipeline tiles images at 448 only). Weights: a random transformers
  `InternVLForConditionalGeneration` (the same architecture) under the official tensor names
  (model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*, lm_head.*), in
  two shards with an index, float32. Beside them `configuration_interns1.py` and
  `modeling_interns1.py` (both raise when imported), special_tokens_map.json and the tokenizer
  of `write_tokenizer`. Idempotent: an existing checkpoint in `path` is kept.
  """
  # Test-only dependencies, imported here so that write_tokenizer's users do not load torch.
  import tempfile  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  from test_intern_s1 import (  # pylint: disable=import-outside-toplevel
      TEXT, VISION, _hf_model, _new_layout)

  os.makedirs(path, exist_ok=True)
  if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
    return write_tokenizer(path)
  text = dict(TEXT, vocab_size=VOCAB_SIZE, hidden_size=hidden_size,
              intermediate_size=2 * hidden_size, num_hidden_layers=num_hidden_layers,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  model = _hf_model(text, dict(VISION, image_size=image_size), seed=seed)
  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    tensors = {_new_layout(k): v
               for k, v in load_file(os.path.join(tmp, "model.safetensors")).items()}
    with open(os.path.join(tmp, "config.json"), encoding="utf-8") as f:
      config = json.load(f)
  names = sorted(tensors)
  shards = [names[:len(names) // 2], names[len(names) // 2:]]
  weight_map, total = {}, 0
  for k, shard in enumerate(shards):
    file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({n: tensors[n] for n in shard}, os.path.join(path, file),
              metadata={"format": "pt"})
    weight_map.update({n: file for n in shard})
    total += sum(tensors[n].nbytes for n in shard)
  config.update(model_type="interns1", architectures=["InternS1ForConditionalGeneration"],
                auto_map=dict(AUTO_MAP), image_token_id=IMAGE_TOKEN)
  config["vision_config"]["model_type"] = "interns1_vision"
  for name in CODE_FILES:
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      f.write(MODEL_CODE)
  with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
    json.dump(SPECIAL_TOKENS_MAP, f, indent=2)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  write_tokenizer(path)
  # Last: the index marks the checkpoint complete (what makes this function idempotent).
  with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  return path


def as_internvl(path: str, out: str) -> str:
  """A view of the Intern-S1 checkpoint `path` that transformers' own
  `InternVLForConditionalGeneration` loads (no custom code): the same weight files (linked; the
  official tensor names are transformers' InternVL names) under a config.json with model_type
  `internvl` / `internvl_vision` and no auto_map. Returns `out`."""
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(path):
    if name.endswith(".safetensors") or name == "model.safetensors.index.json":
      os.symlink(os.path.join(os.path.abspath(path), name), os.path.join(out, name))
  with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
    config = json.load(f)
  config.pop("auto_map", None)
  config.update(model_type="internvl", architectures=["InternVLForConditionalGeneration"])
  config["vision_config"]["model_type"] = "internvl_vision"
  with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
  return out
