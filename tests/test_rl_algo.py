"""The PPO objectives of `instruct.rl.algo` against numpy loops and hand-computed numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct.rl import algo


def _prefix_masks(lengths, length):
  return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------- GAE


def _gae_reference(rewards, values, mask, gamma, lam):
  """Textbook GAE, one row and one step at a time."""
  batch, length = rewards.shape
  advantages = np.zeros((batch, length))
  for b in range(batch):
    next_advantage = 0.0
    for t in reversed(range(length)):
      next_mask = mask[b, t + 1] if t + 1 < length else 0.0
      next_value = values[b, t + 1] if t + 1 < length else 0.0
      delta = rewards[b, t] + gamma * next_value * next_mask - values[b, t]
      next_advantage = delta + gamma * lam * next_mask * next_advantage
      advantages[b, t] = next_advantage
  advantages *= mask
  return advantages, (advantages + values) * mask


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0)])
def test_gae_matches_numpy_loop(gamma, lam):
  rng = np.random.default_rng(0)
  batch, length = 6, 9
  rewards = rng.normal(size=(batch, length))
  values = rng.normal(size=(batch, length))
  mask = _prefix_masks([9, 5, 1, 0, 7, 3], length)  # full, middle, one token, empty row
  adv, ret = algo.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
  ref_adv, ref_ret = _gae_reference(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(adv)[3]) and not np.any(np.asarray(ret)[3])
  # A fully real row that ends at the last position: A_T = r_T - V_T.
  np.testing.assert_allclose(float(adv[0, -1]), rewards[0, -1] - values[0, -1], rtol=1e-5)


def test_gae_hand_computed_and_ignores_padding_garbage():
  # gamma = 1, lam = 0.5, two real tokens then padding holding garbage.
  rewards = jnp.array([[0.0, 1.0, np.nan, 5.0]])
  values = jnp.array([[0.5, 0.25, np.inf, -3.0]])
  mask = jnp.array([[1, 1, 0, 0]])
  adv, ret = algo.gae(rewards, values, mask, 1.0, 0.5)
  # t=1: delta = 1 - 0.25 = 0.75 (V_2 masked) -> A_1 = 0.75.
  # t=0: delta = 0 + 0.25 - 0.5 = -0.25 -> A_0 = -0.25 + 0.5 * 0.75 = 0.125.
  np.testing.assert_allclose(np.asarray(adv), [[0.125, 0.75, 0.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(ret), [[0.625, 1.0, 0.0, 0.0]], atol=1e-7)


# ----------------------------------------------------------------------------- KL


def test_kl_zero_when_policy_equals_reference():
  logp = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)) - 2.0)
  for estimator in algo.KL_ESTIMATORS:
    np.testing.assert_array_equal(np.asarray(algo.kl_per_token(logp, logp, estimator)), 0.0)


def test_kl_estimators_match_their_formulas():
  rng = np.random.default_rng(2)
  logp = rng.normal(size=(4, 7)) * 3.0
  ref = rng.normal(size=(4, 7)) * 3.0
  k1 = np.asarray(algo.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k1"))
  k3 = np.asarray(algo.kl_per_token(jnp.asarray(logp), jnp.asarray(ref), "k3"))
  np.testing.assert_allclose(k1, logp - ref, rtol=1e-5, atol=1e-5)
  assert np.any(k1 < 0)  # k1 is negative on some tokens
  log_r = ref - logp
  np.testing.assert_allclose(k3, np.exp(log_r) - 1.0 - log_r, rtol=1e-5, atol=1e-5)
  assert np.all(k3 >= 0.0)


def test_k3_clamps_extreme_log_ratios():
  logp = jnp.array([[-100.0, 0.0]])
  ref = jnp.array([[0.0, -100.0]])  # log r = +100 and -100
  k3 = np.asarray(algo.kl_per_token(logp, ref, "k3", log_ratio_clip=20.0))
  assert np.all(np.isfinite(k3))
  np.testing.assert_allclose(k3[0], [np.expm1(20.0) - 20.0, np.expm1(-20.0) + 20.0], rtol=1e-5)
  with pytest.raises(ValueError):
    algo.kl_per_token(logp, ref, "k2")


# ----------------------------------------------------------------------------- KL controller


def test_adaptive_kl_controller_matches_numpy_loop():
  target, horizon, n_steps = 6.0, 10000.0, 512
  kls = [6.0, 7.2, 20.0, 0.0, 4.0, 6.6, 100.0, 1e-3]  # includes errors beyond +-0.2
  state = algo.init_kl_controller(0.1)
  beta, errors = 0.1, []
  for kl in kls:
    error = np.clip((kl - target) / target, -0.2, 0.2)
    errors.append(error)
    beta *= 1.0 + error * n_steps / horizon
    state = algo.update_kl_controller(state, jnp.float32(kl), n_steps, target, horizon)
    np.testing.assert_allclose(float(state.beta), beta, rtol=1e-6)
    np.testing.assert_allclose(float(state.error), error, rtol=1e-6, atol=1e-7)
  assert max(errors) == pytest.approx(0.2) and min(errors) == pytest.approx(-0.2)
  # Hand-computed first clipped step: KL 20 vs 6 -> e = 0.2, beta *= 1 + 0.2 * 0.0512.
  s = algo.update_kl_controller(algo.init_kl_controller(0.1), 20.0, 512, 6.0, 10000.0)
  np.testing.assert_allclose(float(s.beta), 0.1 * 1.01024, rtol=1e-6)


def test_fixed_kl_controller_never_changes():
  state = algo.init_kl_controller(0.05)
  for kl in [0.0, 6.0, 100.0]:
    state = algo.update_kl_controller(state, kl, 512, 6.0, 10000.0, kind="fixed")
  assert float(state.beta) == np.float32(0.05) and float(state.error) == 0.0
  with pytest.raises(ValueError):
    algo.update_kl_controller(state, 1.0, 512, 6.0, 10000.0, kind="pid")


# ----------------------------------------------------------------------------- token rewards


def test_token_rewards_score_on_last_real_token_and_penalty_only_on_mask():
  kl = np.array([[0.5, -1.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0], [7.0, 7.0, 7.0, 7.0]])
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
  score = np.array([3.0, -2.0, 5.0])
  beta = 0.1
  rewards = np.asarray(
      algo.token_rewards(jnp.asarray(score), jnp.asarray(kl), jnp.asarray(mask), beta))
  expected = np.array([[-0.05, 0.1, -0.2 + 3.0, 0.0], [-0.1, -0.1, -0.1, -0.1 - 2.0],
                       [0.0, 0.0, 0.0, 0.0]])  # empty row: no penalty, no score
  np.testing.assert_allclose(rewards, expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- whitening


def test_masked_whiten_uses_only_masked_entries():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 6)) * 3.0 + 2.0
  mask = _prefix_masks([6, 2, 4, 0], 6)
  sel = mask > 0
  white = np.asarray(algo.masked_whiten(jnp.asarray(x), jnp.asarray(mask)))
  np.testing.assert_allclose(white[sel].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(white[sel].var(ddof=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(white[sel], (x[sel] - x[sel].mean()) / x[sel].std(ddof=1), rtol=1e-5,
                             atol=1e-5)
  assert not np.any(white[~sel])
  # Masked-out entries, even non-finite ones, don't change anything.
  garbage = np.where(sel, x, np.array([1e6, np.nan, -np.inf, 5.0, 0.0, 3.0]))
  np.testing.assert_array_equal(
      np.asarray(algo.masked_whiten(jnp.asarray(garbage), jnp.asarray(mask))), white)
  kept = np.asarray(algo.masked_whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False))
  np.testing.assert_allclose(kept[sel].mean(), x[sel].mean(), rtol=1e-5)
  np.testing.assert_allclose(kept[sel].var(ddof=1), 1.0, rtol=1e-5)


def test_masked_mean_and_var_hand_computed():
  x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  assert float(algo.masked_mean(x, mask)) == pytest.approx(2.0)
  assert float(algo.masked_var(x, mask)) == pytest.approx(1.0)  # (1 + 0 + 1) / 2
  assert float(algo.masked_var(x, mask, unbiased=False)) == pytest.approx(2.0 / 3.0)
  assert float(algo.masked_mean(x, jnp.zeros_like(mask))) == 0.0
  np.testing.assert_allclose(np.asarray(algo.masked_mean(x, mask, axis=1)), [2.0])


# ----------------------------------------------------------------------------- policy loss


def _policy_loss(ratio, advantages, mask=None, eps=0.2):
  ratio = jnp.asarray(ratio, jnp.float32)[None, :]
  mask = jnp.ones_like(ratio) if mask is None else jnp.asarray(mask)[None, :]
  old_logp = jnp.full_like(ratio, -1.5)
  return algo.clipped_policy_loss(old_logp + jnp.log(ratio), old_logp,
                                  jnp.asarray(advantages, jnp.float32)[None, :], mask, eps)


def test_clipped_policy_loss_hand_computed():
  # Per token max(-A r, -A clip(r, 0.8, 1.2)):
  #   A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)  A=+1 r=0.5 -> max(-0.5, -0.8) = -0.5
  #   A=-1 r=1.5 -> max( 1.5,  1.2) =  1.5            A=-1 r=0.5 -> max(0.5, 0.8) = 0.8 (clipped)
  #   A=+2 r=1.0 -> -2.0                               masked token: ignored
  ratio = [1.5, 0.5, 1.5, 0.5, 1.0, 3.0]
  adv = [1.0, 1.0, -1.0, -1.0, 2.0, 10.0]
  mask = [1, 1, 1, 1, 1, 0]
  loss, stats = _policy_loss(ratio, adv, mask)
  np.testing.assert_allclose(float(loss), (-1.2 - 0.5 + 1.5 + 0.8 - 2.0) / 5, rtol=1e-5)
  np.testing.assert_allclose(float(stats["clip_fraction"]), 2 / 5, rtol=1e-6)
  np.testing.assert_allclose(float(stats["ratio_mean"]), (1.5 + 0.5 + 1.5 + 0.5 + 1.0) / 5,
                             rtol=1e-5)
  log_r = np.log([1.5, 0.5, 1.5, 0.5, 1.0])
  np.testing.assert_allclose(float(stats["approx_kl"]), np.mean(0.5 * log_r ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(stats["approx_kl_k3"]), np.mean(np.expm1(log_r) - log_r),
                             rtol=1e-5)


def test_clipped_policy_loss_at_clip_boundaries():
  # ratio exactly 1 +- eps: both terms agree, so the loss is -A * ratio.
  for ratio, adv in [(1.2, 1.0), (1.2, -1.0), (0.8, 1.0), (0.8, -1.0)]:
    loss, _ = _policy_loss([ratio], [adv])
    np.testing.assert_allclose(float(loss), -adv * ratio, rtol=1e-5)
  # Just outside the boundary, the clipped side is flat; just inside, it isn't.
  loss_out, stats_out = _policy_loss([1.3], [2.0])
  np.testing.assert_allclose(float(loss_out), -2.0 * 1.2, rtol=1e-5)
  assert float(stats_out["clip_fraction"]) == 1.0
  loss_in, stats_in = _policy_loss([1.1], [2.0])
  np.testing.assert_allclose(float(loss_in), -2.0 * 1.1, rtol=1e-5)
  assert float(stats_in["clip_fraction"]) == 0.0


def test_clipped_policy_loss_gradient_vanishes_where_clipped():
  old_logp = jnp.full((1, 4), -1.0)
  logp = old_logp + jnp.log(jnp.array([[1.5, 1.5, 0.5, 0.5]]))
  adv = jnp.array([[1.0, -1.0, 1.0, -1.0]])
  grad = jax.grad(lambda lp: algo.clipped_policy_loss(lp, old_logp, adv, jnp.ones((1, 4)))[0])(logp)
  # Clipped: (A>0, r>1+eps) and (A<0, r<1-eps). Others: d/dlogp (-A r) / 4 = -A r / 4.
  np.testing.assert_allclose(np.asarray(grad), [[0.0, 1.5 / 4, -0.5 / 4, 0.0]], rtol=1e-5,
                             atol=1e-7)


def test_policy_loss_with_ratio_one_is_minus_mean_advantage():
  rng = np.random.default_rng(4)
  logp = jnp.asarray(rng.normal(size=(3, 5)))
  adv = rng.normal(size=(3, 5))
  mask = _prefix_masks([5, 2, 0], 5)
  loss, stats = algo.clipped_policy_loss(logp, logp, jnp.asarray(adv), jnp.asarray(mask), 0.2)
  np.testing.assert_allclose(float(loss), -adv[mask > 0].mean(), rtol=1e-5)
  assert float(stats["clip_fraction"]) == 0.0
  assert float(stats["ratio_mean"]) == 1.0
  assert float(stats["approx_kl"]) == 0.0 and float(stats["approx_kl_k3"]) == 0.0


# ----------------------------------------------------------------------------- value loss


def test_clipped_value_loss_hand_computed():
  # eps = 0.2, per token max((v - R)^2, (v_clip - R)^2):
  #   old 0, v 1.0, R 1.0 -> v_clip 0.2: max(0, 0.64) = 0.64 (clipped chosen)
  #   old 0, v 1.0, R 0.0 -> v_clip 0.2: max(1, 0.04) = 1.0
  #   old 0, v 0.2, R 1.0 -> boundary, v_clip = v: 0.64 (not counted as clipped)
  #   old 1, v 0.5, R 0.0 -> v_clip 0.8: max(0.25, 0.64) = 0.64 (clipped chosen)
  #   masked token: ignored
  values = jnp.array([[1.0, 1.0, 0.2, 0.5, 50.0]])
  old = jnp.array([[0.0, 0.0, 0.0, 1.0, 0.0]])
  returns = jnp.array([[1.0, 0.0, 1.0, 0.0, -50.0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  loss, stats = algo.clipped_value_loss(values, old, returns, mask, 0.2)
  np.testing.assert_allclose(float(loss), 0.5 * (0.64 + 1.0 + 0.64 + 0.64) / 4, rtol=1e-5)
  np.testing.assert_allclose(float(stats["value_clip_fraction"]), 2 / 4, rtol=1e-6)
  np.testing.assert_allclose(float(stats["value_error"]), (0.0 + 1.0 + 0.64 + 0.25) / 4, rtol=1e-5)


# ----------------------------------------------------------------------------- diagnostics


def test_entropy_uniform_and_one_hot():
  vocab = 7
  mask = jnp.array([[1, 1, 0]])
  uniform = jnp.zeros((1, 3, vocab)).at[0, 2].set(jnp.arange(vocab) * 10.0)  # masked: ignored
  np.testing.assert_allclose(float(algo.masked_entropy(uniform, mask)), np.log(vocab), rtol=1e-6)
  one_hot = jnp.full((1, 3, vocab), -1e4).at[:, :, 3].set(0.0)
  assert abs(float(algo.masked_entropy(one_hot, mask))) < 1e-6


def test_explained_variance():
  rng = np.random.default_rng(5)
  returns = rng.normal(size=(3, 6))
  mask = _prefix_masks([6, 4, 1], 6)
  r, m = jnp.asarray(returns), jnp.asarray(mask)
  np.testing.assert_allclose(float(algo.explained_variance(r, r, m)), 1.0, atol=1e-6)
  mean_value = jnp.full_like(r, returns[mask > 0].mean())
  np.testing.assert_allclose(float(algo.explained_variance(mean_value, r, m)), 0.0, atol=1e-5)
  noisy = returns + 0.5 * rng.normal(size=returns.shape)
  sel = mask > 0
  expected = 1 - np.var(returns[sel] - noisy[sel]) / np.var(returns[sel])
  np.testing.assert_allclose(float(algo.explained_variance(jnp.asarray(noisy), r, m)), expected,
                             rtol=1e-5)


# ----------------------------------------------------------------------------- response mask


# yapf: disable
def test_response_mask_from_tokens():
  eos, pad = 2, 0
  tokens = jnp.array([[5, 6, 2, 7, 8],    # EOS in the middle: tokens after it are not real
                      [5, 6, 7, 8, 2],    # EOS at the end
                      [5, 6, 7, 8, 9],    # no EOS: truncated, all real
                      [2, 2, 5, 2, 1]])   # EOS first: only the first EOS counts
  mask, ended = algo.response_mask_from_tokens(tokens, eos)
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1],
                                                   [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(ended), [True, True, False, True])
  padded = jnp.array([[5, 2, 0, 0], [5, 6, 0, 0], [5, 6, 7, 8]])  # pad after EOS / no EOS
  mask, ended = algo.response_mask_from_tokens(padded, eos, pad_id=pad)
  np.testing.assert_array_equal(np.asarray(mask), [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(np.asarray(ended), [True, False, False])
# yapf: enable

# ----------------------------------------------------------------------------- tracing


def test_every_function_traces_under_jit():
  rng = np.random.default_rng(6)
  b, t, v = 2, 4, 5
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  logp, ref = f(b, t), f(b, t)
  for estimator in algo.KL_ESTIMATORS:
    eager = algo.kl_per_token(logp, ref, estimator)
    jitted = jax.jit(algo.kl_per_token, static_argnames="estimator")(logp, ref, estimator)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-5, atol=1e-6)
  calls = [
      (algo.token_rewards, (f(b), f(b, t), mask, 0.1)),
      (algo.gae, (f(b, t), f(b, t), mask, 1.0, 0.95)),
      (algo.masked_mean, (f(b, t), mask)),
      (algo.masked_var, (f(b, t), mask)),
      (algo.masked_whiten, (f(b, t), mask)),
      (algo.clipped_policy_loss, (logp, ref, f(b, t), mask, 0.2)),
      (algo.clipped_value_loss, (f(b, t), f(b, t), f(b, t), mask, 0.2)),
      (algo.masked_entropy, (f(b, t, v), mask)),
      (algo.explained_variance, (f(b, t), f(b, t), mask)),
      (algo.response_mask_from_tokens, (jnp.array([[1, 2, 3], [3, 3, 3]]), 2)),
  ]
  for fn, args in calls:
    jax.tree.map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-6),
        jax.jit(fn)(*args), fn(*args))
  state = algo.init_kl_controller(0.1)
  for kind in algo.KL_CONTROLLERS:
    update = jax.jit(algo.update_kl_controller, static_argnames="kind")
    jitted = update(state, jnp.float32(8.0), 512, 6.0, 10000.0, kind=kind)
    eager = algo.update_kl_controller(state, jnp.float32(8.0), 512, 6.0, 10000.0, kind=kind)
    np.testing.assert_allclose(float(jitted.beta), float(eager.beta), rtol=1e-6)
