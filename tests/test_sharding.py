"""Mesh construction, the logical-axis rules, and models created directly in their shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxtune import config as config_lib
from jaxtune.models import abstract_model, create_model, presets
from jaxtune.parallel import (AXES, axis_rules, batch_axes, batch_sharding, logical_shard_map,
                              logical_to_spec, make_mesh, merge_rules,
                              param_shardings, shard_activation)
from jaxtune.train.optim import make_optimizer
from jaxtune.train.state import abstract_train_state, split_model


def test_make_mesh_has_all_axes_auto():
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  assert mesh.axis_names == AXES
  assert dict(mesh.shape) == dict(data=1, fsdp=2, tensor=2, expert=1, sequence=1)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert make_mesh({}, devices=jax.devices()[:1]).size == 1
  with pytest.raises(ValueError, match="needs 8 devices"):
    make_mesh(dict(fsdp=8))
  with pytest.raises(ValueError, match="unknown mesh axes"):
    make_mesh(dict(pipeline=4))


def test_rules_map_logical_names_to_mesh_axes():
  assert logical_to_spec(("embed", "mlp")) == P(("fsdp", "sequence"), "tensor")
  assert logical_to_spec(("layers", "embed", "heads")) == P(None, ("fsdp", "sequence"), "tensor")
  assert logical_to_spec(("vocab", "embed")) == P("tensor", ("fsdp", "sequence"))
  assert logical_to_spec(("norm",)) == P(None)
  # `expert` splits the batch too: outside MoE blocks an expert group is data parallel;
  # `sequence` splits each row's tokens.
  assert logical_to_spec(("activation_batch", "activation_length")) == P(
      ("data", "fsdp", "expert"), "sequence")
  with pytest.raises(ValueError, match="no rule"):
    logical_to_spec(("embedding",))


def test_indivisible_dims_are_replicated_not_fatal():
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  assert logical_to_spec(("embed", "kv_heads"), (64, 32), mesh) == P(("fsdp", "sequence"), "tensor")
  assert logical_to_spec(("embed", "kv_heads"), (64, 5), mesh) == P(("fsdp", "sequence"), None)
  assert logical_to_spec(("embed", "kv_heads"), (63, 5), mesh) == P(None, None)
  # A batch that data x fsdp x expert does not divide falls back to fewer axes, then to
  # replication.
  mesh = make_mesh(dict(fsdp=2, expert=2))
  assert logical_to_spec(("activation_batch",), (4,), mesh) == P(("data", "fsdp", "expert"))
  assert logical_to_spec(("activation_batch",), (2,), mesh) == P(("data", "fsdp"))
  mesh = make_mesh(dict(data=2, fsdp=2))
  assert logical_to_spec(("activation_batch",), (2,), mesh) == P("fsdp")
  assert logical_to_spec(("activation_batch",), (1,), mesh) == P(None)


def test_batch_sharding_splits_rows_over_data_fsdp_and_expert():
  mesh = make_mesh(dict(data=2, fsdp=2))
  sharding = batch_sharding(mesh)
  assert sharding.spec == P(("data", "fsdp", "expert"))
  rows = jax.device_put(np.zeros((8, 16), np.int32), sharding)
  assert rows.addressable_shards[0].data.shape == (2, 16)


# 1 kv head of dim 6 and vocab 250: k/v projections (6) and the vocab (250) do not divide
# tensor=4, so those dims must be replicated while the rest is split.
_AWKWARD = dict(vocab_size=250, num_attention_heads=2, num_key_value_heads=1, head_dim=6)


@pytest.mark.slow
def test_create_model_places_every_param_in_its_rule_sharding():
  cfg = presets.qwen3_tiny(**_AWKWARD)
  mesh = make_mesh(dict(tensor=4))
  model = create_model(cfg, mesh, compute_dtype="float32", seed=3)
  expected = param_shardings(model, mesh)
  for (path, var), (_, want) in zip(nnx.to_flat_state(nnx.state(model)),
                                    nnx.to_flat_state(expected)):
    got = var.get_value().sharding
    assert got.is_equivalent_to(want.get_value(), var.get_value().ndim), path
  layers = model.model.layers
  assert layers.self_attn.k_proj.kernel.get_value().sharding.spec == P(None, ("fsdp", "sequence"), None)
  assert layers.mlp.up_proj.kernel.get_value().sharding.spec == P(None, ("fsdp", "sequence"), "tensor")
  assert model.model.embed_tokens.embedding.get_value().sharding.spec == P(None, ("fsdp", "sequence"))
  # Same seed, same values whatever the mesh.
  single = create_model(cfg, make_mesh({}, devices=jax.devices()[:1]), compute_dtype="float32",
                        seed=3)
  np.testing.assert_array_equal(np.asarray(layers.mlp.up_proj.kernel.get_value()),
                                np.asarray(single.model.layers.mlp.up_proj.kernel.get_value()))


@pytest.mark.slow
def test_sharded_forward_runs_with_indivisible_dims():
  cfg = presets.qwen3_tiny(**_AWKWARD)
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  ids = jax.device_put(np.arange(32, dtype=np.int32).reshape(4, 8) % 250, batch_sharding(mesh))
  positions = jax.device_put(np.tile(np.arange(8, dtype=np.int32), (4, 1)), batch_sharding(mesh))
  with jax.set_mesh(mesh):  # as the trainer builds and runs it
    model = create_model(cfg, mesh, compute_dtype="float32")
    hidden = nnx.jit(lambda m, *a: m(*a))(model, ids, positions, jnp.ones_like(ids))
  assert hidden.shape == (4, 8, 64) and np.isfinite(np.asarray(hidden)).all()


def test_abstract_model_allocates_nothing():
  mesh = make_mesh(dict(fsdp=4))
  model = abstract_model(presets.qwen3_8b(), mesh)
  leaves = jax.tree.leaves(nnx.state(model))
  assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
  kernel = model.model.layers.mlp.down_proj.kernel.get_value()
  assert kernel.shape == (36, 12288, 4096) and kernel.dtype == jnp.float32
  assert kernel.sharding.spec == P(None, "tensor", ("fsdp", "sequence"))


def test_shard_activation_is_a_noop_without_mesh():
  x = jnp.ones((4, 8, 16))
  assert shard_activation(x, ("activation_batch", "activation_length", "activation_embed")) is x
  mesh = make_mesh(dict(fsdp=4))
  with jax.set_mesh(mesh):
    y = jax.jit(lambda x: shard_activation(x * 2, ("activation_batch", None, None)))(x)
  assert y.sharding.spec[0] in ("fsdp", ("data", "fsdp"), ("data", "fsdp", "expert"))


def test_large_replicated_params_are_named_in_a_warning(caplog):
  """A parameter over 1 M elements that no rule can split is copied onto every device: the
  warning names it; the sharded ones are not named."""
  mesh = make_mesh(dict(fsdp=4))
  # hidden 1,001 is odd and fsdp splits the hidden axis: the 2 M-element embedding (whose vocab
  # axis maps to the size-1 tensor axis) ends up whole on every device.
  odd = presets.qwen3_tiny(vocab_size=2000, hidden_size=1001, num_attention_heads=1,
                           num_key_value_heads=1, head_dim=8, intermediate_size=12,
                           num_hidden_layers=1)
  with caplog.at_level("WARNING", logger="jaxtune.parallel.sharding"):
    param_shardings(abstract_model(odd, mesh), mesh)
  assert "model.embed_tokens.embedding (2000, 1001)" in caplog.text
  caplog.clear()
  even = presets.qwen3_tiny(vocab_size=2000, hidden_size=1024, num_attention_heads=1,
                            num_key_value_heads=1, head_dim=8, intermediate_size=12,
                            num_hidden_layers=1)
  with caplog.at_level("WARNING", logger="jaxtune.parallel.sharding"):
    param_shardings(abstract_model(even, mesh), mesh)
  assert "replicated" not in caplog.text


# --- the recipe's rules, the data-parallel axes, logical_shard_map -------------------------

def test_recipe_rules_replace_only_the_names_they_list():
  rules = merge_rules((("embed", None), ("mlp", ("tensor", "fsdp"))))
  assert logical_to_spec(("embed", "mlp"), rules=rules) == P(None, ("tensor", "fsdp"))
  assert logical_to_spec(("layers", "vocab"), rules=rules) == P(None, "tensor")  # kept
  # Listed rules are fallbacks in their order: mlp falls back to tensor alone where
  # tensor x fsdp does not divide it.
  rules = merge_rules((("mlp", ("tensor", "fsdp")), ("mlp", "tensor")))
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  assert logical_to_spec(("mlp",), (8,), mesh, rules) == P(("tensor", "fsdp"))
  assert logical_to_spec(("mlp",), (6,), mesh, rules) == P("tensor")
  for bad, words in ((("embedding", None), "unknown logical axis 'embedding'"),
                     (("embed", "tensr"), "unknown or repeated mesh axes"),
                     (("embed",), "not a \\(logical name, mesh axes\\) pair")):
    with pytest.raises(ValueError, match=r"mesh.logical_axis_rules\[0\].*" + words):
      merge_rules((bad,))


def test_the_rules_decide_the_data_parallel_axes_everywhere():
  """An override of activation_batch changes the config's data-parallel size, the batch
  sharding and the parameters' layout together (axis_rules is what the trainer enters)."""
  cfg = config_lib.base_config()
  cfg.mesh.update(dict(data=2, fsdp=2))
  assert config_lib.data_parallel_size(cfg, 4) == 4
  cfg.mesh.logical_axis_rules = (("activation_batch", "data"), ("embed", None))
  assert config_lib.data_parallel_size(cfg, 4) == 2
  rules = config_lib.axis_rules(cfg)
  assert batch_axes(rules) == ("data",) and batch_axes() == ("data", "fsdp", "expert")
  mesh = make_mesh(dict(data=2, fsdp=2))
  with axis_rules(rules):
    assert batch_sharding(mesh).spec == P("data")
    model = abstract_model(presets.qwen3_tiny(), mesh)
    # [L, D, F]: no FSDP over the hidden dim D any more (F keeps its size-1 tensor axis).
    assert model.model.layers.mlp.up_proj.kernel.get_value().sharding.spec == P(None, None,
                                                                                 "tensor")
  assert batch_sharding(mesh).spec == P(("data", "fsdp", "expert"))  # restored
  cfg.mesh.logical_axis_rules = (("activation_batch", "pipeline"),)
  with pytest.raises(config_lib.ConfigError, match=r"mesh.logical_axis_rules\[0\]"):
    config_lib.axis_rules(cfg)


