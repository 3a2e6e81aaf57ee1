"""jaxtune's InternViT tower, pixel shuffle and projector against transformers' PyTorch
InternVL (float32, CPU), plus their HF name tables, gradients and remat; the tower's attention
through each impl of the dispatcher (jaxtune.ops.attention, non-causal)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from ml_collections import ConfigDict

from jaxtune.hf.load import check_table, flat_params, hf_shape
from jaxtune.models.intern_s1 import presets as intern_s1_presets
from jaxtune.models.intern_s1.model import InternS1ForConditionalGeneration
from jaxtune.models.intern_s1 import vision as iv
from jaxtune.ops import attention as attention_lib
from jaxtune.ops.pallas_attention import Blocks
from jaxtune.parallel import make_mesh, param_shardings

pytestmark = pytest.mark.parity

LAYERS = 3
BASE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, layer_norm_eps=1e-6, layer_scale_init_value=0.1,
            num_channels=3, hidden_act="gelu")
VARIANTS = {
    # InternViT-300M (Intern-S1-mini) style; image/patch sizes as ints.
    "layer_norm_bias_mean_pool": dict(norm_type="layer_norm", attention_bias=True,
                                      use_qk_norm=False, use_mean_pooling=True,
                                      image_size=56, patch_size=14),
    # InternViT-6B (Intern-S1) style, plus the final LayerNorm; sizes as pairs. A large
    # layer_norm_eps shows that HF's q_norm/k_norm ignore it (they always use 1e-6).
    "rms_norm_qk_norm_final_ln": dict(norm_type="rms_norm", attention_bias=False,
                                      layer_norm_eps=1e-2,
                                      use_qk_norm=True, use_mean_pooling=False,
                                      image_size=[56, 56], patch_size=[14, 14]),
}
TEXT = dict(model_type="qwen3", vocab_size=64, hidden_size=48, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=24)
RATIO = 0.5


def _vcfg(variant: str) -> ConfigDict:
  return ConfigDict({**BASE, **VARIANTS[variant]})


def _randomise(module: torch.nn.Module, seed: int) -> None:
  """O(1) random weights everywhere (HF's init zeroes cls/pos and biases, which would hide
  mistakes): norm and layer-scale weights near 1, the rest N(0, 0.2^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=gen)
      near_one = ("norm" in name and name.endswith("weight")) or "lambda" in name
      param.copy_(1.0 + 0.1 * noise if near_one else 0.2 * noise)


def _copy_in(model: nnx.Module, table, state_dict: dict) -> None:
  """Fills our params from a torch state dict through an HF table (the loader's job)."""
  params = flat_params(model)
  check_table(params, tuple(table))
  for entry in table:
    var = params[entry.path]
    shape = var.get_value().shape
    value = np.zeros(shape, np.float32)
    for name, position in entry.names(shape[:len(entry.indices)]):
      tensor = state_dict[name].detach().numpy()
      assert tensor.shape == hf_shape(entry, shape), name
      value[position] = tensor.T if entry.transpose else tensor
    var.set_value(jnp.asarray(value))


def _close(ours, theirs, tol=1e-4):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape
  scale = max(1.0, float(np.abs(theirs).max()))
  err = float(np.abs(ours - theirs).max()) / scale
  assert err < tol, f"max relative diff {err:.2e}"


def _pixels(n, height, width, seed=0):
  """Channels-last pixels for us, the same pixels channels-first for torch."""
  nhwc = np.random.default_rng(seed).normal(size=(n, height, width, 3)).astype(np.float32)
  return jnp.asarray(nhwc), torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy())


_TOWERS: dict[str, tuple] = {}


