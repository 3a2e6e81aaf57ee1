"""Qwen3-MoE against transformers' PyTorch `Qwen3MoeForCausalLM`: HF weights in, logits, the
balancing loss, export back, expert sharding, presets and the family interface in training."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.models import export_hf, load_hf_weights
from jaxtune.models import abstract_model, param_count, presets, qwen3_moe
from jaxtune.parallel import batch_sharding, make_mesh
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step

FIELDS = dict(vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
              num_experts=8, num_experts_per_tok=2, rope_theta=10_000.0,
              tie_word_embeddings=False)
VARIANTS = {
    # layer 1 dense (mlp_only_layers), routing weights renormalised over the top-k
    "renormalised_with_a_dense_layer": dict(norm_topk_prob=True, decoder_sparse_step=1,
                                            mlp_only_layers=[1]),
    # layers 1 and 3 sparse (decoder_sparse_step 2), raw softmax weights of the top-k
    "raw_weights_every_second_layer": dict(norm_topk_prob=False, decoder_sparse_step=2,
                                           mlp_only_layers=[]),
}


def _single_mesh():
  return make_mesh({}, jax.devices()[:1])


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def reference(request, tmp_path_factory):
  """(transformers model, its save_pretrained directory, our config read from it)."""
  torch.manual_seed(0)
  hf_cfg = transformers.Qwen3MoeConfig(**FIELDS, **VARIANTS[request.param])
  model = transformers.Qwen3MoeForCausalLM(hf_cfg).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.normal_(0.0, 0.3)
  path = tmp_path_factory.mktemp("moe") / request.param
  model.save_pretrained(path)
  return model, str(path), presets.from_hf(str(path))


def _rows(seed=0):
  """Two packed rows of 2 samples each plus padding: ids, positions, segment ids [2, 24]."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, FIELDS["vocab_size"], (2, 24)).astype(np.int32)
  segments = np.array([[1] * 10 + [2] * 11 + [0] * 3, [1] * 7 + [2] * 17], np.int32)
  positions = np.zeros_like(ids)
  for r in range(2):
    for s in (1, 2):
      idx = np.flatnonzero(segments[r] == s)
      positions[r, idx] = np.arange(len(idx))
  return ids, positions, segments


def _torch_sample(model, ids):
  """Logits and per-sparse-layer router logits of one unpacked sample."""
  with torch.no_grad():
    out = model(torch.from_numpy(ids[None]).long(), output_router_logits=True)
  return out.logits[0].numpy(), [r.numpy() for r in out.router_logits]


def _xtuner_balancing_loss(router_logits, num_experts, top_k):
  """XTuner's balancing loss written out in numpy: per layer E / (n k) * sum_e c_e * P_e over
  all valid tokens of the batch (c_e: top-k selections, P_e: mean softmax), summed over layers."""
  total = 0.0
  for logits in router_logits:
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1)[:, :top_k]
    counts = np.bincount(chosen.reshape(-1), minlength=num_experts)
    n = logits.shape[0]
    total += num_experts / (n * top_k) * np.sum(counts * probs.mean(0))
  return total


def _ours(cfg, path, mesh, ids, positions, segments):
  with jax.set_mesh(mesh):
    model = load_hf_weights(abstract_model(cfg, mesh, compute_dtype="float32"), path)
    sharding = batch_sharding(mesh)
    batch = {k: to_global_array(v, sharding) for k, v in
             dict(input_ids=ids, positions=positions, segment_ids=segments).items()}
    model_def, params = split_model(model)

    def run(params, batch):
      m = model_def.merge(params)
      out = m.forward(batch)
      return m.logits(out.hidden), out.aux_losses
    logits, aux = jax.jit(run)(params, batch)
  return np.asarray(logits), jax.tree.map(float, aux)


def test_from_hf_reads_every_field(reference):
  _, path, cfg = reference
  hf = transformers.AutoConfig.from_pretrained(path)
  assert cfg.type == "qwen3_moe"
  for field in cfg.keys():
    if field not in ("type", "router_z_loss_coef", "rope_theta", "rope_scaling"):
      expected = getattr(hf, field)
      assert cfg[field] == (tuple(expected) if isinstance(expected, list) else expected), field
  assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
  assert cfg.rope_scaling is None and hf.rope_parameters["rope_type"] == "default"


@pytest.mark.slow
def test_packed_logits_and_balancing_loss_match_transformers(reference):
  """Each packed sample's logits equal transformers' forward of that sample alone, and the
  balancing loss equals XTuner's formula over the router logits transformers computes."""
  torch_model, path, cfg = reference
  ids, positions, segments = _rows()
  logits, aux = _ours(cfg, path, _single_mesh(), ids, positions, segments)
  per_layer = None
  for r in range(2):
    for s in (1, 2):
      idx = np.flatnonzero(segments[r] == s)
      expected, router = _torch_sample(torch_model, ids[r, idx])
      np.testing.assert_allclose(logits[r, idx], expected, atol=1e-4, rtol=1e-4)
      per_layer = router if per_layer is None else [np.concatenate([a, b])
                                                    for a, b in zip(per_layer, router)]
  assert len(per_layer) == len(qwen3_moe.sparse_layer_ids(cfg))
  expected_aux = _xtuner_balancing_loss(per_layer, cfg.num_experts, cfg.num_experts_per_tok)
  np.testing.assert_allclose(aux["aux_loss"], expected_aux, rtol=1e-5)


