"""Evaluation loss on held-out datasets (XTuner has none): `eval_datasets`, `eval_interval`.

Each eval dataset is tokenized and packed exactly like the training data (same template, loss
mask, `pack_max_length`, `pack_level`), and every one of its packs is seen exactly once per
evaluation: packs go into batches of one forward pass (`data-parallel size x
data.micro_batch_size` rows), and the last batch is filled up with empty rows (labels -100,
which weigh nothing). The loss is the training loss's reduction (`loss.loss_reduction`) taken
over the whole dataset: sum(weight x CE) / sum(weight) over every trained token of it. No
gradients, no optimizer: a jit-compiled forward pass over the current parameters.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import jax
import numpy as np

from jaxtune.config import Resolved
from jaxtune.data.pipeline import SFTData
from jaxtune.ops.loss import loss_weights
from jaxtune.parallel.sharding import batch_sharding
from jaxtune.train import build, multihost
from jaxtune.train.prefetch import to_global_array
from jaxtune.train.step import ModelDef, make_loss_fn

log = logging.getLogger(__name__)


def make_eval_step(model_def: ModelDef, loss_cfg) -> Callable:
  """jit(params, batch) -> (weighted CE sum, weight sum, trained tokens) of one batch."""
  loss_fn = make_loss_fn(model_def, loss_cfg)

  def eval_step(params, batch: dict) -> dict:
    weights_bt = loss_weights(batch["labels"], batch["segment_ids"], loss_cfg.loss_reduction)
    return dict(loss_sum=loss_fn(params, batch, weights_bt)[0], weight=weights_bt.sum(),
                loss_tokens=(batch["labels"] >= 0).sum())
  return jax.jit(eval_step)


class EvalSet:
  """One eval dataset, packed; yields this host's rows of each eval batch."""

  def __init__(self, name: str, data: SFTData, rows_per_host: int, num_batches: int,
               layout: dict):
    """layout: the family's batch layout for rows_per_host rows of this data."""
    self.name, self.data = name, data
    self.rows, self.num_batches, self.layout = rows_per_host, num_batches, layout

  def host_batches(self):
    packs = self.data.plan.num_packs
    for b in range(self.num_batches):
      rows = [self.data.batch(0, 0, order=np.array([p]))
              for p in range(b * self.rows, min((b + 1) * self.rows, packs))]
      yield {k: self._fill([r[k] for r in rows], k) for k in self.layout}

  def _fill(self, rows: list[np.ndarray], key: str) -> np.ndarray:
    """Stacks the rows and adds empty ones (padding ids, no labels, no tiles) up to
    rows_per_host."""
    shape, dtype = self.layout[key]
    empty = {"input_ids": self.data.pad_id, "labels": -100}.get(key, 0)
    pad = np.full((self.rows - len(rows), *shape[1:]), empty, dtype)
    return np.concatenate([*rows, pad], axis=0) if rows else pad


class Evaluator:
  """Builds the eval sets once; `evaluate(params)` -> {"eval_loss_<name>": loss, ...}."""

  def __init__(self, resolved: Resolved, mesh, model_def: ModelDef, *, tokenizer):
    """tokenizer: what SFTData accepts (a directory, an HF tokenizer, a TokenEncoder)."""
    cfg = resolved.cfg
    self.mesh = mesh
    self.step = make_eval_step(model_def, cfg.loss)
    n_proc = jax.process_count()
    rows_global = resolved.data_parallel * cfg.data.micro_batch_size
    # Every process must hold whole rows of each batch.
    rows_global = rows_global * n_proc // math.gcd(rows_global, n_proc)
    self.sets = []
    for ds in cfg.eval_datasets:
      data = build.build_data(resolved, tokenizer, role="eval", dataset=ds)
      rows = rows_global // n_proc
      batches = math.ceil(data.plan.num_packs / rows)
      # Every process runs the same number of (collective) forward passes.
      batches = max(multihost.allgather_ints(batches))
      layout = build.batch_layout(resolved, rows, max_tiles=data.max_tiles)
      self.sets.append(EvalSet(ds["name"], data, rows, batches, layout))
      log.info("eval dataset '%s': %d packs in %d batch(es) of %d rows", ds["name"],
               data.plan.num_packs, batches, rows_global)

  def evaluate(self, params) -> dict[str, float]:
    out = {}
    sharding = batch_sharding(self.mesh)
    for eval_set in self.sets:
      loss_sum = weight = 0.0
      for host in eval_set.host_batches():
        batch = {k: to_global_array(v, sharding) for k, v in host.items()}
        result = jax.device_get(self.step(params, batch))
        loss_sum += float(result["loss_sum"])
        weight += float(result["weight"])
      out[f"eval_loss_{eval_set.name}"] = loss_sum / weight if weight > 0 else float("nan")
    return out
