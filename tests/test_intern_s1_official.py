"""A checkpoint directory laid out as the published Intern-S1 / Intern-S1-mini ones (model_type
`interns1`, custom code, no tokenizer.json: vocab.json + merges.txt + three SentencePiece models;
tests/interns1_layout.py builds a tiny one): loaded, exported in the same layout (tokenizer files
and custom code byte for byte, config.json's auto_map, the tensor names, the logits), the seeds'
recipe trained on it with its scientific tokenizer, and a directory without a tokenizer refused
at start-up with a message."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece as spm
import torch
import transformers
from interns1_layout import (AUTO_MAP, CODE_FILES, IMAGE_TOKEN, VOCAB_SIZE, as_internvl,
                             write_checkpoint, write_tokenizer)
from safetensors.numpy import load_file
from test_intern_s1 import _single_mesh

from jaxtune import Trainer, config as config_lib
from jaxtune.data import SFTData, open_encoder, templates
from jaxtune.data.intern_s1_tokenizer import OFFSETS
from jaxtune.data.tokenizer_files import TokenizerFilesError, read_tokenizer_files
from jaxtune.models import export_hf, load_hf_weights
from jaxtune.models import abstract_model, family, presets
from jaxtune.recipes import sft_mini

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TILE = 448                       # the data pipeline's tiles (and Intern-S1's)
PER_TILE = 256
IMG_START, IMG_END = 152955, 152956
# Every file of the published layout that is not a weight file (the tokenizer and custom code).
TOKENIZER_NAMES = {"vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer_SMILES.model", "tokenizer_IUPAC.model", "tokenizer_FASTA.model",
                   "tokenization_interns1.py"}
CODE_NAMES = set(CODE_FILES)
SMILES = "CC(=O)Oc1ccccc1C(=O)O"
PROTEIN = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"   # 33 capitals: detected without a tag


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _weights(path: str) -> dict[str, np.ndarray]:
  out = {}
  for name in sorted(os.listdir(path)):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(path, name)))
  return out


def _not_weights(path: str) -> set[str]:
  return {n for n in os.listdir(path)
          if not n.endswith(".safetensors") and n != "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return write_checkpoint(str(tmp_path_factory.mktemp("official") / "Intern-S1-tiny"))


@pytest.fixture(scope="module")
def loaded(checkpoint):
  cfg = presets.from_hf(checkpoint)
  model = load_hf_weights(abstract_model(cfg, _single_mesh(), param_dtype="float32",
                                         compute_dtype="float32", remat="none"), checkpoint)
  return cfg, model


def _sample(rng) -> np.ndarray:
  """Chat ids around one image: Qwen ids, the image span, ids of the SentencePiece ranges."""
  return np.concatenate([[151644, 872, 198], rng.integers(0, 151643, 4), [IMG_START],
                         np.full(PER_TILE, IMAGE_TOKEN), [IMG_END],
                         OFFSETS["SMILES"] + rng.integers(1, 50, 3),
                         OFFSETS["FASTA"] + rng.integers(1, 30, 3), [VOCAB_SIZE - 1, 151645]
                         ]).astype(np.int32)


def _hf_logits(path: str, ids: np.ndarray, pix: np.ndarray) -> np.ndarray:
  model = transformers.InternVLForConditionalGeneration.from_pretrained(
      path, dtype=torch.float32).eval()
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids[None]).long(),
                 pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2))).logits[0].numpy()


def test_checkpoint_reads_as_the_published_layout(checkpoint, loaded):
  cfg, _ = loaded
  assert cfg.type == "intern_s1" and cfg.hf_layout == "interns1"
  assert cfg.image_token_id == IMAGE_TOKEN == 152957 and cfg.text.vocab_size == VOCAB_SIZE
  assert "tokenizer.json" not in os.listdir(checkpoint)
  files = read_tokenizer_files(checkpoint)
  assert files.layout == "intern-s1"
  assert files.spec["added_tokens"][-1] == dict(id=IMAGE_TOKEN, content="<IMG_CONTEXT>",
                                                single_word=False, lstrip=False, rstrip=False,
                                                normalized=False, special=True)
  # No file of the directory's code was imported (each one raises if it is).
  assert not {n.removesuffix(".py") for n in CODE_NAMES | {"tokenization_interns1.py"}} \
      & set(sys.modules)


@pytest.mark.slow
def test_export_keeps_the_published_layout_and_the_logits(checkpoint, loaded, tmp_path):
  cfg, model = loaded
  out = export_hf(model, cfg, str(tmp_path / "export"), dtype="float32",
                  tokenizer_path=checkpoint, source_dir=checkpoint)
  # The same files as the source beside the weights, each byte for byte.
  assert _not_weights(checkpoint) == TOKENIZER_NAMES | CODE_NAMES | {"config.json"}
  assert _not_weights(out) == _not_weights(checkpoint)
  for path in read_tokenizer_files(checkpoint).files:   # the files read_tokenizer_files names
    assert os.path.basename(path) in TOKENIZER_NAMES
  for name in TOKENIZER_NAMES | CODE_NAMES:
    assert _read(os.path.join(out, name)) == _read(os.path.join(checkpoint, name)), name
  # config.json: the official model type, auto_map and ids, the architecture written over.
  source, written = _config(checkpoint), _config(out)
  assert written["model_type"] == "interns1" and written["auto_map"] == source["auto_map"]
  assert written["auto_map"] == AUTO_MAP
  assert written["architectures"] == ["InternS1ForConditionalGeneration"]
  assert written["vision_config"]["model_type"] == "interns1_vision"
  assert written["image_token_id"] == IMAGE_TOKEN
  assert written["text_config"]["vocab_size"] == VOCAB_SIZE
  # The weights: the source's names, the float32 values unchanged.
  theirs, ours = _weights(checkpoint), _weights(out)
  assert set(ours) == set(theirs)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    assert set(json.load(f)["weight_map"]) == set(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  # Logits: transformers on the export and on the source (each seen as transformers' InternVL),
  # and jaxtune on the loaded model, for a chat with one 448-pixel tile.
  rng = np.random.default_rng(0)
  ids = _sample(rng)
  pix = rng.normal(size=(1, TILE, TILE, 3)).astype(np.float32)
  expected = _hf_logits(as_internvl(checkpoint, str(tmp_path / "source_view")), ids, pix)
  np.testing.assert_array_equal(
      _hf_logits(as_internvl(out, str(tmp_path / "export_view")), ids, pix), expected)
  batch = dict(input_ids=ids[None], positions=np.arange(len(ids), dtype=np.int32)[None],
               segment_ids=np.ones((1, len(ids)), np.int32), pixel_values=pix[None],
               tile_segment_ids=np.ones((1, 1), np.int32))
  logits = model.logits(model.forward({k: jnp.asarray(v) for k, v in batch.items()}).hidden)
  np.testing.assert_allclose(np.asarray(logits)[0], expected, atol=1e-4, rtol=1e-4)


def test_export_with_a_separate_tokenizer_takes_the_model_code_from_the_source(
    checkpoint, loaded, tmp_path):
  """tokenizer_path elsewhere: its tokenizer files; the code config.json's auto_map names comes
  from source_dir."""
  cfg, model = loaded
  tokenizer = write_tokenizer(str(tmp_path / "tokenizer"))
  with open(os.path.join(tokenizer, "tokenization_interns1.py"), "a") as f:
    f.write("# the tokenizer directory's own copy\n")
  out = export_hf(model, cfg, str(tmp_path / "export"), dtype="float32",
                  tokenizer_path=tokenizer, source_dir=checkpoint)
  assert _not_weights(out) == TOKENIZER_NAMES - {"special_tokens_map.json"} | CODE_NAMES \
      | {"config.json"}
  for name in TOKENIZER_NAMES - {"special_tokens_map.json"}:
    assert _read(os.path.join(out, name)) == _read(os.path.join(tokenizer, name)), name
  for name in CODE_NAMES:
    assert _read(os.path.join(out, name)) == _read(os.path.join(checkpoint, name)), name
  # Without source_dir the config has no auto_map, and no model code is copied.
  plain = export_hf(model, cfg, str(tmp_path / "plain"), dtype="float32",
                    tokenizer_path=tokenizer)
  assert "auto_map" not in _config(plain) and not CODE_NAMES & set(os.listdir(plain))


def test_export_refuses_a_directory_without_a_tokenizer(checkpoint, loaded, tmp_path):
  cfg, model = loaded
  empty = tmp_path / "no_tokenizer"
  empty.mkdir()
  (empty / "config.json").write_bytes(_read(os.path.join(checkpoint, "config.json")))
  (empty / "vocab.json").write_text("{}")
  with pytest.raises(TokenizerFilesError) as e:
    export_hf(model, cfg, str(tmp_path / "export"), tokenizer_path=str(empty),
              source_dir=checkpoint)
  message = str(e.value)
  assert str(empty) in message and "config.json, vocab.json" in message
  assert "merges.txt is missing" in message and "tokenizer_SMILES.model" in message
  assert not os.path.exists(tmp_path / "export") and not os.path.exists(
      tmp_path / "export.partial")


# --- the seeds' recipe on the official layout ---------------------------------------------------
TEXT_LINES = [
    [{"role": "user", "content": f"What is <SMILES>{SMILES}</SMILES>?"},
     {"role": "assistant", "content": "Aspirin: <IUPAC>2-acetyloxybenzoic acid</IUPAC>."}],
    [{"role": "user", "content": f"Which protein begins {PROTEIN}?"},
     {"role": "assistant", "content": "A kinase fragment, by its first residues."}],
    [{"role": "user", "content": "Name a solvent."},
     {"role": "assistant", "content": "Ethanol, <SMILES>CCO</SMILES>."}],
]


def _recipe(checkpoint: str, tmp_path):
  text = tmp_path / "text.jsonl"
  text.write_text("".join(json.dumps({"messages": m}) + "\n" for m in TEXT_LINES))
  cfg = sft_mini.get_config(f"load_from={checkpoint},text={text},"
                            f"image={os.path.join(sft_mini.ASSETS, 'mini_vqa.jsonl')},"
                            f"media_root={sft_mini.ASSETS}")
  cfg.work_dir = str(tmp_path / "work")
  cfg.progress_bar = False
  cfg.epoch_num = None
  cfg.total_steps = 2
  cfg.eval_interval = -1
  cfg.global_batch_size = 4         # one row per simulated device (tests/conftest.py)
  cfg.compute_dtype = "float32"       # bf16 matmuls are slow on CPUs
  cfg.remat = "none"
  cfg.data.pack_max_length = 512
  cfg.data.sample_max_length = 512
  cfg.data.max_dynamic_patch = 1      # one 448-pixel tile (256 tokens) per picture
  cfg.data.max_tiles_per_pack = 1
  cfg.data.datasets[1]["sample_ratio"] = 0.25
  return cfg


@pytest.fixture(scope="module")
def recipe_run(checkpoint, tmp_path_factory):
  trainer = Trainer(_recipe(checkpoint, tmp_path_factory.mktemp("recipe")))
  return trainer.cfg, trainer.fit()


@pytest.mark.slow
def test_recipe_trains_with_the_scientific_tokenizer(checkpoint, recipe_run):
  cfg, summary = recipe_run
  assert cfg.tokenizer_path == checkpoint and cfg.model.image_token_id == IMAGE_TOKEN
  with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["loss_tokens"] > 0 for r in records)
  # The run's data: each text sample has the ids of the directory's encoder on its rendered
  # text, the tagged SMILES and the untagged protein in SentencePiece ids (the model files read
  # with the sentencepiece library).
  encoder = open_encoder(checkpoint)
  assert type(encoder).__name__ == "InternS1Encoder"
  data = SFTData(cfg.data, encoder, global_batch_size=cfg.global_batch_size, global_order=True,
                 data_parallel=config_lib.data_parallel_size(cfg, jax.device_count()),
                 media=family(cfg.model.type).media(cfg.model))
  samples = data.samples("pure_text")
  assert len(samples) == len(TEXT_LINES)
  template = templates.get_template("intern-s1")
  smiles = spm.SentencePieceProcessor(model_file=os.path.join(checkpoint,
                                                              "tokenizer_SMILES.model"))
  fasta = spm.SentencePieceProcessor(model_file=os.path.join(checkpoint, "tokenizer_FASTA.model"))
  for k, messages in enumerate(TEXT_LINES):
    ids = samples[k]["input_ids"].tolist()
    rendered = templates.render_text([templates.Message(m["role"], m["content"])
                                      for m in messages], template, eos=encoder.eos_token)
    assert ids == list(encoder.encode(rendered)), k
  tagged = [OFFSETS["SMILES"] + i for i in smiles.encode(SMILES)]
  detected = [OFFSETS["FASTA"] + i for i in fasta.encode(PROTEIN)]
  first, second = samples[0]["input_ids"].tolist(), samples[1]["input_ids"].tolist()
  at = first.index(151925)                                   # <SMILES>
  assert first[at + 1:at + 1 + len(tagged) + 1] == tagged + [151926]
  assert all(OFFSETS["SMILES"] < i < OFFSETS["SMILES"] + 60 for i in tagged)
  assert any(second[i:i + len(detected)] == detected for i in range(len(second)))
  assert all(OFFSETS["FASTA"] < i < OFFSETS["FASTA"] + 40 for i in detected)
  # The two batches the run trained on (the trainer's order: global, grouped for its data
  # parallelism) hold image tiles and ids of both SentencePiece ranges.
  ids = np.concatenate([data.batch(0, step)["input_ids"] for step in range(2)])
  assert ids.shape == (8, 512) and (ids == IMAGE_TOKEN).sum() >= PER_TILE
  assert ((ids > OFFSETS["SMILES"]) & (ids < 151925)).any()           # SMILES: 151669..151924
  assert ((ids > OFFSETS["FASTA"]) & (ids < 152953)).any()            # FASTA: 152443..152952


@pytest.mark.slow
def test_recipe_export_keeps_the_published_layout(checkpoint, recipe_run):
  _, summary = recipe_run
  export = summary["hf_export"]
  assert export is not None and os.path.basename(os.path.realpath(export)).startswith("hf-")
  assert _not_weights(export) == _not_weights(checkpoint)
  for name in TOKENIZER_NAMES | CODE_NAMES:
    assert _read(os.path.join(export, name)) == _read(os.path.join(checkpoint, name)), name
  config = _config(export)
  assert config["model_type"] == "interns1" and config["auto_map"] == AUTO_MAP
  assert set(_weights(export)) == set(_weights(checkpoint))


@pytest.mark.slow
def test_a_directory_without_a_tokenizer_is_a_configuration_error(checkpoint, tmp_path):
  """config.json and the weights, no tokenizer: exit code 2 and a message naming the
  directory, what it holds and the layouts jaxtune reads; no traceback."""
  bare = tmp_path / "weights_only"
  bare.mkdir()
  for name in os.listdir(checkpoint):
    if name == "config.json" or "safetensors" in name:
      os.symlink(os.path.join(checkpoint, name), bare / name)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "jaxtune.main", f"--config=configs/sft_mini.py:load_from={bare}",
       f"--config.work_dir={tmp_path / 'work'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert str(bare) in proc.stderr
  assert "config.json" in proc.stderr and "model.safetensors.index.json" in proc.stderr
  for layout in ("tokenizer.json", "vocab.json + merges.txt", "tokenizer_SMILES.model"):
    assert layout in proc.stderr, layout
  assert not os.path.exists(tmp_path / "work")
