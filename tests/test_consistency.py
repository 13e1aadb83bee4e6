"""The sampler / trainer consistency metrics every online algorithm logs (`instruct.rl.online`):
small when the scorer and the update see the sampled distribution, large when they do not.

RLOO and GRPO report them through the same code; tests/test_rloo_grpo.py asserts them on every
iteration of its toy runs and on every record of its driver runs."""

import jax
import jax.numpy as jnp
import numpy as np

from instruct.rl import online
from tests import test_ppo as ppo_toy


def test_consistency_metrics_by_hand():
  """|sampler - scorer| over 4 real tokens: (0, 0.5, 0, 0.25), mean 0.1875, max 0.5 (the
  masked entries, 5.0 and 9.0, never count). Ratios (1, 1.5, 1, 0.5): max |r - 1| = 0.5 and
  std sqrt(mean((0, 0.5, 0, -0.5)^2)) = sqrt(0.125)."""
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  sampler = jnp.array([[-1.0, -2.0, -3.0], [-0.5, 5.0, 0.0]])
  scorer = jnp.array([[-1.0, -2.5, -3.0], [-0.25, 0.0, 9.0]])
  metrics = online.logprob_consistency(sampler, scorer, mask)
  np.testing.assert_allclose(metrics["consistency/logprob_abs_diff_mean"], 0.1875, rtol=1e-6)
  np.testing.assert_allclose(metrics["consistency/logprob_abs_diff_max"], 0.5, rtol=1e-6)
  old = jnp.zeros((2, 3))
  logp = jnp.array([[0.0, np.log(1.5), 0.0], [np.log(0.5), 9.0, 9.0]]) * mask
  spread = online.ratio_spread(logp, old, mask)
  np.testing.assert_allclose(spread["max_dev"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(spread["std"], np.sqrt(0.125), rtol=1e-6)


def test_ppo_logs_them_small_and_a_temperature_mismatch_shows():
  """PPO on the toy of tests/test_ppo.py, sampling at T = 0.7. Measured over seeds 0-4 at
  T = 1 and 0.7: scorer vs sampler at most 9.6e-7 apart (mean <= 1.7e-7), so the <= 1e-5
  bound has a 10x margin; the first ratio is 1 to within 1e-6. Scoring the same samples at
  T = 1 instead moves the mean difference to 0.049-0.062 (max 0.17-0.48), and an update at
  T = 0.7 on log-probs scored at T = 1 moves the first ratio far from 1."""
  *_, sampler, experience, update = ppo_toy.toy(temperature=0.7)
  *_, experience_t1, _ = ppo_toy.toy(temperature=1.0)
  policy, value = ppo_toy.start()
  pt, pm = ppo_toy.prompts(0)
  samples = sampler(policy.params, pt, pm, jax.random.key(3))
  frozen = ppo_toy.frozen(policy, value, policy.params)
  exp, metrics = experience(frozen, samples, pt, pm, 0.02)
  assert metrics["consistency/logprob_abs_diff_max"] <= 1e-5, metrics
  assert 0 <= metrics["consistency/logprob_abs_diff_mean"] <= 1e-6, metrics
  _, _, update_metrics = update(policy, value, exp, {}, jax.random.key(4))
  assert update_metrics["consistency/first_ratio_max_dev"] <= 1e-5, update_metrics
  assert update_metrics["consistency/first_ratio_std"] <= 1e-5, update_metrics
  assert update_metrics["consistency/first_ratio_max_dev"] == update_metrics["first_ratio_error"]

  exp_t1, wrong = experience_t1(frozen, samples, pt, pm, 0.02)
  assert wrong["consistency/logprob_abs_diff_mean"] > 1e-2, wrong
  assert wrong["consistency/logprob_abs_diff_max"] > 0.1, wrong
  _, _, wrong_update = update(policy, value, exp_t1, {}, jax.random.key(4))
  assert wrong_update["consistency/first_ratio_max_dev"] > 0.1, wrong_update
  assert wrong_update["consistency/first_ratio_std"] > 1e-2, wrong_update
