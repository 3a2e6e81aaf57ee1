"""Intern-S1 against transformers' PyTorch `InternVLForConditionalGeneration`: the config read
from config.json, HF weights in (both tensor layouts and the official `interns1` one), logits
with images, packed rows, export back, freezing, presets and the family interface in training."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxtune import config as config_lib
from jaxtune import models
from jaxtune.models import (abstract_model, export_hf, intern_s1, load_hf_weights, param_count,
                            presets)
from jaxtune.parallel import batch_sharding, make_mesh
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.state import new_train_state, split_model
from jaxtune.train.step import compile_train_step

IMAGE_TOKEN = 300
TILE = 56                      # 4 x 4 patches of 14 -> 16 patches -> 4 tokens after the shuffle
PER_TILE = 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=TILE, patch_size=14, attention_bias=True)
TEXT = dict(model_type="qwen3", vocab_size=320, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rope_theta=10_000.0, tie_word_embeddings=False)
MOE_TEXT = dict(TEXT, model_type="qwen3_moe", moe_intermediate_size=24, num_experts=4,
                num_experts_per_tok=2, norm_topk_prob=True)


def _single_mesh():
  return make_mesh({}, jax.devices()[:1])


def _hf_model(text: dict, vision: dict | None = None, seed: int = 0):
  torch.manual_seed(seed)
  hf_cfg = transformers.InternVLConfig(vision_config=vision or VISION, text_config=text,
                                       image_token_id=IMAGE_TOKEN, tie_word_embeddings=False)
  model = transformers.InternVLForConditionalGeneration(hf_cfg).eval()
  with torch.no_grad():  # larger than the init's, so every op shows in the logits
    for name, param in model.named_parameters():
      if "norm" not in name and "lambda" not in name:
        param.normal_(0.0, 0.2)
  return model


def _saved(text: dict, tmp_path_factory):
  """(transformers model, its save_pretrained directory (llava-style names), our config)."""
  model = _hf_model(text)
  path = tmp_path_factory.mktemp("internvl") / text["model_type"]
  model.save_pretrained(path)
  return model, str(path), presets.from_hf(str(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _saved(TEXT, tmp_path_factory)


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def any_reference(request, tmp_path_factory):
  """The dense and the MoE text model (Intern-S1-mini and Intern-S1)."""
  return _saved(TEXT if request.param == "qwen3" else MOE_TEXT, tmp_path_factory)


def _ours(path: str, cfg):
  return load_hf_weights(abstract_model(cfg, _single_mesh(), param_dtype="float32",
                                        compute_dtype="float32", remat="none"), path)


def _sample(rng, tiles: int, text_before: int = 5, text_after: int = 4) -> np.ndarray:
  ids = [rng.integers(0, IMAGE_TOKEN, text_before)]
  ids += [np.full(tiles * PER_TILE, IMAGE_TOKEN)] if tiles else []
  ids += [rng.integers(0, IMAGE_TOKEN, text_after)]
  return np.concatenate(ids).astype(np.int32)


def _pack(samples: list[np.ndarray], tiles: list[np.ndarray], length: int, max_tiles: int):
  """One packed row (+ its tiles, channels-last) as the data pipeline lays it out."""
  ids = np.zeros((1, length), np.int32)
  segments, positions = np.zeros_like(ids), np.zeros_like(ids)
  pixels = np.zeros((1, max_tiles, TILE, TILE, 3), np.float32)
  owners = np.zeros((1, max_tiles), np.int32)
  at = used = 0
  for s, (sample, pix) in enumerate(zip(samples, tiles), start=1):
    ids[0, at:at + len(sample)] = sample
    segments[0, at:at + len(sample)] = s
    positions[0, at:at + len(sample)] = np.arange(len(sample))
    pixels[0, used:used + len(pix)] = pix
    owners[0, used:used + len(pix)] = s
    at, used = at + len(sample), used + len(pix)
  return dict(input_ids=ids, positions=positions, segment_ids=segments, labels=ids,
              pixel_values=pixels, tile_segment_ids=owners)


def _hf_logits(model, sample: np.ndarray, pix: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    kwargs = dict(pixel_values=torch.from_numpy(pix.transpose(0, 3, 1, 2))) if len(pix) else {}
    return model(input_ids=torch.from_numpy(sample[None]).long(), **kwargs).logits[0].numpy()


def _our_logits(model, batch) -> np.ndarray:
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return np.asarray(model.logits(model.forward(batch).hidden))


def test_config_read_from_config_json(reference):
  _, path, cfg = reference
  assert cfg.type == "intern_s1" and cfg.hf_layout == "internvl_legacy"
  # Fields whose InternVL defaults differ from the checkpoint's are read from it.
  assert cfg.vision.attention_bias is True          # InternVLVisionConfig default: False
  assert cfg.tie_word_embeddings is False           # InternVLConfig default: True
  assert cfg.image_token_id == IMAGE_TOKEN          # InternVLConfig default: 151667
  assert cfg.vision.image_size == TILE and cfg.vision.patch_size == 14
  assert cfg.text.vocab_size == 320 and cfg.text.type in ("qwen3", "qwen3_moe")
  assert intern_s1.tokens_per_tile(cfg) == PER_TILE
  # A config.json that omits fields gets transformers' defaults, as from_pretrained would.
  with open(os.path.join(path, "config.json")) as f:
    hf = json.load(f)
  del hf["vision_config"]["layer_norm_eps"], hf["downsample_ratio"]
  sparse = intern_s1.config_from_hf(hf, path)
  assert sparse.vision.layer_norm_eps == transformers.InternVLVisionConfig().layer_norm_eps
  assert sparse.projector.downsample_ratio == 0.5


def test_logits_match_transformers_with_images_packed(any_reference):
  """Two samples in one row (one with 2 image tiles, one text-only, one with 1 tile) equal
  transformers run on each sample alone."""
  hf_model, path, cfg = any_reference
  model = _ours(path, cfg)
  rng = np.random.default_rng(0)
  samples = [_sample(rng, 2), _sample(rng, 0, 3, 3), _sample(rng, 1, 2, 6)]
  tiles = [rng.normal(size=(n, TILE, TILE, 3)).astype(np.float32) for n in (2, 0, 1)]
  batch = _pack(samples, tiles, length=48, max_tiles=4)
  ours = _our_logits(model, batch)
  at = 0
  for sample, pix in zip(samples, tiles):
    expected = _hf_logits(hf_model, sample, pix)
    np.testing.assert_allclose(ours[0, at:at + len(sample)], expected, atol=1e-4, rtol=1e-4)
    at += len(sample)


def test_images_change_the_logits_and_text_only_rows_skip_the_tower(reference):
  hf_model, path, cfg = reference
  model = _ours(path, cfg)
  rng = np.random.default_rng(1)
  sample = _sample(rng, 1)
  pix = rng.normal(size=(1, TILE, TILE, 3)).astype(np.float32)
  with_image = _our_logits(model, _pack([sample], [pix], 24, 2))
  other = _our_logits(model, _pack([sample], [pix * 0.5], 24, 2))
  assert np.abs(with_image - other).max() > 1e-3       # the pixels reach the LM
  # No tile in the batch: the image-token positions keep their text embedding (the tower does
  # not run), exactly like a forward without pixel arrays at all.
  text = _sample(rng, 0)
  no_tiles = _pack([text], [np.zeros((0, TILE, TILE, 3), np.float32)], 24, 2)
  no_pixels = {k: v for k, v in no_tiles.items() if k not in ("pixel_values", "tile_segment_ids")}
  np.testing.assert_array_equal(_our_logits(model, no_tiles), _our_logits(model, no_pixels))
  np.testing.assert_allclose(_our_logits(model, no_pixels)[0, :len(text)],
                             _hf_logits(hf_model, text, np.zeros((0,))), atol=1e-4, rtol=1e-4)


def _resave(src: str, dst: str, rename) -> None:
  """A copy of an HF directory with every tensor renamed."""
  os.makedirs(dst, exist_ok=True)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  save_file({rename(k): v for k, v in tensors.items()}, os.path.join(dst, "model.safetensors"),
            metadata={"format": "pt"})
  shutil.copy(os.path.join(src, "config.json"), os.path.join(dst, "config.json"))


def _new_layout(name: str) -> str:
  """llava-style -> transformers' current (model.language_model.*, ...) names."""
  if name.startswith("language_model.lm_head."):
    return name.removeprefix("language_model.")
  if name.startswith("language_model.model."):
    return "model.language_model." + name.removeprefix("language_model.model.")
  return "model." + name


