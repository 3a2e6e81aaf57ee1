"""Recipe validation: every mistake gives one clear ConfigError naming the key, before any work."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import ConfigDict

from jaxtune import config as config_lib
from jaxtune.config import ConfigError, base_config, dataset, mesh_shape, validate
from jaxtune.models import presets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def good(tmp_path):
  data = tmp_path / "d.jsonl"
  data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                           {"role": "assistant", "content": "yo"}]}) + "\n")
  tok = tmp_path / "tok"
  tok.mkdir()
  (tok / "tokenizer.json").write_text("{}")   # validation reads only which files are there
  c = base_config()
  c.model = presets.qwen3_tiny()
  c.tokenizer_path = str(tok)
  c.data.datasets = [dataset("d", str(data))]
  c.data.sample_max_length = 64
  c.data.pack_max_length = 128
  c.epoch_num = 1
  c.global_batch_size = 4
  return c


def test_good_config_passes_and_resolves_alias(good):
  good.data.pack_level = "expand_soft"
  out = validate(good, num_devices=4)
  assert out.data.pack_level == "soft"
  assert good.data.pack_level == "expand_soft"  # the caller's config is not edited


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c.__setattr__("epoch_num", None), ["exactly one", "epoch_num", "total_steps"]),
    (lambda c: c.__setattr__("total_steps", 10), ["exactly one"]),
    (lambda c: c.data.__setattr__("sample_max_length", 4096), ["sample_max_length", "pack_max"]),
    (lambda c: c.__setattr__("tokenizer_path", None), ["tokenizer_path"]),
    (lambda c: c.__setattr__("tokenizer_path", "/nonexistent/tok"), ["tokenizer_path"]),
    (lambda c: c.__setattr__("load_from", "/nonexistent/model"), ["load_from", "config.json"]),
    (lambda c: c.data.__setattr__("datasets", [dataset("x", "/nope.jsonl")]),
     ["data.datasets[0].anno_path", "/nope.jsonl"]),
    (lambda c: c.data.__setattr__("datasets", []), ["data.datasets"]),
    (lambda c: c.loss.__setattr__("loss_reduction", "mean"), ["loss.loss_reduction", "token"]),
    (lambda c: c.lr.__setattr__("lr_type", "step"), ["lr.lr_type"]),
    (lambda c: c.__setattr__("global_batch_size", 6), ["global_batch_size", "multiple", "4"]),
    (lambda c: c.mesh.__setattr__("tensor", -1), ["at most one mesh axis"]),
    (lambda c: c.model.__setattr__("num_key_value_heads", 3), ["num_key_value_heads"]),
    (lambda c: c.optim.__setattr__("lr", -1e-5), ["optim.lr must be >= 0", "-1e-05"]),
    (lambda c: c.lr.__setattr__("warmup_ratio", -0.5), ["lr.warmup_ratio must be >= 0", "-0.5"]),
    (lambda c: c.optim.__setattr__("skip_grad_norm_threshold", 0.0),
     ["optim.skip_grad_norm_threshold", "0.0"]),
])
def test_each_mistake_names_its_key(good, mutate, words):
  mutate(good)
  with pytest.raises(ConfigError) as e:
    validate(good, num_devices=4)
  for word in words:
    assert word in str(e.value)


def test_zero_learning_rate_is_valid(good):
  good.optim.lr = 0.0  # evaluation-only runs and parity checks, as in torch and optax
  assert validate(good, num_devices=4).optim.lr == 0.0


def test_unknown_key_and_wrong_type(good):
  good.optim.learning_rate = 1e-3  # XTuner-style typo
  with pytest.raises(ConfigError, match="unknown config key 'optim.learning_rate'"):
    validate(good)
  del good.optim["learning_rate"]
  # ConfigDict type-checks assignments; a config built from a plain dict is not checked.
  with pytest.raises(ConfigError, match="'global_batch_size' must be int"):
    validate(ConfigDict({**good.to_dict(), "global_batch_size": "8"}))


def test_load_from_config_json_must_match_recipe(good, tmp_path):
  hf = tmp_path / "hf"
  hf.mkdir()
  fields = {k: v for k, v in presets.qwen3_tiny().items() if k != "type"}
  (hf / "config.json").write_text(json.dumps({**fields, "model_type": "qwen3",
                                              "num_hidden_layers": 3}))
  good.load_from = str(hf)
  with pytest.raises(ConfigError, match="model.num_hidden_layers: recipe 2 vs config.json 3"):
    validate(good)
  # A field config.json omits is transformers' default (Qwen3Config: rms_norm_eps 1e-6,
  # tie_word_embeddings False), not the recipe's: the untied default differs from the tiny
  # preset's tied head.
  (hf / "config.json").write_text(json.dumps({
      k: v for k, v in {**fields, "model_type": "qwen3"}.items() if k != "tie_word_embeddings"}))
  with pytest.raises(ConfigError, match="model.tie_word_embeddings: recipe True vs config.json "
                                        "False"):
    validate(good)


def test_nested_model_fields_are_checked_against_config_json(good, tmp_path):
  """A mismatch inside a nested section (a VLM's text_config) names the nested field."""
  nested = ConfigDict({"type": "qwen3", "text": presets.qwen3_tiny(), "depth": 2})
  checkpoint = ConfigDict({"type": "qwen3", "text": presets.qwen3_tiny(hidden_size=32),
                           "depth": 2})
  good.model = nested
  good.load_from = str(tmp_path)
  with pytest.raises(ConfigError, match=r"model\.text\.hidden_size: recipe 64 vs config.json 32"):
    config_lib._check_against_hf_config(good, checkpoint)  # pylint: disable=protected-access


def test_mesh_shape_resolves_minus_one(good):
  good.mesh.tensor = 2
  assert mesh_shape(good, 8) == dict(data=1, fsdp=4, tensor=2, expert=1, sequence=1)
  good.mesh.tensor = 3
  with pytest.raises(ConfigError, match="cannot be split"):
    mesh_shape(good, 8)


def test_cli_config_error_exits_nonzero_and_writes_nothing(tmp_path):
  work = tmp_path / "work"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "jaxtune.main", f"--config={REPO}/configs/sft_mini.py",
       "--config.data.sample_max_length=100000", f"--config.work_dir={work}"],
      capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "data.sample_max_length (100000) must be <= data.pack_max_length" in proc.stderr
  assert not work.exists()


