"""Building the train state on the mesh: fresh, from HF weights, or as a restore target.

Nothing here materialises a full unsharded copy: parameters come from the model factory already
sharded, and the optimizer state is created by a jit whose output shardings mirror the
parameters' (left to itself, XLA would place Adam's moments on a single device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import models
from jaxtune.train.step import ModelDef, TrainState


def split_model(model: nnx.Module) -> tuple[ModelDef, nnx.State]:
  """(the model's static half, its nnx.Param state): what the train step takes."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return ModelDef(graphdef, rest, models.trainable_filter(model.config)), params


def opt_state_shardings(abstract_opt_state, param_shardings, mesh):
  """A parameter's sharding for every optimizer leaf that mirrors it; replicated otherwise.

  Optimizer states (Adam's mu and nu, ...) hold trees with the parameters' own key paths, so a
  leaf whose key path ends with a parameter's path and has its shape takes its sharding.
  """
  by_path = {tuple(path): s for path, s in
             jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    for start in range(len(path)):
      hit = by_path.get(tuple(path[start:]))
      if hit is not None and len(hit.spec) <= len(leaf.shape):
        return hit
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def init_opt_state(optimizer, params, mesh):
  shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(optimizer.init, params)
  out = opt_state_shardings(abstract, shardings, mesh)
  return jax.jit(optimizer.init, out_shardings=out)(params)


def new_train_state(params, optimizer, mesh, model_def: ModelDef) -> TrainState:
  """Fresh optimizer state for the trainable params; frozen ones get none."""
  trainable, _ = model_def.split_trainable(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, PartitionSpec()))
  return TrainState(params=params, opt_state=init_opt_state(optimizer, trainable, mesh),
                    step=step)


def abstract_train_state(abstract_params, optimizer, mesh, model_def: ModelDef) -> TrainState:
  """The state's shapes, dtypes and shardings with nothing allocated: a restore target."""
  trainable, _ = model_def.split_trainable(abstract_params)
  shardings = jax.tree.map(lambda x: x.sharding, trainable)
  abstract_opt = jax.eval_shape(optimizer.init, trainable)
  opt_shardings = opt_state_shardings(abstract_opt, shardings, mesh)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return TrainState(
      params=abstract_params,
      opt_state=jax.tree.map(with_sharding, abstract_opt, opt_shardings),
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())))