@pytest.mark.slow
def test_export_round_trips_in_the_source_layout(any_reference, tmp_path):
  """Both layouts load; the export uses the source's names and reloads in transformers with
  identical logits."""
  hf_model, path, _ = any_reference
  new = str(tmp_path / "new_layout")
  _resave(path, new, _new_layout)
  rng = np.random.default_rng(2)
  sample, pix = _sample(rng, 2), rng.normal(size=(2, TILE, TILE, 3)).astype(np.float32)
  expected = _hf_logits(hf_model, sample, pix)
  for source, layout in ((path, "internvl_legacy"), (new, "internvl")):
    cfg = presets.from_hf(source)
    assert cfg.hf_layout == layout
    model = _ours(source, cfg)
    out = export_hf(model, cfg, str(tmp_path / f"export_{layout}"), dtype="float32")
    assert set(load_file(os.path.join(out, next(f for f in os.listdir(out)
                                                 if f.endswith(".safetensors")))).keys()) \
        == set(load_file(os.path.join(source, "model.safetensors")).keys())
    reloaded = transformers.InternVLForConditionalGeneration.from_pretrained(out).eval()
    np.testing.assert_allclose(_hf_logits(reloaded, sample, pix), expected, atol=1e-4,
                               rtol=1e-4)


@pytest.mark.slow
def test_official_interns1_checkpoint_layout(tmp_path):
  """An Intern-S1-style directory (model_type interns1, custom code, model.* names) is read
  without running its code; the export keeps its names, its custom code and its auto_map."""
  hf_model = _hf_model(TEXT, seed=4)
  path = str(tmp_path / "internvl")
  hf_model.save_pretrained(path)
  src = str(tmp_path / "interns1")
  _resave(path, src, _new_layout)
  with open(os.path.join(src, "config.json")) as f:
    hf = json.load(f)
  hf.update(model_type="interns1", architectures=["InternS1ForConditionalGeneration"],
            auto_map={"AutoConfig": "configuration_interns1.InternS1Config"})
  hf["vision_config"]["model_type"] = "interns1_vision"
  with open(os.path.join(src, "config.json"), "w") as f:
    json.dump(hf, f)
  with open(os.path.join(src, "configuration_interns1.py"), "w") as f:
    f.write("# custom code shipped with the checkpoint\n")
  tokenizer = str(tmp_path / "tokenizer")
  from jaxtune.data.tokenizer import build_qwen_tokenizer  # pylint: disable=import-outside-toplevel
  build_qwen_tokenizer(tokenizer, image_tokens=True)
  shutil.copy(os.path.join(src, "configuration_interns1.py"), tokenizer)
  cfg = presets.from_hf(src)
  assert cfg.hf_layout == "interns1" and cfg.image_token_id == IMAGE_TOKEN
  model = _ours(src, cfg)
  rng = np.random.default_rng(3)
  sample, pix = _sample(rng, 1), rng.normal(size=(1, TILE, TILE, 3)).astype(np.float32)
  np.testing.assert_allclose(_our_logits(model, _pack([sample], [pix], 24, 1))[0, :len(sample)],
                             _hf_logits(hf_model, sample, pix), atol=1e-4, rtol=1e-4)
  out = export_hf(model, cfg, str(tmp_path / "export"), dtype="float32",
                  tokenizer_path=tokenizer, source_dir=src)
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["model_type"] == "interns1" and written["auto_map"] == hf["auto_map"]
  assert written["vision_config"]["model_type"] == "interns1_vision"
  assert os.path.isfile(os.path.join(out, "configuration_interns1.py"))
  names = set()
  for file in os.listdir(out):
    if file.endswith(".safetensors"):
      names |= set(load_file(os.path.join(out, file)))
  assert names == set(load_file(os.path.join(src, "model.safetensors")))


