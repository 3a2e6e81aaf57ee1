"""The training step: a pure function (state, batch) -> (state, metrics), jit-compiled once.

One call is one optimizer step over the whole global batch: the batch is split into
micro-batches scanned in order (gradient accumulation), each contributing its weighted loss
sum and gradient; both are divided by the sum of loss weights over the *global* batch, so any
split gives exactly the single-batch loss and gradient (XTuner's reduction). Then the update
is applied unless the loss or gradient norm is not finite, in which case the step is skipped.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxtune.ops.loss import chunked_cross_entropy, eager_cross_entropy, loss_weights

BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions")


class TrainState(NamedTuple):
  params: Any          # nnx.State of the trainable parameters (fp32 master weights)
  opt_state: Any
  step: jax.Array      # applied updates so far; drives the LR schedule


def split_micro_batches(batch: dict, num_micro: int) -> dict:
  """[G, T] -> [A, G/A, T] so that each data-parallel rank keeps its own rows.

  Rows arrive sharded over ranks along G; reshaping to [G/A, A] first and swapping axes keeps
  every rank's rows on that rank (no data movement) while each micro-batch spans all ranks.
  """
  def split(x):
    g = x.shape[0]
    return jnp.swapaxes(x.reshape(g // num_micro, num_micro, *x.shape[1:]), 0, 1)
  return {k: split(v) for k, v in batch.items()}


def make_loss_fn(graphdef: nnx.GraphDef, loss_cfg) -> Callable:
  """Returns loss_sum(params, micro_batch, weights): the weighted CE sum over its tokens."""
  chunk_size = int(loss_cfg.chunk_size)
  eager = loss_cfg.mode == "eager"

  def loss_sum(params, mb: dict, weights_bt: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, params)
    hidden_btd = model(mb["input_ids"], mb["positions"], mb["segment_ids"])
    hidden_nd = hidden_btd.reshape(-1, hidden_btd.shape[-1])
    labels_n, weights_n = mb["labels"].reshape(-1), weights_bt.reshape(-1)
    if eager:
      return eager_cross_entropy(hidden_nd, model.lm_head_kernel(), labels_n, weights_n)
    # Tokens are sharded over the data-parallel axes: each device chunks its own tokens and the
    # LM-head gradient is reduced once per micro-batch, not once per chunk.
    return chunked_cross_entropy(hidden_nd, model.lm_head_kernel(), labels_n, weights_n,
                                 chunk_size=chunk_size, token_axes=("data", "fsdp"))
  return loss_sum


def train_step(state: TrainState, batch: dict, *, loss_fn: Callable,
               optimizer: optax.GradientTransformation, schedule: Callable, num_micro: int,
               loss_reduction: str) -> tuple[TrainState, dict]:
  """One optimizer step over a global batch of packed rows [G, T]."""
  weights_gt = loss_weights(batch["labels"], batch["segment_ids"], loss_reduction)
  denominator = jnp.maximum(weights_gt.sum(), 1e-6)  # over the global batch, all ranks
  micro = split_micro_batches({**batch, "weights": weights_gt}, num_micro)
  grad_fn = jax.value_and_grad(loss_fn)

  def accumulate(carry, mb):
    loss_acc, grads_acc = carry
    loss, grads = grad_fn(state.params, mb, mb["weights"])
    grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
    return (loss_acc + loss, grads_acc), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
  (loss_sum, grad_sum), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
  loss = loss_sum / denominator
  grads = jax.tree.map(lambda g, p: (g / denominator).astype(p.dtype), grad_sum, state.params)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite step leaves params, optimizer state and the schedule untouched.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(params=keep(params, state.params),
                         opt_state=keep(opt_state, state.opt_state),
                         step=state.step + finite.astype(state.step.dtype))
  metrics = dict(
      loss=loss,
      grad_norm=grad_norm,
      lr=jnp.asarray(schedule(state.step), jnp.float32),
      loss_tokens=(batch["labels"] >= 0).sum(),
      tokens=(batch["segment_ids"] > 0).sum(),
      skipped=jnp.logical_not(finite),
  )
  return new_state, metrics


def compile_train_step(state: TrainState, *, graphdef, loss_cfg, optimizer, schedule,
                       num_micro: int, batch_sharding) -> Callable:
  """jit with the state's shardings kept in place and its buffers donated.

  Call the result under `jax.set_mesh(mesh)` (the loss names the mesh's data axes).
  """
  step = functools.partial(train_step, loss_fn=make_loss_fn(graphdef, loss_cfg),
                           optimizer=optimizer, schedule=schedule, num_micro=num_micro,
                           loss_reduction=loss_cfg.loss_reduction)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  batch_shardings = {k: batch_sharding for k in BATCH_KEYS}
  return jax.jit(step, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, None), donate_argnums=(0,))
