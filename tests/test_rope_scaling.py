"""RoPE scaling (`model.rope_scaling`): YaRN against transformers' Qwen3 / Qwen3-MoE past the
original context, its config.json forms in and out, and the types jaxtune rejects."""

import copy
import json

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from jaxtune.config import ConfigError, validate
from jaxtune.models import export_hf, presets
from jaxtune.models.intern_s1 import hf as intern_s1_hf
from jaxtune.models.qwen3 import hf as qwen3_hf
from jaxtune.models.qwen3_moe import hf as qwen3_moe_hf
from jaxtune.ops.rope import normalize_rope_scaling, rope_frequencies

# pylint: disable=wrong-import-order
from test_config import good  # noqa: F401  pylint: disable=unused-import
from test_qwen3_moe import FIELDS as MOE_FIELDS
from test_qwen3_moe import _ours, _single_mesh, _torch_sample
from test_qwen3_vs_reference import (VOCAB, _fields, _load, _logits, _single_device_mesh,
                                     _torch_logits, _torch_model)

# Original context 64, positions to 300: past both the original and the scaled (256) length.
YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64)
LENGTH = 300
QWEN3_YARN = dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768)


def _hf_yarn_fields(fields: dict, yarn: dict) -> dict:
  """HF Qwen3Config fields with `yarn` in transformers 5's `rope_parameters`."""
  out = {k: v for k, v in fields.items() if k != "rope_theta"}
  return {**out, "rope_parameters": {**yarn, "rope_theta": fields["rope_theta"]}}


@pytest.mark.parametrize("head_dim, theta, yarn, max_positions", [
    (16, 1e4, YARN, 256),
    (128, 1e6, QWEN3_YARN, 40960),   # Qwen3's documented setting on its 40,960-position config
    (128, 5e6, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32768,
                    truncate=False, beta_fast=16, beta_slow=2), 262144),
    (64, 1e4, dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=4096,
                   mscale=0.707, mscale_all_dim=1.0), 8192),
    (64, 1e4, dict(rope_type="yarn", factor=2.0, original_max_position_embeddings=4096,
                   attention_factor=0.9), 8192),
    (8, 1e4, dict(rope_type="yarn", factor=3.0), 100),  # original falls back to max positions
])
def test_yarn_frequencies_equal_transformers(head_dim, theta, yarn, max_positions):
  hf_cfg = transformers.Qwen3Config(head_dim=head_dim, max_position_embeddings=max_positions,
                                    rope_parameters={**yarn, "rope_theta": theta})
  inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg)
  ours, our_factor = rope_frequencies(head_dim, theta, yarn, max_positions)
  assert ours.dtype == np.float32 and ours.shape == (head_dim // 2,)
  # float32 pow differs from torch's by an ulp at some exponents (the default RoPE's does too).
  np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=5e-7, atol=0)
  assert our_factor == pytest.approx(attention_factor, rel=1e-12)
  if "attention_factor" not in yarn and "mscale" not in yarn:
    assert our_factor == pytest.approx(0.1 * np.log(yarn["factor"]) + 1)


@pytest.fixture(scope="module")
def yarn_qwen3(tmp_path_factory):
  """(transformers' Qwen3 with YaRN, its save_pretrained directory, jaxtune's model loaded
  from it with the config read from its config.json)."""
  torch_model = _torch_model(_hf_yarn_fields(_fields(False, 8, 2, 8), YARN), seed=1)
  hf_dir = str(tmp_path_factory.mktemp("yarn") / "hf")
  torch_model.save_pretrained(hf_dir)
  cfg = presets.from_hf(hf_dir)
  return torch_model, hf_dir, cfg, _load(cfg, hf_dir, _single_device_mesh())


def _long_row():
  ids = np.random.RandomState(0).randint(0, VOCAB, (1, LENGTH)).astype(np.int32)
  return ids, np.arange(LENGTH, dtype=np.int32)[None], np.ones_like(ids)


@pytest.mark.parity
def test_yarn_logits_equal_transformers_past_the_original_context(yarn_qwen3):
  """A Qwen3 with YaRN read from the config.json transformers saves: logits as transformers'
  at positions 0..299 (original context 64); plain RoPE would differ there."""
  torch_model, _, cfg, model = yarn_qwen3
  assert cfg.rope_scaling.to_dict() == YARN
  ids, positions, segments = _long_row()
  ours = np.asarray(_logits(model, ids, positions, segments))
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=0)

  # The check has teeth: transformers' model on plain RoPE gives other logits.
  plain = copy.deepcopy(torch_model)
  plain.model.rotary_emb.inv_freq.copy_(
      plain.model.rotary_emb.compute_default_rope_parameters(plain.config)[0])
  plain.model.rotary_emb.attention_scaling = 1.0
  assert np.abs(ours - _torch_logits(plain, ids)).max() > 1e-2


