"""LoRA on the Intern-S1 miniature from a transformers-written HF checkpoint: the run trains,
the vision tower and projector (and every untargeted tensor) of `hf-<step>` keep the source's
bits, the adapter's target_modules reach no vision module under PEFT's rule, and
`peft.PeftModel.from_pretrained(InternVLForConditionalGeneration(source), adapter-<step>)`
gives the logits of `InternVLForConditionalGeneration(hf-<step>)` on a batch with an image."""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from jaxtune import Trainer, models
from jaxtune.data import images
from jaxtune.hf import peft as jt_peft
from jaxtune.models import intern_s1
from jaxtune.parallel import make_mesh
from jaxtune.recipes import sft_mini, sft_mini_lora
from test_trainer_utils import read_metrics, use_compile_cache

RANK, ALPHA, STEPS = 4, 8.0, 2
_RUN: dict = {}


def _tensors(directory: str) -> dict:
  out = {}
  for name in os.listdir(directory):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  return out


# transformers' (model.language_model.*, model.vision_tower.*, ...) -> the llava-style names of
# InternVL-hf checkpoints that transformers renames on load (hf_layout "internvl_legacy").
_LEGACY = (("model.language_model.", "language_model.model."),
           ("lm_head.", "language_model.lm_head."), ("model.vision_tower.", "vision_tower."),
           ("model.multi_modal_projector.", "multi_modal_projector."))


def _legacy_name(name: str) -> str:
  for new, old in _LEGACY:
    if name.startswith(new):
      return old + name.removeprefix(new)
  raise AssertionError(name)


def _source(root: str, layout: str) -> str:
  """The miniature's architecture, random weights, written by transformers' save_pretrained
  (float32) with the miniature's tokenizer; "internvl_legacy": its tensors renamed llava-style."""
  cfg = sft_mini.get_config()
  model = models.create_model(cfg.model, make_mesh({}, jax.devices()[:1]), param_dtype="float32",
                              compute_dtype="float32", seed=5)
  ours = models.export_hf(model, cfg.model, os.path.join(root, "ours"), dtype="float32",
                          tokenizer_path=cfg.tokenizer_path)
  hf_model = transformers.InternVLForConditionalGeneration.from_pretrained(
      ours, dtype=torch.float32)
  source = os.path.join(root, "source")
  hf_model.save_pretrained(source)
  transformers.AutoTokenizer.from_pretrained(ours).save_pretrained(source)
  if layout == "internvl_legacy":
    path = os.path.join(source, "model.safetensors")
    tensors = load_file(path)
    os.remove(path)
    save_file({_legacy_name(k): v for k, v in tensors.items()}, path, metadata={"format": "pt"})
  assert models.presets.from_hf(source).hf_layout == layout
  return source


@pytest.fixture(scope="module", params=["internvl", "internvl_legacy"])
def lora_run(request, tmp_path_factory):
  """(recipe, summary, source dir) of a rank-4 LoRA run of the miniature on the source, in
  transformers' tensor names and in the llava-style ones of InternVL-hf checkpoints."""
  if request.param not in _RUN:
    use_compile_cache(tmp_path_factory)
    root = str(tmp_path_factory.mktemp("lora_intern_s1"))
    source = _source(root, request.param)
    cfg = sft_mini_lora.get_config()
    cfg.load_from = source  # the architecture and tokenizer from it (model_from_checkpoint)
    cfg.work_dir = os.path.join(root, "work")
    cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout = RANK, ALPHA, 0.0
    cfg.progress_bar, cfg.epoch_num, cfg.total_steps = False, None, STEPS
    cfg.eval_datasets, cfg.eval_interval = [], -1
    cfg.global_batch_size, cfg.data.pack_max_length = 4, 1024
    cfg.hf_interval, cfg.checkpoint_interval = STEPS, -1
    _RUN[request.param] = cfg, Trainer(cfg).fit(), source
  return _RUN[request.param]


def _exports(summary) -> tuple[str, str]:
  run_dir = summary["run_dir"]
  return os.path.join(run_dir, f"hf-{STEPS}"), os.path.join(run_dir, f"adapter-{STEPS}")