def test_presets_match_transformers_parameter_counts():
  """intern_s1_mini / intern_s1 have the official dimensions: their parameter counts equal
  transformers' InternVL built (on the meta device) from our exported config."""
  for preset in (presets.intern_s1_mini(hf_layout="internvl"), presets.intern_s1_tiny()):
    hf = intern_s1.hf_config(preset, "bfloat16")
    with torch.device("meta"):
      ref = transformers.InternVLForConditionalGeneration(transformers.InternVLConfig(
          **{k: v for k, v in hf.items() if k not in ("model_type", "architectures")}))
    assert param_count(preset) == sum(p.numel() for p in ref.parameters())
  big = presets.intern_s1()
  with torch.device("meta"):
    vision = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(
        **intern_s1.hf_config(big, "bfloat16")["vision_config"]))
  vision_params = sum(p.numel() for p in vision.parameters())
  projector = intern_s1.projector_in_features(big) * 2 + (
      intern_s1.projector_in_features(big) + 1) * 4096 + 4097 * 4096
  assert param_count(big) == param_count(big.text) + vision_params + projector
  assert 5.5e9 < vision_params < 6.0e9                  # "a 6B vision encoder"
  mini = presets.intern_s1_mini()
  assert 0.28e9 < param_count(mini) - param_count(mini.text) < 0.35e9   # "0.3B vision encoder"


