"""LR schedules (hand-computed and against XTuner's torch scheduler chain) and the optimizer
against torch.optim.AdamW + clip_grad_norm_."""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from ml_collections import ConfigDict

from jaxtune.config import base_config
from jaxtune.train.optim import global_norm, lr_schedule, make_optimizer, warmup_steps

BASE, LR_MIN = 1e-3, 1e-5


def _lr(lr_type, warmup_ratio, lr_min=LR_MIN, zero_warmup_repeats_base_lr=True):
  return ConfigDict(dict(lr_type=lr_type, warmup_ratio=warmup_ratio, lr_min=lr_min,
                         zero_warmup_repeats_base_lr=zero_warmup_repeats_base_lr))


def _optim(max_grad_norm=1.0, weight_decay=0.01):
  cfg = base_config().optim
  cfg.update(lr=BASE, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8,
             max_grad_norm=max_grad_norm)
  return cfg


def _scheduled(optim_cfg, schedule):
  """The unit-lr optimizer with the schedule applied by update count (as the train step does
  by trainer step, which is the same count when no step is skipped)."""
  return optax.chain(make_optimizer(optim_cfg), optax.scale_by_schedule(schedule))


def _values(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_cosine_with_fractional_warmup_hand_computed():
  f = lr_schedule(_lr("cosine", 0.1), BASE, 100)  # W = 10, decay over 90 steps
  cos = lambda k: LR_MIN + (BASE - LR_MIN) * (1 + math.cos(math.pi * k / 90)) / 2
  want = {0: 0.0, 1: 1e-4, 5: 5e-4, 9: 9e-4, 10: BASE, 11: cos(1),
          55: LR_MIN + (BASE - LR_MIN) / 2, 99: cos(89), 100: LR_MIN, 250: LR_MIN}
  np.testing.assert_allclose(_values(f, want), list(want.values()), rtol=1e-6, atol=1e-12)


def test_linear_with_absolute_warmup_hand_computed():
  f = lr_schedule(_lr("linear", 4), BASE, 20)  # W = 4 steps, decay over 16
  lin = lambda k: BASE + (LR_MIN - BASE) * k / 16
  want = {0: 0.0, 2: BASE / 2, 3: 0.75 * BASE, 4: BASE, 12: lin(8), 19: lin(15), 20: LR_MIN,
          30: LR_MIN}
  np.testing.assert_allclose(_values(f, want), list(want.values()), rtol=1e-6, atol=1e-12)


def test_constant_and_no_warmup():
  f = lr_schedule(_lr("constant", 0.25), BASE, 10)  # int(2.5) = 2 warmup steps
  np.testing.assert_allclose(_values(f, range(6)), [0, BASE / 2] + [BASE] * 4, rtol=1e-6)
  # No warmup, XTuner's way (its SequentialLR on torch <= 2.12): updates 0 and 1 at base_lr,
  # then the decay one update late.
  cos = [LR_MIN + (BASE - LR_MIN) * math.cos(math.pi * s / 20) ** 2 for s in range(10)]
  g = lr_schedule(_lr("cosine", 0.0), BASE, 10)
  np.testing.assert_allclose(_values(g, range(10)), [BASE] + cos[:9], rtol=1e-6)
  # ... or from update 0 (the fixed torch's chain).
  g = lr_schedule(_lr("cosine", 0.0, zero_warmup_repeats_base_lr=False), BASE, 10)
  np.testing.assert_allclose(_values(g, range(10)), cos, rtol=1e-6)
  assert warmup_steps(_lr("cosine", 0.03), 50) == 1  # floor(1.5)
  assert warmup_steps(_lr("cosine", 3.0), 50) == 3
  assert warmup_steps(_lr("cosine", 1.0), 50) == 1  # 1 is a count, not "all of training"


def test_schedule_works_under_jit_with_integer_count():
  f = lr_schedule(_lr("cosine", 0.1), BASE, 100)
  out = jax.jit(jax.vmap(f))(jnp.arange(100, dtype=jnp.int32))
  np.testing.assert_allclose(np.asarray(out), _values(f, range(100)), rtol=1e-5)


def _xtuner_torch_lrs(lr_type, ratio, total, base=BASE, lr_min=LR_MIN):
  """XTuner's Trainer.build_lr_scheduler rebuilt from torch's schedulers; lr of each update."""
  opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=base)
  warm = int(ratio * total) if ratio < 1 else int(ratio)
  first = torch.optim.lr_scheduler.LambdaLR(opt, lambda x: x / warm if x < warm else 1)
  if lr_type == "linear":
    second = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=lr_min / base,
                                               total_iters=total - warm)
  elif lr_type == "cosine":
    second = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warm, eta_min=lr_min)
  else:
    second = torch.optim.lr_scheduler.LambdaLR(opt, lambda x: 1.0)
  chain = torch.optim.lr_scheduler.SequentialLR(opt, schedulers=[first, second],
                                                milestones=[warm])
  lrs = []
  for _ in range(total):
    lrs.append(chain.get_last_lr()[0])
    opt.step()
    chain.step()
  return np.array(lrs)


