"""Readable profiles: the model's blocks carry `jax.named_scope`s, so the lowered program (and
so a profiler trace) names each op by layer and block."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtune import models
from jaxtune.models import presets
from jaxtune.models.qwen3 import Qwen3ForCausalLM
from jaxtune.models.qwen3_moe import Qwen3MoeForCausalLM
from jaxtune.ops.loss import chunked_cross_entropy


def _scopes(model_class, cfg) -> set[str]:
  """The scope names in the op paths of the model's jitted loss gradient: `jvp(decoder)/while/
  body/layer/mlp/dot_general` gives decoder, layer, mlp (transformation wrappers dropped)."""
  text = _hlo(model_class, cfg)
  paths = [p for p in re.findall(r'loc\("([^"]*)"', text) if "/" in p]
  out = set()
  for path in paths:
    for part in path.split("/"):
      out.add(re.sub(r"^(?:\w+\()+|\)+$", "", part))
  return out


def _hlo(model_class, cfg) -> str:
  model = model_class(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32, remat="full",
                      attention="xla", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  ids = jnp.ones((1, 8), jnp.int32)
  pos = jnp.arange(8, dtype=jnp.int32)[None]

  def objective(state):
    m = nnx.merge(graphdef, state)
    hidden = m(ids, pos, jnp.ones_like(ids))
    return chunked_cross_entropy(hidden.reshape(8, -1), m.lm_head_kernel(), ids.reshape(-1),
                                 jnp.ones((8,), jnp.float32), chunk_size=4, impl="jax")
  return jax.jit(jax.grad(objective)).lower(state).as_text(debug_info=True)


def test_qwen3_forward_and_loss_read_by_scope():
  scopes = _scopes(Qwen3ForCausalLM, presets.qwen3_tiny(vocab_size=64))
  assert {"decoder", "layer", "attention", "mlp", "loss"} <= scopes, sorted(scopes)


def test_qwen3_moe_reads_by_scope():
  scopes = _scopes(Qwen3MoeForCausalLM, presets.qwen3_moe_tiny(vocab_size=64))
  assert {"decoder", "layer", "dense_layer", "attention", "mlp", "moe", "router",
          "experts"} <= scopes, sorted(scopes)


def test_scopes_do_not_change_the_numbers():
  cfg = presets.qwen3_tiny(vocab_size=64)
  model = Qwen3ForCausalLM(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                           remat="none", attention="xla", rngs=nnx.Rngs(0))
  ids = jnp.arange(8, dtype=jnp.int32)[None]
  eager = model(ids, ids, jnp.ones_like(ids))
  jitted = nnx.jit(lambda m, i: m(i, i, jnp.ones_like(i)))(model, ids)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)


def test_intern_s1_vision_side_reads_by_scope():
  cfg = presets.intern_s1_tiny(vision=presets.intern_s1_tiny().vision.to_dict() | dict(
      image_size=28, patch_size=14))
  fam = models.family("intern_s1")
  model = fam.MODEL_CLASS(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32, remat="none",
                          attention="xla", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  batch = {k: jnp.zeros(shape, dtype) for k, (shape, dtype)
           in fam.batch_layout(cfg, 1, 8, max_tiles=1).items()}
  text = jax.jit(lambda st: nnx.merge(graphdef, st).forward(batch).hidden).lower(
      state).as_text(debug_info=True)
  paths = [p for p in re.findall(r'loc\("([^"]*)"', text) if "/" in p]
  for scope in ("vision_tower/", "projector/", "decoder/"):
    assert any(scope in p for p in paths), scope
  # The tower's layers scan inside its scope: its while body reads layer/attention, layer/mlp.
  tower = [p for p in paths if "vision_tower/while/body" in p]
  assert any("layer/attention/" in p for p in tower) and any("layer/mlp/" in p for p in tower)