def test_cli_rejects_unknown_override(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxtune.main", f"--config={REPO}/configs/sft_mini.py",
       "--config.optim.learning_rate=0.1"],
      capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
      cwd=tmp_path)
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr


def test_resolve_derives_every_value_once_beside_the_recipe(good):
  """The recipe stays what config.json holds; the derived values sit beside it."""
  good.mesh.update(data=2, fsdp=-1)
  good.data.micro_batch_size = 1
  resolved = config_lib.resolve(good, 4, backend="cpu")
  assert config_lib.to_json(resolved.cfg) == config_lib.to_json(validate(good, num_devices=4))
  assert resolved.mesh_shape == dict(data=2, fsdp=2, tensor=1, expert=1, sequence=1)
  assert resolved.data_parallel == 4 and resolved.num_micro == 1
  assert resolved.attention == "blockwise" and resolved.media is None
  assert resolved.tiles_bound == 0
  with pytest.raises(ConfigError, match="global_batch_size"):
    config_lib.resolve(good, 8, backend="cpu")


def test_attention_auto_follows_the_ops_rule(good, monkeypatch):
  """'auto' is resolved by ops.attention.resolve_impl, the function the model runs, so a flip
  of AUTO_GPU_IMPL reaches the planner's report too."""
  from jaxtune.ops import attention  # pylint: disable=import-outside-toplevel
  assert config_lib.resolve(good, 1, backend="gpu").attention == attention.AUTO_GPU_IMPL
  monkeypatch.setattr(attention, "AUTO_GPU_IMPL", "pallas")
  assert config_lib.resolve(good, 1, backend="gpu").attention == "pallas"
  good.compute_dtype = "float32"
  assert config_lib.resolve(good, 1, backend="gpu").attention == "blockwise"


def test_load_from_config_is_read_once(good, monkeypatch):
  reads = []
  checkpoint = presets.qwen3_tiny()
  monkeypatch.setattr(presets, "from_hf", lambda path: reads.append(path) or checkpoint)
  good.load_from = good.tokenizer_path   # a directory with a tokenizer
  good.model_from_checkpoint = True
  out = validate(good)
  assert reads == [good.load_from] and out.tokenizer_path == good.load_from


def test_files_false_skips_only_the_files(good):
  """Planning (files=False) checks the recipe but not the files a run reads or writes."""
  good.data.datasets = []
  good.tokenizer_path = None
  good.work_dir = "/proc/no/such/dir"
  assert validate(good, files=False).data.datasets == []
  good.optim.lr = -1.0
  with pytest.raises(ConfigError, match="optim.lr"):
    validate(good, files=False)