@pytest.mark.parametrize("lr_type", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("ratio,total", [(0.03, 100), (0.2, 37), (0.1, 12), (5, 40), (1.0, 9),
                                         (0.0, 20), (0.01, 50)])  # the last two: no warmup
def test_schedule_matches_xtuner_torch_chain(lr_type, ratio, total):
  """XTuner's chain on the torch installed here (>= 2.13). With no warmup that torch starts
  the decay at update 0 (`zero_warmup_repeats_base_lr=False`); the torch <= 2.12 XTuner ran on
  repeats base_lr first (the default, hand-computed in test_constant_and_no_warmup)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # SequentialLR's internal step(epoch) deprecation
    want = _xtuner_torch_lrs(lr_type, ratio, total)
  no_warmup = warmup_steps(_lr(lr_type, ratio), total) == 0
  got = _values(lr_schedule(_lr(lr_type, ratio, zero_warmup_repeats_base_lr=not no_warmup),
                            BASE, total), range(total))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-10)
  if no_warmup:  # the default runs the same values one update late
    late = _values(lr_schedule(_lr(lr_type, ratio), BASE, total), range(total))
    np.testing.assert_allclose(late, np.concatenate([[BASE], want[:-1]]), rtol=1e-5, atol=1e-10)


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w": rng.normal(size=(5, 3)).astype(np.float32),
          "b": rng.normal(size=(3,)).astype(np.float32)}


def _grads(step, scale):
  rng = np.random.default_rng(100 + step)
  return {"w": (rng.normal(size=(5, 3)) * scale).astype(np.float32),
          "b": (rng.normal(size=(3,)) * scale).astype(np.float32)}


@pytest.mark.parametrize("max_grad_norm,scale", [(1.0, 3.0), (1.0, 0.05), (0.0, 3.0)])
def test_adamw_matches_torch(max_grad_norm, scale):
  """Several steps of clip + AdamW + warmup-cosine against torch, clipping on and off."""
  total, lr_cfg, optim_cfg = 8, _lr("cosine", 0.25), _optim(max_grad_norm, weight_decay=0.1)
  params = jax.tree.map(jnp.asarray, _params())
  tx = _scheduled(optim_cfg, lr_schedule(lr_cfg, BASE, total))
  state = tx.init(params)
  update = jax.jit(tx.update)

  t_params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in _params().items()}
  opt = torch.optim.AdamW(list(t_params.values()), lr=BASE, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)
  lrs = _xtuner_torch_lrs("cosine", 0.25, total)
  clipped = 0
  for step in range(total):
    g = _grads(step, scale)
    updates, state = update(jax.tree.map(jnp.asarray, g), state, params)
    params = optax.apply_updates(params, updates)

    for k, p in t_params.items():
      p.grad = torch.tensor(g[k])
    if max_grad_norm > 0:
      norm = torch.nn.utils.clip_grad_norm_(list(t_params.values()), max_grad_norm)
      clipped += float(norm) > max_grad_norm
      np.testing.assert_allclose(float(global_norm(g)), float(norm), rtol=1e-6)
    for group in opt.param_groups:
      group["lr"] = lrs[step]
    opt.step()
    for k, p in t_params.items():
      np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=1e-5,
                                 atol=1e-7, err_msg=f"{k} after update {step}")
  assert clipped == (total if scale > 1 and max_grad_norm > 0 else 0)
  moved = np.abs(np.asarray(params["w"]) - _params()["w"]).max()
  assert moved > 1e-4  # the comparison is not vacuous: the parameters did change


def test_first_update_runs_at_zero_learning_rate():
  tx = _scheduled(_optim(), lr_schedule(_lr("cosine", 0.5), BASE, 10))
  params = jax.tree.map(jnp.asarray, _params())
  updates, state = tx.update(jax.tree.map(jnp.asarray, _grads(0, 1.0)), tx.init(params), params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  updates, _ = tx.update(jax.tree.map(jnp.asarray, _grads(1, 1.0)), state, params)
  assert all(np.any(np.asarray(u)) for u in jax.tree.leaves(updates))


def test_clip_takes_the_norm_the_step_computed():
  """The train step passes its gradient norm (`grad_norm=`): the update is the same as the
  optimizer computing the norm itself."""
  tx = make_optimizer(_optim(max_grad_norm=1.0))
  params = jax.tree.map(jnp.asarray, _params())
  grads = jax.tree.map(jnp.asarray, _grads(0, 3.0))
  state = tx.init(params)
  own, _ = tx.update(grads, state, params)
  given, _ = tx.update(grads, state, params, grad_norm=global_norm(grads))
  for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(given)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_global_norm_accumulates_in_float32():
  tree = {"a": jnp.full((4096,), 0.01, jnp.bfloat16), "b": jnp.ones((3,), jnp.float32)}
  want = math.sqrt(4096 * float(jnp.bfloat16(0.01)) ** 2 + 3)
  got = global_norm(tree)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert float(global_norm({})) == 0.0


def test_rejects_unknown_lr_type():
  with pytest.raises(ValueError, match="lr_type"):
    lr_schedule(_lr("step", 0.0), BASE, 10)
