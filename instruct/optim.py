"""Optimiser and learning-rate schedule from `config.optimizer`."""

from __future__ import annotations

import jax
import optax


def make_schedule(opt_config, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine or linear decay to `end_lr_fraction` * peak."""
  peak, warmup = opt_config.learning_rate, min(opt_config.warmup_steps, num_steps)
  end = peak * opt_config.end_lr_fraction
  decay_steps = max(num_steps - warmup, 1)
  if opt_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_config.end_lr_fraction)
  elif opt_config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt_config.schedule == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.optimizer.schedule={opt_config.schedule!r}; expected "
                     "'cosine', 'linear' or 'constant'.")
  warm = optax.linear_schedule(0.0, peak, warmup) if warmup else optax.constant_schedule(peak)
  return optax.join_schedules([warm, decay], [warmup])


def _decay_mask(params):
  """Weight decay on matrices only (not on biases, norm scales)."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup + decay and global-norm gradient clipping."""
  schedule = make_schedule(opt_config, num_steps)
  chain = []
  if opt_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  chain.append(optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                           weight_decay=opt_config.weight_decay, mask=_decay_mask))
  return optax.chain(*chain)
