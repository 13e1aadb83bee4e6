"""Optimiser and learning-rate schedule from `config.optimizer`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


EPS_STYLES = ("pytorch", "tf")


def tf_adam_eps(eps: float, b2: float):
  """The per-step epsilon that makes optax's Adam apply epsilon as TensorFlow's Adam does.

  optax (like PyTorch) divides the bias-corrected moments, m_hat / (sqrt(v_hat) + eps).
  TensorFlow's `AdamOptimizer` (used by the original RLHF code, Ziegler et al. 2019) adds eps
  to the uncorrected root: lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps), which is
  the former with eps_t = eps / sqrt(1 - b2^t). Early on eps_t >> eps: for g = 1e-6, b2 =
  0.95, eps = 1e-5 the first update is 0.022 (TF) against 0.091 (PyTorch). t = count + 1.
  """
  return lambda count: eps / jnp.sqrt(1.0 - b2 ** (count + 1).astype(jnp.float32))


def make_optimizer(opt_config, num_steps: int) -> optax.GradientTransformation:
  """Adam(W) with warmup + decay and optional global-norm gradient clipping.

  `opt_config.eps_style` (default 'pytorch') is where epsilon enters: 'pytorch' is
  `optax.adamw`; 'tf' is TensorFlow's Adam (see `tf_adam_eps`), the same chain with a
  per-step epsilon injected into `optax.scale_by_adam`.
  """
  schedule = make_schedule(opt_config, num_steps)
  eps_style = opt_config.get("eps_style", "pytorch")
  if eps_style not in EPS_STYLES:
    raise ValueError(f"config.optimizer.eps_style={eps_style!r}; expected one of {EPS_STYLES}.")
  chain = []
  if opt_config.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(opt_config.grad_clip_norm))
  if eps_style == "pytorch":
    chain.append(
        optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.eps,
                    weight_decay=opt_config.weight_decay, mask=_decay_mask))
  else:
    chain += [
        optax.inject_hyperparams(optax.scale_by_adam)(b1=opt_config.b1, b2=opt_config.b2,
                                                      eps=tf_adam_eps(opt_config.eps,
                                                                      opt_config.b2)),
        optax.add_decayed_weights(opt_config.weight_decay, mask=_decay_mask),
        optax.scale_by_learning_rate(schedule)
    ]
  return optax.chain(*chain)
