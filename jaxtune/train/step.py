"""The training step: a pure function (state, batch) -> (state, metrics), jit-compiled once.

One call is one optimizer step over the whole global batch: the batch is split into
micro-batches scanned in order (gradient accumulation), each contributing its weighted loss
sum and gradient; both are divided by the sum of loss weights over the *global* batch, so any
split gives exactly the single-batch loss and gradient (XTuner's reduction). The model's
auxiliary losses (MoE load balancing, ...) join the objective with their coefficients,
averaged over the micro-batches; `loss` stays the LM loss. Then the update is applied unless
the loss or gradient norm is not finite, or the norm exceeds `optim.skip_grad_norm_threshold`,
in which case the update is skipped (params and optimizer state kept); the LR schedule still
advances, as XTuner's scheduler does.

Only the trainable params (the family's filter, `nnx.Param` only) are differentiated and have
optimizer state; frozen params ride along in `TrainState.params` untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune.ops.loss import chunked_cross_entropy, eager_cross_entropy, loss_weights
from jaxtune.parallel import sharding
from jaxtune.train.optim import global_norm


class TrainState(NamedTuple):
  params: Any          # nnx.State of every nnx.Param (fp32 master weights), frozen ones too
  opt_state: Any       # the optimizer's state for the trainable params only
  step: jax.Array      # trainer steps so far, skipped ones included; drives the LR schedule


class ModelDef(NamedTuple):
  """The static half of a model: what the step needs besides the params."""
  graphdef: nnx.GraphDef
  rest: Any            # nnx.State of the model's non-Param variables (never trained)
  trainable: Any       # nnx filter selecting the params that train

  def merge(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params, self.rest)

  def split_trainable(self, params) -> tuple[Any, Any]:
    """(trainable, frozen) parts of a params State."""
    return nnx.split_state(params, self.trainable, ...)


def split_micro_batches(batch: dict, num_micro: int) -> dict:
  """[G, ...] -> [A, G/A, ...] so that each data-parallel rank keeps its own rows.

  Rows arrive sharded over ranks along G; reshaping to [G/A, A] first and swapping axes keeps
  every rank's rows on that rank (no data movement) while each micro-batch spans all ranks.
  """
  def split(x):
    g = x.shape[0]
    return jnp.swapaxes(x.reshape(g // num_micro, num_micro, *x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


def make_loss_fn(model_def: ModelDef, loss_cfg) -> Callable:
  """Returns loss_sum(params, micro_batch, weights) -> (weighted CE sum, ForwardOutput)."""
  chunk_size = int(loss_cfg.chunk_size)
  eager = loss_cfg.mode == "eager"

  def loss_sum(params, mb: dict, weights_bt: jax.Array):
    model = model_def.merge(params)
    out = model.forward(mb)
    hidden_nd = out.hidden.reshape(-1, out.hidden.shape[-1])
    labels_n, weights_n = mb["labels"].reshape(-1), weights_bt.reshape(-1)
    if eager:
      return eager_cross_entropy(hidden_nd, model.lm_head_kernel(), labels_n, weights_n), out
    # Tokens are sharded over the data-parallel axes (and a row's over the sequence axes): each
    # device chunks its own tokens and the LM-head gradient is reduced once per micro-batch,
    # not once per chunk.
    mesh = jax.sharding.get_abstract_mesh()
    token_axes = (sharding.batch_axes() if mesh.empty else
                  sharding.token_axes(mb["labels"].shape, mesh))
    return chunked_cross_entropy(hidden_nd, model.lm_head_kernel(), labels_n, weights_n,
                                 chunk_size=chunk_size, token_axes=token_axes), out
  return loss_sum


def train_step(state: TrainState, batch: dict, *, model_def: ModelDef, loss_fn: Callable,
               optimizer: optax.GradientTransformation, schedule: Callable, num_micro: int,
               loss_reduction: str, skip_grad_norm_threshold: float | None = None,
               grad_shardings: Any = None) -> tuple[TrainState, dict]:
  """One optimizer step over a global batch of packed rows [G, T] (+ the family's arrays).

  `optimizer` has a unit learning rate (`make_optimizer(optim_cfg)`): its updates are scaled
  here by `schedule(state.step)`. `grad_shardings` (the trainable params' shardings) pins the
  float32 gradient accumulators to the params' layout: each device keeps only its shard of
  the running sum (a reduce-scatter per micro-batch), never a whole copy."""
  weights_gt = loss_weights(batch["labels"], batch["segment_ids"], loss_reduction)
  denominator = jnp.maximum(weights_gt.sum(), 1e-6)  # over the global batch, all ranks
  micro = split_micro_batches({**batch, "weights": weights_gt}, num_micro)
  trainable, frozen = model_def.split_trainable(state.params)
  coefficients = model_def.merge(state.params).aux_loss_coefficients()

  def objective(trainable_params, mb):
    lm_sum, out = loss_fn(nnx.merge_state(trainable_params, frozen), mb, mb["weights"])
    aux = sum((coefficients[k] * v for k, v in out.aux_losses.items()), jnp.zeros(()))
    return lm_sum / denominator + aux / num_micro, (lm_sum, out.aux_losses, out.stats)

  grad_fn = jax.value_and_grad(objective, has_aux=True)
  like_params = lambda tree: (tree if grad_shardings is None else
                              jax.lax.with_sharding_constraint(tree, grad_shardings))

  def accumulate(carry, mb):
    (_, (lm_sum, aux, stats)), grads = grad_fn(trainable, mb)
    new = dict(lm_sum=lm_sum, aux=aux, stats=stats,
               grads=like_params(jax.tree.map(lambda g: g.astype(jnp.float32), grads)))
    return jax.tree.map(jnp.add, carry, new), None

  # Shapes of one micro-batch's outputs, for the zero-initialised accumulators.
  first = jax.tree.map(lambda x: x[0], micro)
  (_, (lm0, aux0, stats0)) = jax.eval_shape(objective, trainable, first)
  zeros = lambda tree, dtype=None: jax.tree.map(
      lambda x: jnp.zeros(x.shape, dtype or x.dtype), tree)
  init = dict(lm_sum=zeros(lm0), aux=zeros(aux0), stats=zeros(stats0),
              grads=like_params(zeros(trainable, jnp.float32)))
  sums, _ = jax.lax.scan(accumulate, init, micro)

  loss = sums["lm_sum"] / denominator
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), sums["grads"], trainable)
  grad_norm = global_norm(grads)  # float32 accumulation; the clip reuses it
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  apply = finite
  if skip_grad_norm_threshold is not None:
    apply = apply & (grad_norm <= skip_grad_norm_threshold)

  lr = jnp.asarray(schedule(state.step), jnp.float32)
  updates, opt_state = optax.with_extra_args_support(optimizer).update(
      grads, state.opt_state, trainable, grad_norm=grad_norm)
  updates = jax.tree.map(lambda u: (u * lr).astype(u.dtype), updates)
  new_trainable = optax.apply_updates(trainable, updates)
  # A skipped step leaves params and optimizer state (Adam's count too) untouched; the
  # schedule, driven by the trainer step, moves on.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
  new_state = TrainState(params=nnx.merge_state(keep(new_trainable, trainable), frozen),
                         opt_state=keep(opt_state, state.opt_state),
                         step=state.step + 1)
  model_metrics = {k: v / num_micro for k, v in sums["aux"].items()}
  model_metrics.update(model_def.merge(state.params).step_metrics(sums["stats"]))
  metrics = dict(
      loss=loss,
      grad_norm=grad_norm,
      lr=lr,
      loss_tokens=(batch["labels"] >= 0).sum(),
      tokens=(batch["segment_ids"] > 0).sum(),
      skipped=jnp.logical_not(apply),
      nonfinite=jnp.logical_not(finite),
      model=model_metrics,
  )
  return new_state, metrics


def batch_shardings(batch_layout: dict, sharding) -> dict:
  """Every batch array split over the batch axes along its leading (row) axis."""
  return {k: sharding for k in batch_layout}


def compile_train_step(state: TrainState, *, model_def: ModelDef, loss_cfg, optimizer,
                       schedule, num_micro: int, batch_layout: dict, batch_sharding,
                       skip_grad_norm_threshold: float | None = None) -> Callable:
  """jit with the state's shardings kept in place and its buffers donated.

  optimizer: unit learning rate (`make_optimizer(optim_cfg)`); `schedule` scales its updates.
  Call the result under `jax.set_mesh(mesh)` and the run's `sharding.axis_rules` (the loss
  sums over the rules' data-parallel axes).
  """
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  step = functools.partial(train_step, model_def=model_def,
                           loss_fn=make_loss_fn(model_def, loss_cfg), optimizer=optimizer,
                           schedule=schedule, num_micro=num_micro,
                           loss_reduction=loss_cfg.loss_reduction,
                           skip_grad_norm_threshold=skip_grad_norm_threshold,
                           grad_shardings=model_def.split_trainable(state_shardings.params)[0])
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings(batch_layout,
                                                                      batch_sharding)),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