def _tower(variant: str, attention: str = "xla") -> tuple:
  """(torch InternVLVisionModel, our InternVisionModel with its weights, its attention run by
  `attention`), built once."""
  if (variant, attention) not in _TOWERS:
    if variant in _TOWERS:
      torch_model = _TOWERS[variant][0]
    else:
      hf_cfg = transformers.InternVLVisionConfig(**_vcfg(variant).to_dict(),
                                                 attn_implementation="eager")
      torch_model = transformers.InternVLVisionModel(hf_cfg).eval()
      _randomise(torch_model, seed=len(variant))
    ours = iv.InternVisionModel(_vcfg(variant), param_dtype=jnp.float32,
                                compute_dtype=jnp.float32, remat="none", attention=attention,
                                rngs=nnx.Rngs(0))
    _copy_in(ours, iv.vision_weight_map(_vcfg(variant)), torch_model.state_dict())
    _TOWERS[variant, attention] = torch_model, ours
    _TOWERS.setdefault(variant, (torch_model, ours))
  return _TOWERS[variant, attention]


def _hf_file_order(table, num_layers: int) -> list[str]:
  """The table's names expanded in HF's order: rows before the layers, layer by layer, after."""
  first = next(i for i, e in enumerate(table) if e.stacked)
  last = max(i for i, e in enumerate(table) if e.stacked)
  layer_rows = table[first:last + 1]
  assert all(e.stacked for e in layer_rows)
  return ([e.hf_name for e in table[:first]]
          + [e.hf_name.format(layer=i) for i in range(num_layers) for e in layer_rows]
          + [e.hf_name for e in table[last + 1:]])


# ---- name tables -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_vision_table_matches_hf_state_dict_and_our_params(variant):
  torch_model, ours = _tower(variant)
  table = iv.vision_weight_map(_vcfg(variant))
  state = torch_model.state_dict()
  assert _hf_file_order(table, LAYERS) == list(state)
  params = flat_params(ours)
  assert sorted(e.path for e in table) == sorted(params)
  for entry in table:
    shape = params[entry.path].get_value().shape
    assert shape[:len(entry.indices)] == ((LAYERS,) if entry.stacked else ())
    for name, _ in entry.names(shape[:len(entry.indices)]):
      assert tuple(state[name].shape) == hf_shape(entry, shape), name
  # the config decides which tensors exist
  names = {e.hf_name for e in table}
  cfg = _vcfg(variant)
  assert ("encoder.layer.{layer}.attention.q_proj.bias" in names) == cfg.attention_bias
  assert ("encoder.layer.{layer}.attention.q_norm.weight" in names) == cfg.use_qk_norm
  assert ("layernorm.weight" in names) == (not cfg.use_mean_pooling)
  assert ("encoder.layer.{layer}.layernorm_before.bias" in names) == (
      cfg.norm_type == "layer_norm")


def test_projector_table_matches_hf_state_dict():
  torch_proj, ours = _projector()
  table = iv.projector_weight_map()
  assert [e.hf_name for e in table] == list(torch_proj.state_dict())
  assert sorted(e.path for e in table) == sorted(flat_params(ours))


def test_params_carry_known_logical_axes():
  _, ours = _tower("rms_norm_qk_norm_final_ln")
  shardings = param_shardings(nnx.state(ours, nnx.Param), make_mesh(dict(fsdp=2, tensor=2)))
  q_kernel = shardings["encoder"]["layer"]["attention"]["q_proj"]["kernel"]
  # "embed" splits over every axis that splits the tokens (fsdp, sequence; size 1 here).
  assert tuple(q_kernel.get_value().spec) == (None, ("fsdp", "sequence"), "tensor")
  fc1_bias = shardings["encoder"]["layer"]["mlp"]["fc1"]["bias"]
  assert tuple(fc1_bias.get_value().spec) == (None, "tensor")


def test_tokens_per_tile():
  assert iv.tokens_per_tile(ConfigDict(dict(image_size=448, patch_size=14)), 0.5) == 256
  assert iv.tokens_per_tile(ConfigDict(dict(image_size=[448, 448], patch_size=[14, 14])),
                            0.5) == 256
  assert iv.projector_in_features(ConfigDict(dict(hidden_size=1024)), 0.5) == 4096