@pytest.mark.parity
def test_yarn_export_reloads_in_transformers_with_identical_logits(yarn_qwen3, tmp_path):
  torch_model, _, cfg, model = yarn_qwen3
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      export_hf(model, cfg, str(tmp_path / "export"), dtype="float32"),
      attn_implementation="eager")
  assert reloaded.config.rope_parameters == {**YARN, "rope_theta": cfg.rope_theta}
  ids, _, _ = _long_row()
  np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids))


@pytest.mark.parity
def test_yarn_moe_logits_equal_transformers(tmp_path):
  """The same for Qwen3-MoE (whose decoder builds its own RoPE tables)."""
  torch.manual_seed(0)
  fields = {**MOE_FIELDS, "num_hidden_layers": 2, "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 256}
  hf_model = transformers.Qwen3MoeForCausalLM(
      transformers.Qwen3MoeConfig(**_hf_yarn_fields(fields, YARN))).eval()
  with torch.no_grad():
    for param in hf_model.parameters():
      param.normal_(0.0, 0.3)
  hf_model.save_pretrained(tmp_path / "moe")
  cfg = presets.from_hf(str(tmp_path / "moe"))
  assert cfg.rope_scaling.to_dict() == YARN
  ids = np.random.default_rng(0).integers(0, fields["vocab_size"], (1, LENGTH)).astype(np.int32)
  positions = np.arange(LENGTH, dtype=np.int32)[None]
  ours, _ = _ours(cfg, str(tmp_path / "moe"), _single_mesh(), ids, positions, np.ones_like(ids))
  np.testing.assert_allclose(ours[0], _torch_sample(hf_model, ids[0])[0], atol=1e-4, rtol=0)


def _config_json(tmp_path, name: str, **rope) -> str:
  """A Qwen3 config.json (the tiny preset's fields) with the given RoPE keys."""
  path = tmp_path / name
  path.mkdir()
  fields = {k: v for k, v in presets.qwen3_tiny().to_dict().items()
            if k not in ("type", "rope_scaling", "rope_theta")}
  (path / "config.json").write_text(json.dumps({**fields, "model_type": "qwen3", **rope}))
  return str(path)


@pytest.mark.parametrize("rope", [
    # transformers 5's form
    dict(rope_parameters={**QWEN3_YARN, "rope_theta": 1e6}),
    # the legacy form (Qwen3's model card: add this to config.json), transformers 4's "type" too
    dict(rope_scaling=QWEN3_YARN, rope_theta=1e6),
    dict(rope_scaling={**QWEN3_YARN, "type": "yarn"}, rope_theta=1e6),
    dict(rope_scaling={k: v for k, v in QWEN3_YARN.items() if k != "rope_type"} | {"type": "yarn"},
         rope_theta=1e6),
], ids=["rope_parameters", "rope_scaling", "rope_scaling_both_types", "rope_scaling_type"])
def test_config_json_yarn_round_trips_through_export(tmp_path, rope):
  cfg = presets.from_hf(_config_json(tmp_path, "in", **rope))
  assert cfg.rope_scaling.to_dict() == QWEN3_YARN and cfg.rope_theta == 1e6
  out = tmp_path / "out"
  out.mkdir()
  written = qwen3_hf.hf_config(cfg, "float32")
  assert written["rope_parameters"] == {**QWEN3_YARN, "rope_theta": 1e6}
  assert written["rope_scaling"] == QWEN3_YARN and written["rope_theta"] == 1e6  # older readers
  (out / "config.json").write_text(json.dumps(written))
  hf = transformers.AutoConfig.from_pretrained(out)
  assert hf.rope_parameters == {**QWEN3_YARN, "rope_theta": 1e6}
  assert presets.from_hf(str(out)).to_dict() == cfg.to_dict()


def test_export_writes_plain_rope_as_before_and_yarn_in_every_family():
  plain = qwen3_hf.hf_config(presets.qwen3_tiny(), "float32")
  assert plain["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
  assert plain["rope_scaling"] is None  # as the official Qwen3 config.json files
  moe = qwen3_moe_hf.hf_config(presets.qwen3_moe_tiny(rope_scaling=QWEN3_YARN), "float32")
  assert moe["rope_parameters"] == {**QWEN3_YARN, "rope_theta": 1e6}
  assert transformers.Qwen3MoeConfig(**moe).rope_parameters == moe["rope_parameters"]
  vlm = presets.intern_s1_tiny()
  vlm.text.rope_scaling = QWEN3_YARN
  text = intern_s1_hf.hf_config(vlm, "float32")["text_config"]
  assert text["rope_parameters"] == {**QWEN3_YARN, "rope_theta": 1e6}


def test_intern_s1_reads_its_text_models_yarn():
  vlm = presets.intern_s1_tiny()
  vlm.text.rope_scaling = QWEN3_YARN
  written = intern_s1_hf.hf_config(vlm, "float32")
  assert intern_s1_hf.config_from_hf(written).text.rope_scaling.to_dict() == QWEN3_YARN
  written["text_config"]["rope_scaling"] = {"rope_type": "dynamic", "factor": 2.0}
  with pytest.raises(ValueError, match="config.json text_config rope_scaling has rope_type "
                                       "'dynamic'"):
    intern_s1_hf.config_from_hf(written)


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "longrope", "llama3"])
def test_unimplemented_types_in_config_json_fail_with_a_message(tmp_path, rope_type):
  """Read before transformers sees them: it raises a bare KeyError for llama3 and longrope."""
  rope = dict(rope_scaling={"rope_type": rope_type, "factor": 2.0}, rope_theta=1e6)
  with pytest.raises(ValueError, match=f"rope_scaling has rope_type '{rope_type}', which "
                                       "jaxtune does not implement; it reads"):
    presets.from_hf(_config_json(tmp_path, "a", **rope))
  rope = dict(rope_parameters={"rope_type": rope_type, "factor": 2.0, "rope_theta": 1e6})
  with pytest.raises(ValueError, match=f"rope_parameters has rope_type '{rope_type}'"):
    presets.from_hf(_config_json(tmp_path, "b", **rope))


