"""Eval loss: logged per dataset every eval_interval steps and at the end, and equal to a direct
computation: each chat tokenized by hand (the tokenizer is byte-level), run alone through
transformers' Qwen3 loaded from the run's HF export, log-softmax, mean per sample (the recipe
uses loss_reduction='sample'), mean over samples."""

import json
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from jaxtune.config import dataset
from jaxtune.train.trainer import Trainer
from test_trainer_utils import read_metrics, tiny_config, use_compile_cache, write_chats

pytestmark = pytest.mark.slow

IM_START, IM_END = 257, 258


def _chat_ids(messages):
  """ids and trained flags of one chat under the qwen3 template, one id per byte."""
  ids, trained = [], []

  def add(text_or_ids, train):
    chunk = list(text_or_ids.encode()) if isinstance(text_or_ids, str) else text_or_ids
    ids.extend(chunk)
    trained.extend([train] * len(chunk))

  for m in messages:
    if m["role"] == "user":
      add([IM_START], False), add("user\n" + m["content"], False), add([IM_END], False)
      add("\n", False), add([IM_START], False), add("assistant\n", False)
    else:
      add(m["content"], True), add([IM_END], True), add("\n", False)
  return np.array(ids), np.array(trained)


def _direct_eval_loss(model, path):
  per_sample = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      ids, trained = _chat_ids(json.loads(line)["messages"])
      with torch.no_grad():
        logits = model(torch.from_numpy(ids[None]).long()).logits[0].double()
      logp = torch.log_softmax(logits, dim=-1).numpy()
      targets = np.flatnonzero(trained[1:])  # position t predicts token t + 1
      per_sample.append(-logp[targets, ids[targets + 1]].mean())
  return float(np.mean(per_sample))


def test_eval_loss_per_dataset_equals_a_direct_computation(tmp_path, tmp_path_factory):
  use_compile_cache(tmp_path_factory)
  held = write_chats(str(tmp_path / "held.jsonl"), 10, seed=1)
  other = write_chats(str(tmp_path / "other.jsonl"), 5, seed=2)
  cfg = tiny_config(str(tmp_path), total_steps=3, eval_interval=2, checkpoint_interval=-1,
                    eval_datasets=[dataset("held", held), dataset("other", other)])
  cfg.loss.loss_reduction = "sample"
  summary = Trainer(cfg).fit()

  records = read_metrics(summary["run_dir"])
  logged = [sorted(k for k in r if k.startswith("eval_loss_")) for r in records]
  assert logged == [[], ["eval_loss_held", "eval_loss_other"],
                    ["eval_loss_held", "eval_loss_other"]]  # every 2 steps and at the end
  assert records[1]["eval_loss_held"] != records[2]["eval_loss_held"]

  model = AutoModelForCausalLM.from_pretrained(os.path.join(summary["run_dir"], "hf-latest"),
                                               dtype=torch.float32).eval()
  for name, path in (("held", held), ("other", other)):
    direct = _direct_eval_loss(model, path)
    assert records[2][f"eval_loss_{name}"] == pytest.approx(direct, rel=2e-5), name
    assert summary[f"eval_loss_{name}"] == records[2][f"eval_loss_{name}"]