def test_logical_shard_map_resolves_names_once_and_hands_fn_the_axes():
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  x = np.arange(48, dtype=np.float32).reshape(8, 6)
  w = np.linspace(-1, 1, 24, dtype=np.float32).reshape(6, 4)
  seen = []

  def rows_then_total(axes, x, w):
    seen.append(axes)
    y = x @ w                                           # this device's rows
    return y, jax.lax.psum(y.sum(), axes["activation_batch"])

  fn = logical_shard_map(rows_then_total, in_names=(("activation_batch", None), None),
                         out_names=(("activation_batch", None), ()))
  with jax.set_mesh(mesh):
    y, total = jax.jit(fn)(x, w)
  assert seen[0]["activation_batch"] == ("data", "fsdp", "expert") and seen[0]["heads"] == ()
  np.testing.assert_allclose(np.asarray(y), x @ w, rtol=1e-6)
  np.testing.assert_allclose(float(total), (x @ w).sum(), rtol=1e-5)
  assert y.addressable_shards[0].data.shape == (4, 4)  # rows split over fsdp=2 only
  # Without a mesh fn runs on the whole arrays, every name unsplit.
  y1, total1 = fn(x, w)
  np.testing.assert_allclose(np.asarray(y1), x @ w, rtol=1e-6)
  # A later argument whose dim the name's axes do not divide is named.
  two = logical_shard_map(lambda axes, a, b: a.sum() + b.sum(),
                          in_names=(("activation_batch",), ("activation_batch",)), out_names=())
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="argument 1: dim 0"):
    jax.jit(two)(np.ones(8, np.float32), np.ones(3, np.float32))


