"""The seeds' Intern-S1-mini recipe (configs/sft_mini.py): the embedded default trains on the
bundled text + image data and exports weights transformers' InternVL loads with our logits;
XTuner's own example files train without edits; the real-run argument reads the checkpoint."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jaxtune import Trainer, config as config_lib, models
from jaxtune.data import images
from jaxtune.models import load_hf_weights
from jaxtune.models import intern_s1
from jaxtune.parallel.mesh import make_mesh
from jaxtune.recipes import sft_mini

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _records(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _short(tmp_path, steps: int, **overrides):
  cfg = sft_mini.get_config()
  cfg.work_dir = str(tmp_path / "work")
  cfg.progress_bar = False
  cfg.epoch_num = None
  cfg.total_steps = steps
  cfg.eval_interval = -1
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  cfg = _short(tmp_path_factory.mktemp("sft_mini"), steps=4, global_batch_size=4,
               **{"data.pack_max_length": 1024})
  return cfg, Trainer(cfg).fit()


def test_default_recipe_is_the_seed_recipe_with_a_miniature():
  real = sft_mini.get_config("load_from=/nonexistent/Intern-S1-mini")
  assert real.model.type == "intern_s1" and real.model_from_checkpoint
  assert (real.data.pack_max_length, real.data.sample_max_length) == (16384, 8192)
  assert real.optim.lr == 1e-6 and real.lr.lr_type == "cosine" and real.lr.warmup_ratio == 0
  assert real.model.freeze_vision and real.model.freeze_projector
  assert [d["sample_ratio"] for d in real.data.datasets] == [5.0, 20.0]
  mini = sft_mini.get_config()
  assert mini.load_from is None and mini.model.text.hidden_size == 64
  assert mini.model.freeze_vision and mini.model.freeze_projector
  with pytest.raises(ValueError, match="unknown argument 'txt'"):
    sft_mini.get_config("txt=a.jsonl")


def test_default_run_trains_on_text_and_images(default_run):
  cfg, summary = default_run
  records = _records(summary["run_dir"])
  assert [r["step"] for r in records] == list(range(1, 5))
  assert all(np.isfinite(r["loss"]) for r in records)
  assert records[-1]["loss"] < records[0]["loss"]
  assert summary["hf_export"] is not None


def test_default_export_loads_in_transformers_with_our_logits(default_run):
  cfg, summary = default_run
  export = summary["hf_export"]
  hf_model = transformers.InternVLForConditionalGeneration.from_pretrained(
      export, dtype=torch.float32).eval()
  model_cfg = models.presets.from_hf(export)
  assert model_cfg.hf_layout == "internvl"
  mesh = make_mesh({}, jax.devices()[:1])
  model = load_hf_weights(models.abstract_model(model_cfg, mesh, param_dtype="float32",
                                                compute_dtype="float32", remat="none"), export)
  # One bundled image sample: pixels as the pipeline makes them, ids with its image tokens.
  with open(os.path.join(sft_mini.ASSETS, "mini_vqa.jsonl")) as f:
    ref = json.loads(f.readline())["messages"][0]["content"][0]["image_url"]
  tiles = images.load_tiles(os.path.join(sft_mini.ASSETS, ref["url"]), ref["image_wh"], 1,
                            cfg.data.min_dynamic_patch, cfg.data.max_dynamic_patch)
  per_tile = intern_s1.tokens_per_tile(model_cfg)
  ids = np.concatenate([[151644, 872, 198, 151669], np.full(len(tiles) * per_tile,
                                                            model_cfg.image_token_id),
                        [151670, 198, 3838, 374, 151645]]).astype(np.int32)[None]
  with torch.no_grad():
    expected = hf_model(input_ids=torch.from_numpy(ids).long(),
                        pixel_values=torch.from_numpy(tiles.transpose(0, 3, 1, 2))).logits
  batch = dict(input_ids=ids, positions=np.arange(ids.shape[1], dtype=np.int32)[None],
               segment_ids=np.ones_like(ids), pixel_values=tiles[None],
               tile_segment_ids=np.ones((1, len(tiles)), np.int32))
  ours = model.logits(model.forward({k: jnp.asarray(v) for k, v in batch.items()}).hidden)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-4, rtol=1e-4)


def test_xtuner_example_files_train_without_edits(tmp_path):
  """XTuner's own example JSONL files (single and multi image, and pure text), as shipped."""
  examples = sft_mini.XTUNER_EXAMPLES
  datasets = [config_lib.dataset(name, os.path.join(examples,
                                                   f"mllm_sft_{name}_example_data.jsonl"),
                                 media_root=examples, chat_template="intern-s1",
                                 sample_ratio=0.1 if name == "text" else 1.0)
              for name in ("text", "single_image", "multi_image")]
  # A small tile budget keeps the step light (the files are as XTuner ships them).
  cfg = _short(tmp_path, steps=1, **{"data.datasets": datasets, "eval_datasets": [],
                                     "data.pack_max_length": 2048,
                                     "data.sample_max_length": 2048, "hf_interval": -1,
                                     "data.max_dynamic_patch": 4,
                                     "global_batch_size": 4, "data.skip_bad_samples": True})
  summary = Trainer(cfg).fit()
  records = _records(summary["run_dir"])
  assert len(records) == 1 and np.isfinite(records[0]["loss"]) and records[0]["loss_tokens"] > 0
  # Line 6 of XTuner's multi-image file gives the two-cat picture (640 x 480) image_wh
  # [375, 500]: XTuner fails when it loads that sample, jaxtune at start-up, or skips it.
  with open(os.path.join(summary["run_dir"], "train.log")) as f:
    log = f.read()
  assert "mllm_sft_multi_image_example_data.jsonl:6" in log and "image_wh" in log
