"""`HFWeight` rows with a two-way `Transform`: one HF tensor split into several params on load
and fused back on export, walked by the generic loader and exporter (no edit of jaxtune/hf/).

The family here is synthetic: a two-layer stack whose HF checkpoint stores each layer's gate
and up projections as one fused `gate_up_proj` [D, 2F] (GPT-OSS's layout, already [in, out]),
and a scale stored as a [1, D] row for our [D] vector (a reshape).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict
from safetensors.numpy import load_file, save_file

from jaxtune.hf import export_hf, load_hf_weights
from jaxtune.hf.weights import HFWeight, Transform

D, F, LAYERS = 4, 3, 2
FUSED = Transform(
    to_ours=lambda t: (t[:, :F], t[:, F:]),
    to_hf=lambda gate, up: np.concatenate([gate, up], axis=1),
    hf_shape=lambda gate, up: (gate[0], gate[1] + up[1]))
ROW = Transform(to_ours=lambda t: (t.reshape(-1),), to_hf=lambda s: s.reshape(1, -1),
                hf_shape=lambda s: (1, *s))


class _Layer(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.normal(1.0)
    self.gate = nnx.Param(init(rngs.params(), (D, F)))
    self.up = nnx.Param(init(rngs.params(), (D, F)))


class _Model(nnx.Module):
  def __init__(self, seed: int):
    rngs = nnx.Rngs(seed)
    self.config = ConfigDict(dict(type="fused_demo"))

    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(r):
      return _Layer(r)
    self.layers = make(rngs)
    self.scale = nnx.Param(jax.random.normal(rngs.params(), (D,)))


class _Family:
  """What loading and exporting need of a family (`jaxtune.hf.HFFamily`)."""

  @staticmethod
  def hf_weight_map(cfg):
    del cfg
    return (HFWeight("model.layers.{layer}.mlp.gate_up_proj",
                     ("layers.gate", "layers.up"), transform=FUSED),
            HFWeight("model.scale", "scale", transform=ROW))

  @staticmethod
  def hf_config(cfg, dtype, source=None):
    del source
    return {"model_type": cfg.type, "dtype": dtype}


def _values(model):
  return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_a_fused_tensor_splits_on_load_and_fuses_on_export_bit_exactly(tmp_path):
  ours = _Model(seed=0)
  out = export_hf(ours, ours.config, str(tmp_path / "hf"), _Family(), dtype="float32")
  tensors = {}
  for file in sorted((tmp_path / "hf").glob("*.safetensors")):
    tensors.update(load_file(str(file)))
  assert sorted(tensors) == ["model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.gate_up_proj",
                             "model.scale"]
  for layer in range(LAYERS):
    fused = tensors[f"model.layers.{layer}.mlp.gate_up_proj"]
    assert fused.shape == (D, 2 * F)
    np.testing.assert_array_equal(fused[:, :F], np.asarray(ours.layers.gate[...][layer]))
    np.testing.assert_array_equal(fused[:, F:], np.asarray(ours.layers.up[...][layer]))
  assert tensors["model.scale"].shape == (1, D)

  back = load_hf_weights(_Model(seed=1), out, _Family())
  want, got = _values(ours), _values(back)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])   # bit-exact round trip

  # And the checkpoint written by hand (HF's side) loads the same: split on load.
  hand = tmp_path / "hand"
  hand.mkdir()
  save_file(tensors, str(hand / "model.safetensors"))
  again = load_hf_weights(_Model(seed=2), str(hand), _Family())
  for key, value in _values(again).items():
    np.testing.assert_array_equal(value, want[key])


def test_a_transform_with_the_wrong_shape_is_named(tmp_path):
  ours = _Model(seed=0)
  out = export_hf(ours, ours.config, str(tmp_path / "hf"), _Family(), dtype="float32")

  class Wrong(_Family):
    @staticmethod
    def hf_weight_map(cfg):
      rows = _Family.hf_weight_map(cfg)
      bad = FUSED._replace(to_ours=lambda t: (t[:, :F - 1], t[:, F - 1:]))
      return (rows[0]._replace(transform=bad), rows[1])

  with pytest.raises(ValueError, match="gate_up_proj.*transform gives shapes"):
    load_hf_weights(_Model(seed=1), out, Wrong())


def test_a_quantised_layout_keeps_its_own_dtype(tmp_path):
  """A row may store HF's tensor in its own dtype (e.g. uint8 blocks), whatever the export's."""
  codes = Transform(to_ours=lambda t: (t.astype(np.float32).reshape(-1) / 16,),
                    to_hf=lambda s: np.round(s * 16).reshape(1, -1),
                    hf_shape=lambda s: (1, *s), hf_dtype="uint8")

  class Quantised(_Family):
    @staticmethod
    def hf_weight_map(cfg):
      rows = _Family.hf_weight_map(cfg)
      return (rows[0], rows[1]._replace(transform=codes))

  ours = _Model(seed=0)
  ours.scale.set_value(jnp.asarray([0.0, 1.0, 2.5, 15.0]))
  out = export_hf(ours, ours.config, str(tmp_path / "hf"), Quantised(), dtype="bfloat16")
  tensors = {}
  for file in sorted((tmp_path / "hf").glob("*.safetensors")):
    tensors.update(load_file(str(file)))
  assert tensors["model.scale"].dtype == np.uint8
  np.testing.assert_array_equal(tensors["model.scale"], [[0, 16, 40, 240]])
  back = load_hf_weights(_Model(seed=1), out, Quantised())
  np.testing.assert_array_equal(np.asarray(back.scale[...]), [0.0, 1.0, 2.5, 15.0])