def test_optimizer_state_takes_its_shardings_from_optax_tree_mapping():
  """Adam's mu and nu leaves carry their parameter's sharding (optax.tree_map_params says
  which leaves are parameter-shaped); the count is replicated. bf16 moments too."""
  mesh = make_mesh(dict(fsdp=2, tensor=2))
  cfg = config_lib.base_config()
  for state_dtype in ("float32", "bfloat16"):
    cfg.optim.state_dtype = state_dtype
    optimizer = make_optimizer(cfg.optim)
    with jax.set_mesh(mesh):
      model_def, params = split_model(abstract_model(presets.qwen3_tiny(), mesh))
      state = abstract_train_state(params, optimizer, mesh, model_def)
    adam = state.opt_state[1][0]
    want = jax.tree.leaves(jax.tree.map(lambda p: p.sharding.spec, params))
    for moments in (adam.mu, adam.nu):
      got = jax.tree.leaves(moments)
      assert [m.sharding.spec for m in got] == want
      assert {m.dtype for m in got} == {jnp.dtype(state_dtype)}
    assert adam.count.sharding.spec == P()
    assert any(spec != P(*[None] * len(spec)) for spec in want)  # something is split


def test_head_projections_split_into_whole_heads_only():
  """2 query heads of 8 on tensor=4: N * H = 16 divides 4, but a split would cut each head in
  half, so q_proj / o_proj stay whole along heads; 4 heads split one per device."""
  mesh = make_mesh(dict(tensor=4))
  halves = presets.qwen3_tiny(num_attention_heads=2, num_key_value_heads=2, head_dim=8)
  attn = abstract_model(halves, mesh).model.layers.self_attn
  assert attn.q_proj.kernel.get_value().sharding.spec == P(None, ("fsdp", "sequence"), None)
  assert attn.o_proj.kernel.get_value().sharding.spec == P(None, None, ("fsdp", "sequence"))
  assert attn.k_proj.kernel.get_value().sharding.spec == P(None, ("fsdp", "sequence"), None)
  whole = presets.qwen3_tiny(num_attention_heads=4, num_key_value_heads=4, head_dim=8)
  attn = abstract_model(whole, mesh).model.layers.self_attn
  assert attn.q_proj.kernel.get_value().sharding.spec == P(None, ("fsdp", "sequence"), "tensor")
  assert attn.o_proj.kernel.get_value().sharding.spec == P(None, "tensor", ("fsdp", "sequence"))
  q = attn.q_proj.kernel.get_value()
  assert q.sharding.shard_shape(q.shape)[-1] == 8  # one whole head per device
