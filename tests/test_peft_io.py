"""LoRA adapters in and out in PEFT's format, against peft + transformers on the CPU: a PEFT
adapter with non-zero A and B (made by peft itself) loaded with `lora.init_from` gives peft's
logits, loss and A/B gradients (tiny Qwen3 and Qwen3-MoE, experts as peft's fused
`target_parameters` included); our exported adapter (Qwen3-MoE experts too) loaded by
`peft.PeftModel.from_pretrained` gives the merged export's logits in transformers, and the
tensors LoRA does not target are the base's bit for bit; the adapter config check's errors."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from ml_collections import ConfigDict
from safetensors.numpy import load_file

from jaxtune import models
from jaxtune.hf import peft as peft_io
from jaxtune.models import lora, presets
from jaxtune.parallel import batch_sharding, make_mesh
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import split_model

peft = pytest.importorskip("peft")

QWEN3 = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=10_000.0,
             tie_word_embeddings=False)
MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           num_experts=4, num_experts_per_tok=2, rope_theta=10_000.0, tie_word_embeddings=False,
           norm_topk_prob=True)
RANK, ALPHA = 4, 8.0
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ATTENTION_TARGETS = (r"(^|\.)layers\.\d+\.self_attn\.[qkvo]_proj$",)
FUSED_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _lora_cfg(targets=lora.DEFAULT_LORA_TARGETS, init_from=None, rank=RANK, alpha=ALPHA):
  return ConfigDict(dict(rank=rank, alpha=alpha, dropout=0.0, targets=tuple(targets),
                         init_from=init_from, quantize_base="none"))


def _reference(tmp_path_factory, name, model, target_modules, target_parameters=None):
  """(peft model with random non-zero A and B, base dir, adapter dir)."""
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.3)
  base_dir = tmp_path_factory.mktemp(name) / "base"
  model.save_pretrained(base_dir)
  peft_model = peft.get_peft_model(
      model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=target_modules,
                             target_parameters=target_parameters, lora_dropout=0.0,
                             init_lora_weights=False))
  with torch.no_grad():
    for name_, param in peft_model.named_parameters():
      if "lora_" in name_:
        param.normal_(0.0, 0.2)
  adapter_dir = base_dir.parent / "adapter"
  peft_model.save_pretrained(adapter_dir)
  return peft_model.eval(), str(base_dir), str(adapter_dir)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3))
  return _reference(tmp_path_factory, "qwen3", model, ["q_proj", "k_proj", "v_proj", "o_proj",
                                                       "gate_proj", "up_proj", "down_proj"])


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
  torch.manual_seed(1)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**MOE))
  return _reference(tmp_path_factory, "moe", model, ATTENTION)


@pytest.fixture(scope="module")
def qwen3_moe_experts(tmp_path_factory):
  """Attention and expert adapters as peft makes them on transformers 5's fused experts."""
  torch.manual_seed(2)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**MOE))
  return _reference(tmp_path_factory, "moe_experts", model, ATTENTION, FUSED_PARAMETERS)


def _mesh():
  return make_mesh({}, jax.devices()[:1])


def _our_model(base_dir, adapter_dir, lora_cfg):
  cfg = presets.from_hf(base_dir)
  model = models.abstract_model(cfg, _mesh(), param_dtype="float32", compute_dtype="float32",
                                lora=lora_cfg)
  models.load_hf_weights(model, base_dir)
  adapters = _adapter_map(cfg, lora_cfg)
  peft_io.read_adapter(model, adapter_dir, models.family(cfg.type).hf_weight_map(cfg), adapters)
  return cfg, model, adapters


def _adapter_map(cfg, lora_cfg):
  return {p: lora.adapter_paths(p)
          for p in lora.lora_targets(models.family(cfg.type), cfg, tuple(lora_cfg.targets))}


def _ids(vocab, n=20, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (n,)).astype(np.int32)


def _ours(model, ids):
  """(logits [T, V], mean next-token loss, flat grads of the adapters) of one sample."""
  mesh = _mesh()
  with jax.set_mesh(mesh):
    sharding = batch_sharding(mesh)
    batch = {k: to_global_array(v[None], sharding) for k, v in
             dict(input_ids=ids, positions=np.arange(len(ids), dtype=np.int32),
                  segment_ids=np.ones_like(ids)).items()}
    model_def, params = split_model(model)
    trainable, frozen = model_def.split_trainable(params)

    def loss(tr):
      m = model_def.merge(nnx.merge_state(tr, frozen))
      logits = m.logits(m.forward(batch).hidden)[0].astype(jnp.float32)
      logp = jax.nn.log_softmax(logits[:-1])
      return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(ids[1:, None]), -1)), logits
    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)
  flat = {".".join(map(str, k)): np.asarray(v.get_value())
          for k, v in nnx.to_flat_state(grads)}
  return np.asarray(logits), float(value), flat


