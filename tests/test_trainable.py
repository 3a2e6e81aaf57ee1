"""The trainable-parameter mask: frozen params get no gradient, no optimizer state and no
weight decay, stay bit-identical through training, and the saving shows in the compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxtune import models
from jaxtune.models import presets, qwen3
from jaxtune.parallel import batch_sharding, make_mesh
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step

pytestmark = pytest.mark.slow

CFG = presets.qwen3_tiny(vocab_size=256, hidden_size=32, intermediate_size=96, head_dim=8)
ROWS, LENGTH = 4, 32


def _frozen_mlp(cfg):
  """What `freeze_vision` does for a VLM, here for the decoder MLPs of a text model."""
  del cfg
  return lambda path, _: "mlp" not in path


def _setup(mesh, loss_cfg):
  # Weight decay 0.5: a decayed frozen param would move even with a zero gradient.
  optimizer = optax.adamw(1.0, weight_decay=0.5)  # unit lr: the step applies the schedule
  with jax.set_mesh(mesh):
    model = models.create_model(CFG, mesh, param_dtype="float32", compute_dtype="float32",
                                remat="none", attention="xla", seed=1)
    model_def, params = split_model(model)
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=loss_cfg,
                              optimizer=optimizer, schedule=optax.constant_schedule(1e-2),
                              num_micro=2, batch_layout=models.text_batch_layout(ROWS, LENGTH),
                              batch_sharding=batch_sharding(mesh))
  return state, step


def _batch(mesh):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CFG.vocab_size, (ROWS, LENGTH)).astype(np.int32)
  host = dict(input_ids=ids, labels=np.roll(ids, -1, axis=1),
              segment_ids=np.ones_like(ids), positions=np.tile(np.arange(LENGTH, dtype=np.int32),
                                                               (ROWS, 1)))
  return {k: to_global_array(v, batch_sharding(mesh)) for k, v in host.items()}


def _flat(params):
  return {".".join(map(str, path)): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(params)}


@pytest.fixture
def loss_cfg():
  from jaxtune.config import base_config  # pylint: disable=import-outside-toplevel
  cfg = base_config().loss
  cfg.chunk_size = 32
  return cfg


def test_frozen_params_do_not_move_and_have_no_optimizer_state(monkeypatch, loss_cfg):
  monkeypatch.setattr(qwen3, "trainable", _frozen_mlp)
  mesh = make_mesh({"fsdp": 2, "tensor": 2})
  state, step = _setup(mesh, loss_cfg)
  before = _flat(state.params)
  opt_paths = [jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(state.opt_state)[0]]
  assert opt_paths and not any("mlp" in p for p in opt_paths)
  with jax.set_mesh(mesh):
    for _ in range(2):
      state, out = step(state, _batch(mesh))
  after = _flat(state.params)
  assert np.isfinite(float(out["loss"]))
  frozen = [k for k in before if ".mlp." in k]
  assert len(frozen) == 3
  for name in before:
    if name in frozen:
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)  # bit-identical
    else:
      assert np.abs(after[name] - before[name]).max() > 0, name


def test_memory_analysis_shows_the_optimizer_state_saving(monkeypatch, loss_cfg):
  """Freezing P float32 params removes exactly Adam's two moments (2 x 4P bytes) from the
  compiled step's arguments and outputs, and their gradient from its temporaries."""
  mesh = make_mesh({}, jax.devices()[:1])

  def analysis():
    state, step = _setup(mesh, loss_cfg)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    batch = {k: jax.ShapeDtypeStruct((ROWS, LENGTH), jnp.int32, sharding=batch_sharding(mesh))
             for k in models.text_batch_layout(ROWS, LENGTH)}
    with jax.set_mesh(mesh):
      return step.lower(abstract, batch).compile().memory_analysis()

  full = analysis()
  monkeypatch.setattr(qwen3, "trainable", _frozen_mlp)
  frozen = analysis()
  mlp_params = CFG.num_hidden_layers * 3 * CFG.hidden_size * CFG.intermediate_size
  assert mlp_params * 4 * 3 > 0.2 * full.argument_size_in_bytes  # a saving worth showing
  saved = 2 * 4 * mlp_params
  assert full.argument_size_in_bytes - frozen.argument_size_in_bytes == saved
  assert full.output_size_in_bytes - frozen.output_size_in_bytes >= saved
  assert frozen.temp_size_in_bytes < full.temp_size_in_bytes