def _train_batch(cfg, rows=2, length=32, max_tiles=2, seed=0):
  rng = np.random.default_rng(seed)
  per_tile = intern_s1.tokens_per_tile(cfg)
  samples, tiles = [], []
  batch = None
  for r in range(rows):
    ids = np.concatenate([rng.integers(0, 200, 4), np.full(per_tile, cfg.image_token_id),
                          rng.integers(0, 200, length - 4 - per_tile)]).astype(np.int32)
    pix = rng.normal(size=(1, *_pair(cfg.vision.image_size), 3)).astype(np.float32)
    one = _pack([ids], [pix], length, max_tiles)
    batch = one if batch is None else {k: np.concatenate([batch[k], one[k]]) for k in one}
    samples.append(ids)
    tiles.append(pix)
  batch["labels"] = np.where(batch["input_ids"] == cfg.image_token_id, -100,
                             np.roll(batch["input_ids"], -1, axis=1)).astype(np.int32)
  batch["labels"][:, -1] = -100
  return batch


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _tiny(**overrides):
  vision = presets.intern_s1_tiny().vision
  vision.update(image_size=TILE, hidden_size=16, num_attention_heads=2, intermediate_size=32)
  text = presets.qwen3_tiny(vocab_size=512, tie_word_embeddings=False)
  return presets.intern_s1_tiny(text=text, vision=vision, image_token_id=250, **overrides)


def _trainable_split(model, cfg):
  """ModelDef and params of one built model, trained as `cfg`'s freeze flags say (the flags
  change only the trainable filter, so one model serves every setting)."""
  model_def, params = split_model(model)
  params = jax.tree.map(jnp.copy, params)  # the train step donates its state
  return model_def._replace(trainable=models.trainable_filter(cfg)), params


@pytest.mark.slow
def test_freezing_trains_only_the_rest_and_saves_optimizer_memory():
  mesh = _single_mesh()
  model = models.create_model(_tiny(), mesh, param_dtype="float32", compute_dtype="float32",
                              remat="none")
  batch = _train_batch(_tiny())
  sharding = batch_sharding(mesh)
  layout = intern_s1.batch_layout(_tiny(), *batch["input_ids"].shape, max_tiles=2)
  optimizer = optax.adamw(1.0)
  results = {}
  for name, flags in (("none", {}), ("vision+projector", dict(freeze_vision=True,
                                                              freeze_projector=True))):
    model_def, params = _trainable_split(model, _tiny(**flags))
    state = new_train_state(params, optimizer, mesh, model_def)
    step = compile_train_step(state, model_def=model_def, loss_cfg=config_lib.base_config().loss,
                              optimizer=optimizer, schedule=lambda _: 1e-3, num_micro=1,
                              batch_layout=layout, batch_sharding=sharding)
    with jax.set_mesh(mesh):
      device_batch = {k: to_global_array(v, sharding) for k, v in batch.items()}
      compiled = step.lower(state, device_batch).compile()
      before = jax.tree.map(np.array, nnx.to_pure_dict(state.params))
      new_state, _ = compiled(state, device_batch)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(new_state.params))
    results[name] = (compiled.memory_analysis(), before, after)
  frozen_params = sum(x.size for part in ("vision_tower", "multi_modal_projector")
                      for x in jax.tree.leaves(results["none"][1][part]))
  full, frozen = results["none"][0], results["vision+projector"][0]
  # Adam's two fp32 moments of every frozen param are gone from the step's arguments.
  assert full.argument_size_in_bytes - frozen.argument_size_in_bytes == 8 * frozen_params
  assert frozen.temp_size_in_bytes < full.temp_size_in_bytes
  _, before, after = results["vision+projector"]
  for part in ("vision_tower", "multi_modal_projector"):
    for b, a in zip(jax.tree.leaves(before[part]), jax.tree.leaves(after[part])):
      np.testing.assert_array_equal(a, b)              # bit-identical
  moved = [np.abs(a - b).max() for b, a in zip(jax.tree.leaves(before["language_model"]),
                                               jax.tree.leaves(after["language_model"]))]
  assert max(moved) > 0                                # the text model trains
  _, before, after = results["none"]
  assert max(np.abs(a - b).max() for b, a in zip(jax.tree.leaves(before["vision_tower"]),
                                                 jax.tree.leaves(after["vision_tower"]))) > 0


