"""Building the train state on the mesh: fresh, from HF weights, or as a restore target.

Nothing here materialises a full unsharded copy: parameters come from the model factory already
sharded, and the optimizer state is created by a jit whose output shardings mirror the
parameters' (left to itself, XLA would place Adam's moments on a single device).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxtune import models
from jaxtune.train.step import ModelDef, TrainState


def split_model(model: nnx.Module) -> tuple[ModelDef, nnx.State]:
  """(the model's static half, its nnx.Param state): what the train step takes."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  lora = getattr(model, "lora_config", None)  # a model with adapters (models.lora.attach)
  return ModelDef(graphdef, rest, models.trainable_filter(model.config, lora)), params


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_opt_state,
                        param_shardings, mesh):
  """Every optimizer leaf that stands for a parameter (Adam's mu and nu, ...) takes that
  parameter's sharding; the rest (step counts, ...) are replicated.

  Which leaves stand for parameters is optax's own answer (`optax.tree_map_params`: it
  initialises the optimizer on a placeholder and sees where the parameter tree lands), not a
  guess from key paths or shapes.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(optimizer, lambda _, sharding: sharding, abstract_opt_state,
                               param_shardings, transform_non_params=lambda _: replicated)


def init_opt_state(optimizer, params, mesh):
  shardings = jax.tree.map(lambda x: x.sharding, params)
  abstract = jax.eval_shape(optimizer.init, params)
  out = opt_state_shardings(optimizer, abstract, shardings, mesh)
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
  opt_shardings = opt_state_shardings(optimizer, abstract_opt, shardings, mesh)
  with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  return TrainState(
      params=abstract_params,
      opt_state=jax.tree.map(with_sharding, abstract_opt, opt_shardings),
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())))
