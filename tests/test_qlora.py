"""QLoRA (`lora.quantize_base`): the frozen base of the adapted linears stored quantised in the
param state (`lora.QuantizedBase`), dequantised in the matmul. The forward equals the float
LoRA model holding the dequantised kernels bit for bit (dense and MoE experts), training moves
only the adapters and lowers the loss, loading replaces the float kernels and quantises them
again, and the base costs nf4 0.5625 / int8 1.0625 bytes per param against bf16's 2."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune import models
from jaxtune.config import base_config
from jaxtune.models import lora, presets
from jaxtune.ops import quant
from jaxtune.parallel import batch_sharding, make_mesh
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step

CFG = presets.qwen3_tiny(vocab_size=256)
MOE_CFG = presets.qwen3_moe_tiny(vocab_size=256)
ROWS, LENGTH = 4, 32


def _lora(kind, rank=4):
  cfg = base_config().lora
  cfg.rank, cfg.quantize_base = rank, kind
  return cfg


def _model(kind, mesh, model_cfg=CFG, targets=None):
  lora_cfg = _lora(kind)
  if targets is not None:
    lora_cfg.targets = targets
  with jax.set_mesh(mesh):
    return models.create_model(model_cfg, mesh, param_dtype="float32", compute_dtype="bfloat16",
                               remat="none", attention="xla", seed=1, lora=lora_cfg)


def _flat(model, kind=nnx.Param):
  return {".".join(map(str, p)): v.get_value()
          for p, v in nnx.to_flat_state(nnx.state(model, kind))}


def _inputs():
  ids = np.random.default_rng(0).integers(0, CFG.vocab_size, (ROWS, LENGTH)).astype(np.int32)
  return dict(input_ids=ids, labels=np.roll(ids, -1, axis=1), segment_ids=np.ones_like(ids),
              positions=np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1)))


def _randomise_b(model, seed=2):
  """Non-zero B (PEFT's init has B = 0), so the adapters take part in the forward."""
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, lora.LoRAParam))):
    value = var.get_value()
    noise = jax.random.normal(jax.random.key(seed + i), value.shape, value.dtype) * 0.05
    var.set_value(value + noise)


def _dequantized_float_twin(q_model, kind, mesh, model_cfg=CFG, targets=None):
  """The plain LoRA model (same seed: same adapters) whose base kernels are set to the
  quantised model's, dequantised by hand in the base dtype."""
  f_model = _model("none", mesh, model_cfg, targets)
  codes = {k[:-len("_codes")]: v for k, v in _flat(q_model, lora.QuantizedBase).items()
           if k.endswith("_codes")}
  f_params = dict(nnx.to_flat_state(nnx.state(f_model, nnx.Param)))
  assert codes
  for base, c in codes.items():
    scales = _flat(q_model, lora.QuantizedBase)[base + "_scales"]
    var = f_params[tuple(int(p) if p.isdigit() else p for p in base.split("."))]
    block = var.get_value().shape[-2] // scales.shape[-2]
    deq = quant.dequantize(quant.QuantizedTensor(c, scales, kind, block), var.get_value().dtype)
    var.set_value(deq)
  # The same adapters in both (non-zero B).
  q_adapters = dict(nnx.to_flat_state(nnx.state(q_model, lora.LoRAParam)))
  for path, var in nnx.to_flat_state(nnx.state(f_model, lora.LoRAParam)):
    var.set_value(q_adapters[path].get_value())
  return f_model


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_forward_equals_float_model_with_dequantized_kernels(kind):
  mesh = make_mesh({}, jax.devices()[:1])
  q_model = _model(kind, mesh)
  _randomise_b(q_model)
  f_model = _dequantized_float_twin(q_model, kind, mesh)
  batch = {k: jnp.asarray(v) for k, v in _inputs().items()}
  q_out = jax.jit(lambda m, b: m.forward(b).hidden)(q_model, batch)
  f_out = jax.jit(lambda m, b: m.forward(b).hidden)(f_model, batch)
  np.testing.assert_array_equal(np.asarray(q_out, np.float32), np.asarray(f_out, np.float32))
  # Seven projections per layer, each quantised; nothing else is.
  q_vars = _flat(q_model, lora.QuantizedBase)
  assert len(q_vars) == 2 * 7
  assert {v.dtype for k, v in q_vars.items() if k.endswith("_codes")} == {
      jnp.dtype(jnp.uint8 if kind == "nf4" else jnp.int8)}


@pytest.mark.slow
def test_moe_experts_dequantize_in_the_grouped_matmul():
  mesh = make_mesh({}, jax.devices()[:1])
  q_model = _model("nf4", mesh, MOE_CFG)
  q_vars = _flat(q_model, lora.QuantizedBase)
  assert any(k.endswith("experts.gate_proj_codes") for k in q_vars), sorted(q_vars)
  _randomise_b(q_model)
  f_model = _dequantized_float_twin(q_model, "nf4", mesh, MOE_CFG)
  batch = {k: jnp.asarray(v) for k, v in _inputs().items()}
  q_out = jax.jit(lambda m, b: m.forward(b).hidden)(q_model, batch)
  f_out = jax.jit(lambda m, b: m.forward(b).hidden)(f_model, batch)
  np.testing.assert_array_equal(np.asarray(q_out, np.float32), np.asarray(f_out, np.float32))


