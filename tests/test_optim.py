"""The optimisers of `config.optimizer`: AdamW, and TensorFlow's Adam for PPO."""

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from instruct import optim
from tests.test_sharding import load_config


def tf_adam_reference(grads, lr, b1, b2, eps):
  """TensorFlow's `AdamOptimizer` update rule, written out in numpy (float64):

    lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t);  update = -lr_t * m_t / (sqrt(v_t) + eps)
  """
  m = v = 0.0
  updates = []
  for t, g in enumerate(grads, 1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    updates.append(-lr_t * m / (np.sqrt(v) + eps))
  return np.array(updates)


def opt_config(**fields):
  base = dict(learning_rate=1.0, schedule="constant", warmup_steps=0, end_lr_fraction=1.0, b1=0.9,
              b2=0.95, eps=1e-5, weight_decay=0.0, grad_clip_norm=0.0)
  return ml_collections.ConfigDict(dict(base, **fields))


def run(optimizer, grads):
  params = {"w": jnp.zeros(())}
  state = optimizer.init(params)
  out = []
  for g in grads:
    updates, state = optimizer.update({"w": jnp.float32(g)}, state, params)
    out.append(float(updates["w"]))
  return np.array(out)


@pytest.mark.parametrize("b2", [0.95, 0.999])
def test_tf_epsilon_matches_tensorflows_adam(b2):
  grads = [1e-6, 3e-6, -2e-6, 5e-7, 1e-5, 1e-6]
  got = run(optim.make_optimizer(opt_config(b2=b2, eps_style="tf"), 100), grads)
  np.testing.assert_allclose(got, tf_adam_reference(grads, 1.0, 0.9, b2, 1e-5), rtol=1e-5)


def test_the_two_epsilon_placements_differ_as_measured():
  """First update for g = 1e-6, b2 = 0.95, eps = 1e-5: 0.022 (TF) against 0.091 (PyTorch)."""
  tf = run(optim.make_optimizer(opt_config(eps_style="tf"), 10), [1e-6])[0]
  pytorch = run(optim.make_optimizer(opt_config(eps_style="pytorch"), 10), [1e-6])[0]
  np.testing.assert_allclose([-tf, -pytorch], [0.02187, 0.09091], rtol=1e-3)


def test_unknown_epsilon_style_names_the_key():
  with pytest.raises(ValueError, match="config.optimizer.eps_style"):
    optim.make_optimizer(opt_config(eps_style="torch"), 10)


@pytest.mark.parametrize("preset", ["tiny", "fsdp"])
def test_ppo_uses_the_original_adam_for_both_models(preset):
  """PPO's optimisers are the original code's (TF epsilon 1e-5, b2 0.999, no clipping), not
  the supervised defaults it would otherwise inherit (b2 0.95, clipping at 1.0)."""
  config = load_config("ppo", preset)
  for opt in (config.optimizer, config.value_optimizer):
    assert (opt.eps_style, opt.eps, opt.b2, opt.grad_clip_norm) == ("tf", 1e-5, 0.999, 0.0)
  # A huge gradient is not clipped: the first Adam step is lr * sign(g) whatever |g| is.
  config.optimizer.warmup_steps = 0
  step = run(optim.make_optimizer(config.optimizer, 10), [1e4])[0]
  np.testing.assert_allclose(step, -config.optimizer.learning_rate, rtol=1e-3)
  assert load_config("sft", "tiny").optimizer.eps_style == "pytorch"
