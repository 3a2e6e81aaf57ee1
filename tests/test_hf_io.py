"""HF safetensors in and out: checks that name the bad tensor, sharded files, dtype round trip."""

import json
import os
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxtune.hf import read_hf_dtype
from jaxtune.hf import export as export_module
from jaxtune.models import abstract_model, create_model, export_hf, load_hf_weights, presets
from jaxtune.models.qwen3 import Qwen3ForCausalLM
from jaxtune.parallel import make_mesh

FIELDS = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10_000.0,
              tie_word_embeddings=False)
CFG = presets.qwen3_tiny(**FIELDS)


@pytest.fixture(scope="module")
def torch_model():
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**FIELDS)).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope="module")
def hf_dir(torch_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("hf") / "single"
  torch_model.save_pretrained(path)
  assert os.path.isfile(path / "model.safetensors")
  return str(path)


def _mesh():
  return make_mesh(dict(fsdp=2, tensor=2))


def _load(path, cfg=CFG):
  return load_hf_weights(abstract_model(cfg, _mesh(), compute_dtype="float32"), path)


def _edited_copy(src: str, dst, edit) -> str:
  """A copy of the single-file checkpoint `src` with its tensor dict changed by `edit`."""
  os.makedirs(dst)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  edit(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(os.path.join(src, "config.json"), dst)
  return str(dst)


def _expected_params(torch_model) -> dict[str, np.ndarray]:
  """Our [in, out] kernels and stacked layers, built independently from torch's state dict."""
  sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  layers = range(FIELDS["num_hidden_layers"])
  out = {"model.embed_tokens.embedding": sd["model.embed_tokens.weight"],
         "model.norm.weight": sd["model.norm.weight"], "lm_head.kernel": sd["lm_head.weight"].T}
  for hf_suffix, ours in [("self_attn.q_proj.weight", "self_attn.q_proj.kernel"),
                          ("self_attn.k_proj.weight", "self_attn.k_proj.kernel"),
                          ("self_attn.v_proj.weight", "self_attn.v_proj.kernel"),
                          ("self_attn.o_proj.weight", "self_attn.o_proj.kernel"),
                          ("mlp.gate_proj.weight", "mlp.gate_proj.kernel"),
                          ("mlp.up_proj.weight", "mlp.up_proj.kernel"),
                          ("mlp.down_proj.weight", "mlp.down_proj.kernel")]:
    out["model.layers." + ours] = np.stack([sd[f"model.layers.{i}.{hf_suffix}"].T
                                            for i in layers])
  for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm",
               "self_attn.k_norm"):
    out[f"model.layers.{norm}.weight"] = np.stack([sd[f"model.layers.{i}.{norm}.weight"]
                                                   for i in layers])
  return out


def _params(model) -> dict[str, np.ndarray]:
  return {".".join(map(str, path)): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_params_equal(model, expected):
  got = _params(model)
  assert sorted(got) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_load_gives_exactly_the_hf_weights(hf_dir, torch_model):
  model = _load(hf_dir)
  _assert_params_equal(model, _expected_params(torch_model))
  # Every device holds its own slice (fsdp x tensor), not the whole tensor.
  kernel = model.model.layers.self_attn.q_proj.kernel.get_value()
  assert kernel.addressable_shards[0].data.shape == (2, 16, 16)


def test_load_into_a_concrete_model_overwrites_its_random_init(hf_dir, torch_model):
  model = create_model(CFG, _mesh(), compute_dtype="float32", seed=1)
  load_hf_weights(model, hf_dir)
  _assert_params_equal(model, _expected_params(torch_model))


def test_missing_tensor_is_named(hf_dir, tmp_path):
  name = "model.layers.1.mlp.up_proj.weight"
  path = _edited_copy(hf_dir, tmp_path / "missing", lambda t: t.pop(name))
  with pytest.raises(ValueError, match=f"tensor {name} is missing from {path}"):
    _load(path)


def test_extra_tensor_is_named_with_its_file(hf_dir, tmp_path):
  name = "model.layers.1.mlp.extra_proj.weight"
  path = _edited_copy(hf_dir, tmp_path / "extra",
                      lambda t: t.update({name: np.zeros((4, 4), np.float32)}))
  with pytest.raises(ValueError, match=f"tensor {name} in {path}/model.safetensors is not a "):
    _load(path)


def test_wrongly_shaped_tensor_is_named_with_both_shapes(hf_dir, tmp_path):
  name = "model.layers.0.self_attn.k_proj.weight"
  path = _edited_copy(hf_dir, tmp_path / "shape",
                      lambda t: t.update({name: np.ascontiguousarray(t[name].T)}))
  with pytest.raises(ValueError, match=rf"tensor {name} .* has shape \(32, 16\), but the model "
                                       r"expects \(16, 32\)"):
    _load(path)


def test_truncated_file_is_named(hf_dir, tmp_path):
  os.makedirs(tmp_path / "cut")
  shutil.copy(os.path.join(hf_dir, "config.json"), tmp_path / "cut")
  with open(os.path.join(hf_dir, "model.safetensors"), "rb") as f:
    data = f.read()
  with open(tmp_path / "cut" / "model.safetensors", "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r"model.safetensors ends past the end of the file"):
    _load(str(tmp_path / "cut"))


def test_tied_checkpoint_does_not_load_into_untied_model(tmp_path):
  tied = transformers.Qwen3ForCausalLM(
      transformers.Qwen3Config(**{**FIELDS, "tie_word_embeddings": True}))
  tied.save_pretrained(tmp_path / "tied")
  with pytest.raises(ValueError, match="tensor lm_head.weight is missing"):
    _load(str(tmp_path / "tied"))


def test_tied_checkpoint_storing_a_head_copy_loads(tmp_path):
  """Official tied Qwen3 files also hold lm_head.weight (a copy of the embedding)."""
  fields = {**FIELDS, "tie_word_embeddings": True}
  torch.manual_seed(1)
  tied = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields))
  tied.save_pretrained(tmp_path / "tied")
  path = _edited_copy(str(tmp_path / "tied"), tmp_path / "with_head", lambda t: t.update(
      {"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
  cfg = presets.qwen3_tiny(**fields)
  mesh = _mesh()
  with jax.set_mesh(mesh):  # as the trainer calls it
    model = load_hf_weights(abstract_model(cfg, mesh, compute_dtype="float32"), path)
  np.testing.assert_array_equal(np.asarray(model.lm_head_kernel()),
                                tied.model.embed_tokens.weight.detach().numpy().T)
  out_dir = export_hf(model, cfg, str(tmp_path / "export"), dtype="float32")
  with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
    assert "lm_head.weight" not in json.load(f)["weight_map"]


def test_sharded_checkpoint_with_index_loads(torch_model, tmp_path):
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  files = os.listdir(tmp_path / "sharded")
  assert "model.safetensors.index.json" in files
  assert sum(f.endswith(".safetensors") for f in files) > 2
  _assert_params_equal(_load(str(tmp_path / "sharded")), _expected_params(torch_model))


def test_bfloat16_export_round_trip(hf_dir, torch_model, tmp_path):
  model = _load(hf_dir)
  out_dir = export_hf(model, CFG, str(tmp_path / "bf16"), dtype="bfloat16",
                      max_shard_bytes=16_000)
  with open(os.path.join(out_dir, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  shards = sorted(set(weight_map.values()))
  assert len(shards) > 2 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
  assert read_hf_dtype(out_dir) == "bfloat16"
  with open(os.path.join(out_dir, "config.json")) as f:
    config = json.load(f)
  assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
  assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10_000.0}
  assert not os.path.exists(out_dir + ".partial")

  # Back into jaxtune (float32 master weights): exactly the bf16-rounded originals.
  expected = {name: value.astype(ml_dtypes.bfloat16).astype(np.float32)
              for name, value in _expected_params(torch_model).items()}
  _assert_params_equal(_load(out_dir), expected)

  # transformers reads the shards, names, dtype and architecture.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir, dtype="auto")
  assert reloaded.dtype == torch.bfloat16
  for name, value in torch_model.state_dict().items():
    torch.testing.assert_close(reloaded.state_dict()[name], value.to(torch.bfloat16),
                               rtol=0, atol=0, msg=name)


def test_export_copies_tokenizer_and_never_leaves_a_half_export(hf_dir, tmp_path, monkeypatch):
  model = _load(hf_dir)
  tokenizer_dir = tmp_path / "tok"
  tokenizer_dir.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json", "merges.txt"):
    (tokenizer_dir / name).write_text("{}")
  out_dir = str(tmp_path / "export")
  export_hf(model, CFG, out_dir, dtype="float32", tokenizer_path=str(tokenizer_dir))
  assert {"tokenizer.json", "tokenizer_config.json", "merges.txt"} <= set(os.listdir(out_dir))
  assert read_hf_dtype(out_dir) == "float32"

  with pytest.raises(ValueError, match="no tokenizer.json"):
    export_hf(model, CFG, str(tmp_path / "other"), tokenizer_path=str(hf_dir))
  assert not os.path.exists(tmp_path / "other")

  # A crash half way through a re-export leaves the previous export whole.
  calls = []
  real_to_host = export_module._to_host  # pylint: disable=protected-access

  def failing_to_host(value):
    calls.append(1)
    if len(calls) > 5:
      raise KeyboardInterrupt("simulated preemption")
    return real_to_host(value)
  monkeypatch.setattr(export_module, "_to_host", failing_to_host)
  with pytest.raises(KeyboardInterrupt):
    export_hf(model, CFG, out_dir, dtype="bfloat16")
  assert read_hf_dtype(out_dir) == "float32"
  _assert_params_equal(_load(out_dir), _params(model))


def test_read_hf_dtype_accepts_old_and_nested_keys(tmp_path):
  for config, expected in [({"torch_dtype": "float16"}, "float16"),
                           ({"text_config": {"dtype": "bfloat16"}}, "bfloat16"),
                           ({}, "float32")]:
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_hf_dtype(str(tmp_path)) == expected


def test_single_device_model_without_mesh_loads(hf_dir, torch_model):
  """A model built directly (no create_model) lives on one device and still loads."""
  model = Qwen3ForCausalLM(CFG, compute_dtype=jax.numpy.float32, rngs=nnx.Rngs(0))
  load_hf_weights(model, hf_dir)
  _assert_params_equal(model, _expected_params(torch_model))