@pytest.mark.slow
def test_expert_parallel_mesh_equals_one_device(reference):
  """Experts split over `expert` (2) and params over `fsdp` (2): the same logits and losses."""
  _, path, cfg = reference
  rows = [np.concatenate([a, a[::-1]]) for a in _rows(seed=1)]  # 4 rows: one per device
  single = _ours(cfg, path, _single_mesh(), *rows)
  sharded = _ours(cfg, path, make_mesh({"expert": 2, "fsdp": 2}), *rows)
  np.testing.assert_allclose(sharded[0], single[0], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(sharded[1]["aux_loss"], single[1]["aux_loss"], rtol=1e-5)


def test_export_has_hf_names_and_reloads_with_identical_logits(reference, tmp_path):
  torch_model, path, cfg = reference
  mesh = _single_mesh()
  with jax.set_mesh(mesh):
    model = load_hf_weights(abstract_model(cfg, mesh, compute_dtype="float32"), path)
    export_hf(model, cfg, str(tmp_path / "out"), dtype="float32")
  ours = {}
  for name in sorted(os.listdir(tmp_path / "out")):
    if name.endswith(".safetensors"):
      ours.update(load_file(str(tmp_path / "out" / name)))
  theirs = load_file(os.path.join(path, "model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for name, value in theirs.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert type(reloaded).__name__ == "Qwen3MoeForCausalLM"
  ids = _rows()[0][0]
  np.testing.assert_array_equal(_torch_sample(reloaded, ids)[0], _torch_sample(torch_model, ids)[0])
  assert presets.from_hf(str(tmp_path / "out")).to_dict() == cfg.to_dict()


def test_a_missing_expert_tensor_is_named(reference, tmp_path):
  _, path, cfg = reference
  tensors = load_file(os.path.join(path, "model.safetensors"))
  layer = qwen3_moe.sparse_layer_ids(cfg)[-1]
  missing = f"model.layers.{layer}.mlp.experts.5.up_proj.weight"
  del tensors[missing]
  os.makedirs(tmp_path / "broken")
  save_file(tensors, str(tmp_path / "broken" / "model.safetensors"), metadata={"format": "pt"})
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "broken")
  mesh = _single_mesh()
  with jax.set_mesh(mesh), pytest.raises(ValueError, match=f"tensor {missing} is missing"):
    load_hf_weights(abstract_model(cfg, mesh), str(tmp_path / "broken"))


# Model cards (huggingface.co/Qwen/<name>): total and activated parameters, billions.
PUBLISHED = {"qwen3_30b_a3b": (30.5, 3.3), "qwen3_235b_a22b": (235, 22)}


@pytest.mark.parametrize("name", sorted(PUBLISHED) + ["qwen3_moe_tiny"])
def test_presets_have_transformers_parameter_counts(name):
  cfg = getattr(presets, name)()
  fields = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()
            if k not in ("type", "router_z_loss_coef")}
  with torch.device("meta"):  # shapes only
    reference = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**fields))
  total = param_count(cfg)
  assert total == sum(p.numel() for p in reference.parameters())
  if name in PUBLISHED:
    sparse = len(qwen3_moe.sparse_layer_ids(cfg))
    idle_experts = cfg.num_experts - cfg.num_experts_per_tok
    active = total - sparse * idle_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    published_total, published_active = PUBLISHED[name]
    # The cards round loosely (30.53 B total, 3.35 B active is "30.5B, 3.3B activated").
    assert abs(total / 1e9 - published_total) <= 0.03 * published_total
    assert abs(active / 1e9 - published_active) <= 0.03 * published_active


def _train_step(cfg, mesh, params_seed=0):
  optimizer = optax.sgd(1.0)
  cfg_loss = config_lib.base_config().loss
  cfg_loss.chunk_size = 16
  with jax.set_mesh(mesh):
    model = models.create_model(cfg, mesh, param_dtype="float32", compute_dtype="float32",
                                remat="full", attention="xla", seed=params_seed)
    model_def, params = split_model(model)
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=cfg_loss,
                              optimizer=optimizer, schedule=optax.constant_schedule(1.0),
                              num_micro=1, batch_layout=models.text_batch_layout(4, 24),
                              batch_sharding=batch_sharding(mesh))
  return model_def, state, step