def _torch(model, ids):
  model.zero_grad()
  logits = model(torch.from_numpy(ids[None]).long()).logits[0]
  loss = torch.nn.functional.cross_entropy(logits[:-1], torch.from_numpy(ids[1:]).long())
  loss.backward()
  return logits.detach().numpy(), float(loss.detach())


def _check_parity(reference, lora_cfg, vocab):
  peft_model, base_dir, adapter_dir = reference
  _, model, adapters = _our_model(base_dir, adapter_dir, lora_cfg)
  ids = _ids(vocab)
  logits, loss, grads = _ours(model, ids)
  expected_logits, expected_loss = _torch(peft_model, ids)
  np.testing.assert_allclose(logits, expected_logits, atol=2e-4, rtol=2e-4)
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
  torch_params = dict(peft_model.named_parameters())
  checked = 0
  for base_path, (a_path, b_path) in adapters.items():
    if not base_path.endswith(".kernel"):  # experts: fused in peft
      checked += _check_expert_grads(torch_params, grads, base_path, a_path, b_path)
      continue
    module = base_path.removesuffix(".kernel").replace("model.layers.", "")
    for layer in range(grads[a_path].shape[0]):
      prefix = f"base_model.model.model.layers.{layer}.{module}"
      grad_a = torch_params[f"{prefix}.lora_A.default.weight"].grad.numpy()
      grad_b = torch_params[f"{prefix}.lora_B.default.weight"].grad.numpy()
      np.testing.assert_allclose(grads[a_path][layer].T, grad_a, atol=2e-5, rtol=1e-4)
      np.testing.assert_allclose(grads[b_path][layer].T, grad_b, atol=2e-5, rtol=1e-4)
      checked += 1
  assert checked == len(adapters) * grads[a_path].shape[0]
  assert not any(np.abs(g).max() == 0 for g in grads.values())


