"""Every registered model family against the `ModelFamily` Protocol: the names, their
signatures, and a tiny model of each built, run forward, laid out and counted.

A family missing a function, or taking other arguments than the generic code passes, fails
here before it fails deep in the trainer, the data pipeline or an export.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtune import models
from jaxtune.data.media import MediaSpec
from jaxtune.hf.weights import HFWeight, check_table, flat_params
from jaxtune.models import presets
from jaxtune.models.family import MODEL_METHODS, ModelFamily

# Each family's miniature preset (the real architecture, tiny widths).
TINY = {"qwen3": presets.qwen3_tiny, "qwen3_moe": presets.qwen3_moe_tiny,
        "intern_s1": presets.intern_s1_tiny}
ROWS, LENGTH = 2, 16


def test_every_registered_family_has_a_tiny_preset():
  assert set(TINY) == set(presets.FAMILIES)


@pytest.fixture(params=sorted(presets.FAMILIES))
def name(request):
  return request.param


def _protocol_functions():
  return {n: f for n, f in vars(ModelFamily).items()
          if inspect.isfunction(f) and not n.startswith("_")}


def test_family_implements_the_protocol(name):
  fam = models.family(name)
  assert isinstance(fam, ModelFamily), [
      n for n in ModelFamily.__protocol_attrs__ if not hasattr(fam, n)]
  assert fam.MODEL_TYPE == name and presets.FAMILIES[name].module == fam.__name__
  assert fam.defaults().type == name and TINY[name]().type == name
  assert fam.HF_MODEL_TYPES and all(isinstance(t, str) for t in fam.HF_MODEL_TYPES)
  for method in MODEL_METHODS:
    assert callable(getattr(fam.MODEL_CLASS, method, None)), (name, method)


def test_family_functions_take_the_protocols_arguments(name):
  fam = models.family(name)
  for fn_name, proto in _protocol_functions().items():
    want = [p for p in inspect.signature(proto).parameters.values() if p.name != "self"]
    got = list(inspect.signature(getattr(fam, fn_name)).parameters.values())
    assert [(p.name, p.kind, p.default) for p in got] == [
        (p.name, p.kind, p.default) for p in want], (name, fn_name)


def test_a_tiny_model_runs_through_the_family_interface(name):
  fam = models.family(name)
  cfg = TINY[name]()
  media = fam.media(cfg)
  assert media is None or isinstance(media, MediaSpec)
  max_tiles = 1 if media is not None else 0
  layout = fam.batch_layout(cfg, ROWS, LENGTH, max_tiles=max_tiles)
  assert {"input_ids", "labels", "segment_ids", "positions"} <= set(layout)
  rng = np.random.default_rng(0)
  batch = {}
  for key, (shape, dtype) in layout.items():
    batch[key] = np.zeros(shape, dtype)
  batch["input_ids"] = rng.integers(0, 100, (ROWS, LENGTH)).astype(np.int32)
  batch["segment_ids"] = np.ones((ROWS, LENGTH), np.int32)
  batch["positions"] = np.tile(np.arange(LENGTH, dtype=np.int32), (ROWS, 1))
  if media is not None:
    assert layout["pixel_values"][0][2:] == (media.tile_size, media.tile_size, media.channels)
    assert media.image_token_id == int(cfg.image_token_id)
    batch["input_ids"][0, :media.tokens_per_tile] = media.image_token_id
    batch["tile_segment_ids"][0, 0] = 1
  flops = fam.train_flops(cfg, batch)
  assert np.isfinite(flops) and flops > 0

  model = fam.MODEL_CLASS(cfg, param_dtype=jnp.float32, compute_dtype=jnp.float32,
                          remat="none", attention="xla", rngs=nnx.Rngs(0))
  out = model.forward({k: jnp.asarray(v) for k, v in batch.items()})
  kernel = model.lm_head_kernel()
  assert out.hidden.shape == (ROWS, LENGTH, kernel.shape[0])
  assert np.isfinite(np.asarray(out.hidden)).all()
  assert set(out.aux_losses) == set(model.aux_loss_coefficients())
  assert isinstance(model.step_metrics(out.stats), dict)

  trainable = nnx.state(model, nnx.All(nnx.Param, fam.trainable(cfg)))
  assert jax.tree.leaves(trainable)
  table = fam.hf_weight_map(cfg)
  assert table and all(isinstance(row, HFWeight) for row in table)
  check_table(flat_params(model), table)   # every param has one HF name


def test_family_hf_config_reads_back_as_the_same_preset(name, tmp_path):
  fam = models.family(name)
  cfg = TINY[name]()
  hf = fam.hf_config(cfg, "bfloat16")
  assert hf["model_type"] in fam.HF_MODEL_TYPES
  back = fam.config_from_hf(hf, str(tmp_path))
  skip = set(fam.RECIPE_ONLY)
  assert {k: v for k, v in back.to_dict().items() if k not in skip} == {
      k: v for k, v in cfg.to_dict().items() if k not in skip}
