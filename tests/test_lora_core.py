"""LoRA core (jaxtune.models.lora): adapters attached by path to every family, checked against
independent references: the base model itself (B = 0), the base model with merged kernels
W + A @ B * alpha / r (random A, B), the frozen base through a real train step, the targets'
selection and errors, and the adapters' shardings on a simulated mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune import config, models
from jaxtune.models import lora, presets
from jaxtune.parallel import batch_sharding, make_mesh
from jaxtune.parallel.sharding import param_shardings
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step

QWEN3 = presets.qwen3_tiny(vocab_size=256, hidden_size=32, intermediate_size=96, head_dim=8)
MOE = presets.qwen3_moe_tiny(vocab_size=256)
ROWS, LENGTH = 2, 16
F32 = dict(param_dtype="float32", compute_dtype="float32", remat="none", attention="xla")


def _lora(rank=4, alpha=8.0, **kw):
  cfg = config.base_config().lora
  cfg.rank, cfg.alpha = rank, alpha
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def _mesh():
  return make_mesh({}, jax.devices()[:1])


def _flat(model, kind=nnx.Param):
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def _batch(vocab, rows=ROWS, length=LENGTH, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, min(vocab, 256), (rows, length)).astype(np.int32)
  seg = np.ones_like(ids)
  seg[:, length - 3:] = 0  # some padding
  return dict(input_ids=ids, labels=np.roll(ids, -1, axis=1), segment_ids=seg,
              positions=np.tile(np.arange(length, dtype=np.int32), (rows, 1)))


def _hidden(model, batch):
  return np.asarray(model.forward({k: jnp.asarray(v) for k, v in batch.items()}).hidden)


def _randomise_adapters(model, seed=3):
  """Non-zero A and B (B is zero at init)."""
  rng = np.random.default_rng(seed)
  for path, var in _flat(model, lora.LoRAParam).items():
    del path
    shape = var.get_value().shape
    var.set_value(jnp.asarray(rng.normal(0, 0.2, shape), jnp.float32))


def _vocab(cfg):
  return cfg.text.vocab_size if "text" in cfg else cfg.vocab_size


# Qwen3-MoE and Intern-S1 take ~10 s each here: the fast subset (-m "not slow") runs Qwen3's.
CASES = [QWEN3, pytest.param(MOE, marks=pytest.mark.slow),
         pytest.param(presets.intern_s1_tiny(), marks=pytest.mark.slow)]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.type)
def test_zero_b_gives_the_base_model_exactly(cfg):
  with jax.set_mesh(_mesh()):
    base = models.create_model(cfg, _mesh(), seed=1, **F32)
    adapted = models.create_model(cfg, _mesh(), seed=1, lora=_lora(), **F32)
  batch = _batch(_vocab(cfg))
  np.testing.assert_array_equal(_hidden(adapted, batch), _hidden(base, batch))
  # Every base param is the base model's (the adapters sit beside them).
  base_params, adapted_params = _flat(base), _flat(adapted)
  for path, var in base_params.items():
    np.testing.assert_array_equal(adapted_params[path].get_value(), var.get_value())
  assert set(adapted_params) - set(base_params) == set(_flat(adapted, lora.LoRAParam))


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: c.type)
def test_adapters_equal_the_merged_kernels(cfg):
  """The naive reference: the base model with each targeted kernel W + A @ B * alpha / r."""
  spec = _lora(rank=3, alpha=6.0)
  with jax.set_mesh(_mesh()):
    base = models.create_model(cfg, _mesh(), seed=1, **F32)
    adapted = models.create_model(cfg, _mesh(), seed=1, lora=spec, **F32)
  _randomise_adapters(adapted)
  targets = lora.lora_targets(models.family(cfg.type), cfg, spec.targets)
  assert targets and not any("vision" in t or "projector" in t for t in targets)
  if cfg.type == "qwen3_moe":
    assert "model.layers.mlp.experts.up_proj" in targets
  adapters = _flat(adapted, lora.LoRAParam)
  base_params = _flat(base)
  for path in targets:
    a_path, b_path = lora.adapter_paths(path)
    a, b = (np.asarray(adapters[p].get_value(), np.float64) for p in (a_path, b_path))
    w = np.asarray(base_params[path].get_value(), np.float64)
    merged = w + np.einsum("...ir,...ro->...io", a, b) * spec.alpha / spec.rank
    base_params[path].set_value(jnp.asarray(merged, jnp.float32))
  batch = _batch(_vocab(cfg))
  got, want = _hidden(adapted, batch), _hidden(base, batch)
  assert np.abs(want - _hidden(models.create_model(cfg, _mesh(), seed=1, **F32), batch)).max() \
      > 1e-3  # the adapters change the output
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


# --- training: only the adapters move -------------------------------------------------------

def _setup(cfg, mesh, spec, loss_cfg):
  optimizer = optax.adamw(1.0, weight_decay=0.5)  # decay would move a frozen param
  with jax.set_mesh(mesh):
    model = models.create_model(cfg, mesh, seed=1, lora=spec, **F32)
    if spec is not None and spec.rank:
      _randomise_adapters(model)
    model_def, params = split_model(model)
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=loss_cfg,
                              optimizer=optimizer, schedule=optax.constant_schedule(1e-2),
                              num_micro=1, batch_layout=models.text_batch_layout(ROWS, LENGTH),
                              batch_sharding=batch_sharding(mesh))
  return state, step


def _global(batch, mesh):
  return {k: to_global_array(v, batch_sharding(mesh)) for k, v in batch.items()}


def _state_flat(params):
  return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


@pytest.fixture
def loss_cfg():
  cfg = config.base_config().loss
  cfg.chunk_size = 16
  return cfg


@pytest.mark.slow
@pytest.mark.parametrize("cfg", [QWEN3, MOE], ids=lambda c: c.type)
def test_a_step_moves_only_the_adapters(cfg, loss_cfg):
  mesh = _mesh()
  state, step = _setup(cfg, mesh, _lora(), loss_cfg)
  before = _state_flat(state.params)
  opt_leaves = jax.tree.leaves(state.opt_state)
  adapter_count = sum(v.size for k, v in before.items() if "lora_" in k)
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * adapter_count  # Adam's mu and nu
  with jax.set_mesh(mesh):
    for _ in range(2):
      state, out = step(state, _global(_batch(_vocab(cfg)), mesh))
  assert np.isfinite(float(out["loss"]))
  after = _state_flat(state.params)
  for name, value in before.items():
    if "lora_" in name:
      assert np.abs(after[name] - value).max() > 0, name
    else:
      np.testing.assert_array_equal(after[name], value, err_msg=name)  # bit-identical


@pytest.mark.slow
def test_the_step_arguments_shrink_by_the_base_optimizer_state(loss_cfg):
  mesh = _mesh()

  def analysis(spec):
    state, step = _setup(QWEN3, mesh, spec, loss_cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    batch = {k: jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32, sharding=batch_sharding(mesh))
             for k in models.text_batch_layout(ROWS, LENGTH)}
    with jax.set_mesh(mesh):
      return step.lower(abstract, batch).compile().memory_analysis(), state

  full, full_state = analysis(None)
  adapted, lora_state = analysis(_lora())
  base = sum(v.size for v in _state_flat(full_state.params).values())
  adapters = sum(v.size for k, v in _state_flat(lora_state.params).items() if "lora_" in k)
  # float32 base either way (compute float32 here): the base's Adam moments (8 bytes a param)
  # go, the adapters add their own value and two moments (12 bytes a param).
  assert (full.argument_size_in_bytes - adapted.argument_size_in_bytes
          == 8 * base - 12 * adapters)


def test_the_frozen_base_is_stored_in_the_compute_dtype():
  with jax.set_mesh(_mesh()):
    model = models.abstract_model(QWEN3, _mesh(), param_dtype="float32",
                                  compute_dtype="bfloat16", lora=_lora())
  for path, var in _flat(model).items():
    want = jnp.float32 if isinstance(var, lora.LoRAParam) else jnp.bfloat16
    assert var.get_value().dtype == want, path


# --- dropout ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_dropout_is_deterministic_per_batch_and_changes_the_output():
  batch = _batch(QWEN3.vocab_size)
  outs = {}
  for rate in (0.0, 0.3):
    with jax.set_mesh(_mesh()):
      model = models.create_model(QWEN3, _mesh(), seed=1, lora=_lora(dropout=rate), **F32)
    _randomise_adapters(model)
    outs[rate] = _hidden(model, batch)
    np.testing.assert_array_equal(_hidden(model, batch), outs[rate])  # same data, same masks
    if rate:
      other = _hidden(model, _batch(QWEN3.vocab_size, seed=1))
      assert np.isfinite(other).all()
      lora.set_deterministic(model, True)
      np.testing.assert_array_equal(_hidden(model, batch), outs[0.0])
  assert np.abs(outs[0.3] - outs[0.0]).max() > 1e-3


# --- the targets -----------------------------------------------------------------------------

def test_default_targets_choose_the_language_model_projections():
  family = models.family("intern_s1")
  cfg = presets.intern_s1_tiny()
  names = lora.linear_modules(family, cfg)
  chosen = lora.lora_targets(family, cfg, lora.DEFAULT_LORA_TARGETS)
  assert any("vision_tower" in p for p in names)  # there are vision linears to leave alone
  assert sorted(p.split(".")[-2] for p in chosen) == sorted(
      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
  assert all(p.startswith("language_model.") for p in chosen)
  assert names["language_model.model.layers.self_attn.q_proj.kernel"][0] == \
      "model.language_model.layers.0.self_attn.q_proj"
  moe = lora.linear_modules(models.family("qwen3_moe"), MOE)
  assert "model.layers.1.mlp.experts.7.up_proj" not in moe["model.layers.mlp.experts.up_proj"]
  assert "model.layers.2.mlp.experts.7.up_proj" in moe["model.layers.mlp.experts.up_proj"]
  assert "model.layers.mlp.gate.kernel" not in moe  # the router reads its kernel itself


def test_target_errors_name_the_problem():
  family = models.family("qwen3")
  assert lora.lora_targets(family, QWEN3, (r"q_proj$",)) == (
      "model.layers.self_attn.q_proj.kernel",)
  with pytest.raises(ValueError, match=r"matches model.layers.0.self_attn.q_proj but not "
                                       r"model.layers.1.self_attn.q_proj"):
    lora.lora_targets(family, QWEN3, (r"layers\.0\.self_attn\.q_proj",))
  with pytest.raises(ValueError, match=r"'\(q' is not a regular expression"):
    lora.lora_targets(family, QWEN3, ("(q",))
  with pytest.raises(ValueError, match="match no linear.*model.layers.0.self_attn.q_proj"):
    lora.check_targets(family, QWEN3, ("vision",))


def _recipe(**lora_keys):
  cfg = config.base_config()
  cfg.model = QWEN3
  cfg.total_steps = 1
  for k, v in lora_keys.items():
    cfg.lora[k] = v
  return cfg


@pytest.mark.parametrize("keys,message", [
    (dict(rank=-1), "lora.rank"),
    (dict(rank=4, alpha=0.0), "lora.alpha"),
    (dict(rank=4, dropout=1.0), "lora.dropout"),
    (dict(rank=4, quantize_base="fp4"), "lora.quantize_base"),
    (dict(rank=4, targets=("[",)), r"lora.targets entry '\['"),
    (dict(rank=4, targets=("lm_head",)), "match no linear"),
])
def test_validate_names_the_bad_lora_key(keys, message):
  with pytest.raises(config.ConfigError, match=message):
    config.validate(_recipe(**keys), files=False)


def test_validate_accepts_lora_and_resolve_passes_it_to_the_model():
  cfg = config.validate(_recipe(rank=8), files=False)
  assert cfg.lora.rank == 8
  assert config.validate(_recipe(), files=False).lora.rank == 0
  resolved = config.resolve(_recipe(rank=8), 1, files=False)
  assert resolved.model_kwargs["lora"].rank == 8
  assert config.resolve(_recipe(), 1, files=False).model_kwargs["lora"] is None


def test_moe_expert_adapters_refuse_dropout():
  with pytest.raises(config.ConfigError, match="expert adapters"):
    cfg = _recipe(rank=4, dropout=0.1)
    cfg.model = MOE
    config.validate(cfg, files=False)


# --- sharding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [QWEN3, MOE], ids=lambda c: c.type)
def test_adapters_shard_with_their_base(cfg):
  mesh = make_mesh({"fsdp": 2, "tensor": 2})
  spec = _lora(rank=4)
  with jax.set_mesh(mesh):
    model = models.abstract_model(cfg, mesh, lora=spec, **F32)
  shardings = {".".join(map(str, p)): v.get_value().spec
               for p, v in nnx.to_flat_state(param_shardings(nnx.state(model, nnx.Param), mesh))}
  split_any = False
  for path in lora.lora_targets(models.family(cfg.type), cfg, spec.targets):
    base = tuple(shardings[path])
    base = base + (None,) * (len(_flat(model)[path].get_value().shape) - len(base))
    a_path, b_path = lora.adapter_paths(path)
    a, b = tuple(shardings[a_path]), tuple(shardings[b_path])
    a, b = a + (None,) * (len(base) - len(a)), b + (None,) * (len(base) - len(b))
    assert a == base[:-1] + (None,), (path, a, base)
    assert b == base[:-2] + (None, base[-1]), (path, b, base)
    split_any = split_any or any(x is not None for x in base)
  assert split_any


@pytest.mark.slow
def test_load_hf_weights_fills_the_base_and_inits_the_adapters(tmp_path):
  from jaxtune.hf import export  # pylint: disable=import-outside-toplevel
  mesh = _mesh()
  with jax.set_mesh(mesh):
    source = models.create_model(QWEN3, mesh, seed=5, **F32)
    models.export_hf(source, QWEN3, str(tmp_path), dtype="float32")
    abstract = models.abstract_model(QWEN3, mesh, seed=1, lora=_lora(), **F32)
    loaded = models.load_hf_weights(abstract, str(tmp_path), seed=1)
    fresh = models.create_model(QWEN3, mesh, seed=1, lora=_lora(), **F32)
  del export
  got, src, new = _flat(loaded), _flat(source), _flat(fresh)
  for path, var in got.items():
    want = new[path] if isinstance(var, lora.LoRAParam) else src[path]
    np.testing.assert_array_equal(var.get_value(), want.get_value(), err_msg=path)
