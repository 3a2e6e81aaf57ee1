"""Optimizer and learning-rate schedule, matching XTuner v1's AdamW + LRConfig.

XTuner (xtuner/v1/train/trainer.py, `Trainer.build_lr_scheduler`) chains torch schedulers:
`LambdaLR(x / W if x < W else 1)` for the warmup, then `CosineAnnealingLR(T_max=S - W,
eta_min=lr_min)`, `LinearLR(1 -> lr_min / lr, total_iters=S - W)` or a constant, joined by
`SequentialLR(milestones=[W])`, and calls `scheduler.step()` after every trainer step, also
one whose optimizer step it skipped (a NaN/Inf or too large gradient norm). Its
gradient clipping (xtuner/v1/engine/train_engine.py) scales by
`min(1, max_grad_norm / (norm + 1e-6))` over the trainable parameters, and its optimizer is
one `torch.optim.AdamW` group over every trainable parameter (decay applied to all of them).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

log = logging.getLogger("jaxtune")


def warmup_steps(lr_cfg: ConfigDict, total_steps: int) -> int:
  """W: `warmup_ratio` < 1 is a fraction of the total (floored), >= 1 a step count."""
  ratio = float(lr_cfg.warmup_ratio)
  return int(ratio * total_steps) if ratio < 1 else int(ratio)


def lr_schedule(lr_cfg: ConfigDict, base_lr: float, total_steps: int) -> optax.Schedule:
  """The learning rate of update s (0-based), exactly as XTuner's torch scheduler chain.

  With S = total_steps, W = `warmup_steps` and k = min(s - W, S - W):
    s < W:               base_lr * s / W           (update 0 runs at lr 0, like XTuner)
    s >= W, 'constant':  base_lr
    s >= W, 'linear':    base_lr + (lr_min - base_lr) * k / (S - W)
    s >= W, 'cosine':    lr_min + (base_lr - lr_min) * (1 + cos(pi * k / (S - W))) / 2
  The decay reaches lr_min at s = S, one past the last update: the last update (s = S - 1)
  runs at the value for k = S - W - 1, as in XTuner. Past S the value stays at lr_min
  (torch's cosine would swing back up); with W >= S the decay is never reached.

  With W = 0 and `lr.zero_warmup_repeats_base_lr` (default True), updates 0 and 1 both run at
  base_lr and the decay follows one update late (update s runs at k = s - 1): what XTuner's
  chain does on the torch versions it supports (torch >= 2.6; `SequentialLR` with a milestone
  at 0 skipped the second scheduler's first step until torch 2.13, pytorch #185872). False
  starts the decay at update 0, as the fixed torch does.
  """
  lr_type = lr_cfg.lr_type
  if lr_type not in ("cosine", "linear", "constant"):
    raise ValueError(f"lr.lr_type must be 'cosine', 'linear' or 'constant', got {lr_type!r}")
  base, lr_min = float(base_lr), float(lr_cfg.lr_min)
  warm = warmup_steps(lr_cfg, total_steps)
  decay = max(int(total_steps) - warm, 1)  # only 0 when warmup covers all of training
  late = 1.0 if warm == 0 and lr_cfg.get("zero_warmup_repeats_base_lr", True) else 0.0

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    k = jnp.clip(s - warm - late, 0.0, decay)
    # Written to avoid float32 cancellation near the end: (1 + cos x) / 2 = cos(x / 2)^2,
    # and the linear ramp is measured from lr_min, so both land on lr_min exactly.
    if lr_type == "cosine":
      after = lr_min + (base - lr_min) * jnp.square(jnp.cos(0.5 * math.pi * k / decay))
    elif lr_type == "linear":
      after = lr_min + (base - lr_min) * (1.0 - k / decay)
    else:
      after = jnp.full_like(s, base)
    if warm == 0:
      return after
    return jnp.where(s < warm, base * s / warm, after)

  return schedule


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves, accumulated in float32 whatever the leaves' dtype."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
  """XTuner's (and torch's clip_grad_norm_) rule: scale by min(1, max_norm / (norm + 1e-6)).

  optax.clip_by_global_norm scales by max_norm / norm with no epsilon; keeping XTuner's
  epsilon makes clipped steps match it to the last bit the dtype allows. The train step has
  the norm already (it reports it): it passes it as the extra argument `grad_norm`, so the
  norm is computed once per step.
  """
  def update_fn(updates, state, params=None, *, grad_norm=None, **extra_args):
    del params, extra_args
    norm = global_norm(updates) if grad_norm is None else grad_norm
    scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def scale_by_adam_stored_in(dtype, *, b1: float, b2: float, eps: float
                            ) -> optax.GradientTransformation:
  """optax.scale_by_adam with mu *and* nu stored in `dtype` (optax's `mu_dtype` covers mu).

  The update is computed in float32 from the stored moments (optax upcasts them against the
  float32 gradients) and only the new moments are rounded to `dtype` (to nearest): the step's
  own update is float32 arithmetic, the rounding error enters through the state. optax casts
  the new nu like the old one, so starting nu in `dtype` is all it takes.
  """
  inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=dtype)

  def init_fn(params):
    state = inner.init(params)
    return state._replace(nu=jax.tree.map(lambda v: v.astype(dtype), state.nu))

  return optax.GradientTransformation(init_fn, inner.update)


def make_optimizer(optim_cfg: ConfigDict) -> optax.GradientTransformationExtraArgs:
  """Clip (skipped when max_grad_norm <= 0), then AdamW on one parameter group, at a unit
  learning rate: the train step scales the updates by the schedule at the *trainer* step, so a
  skipped step still advances the schedule (as XTuner's) but not Adam's count. AdamW's update
  is linear in the learning rate (decay included), so this is the scheduled AdamW bit for bit.
  Frozen parameters never reach it: the train step gives it the trainable ones only.

  optim_cfg: the `optim` section: weight_decay, betas, eps, max_grad_norm, state_dtype
  (float32, or bfloat16 for Adam's moments: `scale_by_adam_stored_in`).
  `update(..., grad_norm=n)` clips with a norm the caller has computed (`global_norm`).
  """
  b1, b2 = (float(b) for b in optim_cfg.betas)
  state_dtype = jnp.dtype(optim_cfg.state_dtype)
  if state_dtype == jnp.float32:
    adamw = optax.adamw(learning_rate=1.0, b1=b1, b2=b2, eps=float(optim_cfg.eps),
                        weight_decay=float(optim_cfg.weight_decay))
  else:  # optax.adamw's own chain, with both moments stored in state_dtype
    if b2 > 0.99:
      log.warning("optim.state_dtype=%s with betas[1]=%g: nu's per-step change (%.2g%%) is "
                  "below bfloat16's rounding (0.39%%), so nu can only follow large gradients; "
                  "use float32 state with betas[1] > 0.99", state_dtype.name, b2,
                  100 * (1 - b2))
    adamw = optax.chain(scale_by_adam_stored_in(state_dtype, b1=b1, b2=b2,
                                                eps=float(optim_cfg.eps)),
                        optax.add_decayed_weights(float(optim_cfg.weight_decay)),
                        optax.scale_by_learning_rate(1.0))
  max_norm = float(optim_cfg.max_grad_norm)
  return optax.chain(clip_by_global_norm(max_norm), adamw) if max_norm > 0 else \
      optax.chain(adamw)