# ---- the tower -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tower_matches_hf(variant):
  torch_model, ours = _tower(variant)
  pixels, pixels_t = _pixels(3, 56, 56)
  with torch.no_grad():
    out = torch_model(pixel_values=pixels_t, output_hidden_states=True)
  assert len(out.hidden_states) == LAYERS + 1
  _close(ours(pixels), out.last_hidden_state)
  _close(ours(pixels, feature_layer=-2), out.hidden_states[-2])
  _close(ours(pixels, feature_layer=0), out.hidden_states[0])
  # hidden_states[L] is the last layer *before* the final LayerNorm (HF does not tie it).
  _close(ours(pixels, feature_layer=LAYERS), out.hidden_states[LAYERS])
  if not _vcfg(variant).use_mean_pooling:
    assert not np.allclose(out.hidden_states[LAYERS], out.last_hidden_state, atol=1e-2)
  with pytest.raises(ValueError, match="out of range"):
    ours(pixels, feature_layer=LAYERS + 1)


def _interpreted_pallas(monkeypatch):
  """The tower's attention calls with impl 'pallas' run Pallas' interpreter (CPU)."""
  monkeypatch.setattr(iv, "attention_op", functools.partial(
      attention_lib.attention, interpret=True,
      pallas_blocks=Blocks(q=16, kv=16, bwd_major=16, bwd_minor=16)))