@pytest.mark.slow
def test_train_step_adds_the_aux_loss_to_the_objective_not_to_the_logged_loss():
  mesh = make_mesh({"expert": 2, "fsdp": 2})
  ids, positions, segments = _rows()
  ids = np.concatenate([ids, ids[::-1]])
  host = dict(input_ids=ids, positions=np.concatenate([positions, positions[::-1]]),
              segment_ids=np.concatenate([segments, segments[::-1]]))
  host["labels"] = np.where(host["segment_ids"] > 0, np.roll(ids, -1, axis=1), -100)
  outs, routers = {}, {}
  for coef in (0.0, 10.0):
    cfg = presets.qwen3_moe_tiny(vocab_size=FIELDS["vocab_size"], router_aux_loss_coef=coef)
    model_def, state, step = _train_step(cfg, mesh)
    with jax.set_mesh(mesh):
      batch = {k: to_global_array(v.astype(np.int32), batch_sharding(mesh))
               for k, v in host.items()}
      new_state, outs[coef] = step(state, batch)  # the same seed: the same initial params
    routers[coef] = np.asarray(new_state.params["model"]["layers"]["mlp"]["gate"]["kernel"][...])
  # The logged loss is the LM loss alone, whatever the coefficient.
  np.testing.assert_allclose(float(outs[10.0]["loss"]), float(outs[0.0]["loss"]), rtol=1e-6)
  aux = float(outs[0.0]["model"]["aux_loss"])
  assert aux > 0 and np.isclose(aux, float(outs[10.0]["model"]["aux_loss"]), rtol=1e-6)
  # ... but the router's update differs: the balancing loss is in the objective.
  assert np.abs(routers[10.0] - routers[0.0]).max() > 1e-4
  model = outs[0.0]["model"]
  valid = int((host["segment_ids"] > 0).sum())
  assert int(model["expert_load_max"]) >= valid * cfg.num_experts_per_tok / cfg.num_experts
  assert 0 <= int(model["expert_load_min"]) <= int(model["expert_load_max"])
  assert "z_loss" in model


@pytest.mark.slow
def test_a_tiny_moe_recipe_trains_from_hf_weights_to_an_hf_export(tmp_path):
  """The whole path: an HF directory transformers wrote -> `presets.from_hf` -> Trainer on the
  shipped chats -> metrics with the router losses -> an export transformers loads, whose
  logits equal ours from the same files."""
  from jaxtune import Trainer  # pylint: disable=import-outside-toplevel
  from jaxtune.recipes.qwen3_mini import get_config  # pylint: disable=import-outside-toplevel

  torch.manual_seed(1)
  fields = {**FIELDS, "vocab_size": 151936, "hidden_size": 64, "num_hidden_layers": 2,
            "mlp_only_layers": [], "norm_topk_prob": True}
  transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**fields)).save_pretrained(
      tmp_path / "hf")
  cfg = get_config()
  cfg.load_from = str(tmp_path / "hf")
  cfg.model = presets.from_hf(cfg.load_from)
  cfg.mesh.expert, cfg.mesh.fsdp = 2, -1
  cfg.work_dir = str(tmp_path / "work")
  cfg.data.pack_max_length = cfg.data.sample_max_length = 256
  cfg.progress_bar, cfg.epoch_num, cfg.total_steps = False, None, 6
  summary = Trainer(cfg).fit()

  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(summary["run_dir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 6
  for r in records:
    assert r["aux_loss"] > 0 and r["z_loss"] > 0 and np.isfinite(r["loss"])
    assert 0 <= r["expert_load_min"] <= r["expert_load_max"]
  assert np.mean([r["loss"] for r in records[-2:]]) < np.mean([r["loss"] for r in records[:2]])

  export = os.path.join(summary["run_dir"], "hf-latest")
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
  assert type(hf_model).__name__ == "Qwen3MoeForCausalLM"
  ids = np.array([[151644, 872, 198, 17, 10, 17, 30, 151645]], np.int32)
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(ids).long()).logits.numpy()
  mesh = _single_mesh()
  export_cfg = presets.from_hf(export)
  with jax.set_mesh(mesh):
    model = load_hf_weights(abstract_model(export_cfg, mesh, compute_dtype="float32"), export)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    logits = np.asarray(model.logits(model(ids, positions, np.ones_like(ids))))
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_the_30b_recipe_validates_with_its_preset(tmp_path):
  import importlib.util  # pylint: disable=import-outside-toplevel
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "recipe", os.path.join(repo, "configs", "sft_qwen3_30b_a3b.py"))
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  data = tmp_path / "d.jsonl"
  data.write_text('{"messages": [{"role": "user", "content": "a"}, '
                  '{"role": "assistant", "content": "b"}]}\n')
  cfg = recipe.get_config(str(data))
  cfg.tokenizer_path = str(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")     # validation reads only file names
  for gpus in (8, 16):  # one node; two nodes (expert 8 within a node, fsdp 2 across)
    checked = config_lib.validate(cfg, num_devices=gpus)
    assert config_lib.mesh_shape(checked, gpus) == dict(data=1, fsdp=gpus // 8, tensor=1,
                                                        expert=8, sequence=1)
  assert checked.model.to_dict() == presets.qwen3_30b_a3b().to_dict()