@pytest.mark.slow
def test_frozen_tower_keeps_no_activations_for_the_backward_pass():
  """With the tower frozen, no residual saved for the backward pass has the tower's
  [tiles, patches + 1, hidden] shape; unfrozen, the tower's activations are saved."""
  from jax._src.ad_checkpoint import saved_residuals  # pylint: disable=import-outside-toplevel
  batch = {k: jnp.asarray(v) for k, v in _train_batch(_tiny()).items()}
  model = models.create_model(_tiny(), _single_mesh(), param_dtype="float32",
                              compute_dtype="float32", remat="none")
  tokens = (TILE // 14) ** 2 + 1
  for frozen in (False, True):
    cfg = _tiny(freeze_vision=frozen)
    model_def, params = _trainable_split(model, cfg)
    trainable, frozen_part = model_def.split_trainable(params)

    def loss(t, frozen_part=frozen_part, model_def=model_def):
      return model_def.merge(nnx.merge_state(t, frozen_part)).forward(batch).hidden.sum()
    shapes = [r[0].shape for r in saved_residuals(loss, trainable)]
    tower = [s for s in shapes if len(s) >= 2 and s[-2:] == (tokens, cfg.vision.hidden_size)]
    assert bool(tower) != frozen, (frozen, shapes)


def test_validate_checks_nested_text_fields_and_freeze_flags(tmp_path, reference):
  _, saved, ckpt = reference
  path = str(tmp_path / "ckpt")        # the checkpoint with a tokenizer beside it
  os.mkdir(path)
  for name in os.listdir(saved):
    os.symlink(os.path.join(saved, name), os.path.join(path, name))
  with open(os.path.join(path, "tokenizer.json"), "w") as f:
    f.write("{}")                                    # validation reads only file names
  cfg = config_lib.base_config()
  cfg.model = presets.from_hf(path)
  cfg.model.freeze_vision = True                     # a training choice: not compared
  cfg.load_from = path
  cfg.tokenizer_path = path
  cfg.total_steps = 1
  cfg.data.datasets = [config_lib.dataset("d", path)]
  config_lib.validate(cfg)
  cfg.model.text.hidden_size = 32
  with pytest.raises(config_lib.ConfigError, match="model.text.hidden_size: recipe 32"):
    config_lib.validate(cfg)
  # model_from_checkpoint: the architecture (and tokenizer) come from load_from, the recipe's
  # freeze flags stay.
  cfg.model = presets.intern_s1_tiny(freeze_projector=True)
  cfg.model_from_checkpoint = True
  resolved = config_lib.validate(cfg)
  assert resolved.model.text.hidden_size == ckpt.text.hidden_size
  assert resolved.model.freeze_projector is True and resolved.tokenizer_path == path


def test_uint8_tiles_are_normalised_on_device_as_on_the_host():
  """The batches' uint8 tiles, normalised by the model, equal the host-side float32 tiles
  (torchvision's ToTensor + Normalize steps) and reach the LM exactly as those would."""
  from jaxtune.data import images  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=import-outside-toplevel
  from jaxtune.models.intern_s1 import vision as intern_vit
  rng = np.random.default_rng(5)
  tiles = rng.integers(0, 256, (2, TILE, TILE, 3), dtype=np.uint8)
  np.testing.assert_allclose(np.asarray(intern_vit.normalize_pixels(jnp.asarray(tiles))),
                             images.normalize(tiles), rtol=0, atol=1e-6)
  model = models.create_model(_tiny(), _single_mesh(), param_dtype="float32",
                              compute_dtype="float32", remat="none")
  batch = _train_batch(_tiny(), rows=1, max_tiles=2)
  as_uint8 = dict(batch, pixel_values=np.zeros((1, 2, TILE, TILE, 3), np.uint8))
  as_uint8["pixel_values"][0, :1] = tiles[:1]
  as_float = dict(batch, pixel_values=np.zeros((1, 2, TILE, TILE, 3), np.float32))
  as_float["pixel_values"][0, :1] = images.normalize(tiles[:1])
  np.testing.assert_allclose(_our_logits(model, as_uint8), _our_logits(model, as_float),
                             atol=1e-5, rtol=1e-5)