def test_base_bytes():
  """nf4: 0.5 byte/param of codes + a float32 scale per 64 params = 0.28125 of bf16."""
  mesh = make_mesh({}, jax.devices()[:1])
  sizes = {}
  for kind in ("none", "nf4", "int8"):
    with jax.set_mesh(mesh):
      abstract = models.abstract_model(CFG, mesh, param_dtype="float32",
                                       compute_dtype="bfloat16", lora=_lora(kind))
    state = nnx.state(abstract, nnx.Param)
    flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}
    base = {k: v for k, v in flat.items() if "proj" in k and "lora" not in k}
    sizes[kind] = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in base.values())
  assert sizes["nf4"] / sizes["none"] == pytest.approx(0.5625 / 2)
  assert sizes["int8"] / sizes["none"] == pytest.approx(1.0625 / 2)
  # The concrete model holds the bytes the abstract one counts.
  q_model = _model("nf4", mesh)
  assert sum(v.nbytes for v in _flat(q_model, lora.QuantizedBase).values()) == sizes["nf4"]


def test_float_base_loads_and_quantises_again():
  """Inside `adapters_detached` (what HF loading uses) the base is its float kernel; a kernel
  replaced there (loaded) is quantised on exit, one left alone keeps its codes."""
  mesh = make_mesh({}, jax.devices()[:1])
  q_model = _model("nf4", mesh)
  before = _flat(q_model, lora.QuantizedBase)
  q_path = ("model", "layers", "self_attn", "q_proj", "kernel")
  new_kernel = jax.random.normal(jax.random.key(9), (2, 64, 64), jnp.bfloat16) * 0.02
  with lora.adapters_detached(q_model):
    params = dict(nnx.to_flat_state(nnx.state(q_model, nnx.Param)))
    assert not any(isinstance(v, (lora.QuantizedBase, lora.LoRAParam)) for v in params.values())
    kernel = params[q_path]
    assert kernel.get_value().dtype == jnp.bfloat16 and kernel.get_value().shape == (2, 64, 64)
    kernel.set_value(new_kernel)
  after = _flat(q_model, lora.QuantizedBase)
  expected = quant.quantize(new_kernel, "nf4")
  np.testing.assert_array_equal(after["model.layers.self_attn.q_proj.kernel_codes"],
                                expected.codes)
  np.testing.assert_array_equal(after["model.layers.self_attn.q_proj.kernel_scales"],
                                expected.scales)
  for name, value in before.items():
    if "q_proj" not in name:
      assert after[name] is value, name
  # Abstract models: the float kernel is abstract too, in its sharding.
  with jax.set_mesh(mesh):
    abstract = models.abstract_model(CFG, mesh, param_dtype="float32", lora=_lora("nf4"))
  with lora.adapters_detached(abstract):
    value = dict(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))[q_path].get_value()
    assert isinstance(value, jax.ShapeDtypeStruct) and value.shape == (2, 64, 64)
    assert value.sharding is not None
  assert "model.layers.self_attn.q_proj.kernel_codes" in _flat(abstract, lora.QuantizedBase)


@pytest.mark.slow
def test_hf_load_into_an_abstract_qlora_model(tmp_path):
  """HF weights fill the float kernels (`adapters_detached`), then each is quantised in the
  codes' sharding: the codes are those of the loaded kernel in the base dtype."""
  mesh = make_mesh({"fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh):
    f_model = models.create_model(CFG, mesh, param_dtype="float32", seed=3)
  models.export_hf(f_model, CFG, str(tmp_path))
  with jax.set_mesh(mesh):
    q_model = models.abstract_model(CFG, mesh, param_dtype="float32", lora=_lora("nf4"))
    models.load_hf_weights(q_model, str(tmp_path), seed=0)
  got = _flat(q_model, lora.QuantizedBase)
  for name in ("self_attn.q_proj", "mlp.down_proj"):
    kernel = _flat(f_model)[f"model.layers.{name}.kernel"].astype(jnp.bfloat16)
    codes = got[f"model.layers.{name}.kernel_codes"]
    assert isinstance(codes, jax.Array) and codes.sharding.spec != jax.sharding.PartitionSpec()
    expected = quant.quantize(kernel, "nf4").codes
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(expected))
  assert all(isinstance(v, jax.Array) for v in _flat(q_model).values())


@pytest.mark.slow
def test_qlora_steps_lower_the_loss_and_leave_the_base_alone():
  mesh = make_mesh({"fsdp": 2, "tensor": 2})
  q_model = _model("nf4", mesh)
  loss_cfg = base_config().loss
  loss_cfg.chunk_size = 32
  optimizer = optax.adam(1.0)
  with jax.set_mesh(mesh):
    model_def, params = split_model(q_model)
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=loss_cfg,
                              optimizer=optimizer, schedule=optax.constant_schedule(1e-2),
                              num_micro=1, batch_layout=models.text_batch_layout(ROWS, LENGTH),
                              batch_sharding=batch_sharding(mesh))
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert opt_paths and all("lora" in p for p in opt_paths if "proj" in p)
  assert not any("_codes" in p or "_scales" in p for p in opt_paths)
  base_before = {k: np.asarray(v) for k, v in _flat_state(state.params).items()
                 if k.endswith(("_codes", "_scales"))}
  batch = {k: to_global_array(v, batch_sharding(mesh)) for k, v in _inputs().items()}
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(6):
      state, out = step(state, batch)
      losses.append(float(out["loss"]))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.05, losses
  after = _flat_state(state.params)
  assert base_before
  for name, value in base_before.items():
    np.testing.assert_array_equal(np.asarray(after[name]), value, err_msg=name)


def _flat_state(params):
  return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(params)}