@pytest.mark.parametrize("impl", ["blockwise", "dpa_xla", "pallas"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tower_through_each_attention_impl_matches_hf(variant, impl, monkeypatch):
  """The tower's attention is the dispatcher's, non-causal, every tile one sample: each impl
  gives HF's hidden states (17-token tiles; 'pallas' pads them to 32 inside)."""
  if impl == "pallas":
    _interpreted_pallas(monkeypatch)
  torch_model, ours = _tower(variant, impl)
  assert ours.encoder.layer.attention.attention == impl
  pixels, pixels_t = _pixels(3, 56, 56)
  with torch.no_grad():
    expected = torch_model(pixel_values=pixels_t).last_hidden_state
  _close(ours(pixels), expected)


def test_tower_attention_goes_through_the_dispatcher_non_causal(monkeypatch):
  calls = []

  def spy(q, k, v, segment_ids, **kwargs):
    calls.append((q.shape, segment_ids, kwargs))
    return attention_lib.attention(q, k, v, segment_ids, **kwargs)
  monkeypatch.setattr(iv, "attention_op", spy)
  _, ours = _tower("layer_norm_bias_mean_pool", "blockwise")
  ours(_pixels(2, 56, 56)[0])
  assert calls, "the tower did not call jaxtune.ops.attention"
  shape, segment_ids, kwargs = calls[0]
  assert shape == (2, 17, 4, 8) and segment_ids is None   # [tiles, 1 + 16 patches, N, H]
  assert kwargs["causal"] is False and kwargs["impl"] == "blockwise"
  assert kwargs["block_q"] == kwargs["block_kv"] == iv.BLOCKWISE_BLOCK


def test_intern_s1_threads_its_attention_impl_to_the_tower():
  cfg = intern_s1_presets.intern_s1_tiny()
  for impl in ("blockwise", "xla"):
    model = nnx.eval_shape(lambda impl=impl: InternS1ForConditionalGeneration(
        cfg, attention=impl, rngs=nnx.Rngs(0)))
    assert model.vision_tower.encoder.layer.attention.attention == impl
  with pytest.raises(ValueError, match="attention must be one of"):
    iv.InternVisionAttention(_vcfg("layer_norm_bias_mean_pool"), param_dtype=jnp.float32,
                             compute_dtype=jnp.float32, attention="flash", rngs=nnx.Rngs(0))


def test_tower_attention_memory_is_linear_in_tile_tokens():
  """One InternViT-300M-shaped attention layer (H = 64, bf16) on 4 tiles of 1,025 tokens,
  value_and_grad compiled (not run): "blockwise" keeps well under one [tiles, N, T, T]
  float32 score array, of which the dense "xla" path holds several (about 25 MiB against
  210)."""
  vcfg = ConfigDict(dict(hidden_size=256, num_attention_heads=4, attention_bias=True,
                         use_qk_norm=False))
  x = jax.ShapeDtypeStruct((4, 1025, 256), jnp.bfloat16)

  def temp_bytes(impl):
    with nnx.use_eager_sharding(False):
      module = iv.InternVisionAttention(vcfg, param_dtype=jnp.float32,
                                        compute_dtype=jnp.bfloat16, attention=impl,
                                        rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(module)
    # x as the cotangent too: a constant one would be folded by XLA at compile time (slow).
    loss = lambda state, x: jnp.sum((nnx.merge(graphdef, state)(x) * x).astype(jnp.float32))
    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return vg.lower(state, x).compile().memory_analysis().temp_size_in_bytes
  scores_bytes = 4 * 4 * 1025 * 1025 * 4
  blockwise, xla = temp_bytes("blockwise"), temp_bytes("xla")
  assert blockwise < 0.5 * scores_bytes, (blockwise, scores_bytes)
  assert xla > 2 * scores_bytes, (xla, scores_bytes)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tower_interpolates_position_embeddings_like_hf(variant):
  """A 42x70 input (3x5 patches from a 4x4 table: one axis shrinks, one grows)."""
  torch_model, ours = _tower(variant)
  pixels, pixels_t = _pixels(2, 42, 70, seed=1)
  with torch.no_grad():
    expected = torch_model(pixel_values=pixels_t).last_hidden_state
  assert expected.shape == (2, 1 + 15, BASE["hidden_size"])
  _close(ours(pixels), expected)


@pytest.mark.parametrize("grid", [(4, 4), (3, 5), (7, 2), (1, 9), (16, 6)])
def test_bicubic_resize_matches_torch(grid):
  pos = np.random.default_rng(2).normal(size=(1, 1 + 16, 8)).astype(np.float32)
  patch_t = torch.from_numpy(pos[:, 1:]).reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(patch_t, size=grid, mode="bicubic",
                                            align_corners=False)
  expected = np.concatenate([pos[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, 8)], 1)
  ours = iv.resize_position_embeddings(jnp.asarray(pos), grid)
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)
  # jax.image.resize's cubic is a different filter (Keys a=-0.5): it would not match
  if grid == (3, 5):
    theirs = jax.image.resize(jnp.asarray(pos[0, 1:].reshape(4, 4, 8)), (3, 5, 8), "cubic")
    assert np.abs(np.asarray(theirs).reshape(1, -1, 8) - expected[:, 1:]).max() > 1e-3


# ---- pixel shuffle and projector -------------------------------------------------------------

@pytest.mark.parametrize("shape,scale", [((2, 4, 6, 5), 0.5), ((1, 8, 4, 3), 0.25)])
def test_pixel_shuffle_matches_hf(shape, scale):
  x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)  # distinct values
  expected = transformers.InternVLModel.pixel_shuffle(None, torch.from_numpy(x), scale)
  ours = np.asarray(iv.pixel_shuffle(jnp.asarray(x), scale_factor=scale))
  np.testing.assert_array_equal(ours, expected.numpy())
  # Net effect: space-to-depth with channels ordered (row offset, col offset, channel).
  n, h, w, c = shape
  k = int(1 / scale)
  s2d = x.reshape(n, h // k, k, w // k, k, c).transpose(0, 1, 3, 2, 4, 5)
  np.testing.assert_array_equal(ours, s2d.reshape(n, h // k, w // k, k * k * c))


def test_pixel_shuffle_rejects_odd_grid():
  with pytest.raises(ValueError, match="divisible"):
    iv.pixel_shuffle(jnp.zeros((1, 4, 5, 2)))


def _hf_config(variant: str) -> transformers.InternVLConfig:
  return transformers.InternVLConfig(vision_config=_vcfg(variant).to_dict(), text_config=TEXT,
                                     downsample_ratio=RATIO)


def _projector() -> tuple:
  torch_proj = transformers.models.internvl.modeling_internvl.InternVLMultiModalProjector(
      _hf_config("layer_norm_bias_mean_pool")).eval()
  _randomise(torch_proj, seed=7)
  in_features = iv.projector_in_features(_vcfg("layer_norm_bias_mean_pool"), RATIO)
  ours = iv.InternVLProjector(in_features, TEXT["hidden_size"], param_dtype=jnp.float32,
                              compute_dtype=jnp.float32, rngs=nnx.Rngs(0))
  _copy_in(ours, iv.projector_weight_map(), torch_proj.state_dict())
  return torch_proj, ours


def test_projector_matches_hf():
  torch_proj, ours = _projector()
  x = np.random.default_rng(3).normal(size=(3, 4, 128)).astype(np.float32)
  with torch.no_grad():
    expected = torch_proj(torch.from_numpy(x))
  _close(ours(jnp.asarray(x)), expected)


def _layer_norm(x, eps):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def test_projector_layer_norm_eps_is_torch_default():
  """Tiny-variance features (var ~1e-6) are where eps 1e-5 vs 1e-6 shows."""
  _, ours = _projector()
  assert ours.layer_norm.eps == 1e-5 == torch.nn.LayerNorm(4).eps
  x = (1.0 + 1e-3 * np.random.default_rng(4).normal(size=(2, 128))).astype(np.float32)
  normed = np.asarray(iv.InternVLProjector(128, 8, compute_dtype=jnp.float32,
                                           rngs=nnx.Rngs(0)).layer_norm(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  np.testing.assert_allclose(normed, _layer_norm(x64, 1e-5), atol=1e-4)
  assert np.abs(_layer_norm(x64, 1e-5) - _layer_norm(x64, 1e-6)).max() > 0.1


def test_projector_gelu_is_erf_form():
  _, ours = _projector()
  x = np.random.default_rng(5).normal(size=(2, 128)).astype(np.float32)
  p = {k: np.asarray(v.get_value(), np.float64) for k, v in flat_params(ours).items()}
  x64 = x.astype(np.float64)
  h = (_layer_norm(x64, 1e-5) * p["layer_norm.weight"] + p["layer_norm.bias"]
       ) @ p["linear_1.kernel"] + p["linear_1.bias"]
  erf = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=False), np.float64)
  tanh = np.asarray(jax.nn.gelu(jnp.asarray(h), approximate=True), np.float64)
  out = np.asarray(ours(jnp.asarray(x)))
  np.testing.assert_allclose(out, erf @ p["linear_2.kernel"] + p["linear_2.bias"], atol=1e-5)
  assert np.abs(out - (tanh @ p["linear_2.kernel"] + p["linear_2.bias"])).max() > 1e-4
  # HF's "gelu" is torch's exact GELU; jax's default is the tanh approximation.
  at = torch.tensor([-2.5, 1.7])
  np.testing.assert_allclose(transformers.activations.ACT2FN["gelu"](at).numpy(),
                             jax.nn.gelu(jnp.asarray(at.numpy()), approximate=False), atol=1e-6)
  assert np.abs(np.asarray(jax.nn.gelu(jnp.asarray(at.numpy())))
                - transformers.activations.ACT2FN["gelu"](at).numpy()).max() > 1e-4


# ---- end to end ------------------------------------------------------------------------------

def test_image_features_match_hf_get_image_features():
  variant = "rms_norm_qk_norm_final_ln"
  torch.manual_seed(0)
  hf_model = transformers.InternVLModel(_hf_config(variant)).eval()
  _randomise(hf_model.vision_tower, seed=11)
  _randomise(hf_model.multi_modal_projector, seed=12)
  state = hf_model.state_dict()
  vcfg = _vcfg(variant)
  dims = dict(param_dtype=jnp.float32, compute_dtype=jnp.float32)
  vision = iv.InternVisionModel(vcfg, **dims, remat="none", rngs=nnx.Rngs(0))
  projector = iv.InternVLProjector(iv.projector_in_features(vcfg, RATIO), TEXT["hidden_size"],
                                   **dims, rngs=nnx.Rngs(1))
  _copy_in(vision, [e.with_prefix("vision_tower.", "") for e in iv.vision_weight_map(vcfg)],
           state)
  _copy_in(projector, [e.with_prefix("multi_modal_projector.", "")
                       for e in iv.projector_weight_map()], state)
  pixels, pixels_t = _pixels(3, 56, 56, seed=6)
  for layer in (-1, -2):
    with torch.no_grad():
      expected = hf_model.get_image_features(
          pixel_values=pixels_t, vision_feature_layer=layer,
          vision_feature_select_strategy="default").pooler_output
    ours = iv.image_features(vision, projector, pixels, downsample_ratio=RATIO,
                             feature_layer=layer)
    assert ours.shape == (3, iv.tokens_per_tile(vcfg, RATIO), TEXT["hidden_size"])
    _close(ours, expected)


class _Pair(nnx.Module):
  def __init__(self, vision, projector):
    self.vision, self.projector = vision, projector


def _pair(remat: str, attention: str = "xla") -> _Pair:
  vcfg = _vcfg("rms_norm_qk_norm_final_ln")
  dims = dict(param_dtype=jnp.float32, compute_dtype=jnp.float32)
  rngs = nnx.Rngs(3)
  vision = iv.InternVisionModel(vcfg, **dims, remat=remat, attention=attention, rngs=rngs)
  projector = iv.InternVLProjector(iv.projector_in_features(vcfg, RATIO), 16, **dims,
                                   rngs=rngs)
  return _Pair(vision, projector)


@nnx.jit
def _loss_and_grads(pair: _Pair, pixels):
  def loss(p):
    features = iv.image_features(p.vision, p.projector, pixels, downsample_ratio=RATIO)
    return jnp.mean(jnp.square(features)), features
  return nnx.value_and_grad(loss, has_aux=True)(pair)


@pytest.mark.slow
def test_gradients_flow_and_remat_matches():
  pixels, _ = _pixels(2, 56, 56, seed=8)
  (loss, feats), grads = _loss_and_grads(_pair("none"), pixels)
  (loss_r, feats_r), grads_r = _loss_and_grads(_pair("full"), pixels)
  assert np.isfinite(float(loss)) and float(loss) > 0
  flat = dict(nnx.to_flat_state(grads))
  flat_r = dict(nnx.to_flat_state(grads_r))
  assert flat.keys() == flat_r.keys()
  for path, g in flat.items():
    g = np.asarray(g.get_value())
    assert np.all(np.isfinite(g)), path
    assert np.abs(g).max() > 0, f"no gradient reaches {path}"
    np.testing.assert_allclose(np.asarray(flat_r[path].get_value()), g, rtol=1e-5,
                               atol=1e-9 + 1e-5 * np.abs(g).max(), err_msg=str(path))
  np.testing.assert_allclose(np.asarray(feats_r), np.asarray(feats), rtol=1e-6, atol=1e-7)
  assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_tower_gradients_through_each_attention_impl_match_xla(impl, monkeypatch):
  """Parameter gradients of the tower + projector with the attention run by `impl` against
  the dense 'xla' run (same weights: the same Rngs)."""
  if impl == "pallas":
    _interpreted_pallas(monkeypatch)
  pixels, _ = _pixels(2, 56, 56, seed=9)
  run = nnx.jit(lambda pair: nnx.value_and_grad(lambda p: jnp.mean(jnp.square(
      iv.image_features(p.vision, p.projector, pixels, downsample_ratio=RATIO))))(pair))
  loss, grads = run(_pair("none", "xla"))
  loss_i, grads_i = run(_pair("none", impl))
  assert float(loss_i) == pytest.approx(float(loss), rel=1e-5)
  flat, flat_i = dict(nnx.to_flat_state(grads)), dict(nnx.to_flat_state(grads_i))
  assert flat.keys() == flat_i.keys()
  for path, g in flat.items():
    g = np.asarray(g.get_value())
    np.testing.assert_allclose(np.asarray(flat_i[path].get_value()), g, rtol=1e-4,
                               atol=1e-6 + 1e-4 * np.abs(g).max(), err_msg=str(path))


def test_bf16_compute_runs():
  vcfg = _vcfg("layer_norm_bias_mean_pool")
  vision = iv.InternVisionModel(vcfg, param_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                                remat="full", rngs=nnx.Rngs(0))
  out = vision(_pixels(1, 56, 56)[0])
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 17, 32)
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  with pytest.raises(ValueError, match="channels-last"):
    vision(jnp.zeros((1, 3, 56, 56)))