def _check_expert_grads(torch_params, grads, base_path, a_path, b_path):
  """Our expert adapters' gradients against peft's fused ones (rank r: gate and up share A,
  so peft's A gradient is the sum of ours)."""
  proj = base_path.rsplit(".", 1)[-1]
  layers, experts = grads[a_path].shape[:2]
  for layer in range(layers):
    prefix = f"base_model.model.model.layers.{layer}.mlp.experts"
    prefix += ".base_layer" if proj != "down_proj" else ""
    grad_a = torch_params[f"{prefix}.lora_A.default.weight"].grad.numpy()
    grad_b = torch_params[f"{prefix}.lora_B.default.weight"].grad.numpy()
    grad_a = grad_a.reshape(experts, RANK, -1)
    grad_b = grad_b.reshape(grad_b.shape[0], RANK, experts).transpose(2, 0, 1)
    f = MOE["moe_intermediate_size"]
    if proj == "down_proj":
      ours_a, theirs_b = grads[a_path][layer], grad_b
    else:
      other = a_path.replace(proj, "up_proj" if proj == "gate_proj" else "gate_proj")
      ours_a = grads[a_path][layer] + grads[other][layer]
      theirs_b = grad_b[:, :f] if proj == "gate_proj" else grad_b[:, f:]
    np.testing.assert_allclose(ours_a.transpose(0, 2, 1), grad_a, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(grads[b_path][layer].transpose(0, 2, 1), theirs_b, atol=2e-5,
                               rtol=1e-4)
  return layers


def test_qwen3_init_from_peft_gives_peft_logits_loss_and_gradients(qwen3):
  _check_parity(qwen3, _lora_cfg(), QWEN3["vocab_size"])


@pytest.mark.slow
def test_qwen3_moe_init_from_peft_gives_peft_logits_loss_and_gradients(qwen3_moe):
  """Attention adapters only (the expert adapters: the tests below)."""
  _check_parity(qwen3_moe, _lora_cfg(ATTENTION_TARGETS), MOE["vocab_size"])


@pytest.mark.slow
def test_qwen3_moe_init_from_peft_expert_adapter_gives_peft_logits_loss_and_gradients(
    qwen3_moe_experts):
  """peft's LoRA on the fused expert parameters (target_parameters, gate_up of rank r: gate
  and up share A) read into our per-expert adapters; the config check accepts it."""
  _, base_dir, adapter_dir = qwen3_moe_experts
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    assert sorted(json.load(f)["target_parameters"]) == sorted(FUSED_PARAMETERS)
  cfg = presets.from_hf(base_dir)
  adapted = lora.lora_targets(models.family(cfg.type), cfg, lora.DEFAULT_LORA_TARGETS)
  peft_io.check_adapter_config(adapter_dir, models.family(cfg.type).hf_weight_map(cfg), adapted,
                               rank=RANK, alpha=ALPHA)
  _check_parity(qwen3_moe_experts, _lora_cfg(), MOE["vocab_size"])


def test_qwen3_moe_exported_expert_adapter_in_peft_equals_merged_export(qwen3_moe, tmp_path):
  """Our expert adapters written as peft's fused-parameter LoRA (gate_up of rank 2r =
  blockdiag, alpha 2 alpha) load in peft onto transformers' model with the merged export's
  logits, and read back through lora.init_from (and its config check) unchanged."""
  _, base_dir, _ = qwen3_moe
  cfg, model, adapters, table, params = _random_expert_adapters(base_dir, seed=7)
  out = peft_io.write_adapter(model, table, adapters, str(tmp_path / "adapter"), rank=RANK,
                              alpha=ALPHA, base_model_name_or_path=base_dir)
  with open(os.path.join(out, "adapter_config.json")) as f:
    config = json.load(f)
  assert config["target_parameters"] == sorted(FUSED_PARAMETERS)
  assert config["target_modules"] == sorted(ATTENTION)
  assert (config["rank_pattern"], config["alpha_pattern"]) == ({"gate_up_proj": 2 * RANK},
                                                                {"gate_up_proj": 2 * ALPHA})
  written = load_file(os.path.join(out, "adapter_model.safetensors"))
  e, d, f = MOE["num_experts"], MOE["hidden_size"], MOE["moe_intermediate_size"]
  prefix = "base_model.model.model.layers.1.mlp.experts"
  assert written[prefix + ".base_layer.lora_A.weight"].shape == (e * 2 * RANK, d)
  assert written[prefix + ".base_layer.lora_B.weight"].shape == (2 * f, 2 * RANK * e)
  assert written[prefix + ".lora_A.weight"].shape == (e * RANK, f)
  assert written[prefix + ".lora_B.weight"].shape == (d, RANK * e)
  assert not any(".experts.0." in name for name in written)

  merged = models.export_hf(model, cfg, str(tmp_path / "merged"), dtype="float32",
                            adapters=adapters, scale=ALPHA / RANK)
  ids = torch.from_numpy(_ids(MOE["vocab_size"], seed=3)[None]).long()
  base = transformers.Qwen3MoeForCausalLM.from_pretrained(base_dir).eval()
  _assert_peft_gives_the_merged_logits(base, out, merged, ids)

  adapted = tuple(adapters)
  peft_io.check_adapter_config(out, table, adapted, rank=RANK, alpha=ALPHA)
  _check_read_back(cfg, base_dir, out, table, adapters, params)


@pytest.mark.slow
def test_qwen3_moe_fused_gate_up_that_is_not_two_adapters_is_named(qwen3_moe, tmp_path):
  """A gate_up_proj adapter of rank 2r whose B is not block-diagonal is not a pair of rank-r
  gate / up adapters: lora.init_from names it."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  _, base_dir, _ = qwen3_moe
  cfg, model, adapters, table, _ = _random_expert_adapters(base_dir, seed=9)
  out = peft_io.write_adapter(model, table, adapters, str(tmp_path / "adapter"), rank=RANK,
                              alpha=ALPHA)
  path = os.path.join(out, "adapter_model.safetensors")
  tensors = load_file(path)
  tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight"][0, -1] = 1.0
  save_file(tensors, path)
  with pytest.raises(peft_io.AdapterError, match=r"layers\.0\.mlp\.experts\.base_layer\.lora_B"
                     r".*not block-diagonal"):
    peft_io.read_adapter(models.load_hf_weights(_build(cfg), base_dir), out, table, adapters)


def _random_expert_adapters(base_dir, seed):
  """(cfg, our model with random non-zero A and B on every default target, adapters, table,
  flat params)."""
  from jaxtune.hf.weights import flat_params  # pylint: disable=import-outside-toplevel
  cfg = presets.from_hf(base_dir)
  lora_cfg = _lora_cfg()
  adapters = _adapter_map(cfg, lora_cfg)
  assert any(not p.endswith(".kernel") for p in adapters)  # the experts are adapted
  table = models.family(cfg.type).hf_weight_map(cfg)
  model = models.load_hf_weights(_build(cfg), base_dir)
  params, rng = flat_params(model), np.random.default_rng(seed)
  for pair in adapters.values():
    for path in pair:
      value = params[path].get_value()
      params[path].set_value(jax.device_put(
          rng.normal(0, 0.2, value.shape).astype(np.float32), value.sharding))
  return cfg, model, adapters, table, params


def _build(cfg):
  return models.abstract_model(cfg, _mesh(), param_dtype="float32", compute_dtype="float32",
                               lora=_lora_cfg())


def _check_read_back(cfg, base_dir, adapter_dir, table, adapters, params):
  from jaxtune.hf.weights import flat_params  # pylint: disable=import-outside-toplevel
  again = models.load_hf_weights(_build(cfg), base_dir)
  peft_io.read_adapter(again, adapter_dir, table, adapters)
  params_again = flat_params(again)
  for pair in adapters.values():
    for path in pair:
      np.testing.assert_allclose(np.asarray(params_again[path].get_value()),
                                 np.asarray(params[path].get_value()), rtol=1e-6, atol=1e-7)


def test_exported_adapter_in_peft_equals_merged_export_in_transformers(qwen3, tmp_path):
  peft_model, base_dir, adapter_dir = qwen3
  lora_cfg = _lora_cfg()
  cfg, model, adapters = _our_model(base_dir, adapter_dir, lora_cfg)
  table = models.family(cfg.type).hf_weight_map(cfg)
  ours = peft_io.write_adapter(model, table, adapters, str(tmp_path / "adapter"), rank=RANK,
                               alpha=ALPHA, base_model_name_or_path=base_dir)
  merged = models.export_hf(model, cfg, str(tmp_path / "merged"), dtype="float32",
                            adapters=adapters, scale=ALPHA / RANK)
  # The same names, shapes and values as peft's own file.
  theirs = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  written = load_file(os.path.join(ours, "adapter_model.safetensors"))
  assert sorted(written) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(written[name], value)
  with open(os.path.join(ours, "adapter_config.json")) as f:
    config = json.load(f)
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, 8)
  assert config["base_model_name_or_path"] == base_dir
  assert sorted(config["target_modules"]) == sorted(peft_io.PROJECTIONS)

  ids = torch.from_numpy(_ids(QWEN3["vocab_size"], seed=3)[None]).long()
  base = transformers.Qwen3ForCausalLM.from_pretrained(base_dir).eval()
  _assert_peft_gives_the_merged_logits(base, ours, merged, ids)

  source = load_file(os.path.join(base_dir, "model.safetensors"))
  exported = {}
  for name in os.listdir(merged):
    if name.endswith(".safetensors"):
      exported.update(load_file(os.path.join(merged, name)))
  assert sorted(exported) == sorted(source)
  adapted = [n for n in source if any(f".{p}." in n for p in peft_io.PROJECTIONS)]
  assert len(adapted) == 7 * QWEN3["num_hidden_layers"]
  for name, value in source.items():
    if name not in adapted:
      assert exported[name].tobytes() == value.tobytes(), name
    else:
      assert not np.array_equal(exported[name], value), name


def test_adapter_config_check_names_the_difference(qwen3, tmp_path):
  _, base_dir, adapter_dir = qwen3
  cfg = presets.from_hf(base_dir)
  table = models.family(cfg.type).hf_weight_map(cfg)

  def check(directory, lora_cfg):
    adapted = lora.lora_targets(models.family(cfg.type), cfg, tuple(lora_cfg.targets))
    peft_io.check_adapter_config(directory, table, adapted, rank=lora_cfg.rank,
                                 alpha=lora_cfg.alpha)

  check(adapter_dir, _lora_cfg())  # the seven projections = the default targets
  with pytest.raises(peft_io.AdapterError, match=r"r=4, the recipe lora.rank=8.*rank=4"):
    check(adapter_dir, _lora_cfg(rank=8))
  with pytest.raises(peft_io.AdapterError, match=r"lora_alpha=8.*lora.alpha=16"):
    check(adapter_dir, _lora_cfg(alpha=16.0))
  with pytest.raises(peft_io.AdapterError, match=r"only the adapter adapts .*mlp\.down_proj"):
    check(adapter_dir, _lora_cfg(ATTENTION_TARGETS))
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
  narrow = tmp_path / "narrow"
  os.makedirs(narrow)
  with open(narrow / "adapter_config.json", "w") as f:
    json.dump({**config, "target_modules": ["q_proj", "v_proj"]}, f)
  with pytest.raises(peft_io.AdapterError, match=r"only the recipe adapts .*k_proj"):
    check(str(narrow), _lora_cfg())
  with pytest.raises(peft_io.AdapterError, match="no adapter_config.json"):
    check(str(tmp_path), _lora_cfg())


def test_init_from_with_missing_tensors_is_named(qwen3, tmp_path):
  _, base_dir, adapter_dir = qwen3
  with pytest.raises(peft_io.AdapterError, match=r"holds 12 tensors the model's adapters do not"):
    _our_model(base_dir, adapter_dir, _lora_cfg(ATTENTION_TARGETS))


def test_recipe_validation_checks_lora_init_from(qwen3):
  """config.validate's LoRA check reads lora.init_from's adapter_config.json."""
  from jaxtune import config as config_lib  # pylint: disable=import-outside-toplevel
  _, base_dir, adapter_dir = qwen3
  cfg = config_lib.base_config()
  cfg.model = presets.from_hf(base_dir)
  cfg.lora.rank, cfg.lora.alpha, cfg.lora.init_from = RANK, ALPHA, adapter_dir
  config_lib._check_lora(cfg)  # pylint: disable=protected-access
  cfg.lora.rank = 16
  with pytest.raises(config_lib.ConfigError, match=r"lora.init_from=.*r=4.*--config.lora.rank=4"):
    config_lib._check_lora(cfg)  # pylint: disable=protected-access


@pytest.mark.slow
def test_qwen3_moe_per_expert_adapter_reads_and_merge_is_per_expert(qwen3_moe, tmp_path):
  """An adapter in transformers 4's per-expert module names (jaxtune's earlier export; peft
  converts it on load too) still reads through lora.init_from; the merged export's expert
  weights are W_e + alpha/r B_e A_e."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  _, base_dir, _ = qwen3_moe
  cfg, model, adapters, table, params = _random_expert_adapters(base_dir, seed=5)
  legacy = {}
  for entry in peft_io.adapted_rows(table, adapters):
    a_path, b_path = adapters[entry.paths[0]]
    a, b = (np.asarray(params[p].get_value()) for p in (a_path, b_path))
    names = peft_io._names(entry, a.shape[:len(entry.indices)])  # pylint: disable=protected-access
    for a_name, b_name, position in names:
      legacy[a_name], legacy[b_name] = a[position].T.copy(), b[position].T.copy()
  out = tmp_path / "legacy"
  os.makedirs(out)
  save_file(legacy, str(out / "adapter_model.safetensors"))
  config = peft_io.adapter_config(table, {p: v for p, v in adapters.items()
                                          if p.endswith(".kernel")}, rank=RANK, alpha=ALPHA)
  config["target_modules"] = list(peft_io.PROJECTIONS)
  with open(out / "adapter_config.json", "w") as f:
    json.dump(config, f)
  peft_io.check_adapter_config(str(out), table, tuple(adapters), rank=RANK, alpha=ALPHA)
  _check_read_back(cfg, base_dir, str(out), table, adapters, params)

  merged = _tensors_of(models.export_hf(model, cfg, str(tmp_path / "merged"), dtype="float32",
                                        adapters=adapters, scale=ALPHA / RANK))
  base = _tensors_of(base_dir)
  assert sorted(merged) == sorted(base)
  for hf_name, value in base.items():
    module = "base_model.model." + hf_name.removesuffix(".weight")
    if module + ".lora_A.weight" in legacy:
      delta = legacy[module + ".lora_B.weight"] @ legacy[module + ".lora_A.weight"]
      np.testing.assert_allclose(merged[hf_name], value + ALPHA / RANK * delta, atol=1e-5,
                                 err_msg=hf_name)
    else:
      assert merged[hf_name].tobytes() == value.tobytes(), hf_name


def _tensors_of(directory) -> dict:
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  return out


def _assert_peft_gives_the_merged_logits(base, adapter_dir, merged_dir, ids):
  """peft's base + adapter and transformers' merged export: the same logits, not the base's."""
  with torch.no_grad():
    base_logits = base(ids).logits.numpy()
  loaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()  # wraps `base` in place
  merged_model = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
  with torch.no_grad():
    via_peft = loaded(ids).logits.numpy()
    via_merged = merged_model(ids).logits.numpy()
  np.testing.assert_allclose(via_merged, via_peft, atol=1e-4, rtol=1e-4)
  assert np.abs(via_merged - base_logits).max() > 1e-2  # LoRA counts
