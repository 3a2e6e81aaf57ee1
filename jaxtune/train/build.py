"""What a run needs, built one way: the trainer, the planner (jaxtune.plan), eval, the data CLI
(python -m jaxtune.data) and scripts/bench_train.py all build here, from a `config.Resolved`.

  resolved = config.resolve(recipe, num_devices)
  mesh = build.make_run_mesh(resolved)
  with build.run_context(resolved, mesh):          # the mesh and the logical-axis rules
    run = build.build_run(resolved, mesh, total_steps=...)
    compiled = run.compile()                       # the train step, ahead of time
  data = build.build_data(resolved, tokenizer, role="train", mesh=mesh)

`build_run` works from abstract state: it reads no weights, data files or tokenizer, so the
planner compiles the real step of any model on simulated devices. The trainer fills the state
(random init, HF weights or a restore target: `Run.abstract_model`, `Run.abstract_state`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from jaxtune import models
from jaxtune.config import Resolved
from jaxtune.data.pipeline import SFTData
from jaxtune.parallel import sharding
from jaxtune.parallel.mesh import make_mesh
from jaxtune.train.optim import lr_schedule, make_optimizer
from jaxtune.train.state import abstract_train_state, split_model
from jaxtune.train.step import ModelDef, TrainState, compile_train_step


class Run(NamedTuple):
  """The step of a run and everything it is made of; nothing allocated."""
  mesh: jax.sharding.Mesh
  model_def: ModelDef
  abstract_params: Any        # nnx.State of sharded ShapeDtypeStructs
  optimizer: Any              # unit learning rate: the step applies `schedule`
  schedule: Callable
  total_steps: int
  num_micro: int
  abstract_state: TrainState  # shapes, dtypes and shardings: a restore target
  batch_layout: dict          # name -> (shape, dtype) of the global batch
  batch_sharding: Any         # every batch array, along its rows
  abstract_batch: dict
  step: Callable              # jit(state, batch) -> (state, metrics), state donated

  def abstract_model(self):
    """The model with sharded ShapeDtypeStruct params, to fill (jaxtune.hf.load_hf_weights)."""
    return self.model_def.merge(self.abstract_params)

  def compile(self):
    """The step compiled ahead of time for this run's state and batch."""
    return self.step.lower(self.abstract_state, self.abstract_batch).compile()


def make_run_mesh(resolved: Resolved, devices=None) -> jax.sharding.Mesh:
  """The recipe's mesh on `devices` (default: all of them)."""
  return make_mesh(resolved.mesh_shape, devices)


@contextlib.contextmanager
def run_context(resolved: Resolved, mesh: jax.sharding.Mesh):
  """The mesh and the recipe's logical-axis rules, as everything that builds or runs the step
  needs them."""
  with jax.set_mesh(mesh), sharding.axis_rules(resolved.axis_rules):
    yield


def batch_layout(resolved: Resolved, rows: int, max_tiles: int | None = None) -> dict:
  """The family's layout of a batch of `rows` packed rows; max_tiles: tile slots per row
  (default: the data's bound, `resolved.tiles_bound`)."""
  cfg = resolved.cfg
  tiles = resolved.tiles_bound if max_tiles is None else int(max_tiles)
  return models.family(cfg.model.type).batch_layout(cfg.model, rows, cfg.data.pack_max_length,
                                                    max_tiles=tiles)


def build_run(resolved: Resolved, mesh: jax.sharding.Mesh, *, total_steps: int,
              max_tiles: int | None = None) -> Run:
  """Model definition, optimizer, schedule, abstract state, batch layout and the jitted step.
  Call it inside `run_context(resolved, mesh)`. max_tiles: as `batch_layout`'s (the trainer
  passes its packs' actual maximum, which is at most the bound)."""
  cfg = resolved.cfg
  model_def, abstract_params = split_model(
      models.abstract_model(cfg.model, mesh, **resolved.model_kwargs))
  optimizer = make_optimizer(cfg.optim)
  schedule = lr_schedule(cfg.lr, cfg.optim.lr, total_steps)
  state = abstract_train_state(abstract_params, optimizer, mesh, model_def)
  layout = batch_layout(resolved, cfg.global_batch_size, max_tiles)
  batch_sharding = sharding.batch_sharding(mesh)
  step = compile_train_step(state, model_def=model_def, loss_cfg=cfg.loss, optimizer=optimizer,
                            schedule=schedule, num_micro=resolved.num_micro,
                            batch_layout=layout, batch_sharding=batch_sharding,
                            skip_grad_norm_threshold=cfg.optim.skip_grad_norm_threshold)
  abstract_batch = {k: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=batch_sharding)
                    for k, (shape, dtype) in layout.items()}
  return Run(mesh=mesh, model_def=model_def, abstract_params=abstract_params,
             optimizer=optimizer, schedule=schedule, total_steps=int(total_steps),
             num_micro=resolved.num_micro, abstract_state=state, batch_layout=layout,
             batch_sharding=batch_sharding, abstract_batch=abstract_batch, step=step)


def host_rows(mesh: jax.sharding.Mesh, rows: int) -> np.ndarray:
  """The rows of a global batch that this process's devices hold, in ascending order (the
  order `jax.make_array_from_process_local_data` reads a host's rows in)."""
  indices = sharding.batch_sharding(mesh).addressable_devices_indices_map((rows, 1))
  held = {r for index in indices.values() for r in range(*index[0].indices(rows))}
  return np.asarray(sorted(held), np.int64)


def build_data(resolved: Resolved, tokenizer, *, role: str = "train",
               mesh: jax.sharding.Mesh | None = None, dataset: dict | None = None) -> SFTData:
  """The SFTData of a role. tokenizer: what SFTData accepts (a directory, a TokenEncoder).

  'train': the order of one host reading every row (so the batches do not depend on the host
  count and a run resumes on another topology), this host taking the rows its devices hold in
  `mesh` (None: one process holding them all, as the data CLI shows them); length grouping
  balances each micro-batch over the data-parallel ranks.
  'eval': `dataset` (an eval_datasets entry) packed like the training data, each host packing
  its own share, one row per host and step (SFTData then keeps every pack).
  """
  cfg = resolved.cfg
  count, index = jax.process_count(), jax.process_index()
  if role == "train":
    return SFTData(cfg.data, tokenizer, global_batch_size=cfg.global_batch_size,
                   process_index=index, process_count=count,
                   data_parallel=resolved.data_parallel, global_order=True,
                   host_rows=None if mesh is None else host_rows(mesh, cfg.global_batch_size),
                   media=resolved.media)
  if role == "eval":
    data_cfg = ConfigDict(cfg.data.to_dict())
    data_cfg.datasets = [dataset]
    return SFTData(data_cfg, tokenizer, global_batch_size=count, process_index=index,
                   process_count=count, media=resolved.media)
  raise ValueError(f"unknown data role {role!r}: 'train' or 'eval'")