@pytest.mark.slow
def test_lora_run_keeps_the_vision_tower_and_every_untargeted_tensor(lora_run):
  _, summary, source = lora_run
  hf_dir, adapter_dir = _exports(summary)
  assert os.path.isdir(hf_dir) and os.path.isdir(adapter_dir)
  assert len(read_metrics(summary["run_dir"])) == STEPS
  before, after = _tensors(source), _tensors(hf_dir)
  assert sorted(before) == sorted(after)
  vision = [n for n in before if "vision_tower." in n or "multi_modal_projector." in n]
  assert vision and all("language_model" not in n for n in vision)
  for name, value in before.items():
    targeted = "language_model" in name and "_proj." in name
    if not targeted:  # bit-identical: the vision tower, the projector, norms, embeddings
      assert after[name].dtype == value.dtype and after[name].tobytes() == value.tobytes(), name
    else:
      assert after[name].tobytes() != value.tobytes(), name  # it trained
  adapters = _tensors(adapter_dir)
  layers = lora_run[0].model.text.num_hidden_layers
  assert len(adapters) == 2 * 7 * layers
  assert all(np.abs(v).max() > 0 for k, v in adapters.items() if "lora_B" in k)


@pytest.mark.slow
def test_adapter_target_modules_reach_no_vision_module(lora_run):
  _, summary, source = lora_run
  _, adapter_dir = _exports(summary)
  with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
    config = json.load(f)
  assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", RANK, 8)
  targets = config["target_modules"]
  # The module names PEFT walks: those of the transformers model (whatever the file's names).
  hf_model = transformers.InternVLForConditionalGeneration.from_pretrained(source)
  linear = [n for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)]
  matches = jt_peft._peft_matches  # pylint: disable=protected-access
  matched = [n for n in linear if matches(targets, n)]
  assert not [n for n in matched if "vision_tower" in n or "multi_modal_projector" in n]
  # The tower has projections named as the language model's: suffixes alone would reach them.
  assert any(n.startswith("model.vision_tower.") and matches(list(jt_peft.PROJECTIONS), n)
             for n in linear)
  layers = hf_model.config.text_config.num_hidden_layers
  assert len(matched) == 7 * layers
  assert all(n.startswith("model.language_model.layers.") for n in matched)


def _image_batch(cfg, model_cfg):
  """One bundled image sample: tiles as the pipeline makes them, ids with its image tokens."""
  with open(os.path.join(sft_mini.ASSETS, "mini_vqa.jsonl")) as f:
    ref = json.loads(f.readline())["messages"][0]["content"][0]["image_url"]
  tiles = images.load_tiles(os.path.join(sft_mini.ASSETS, ref["url"]), ref["image_wh"], 1,
                            cfg.data.min_dynamic_patch, cfg.data.max_dynamic_patch)
  per_tile = intern_s1.tokens_per_tile(model_cfg)
  ids = np.concatenate([[151644, 872, 198, 151669], np.full(len(tiles) * per_tile,
                                                            model_cfg.image_token_id),
                        [151670, 198, 3838, 374, 151645]]).astype(np.int64)[None]
  return dict(input_ids=torch.from_numpy(ids),
              pixel_values=torch.from_numpy(np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))))


@pytest.mark.slow
def test_adapter_loads_in_peft_onto_internvl_with_the_merged_logits(lora_run):
  peft = pytest.importorskip("peft")
  cfg, summary, source = lora_run
  hf_dir, adapter_dir = _exports(summary)
  batch = _image_batch(cfg, models.presets.from_hf(source))
  load = transformers.InternVLForConditionalGeneration.from_pretrained
  base = load(source, dtype=torch.float32).eval()
  with torch.no_grad():
    source_logits = base(**batch).logits.numpy()
  loaded = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
  # Every adapter tensor reached a LoRA layer of the language model, none of the vision tower.
  lora_modules = [n for n, m in loaded.named_modules() if hasattr(m, "lora_A")]
  assert len(lora_modules) == 7 * cfg.model.text.num_hidden_layers
  assert all(".language_model.layers." in n for n in lora_modules)
  stored = _tensors(adapter_dir)
  state = loaded.state_dict()
  for name, value in stored.items():
    key = name.replace(".lora_A.weight", ".lora_A.default.weight").replace(
        ".lora_B.weight", ".lora_B.default.weight")
    assert key in state, name
    np.testing.assert_array_equal(state[key].numpy(), value, err_msg=name)
  merged = load(hf_dir, dtype=torch.float32).eval()
  with torch.no_grad():
    peft_logits = loaded(**batch).logits.numpy()
    merged_logits = merged(**batch).logits.numpy()
  np.testing.assert_allclose(peft_logits, merged_logits, atol=1e-4, rtol=1e-4)
  assert np.abs(merged_logits - source_logits).max() > 1e-3  # the adapter is not a no-op