def test_load_from_with_an_unimplemented_type_is_a_config_error(good, tmp_path):  # noqa: F811
  good.load_from = _config_json(tmp_path, "hf", rope_scaling={"type": "linear", "factor": 2.0},
                                rope_theta=1e6)
  with pytest.raises(ConfigError, match=r"load_from '.*/hf': config.json rope_scaling has "
                                        r"rope_type 'linear'"):
    validate(good, files=False)


@pytest.mark.parametrize("value, words", [
    (dict(rope_type="linear", factor=2.0), ["'linear' is not implemented", "'yarn'"]),
    (dict(rope_type="dynamic", factor=2.0), ["'dynamic' is not implemented"]),
    (dict(rope_type="yarn"), ["needs 'factor'"]),
    (dict(rope_type="yarn", factor=4.0, scale=2.0), ["unknown yarn keys ['scale']"]),
    (dict(rope_type="yarn", factor=0.5), ["'factor' must be >= 1"]),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768.5),
     ["original_max_position_embeddings' must be a positive int"]),
    ("yarn", ["must be None (plain RoPE) or a dict"]),
])
def test_recipe_rope_scaling_mistakes_name_the_key(good, value, words):  # noqa: F811
  good.model.rope_scaling = value
  with pytest.raises(ConfigError) as e:
    validate(good, files=False)
  for word in ["config key 'model.rope_scaling'", "Set it to None", *words]:
    assert word in str(e.value)


def test_recipe_rope_scaling_is_normalized_and_builds_the_model(good):  # noqa: F811
  good.model.rope_scaling = dict(type="yarn", factor=4, original_max_position_embeddings=64)
  out = validate(good, files=False)
  assert out.model.rope_scaling.to_dict() == YARN
  good.model.rope_scaling = dict(rope_type="default")
  assert validate(good, files=False).model.rope_scaling is None
  vlm = presets.intern_s1_tiny()
  vlm.text.rope_scaling = dict(rope_type="llama3", factor=8.0)
  good.model = vlm
  with pytest.raises(ConfigError, match="config key 'model.text.rope_scaling'"):
    validate(good, files=False)
  with pytest.raises(ValueError, match="'linear' is not implemented"):
    normalize_rope_scaling({"rope_type": "linear", "factor": 2.0})


def test_recipe_yarn_extends_a_checkpoint_without_it(good, tmp_path):  # noqa: F811
  """A recipe's rope_scaling wins over load_from's plain RoPE (a run extending the context);
  None takes config.json's yarn, or must match it with model_from_checkpoint=False."""
  plain = _config_json(tmp_path, "plain", rope_theta=1e6)
  good.load_from = plain
  good.model.rope_scaling = dict(QWEN3_YARN)
  assert validate(good, files=False).model.rope_scaling.to_dict() == QWEN3_YARN
  good.model_from_checkpoint = True
  assert validate(good, files=False).model.rope_scaling.to_dict() == QWEN3_YARN

  good.load_from = _config_json(tmp_path, "yarn", rope_scaling=QWEN3_YARN, rope_theta=1e6)
  good.model.rope_scaling = None
  assert validate(good, files=False).model.rope_scaling.to_dict() == QWEN3_YARN
  good.model_from_checkpoint = False
  with pytest.raises(ConfigError, match="model.rope_scaling: recipe None vs config.json"):
    validate(good, files=False)
