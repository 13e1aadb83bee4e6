"""The PPO objectives of RLHF as pure functions of arrays.

Shape suffixes: b = batch, t = response length, v = vocabulary. Every per-token quantity is
masked by `mask_bt`: 1 on real response tokens up to and including EOS, 0 after EOS and on
padding (see `response_mask_from_tokens`). Masked-out entries of the inputs never reach a
result, even when they hold garbage (inf, nan), and masked-out entries of per-token outputs
are 0.

The pieces, in the order a PPO iteration uses them:
  kl_per_token -> token_rewards -> (masked_whiten, shift_mean=False) -> gae
  -> masked_whiten(advantages) -> clipped_policy_loss + clipped_value_loss (+ masked_entropy)
and, once per iteration, update_kl_controller with the observed KL. The critic-free methods
(RLOO, GRPO) use instead: kl_per_token -> a sequence reward -> group_advantages ->
clipped_surrogate -> aggregate_token_loss.

References: Schulman et al. 2016 (GAE), Schulman et al. 2017 (PPO), Ziegler et al. 2019
(KL-penalised reward, adaptive KL controller), Stiennon et al. 2020 and Ouyang et al. 2022
(per-token KL penalty with the reward-model score at the last token); Kool et al. 2019 and
Ahmadian et al. 2024 (RLOO), Shao et al. 2024 (GRPO).
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

Array = jax.Array

KL_ESTIMATORS = ("k1", "k3")
KL_CONTROLLERS = ("fixed", "adaptive")
WHITEN_EPS = 1e-8


def _f32(x) -> Array:
  return jnp.asarray(x).astype(jnp.float32)


# ----------------------------------------------------------------------------- masked moments


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Mean of `x` over the entries where `mask` is 1: sum(m * x) / sum(m).

  x, mask: same shape (e.g. [batch, length]). `axis` as in `jnp.sum` (None: all entries).
  Masked-out entries do not count, even when they are inf or nan. An all-zero mask gives 0.
  """
  m = _f32(mask)
  total = jnp.sum(jnp.where(m > 0, m * _f32(x), 0.0), axis=axis)
  count = jnp.sum(m, axis=axis)
  return total / jnp.where(count > 0, count, 1.0)


def masked_var(x: Array, mask: Array, unbiased: bool = True) -> Array:
  """Variance of `x` over the entries where `mask` is 1 (a float32 scalar).

    var = n / (n - 1) * sum(m * (x - mean)^2) / n,   n = sum(m)

  Unbiased (Bessel-corrected) by default, as TRL's and OpenRLHF's `masked_var` are; with
  `unbiased=False` the population variance, which is what the original RLHF code uses
  (lm-human-preferences whitens with `tf.nn.moments`). Over the thousands of tokens of a
  rollout the two differ by a factor n / (n - 1) ~ 1. n <= 1 gives 0.
  """
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(_f32(x) - mean), mask)
  if unbiased:
    n = jnp.sum(_f32(mask))
    var = var * jnp.where(n > 1, n / jnp.maximum(n - 1, 1.0), 1.0)
  return var


def masked_whiten(x_bt: Array, mask_bt: Array, shift_mean: bool = True) -> Array:
  """[batch, length] `x` normalised over its masked entries; 0 where the mask is 0.

    whiten(x) = (x - mean) / sqrt(var + 1e-8)            (shift_mean=True: mean 0, var 1)
    whiten(x) = (x - mean) / sqrt(var + 1e-8) + mean     (shift_mean=False: keeps the mean)

  mean and the (Bessel-corrected) var are taken over the masked entries only (`masked_mean`,
  `masked_var`), so the whitened entries have unbiased variance ~1. Advantages are whitened
  with shift_mean=True per minibatch (Schulman et al. 2017's baselines); rewards optionally
  with shift_mean=False, which rescales them without changing their sign on average
  (Ziegler et al. 2019's code).
  """
  x = _f32(x_bt)
  mean = masked_mean(x, mask_bt)
  whitened = (x - mean) * jax.lax.rsqrt(masked_var(x, mask_bt) + WHITEN_EPS)
  if not shift_mean:
    whitened = whitened + mean
  return jnp.where(_f32(mask_bt) > 0, whitened, 0.0)


# ----------------------------------------------------------------------------- masks


def response_mask_from_tokens(response_tokens_bt: Array, eos_id: int, pad_id: int | None = None):
  """Which sampled response tokens are real: 1 up to and including the first EOS, 0 after.

  Rows with no EOS are 1 over the whole length (truncated responses; the caller may give them
  a fixed penalty score). With `pad_id`, a response also ends just before its first pad token
  (exclusive), so the mask stays one contiguous prefix; pad must differ from EOS.

  Args:
    response_tokens_bt: [batch, length] int sampled tokens (the response only, no prompt).
    eos_id: the end-of-sequence token.
    pad_id: optional padding token.
  Returns:
    (mask_bt, ended_with_eos_b): [batch, length] int32 {0, 1}, and [batch] bool, True where
    the response emitted EOS (before any pad).
  """
  tokens = jnp.asarray(response_tokens_bt)
  length = tokens.shape[-1]
  positions = jnp.arange(length)
  is_eos = tokens == eos_id
  first_eos = jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1), length)
  end = jnp.minimum(first_eos + 1, length)  # exclusive end of the response
  if pad_id is not None:
    is_pad = tokens == pad_id
    first_pad = jnp.where(jnp.any(is_pad, axis=-1), jnp.argmax(is_pad, axis=-1), length)
    end = jnp.minimum(end, first_pad)
  ended_with_eos = first_eos < end
  mask = (positions[None, :] < end[:, None]).astype(jnp.int32)
  return mask, ended_with_eos


# ----------------------------------------------------------------------------- rewards and KL


def kl_per_token(logp_bt: Array, ref_logp_bt: Array, estimator: str = "k1",
                 log_ratio_clip: float = 20.0) -> Array:
  """[batch, length] per-token estimate of KL(pi || pi_ref) from tokens sampled from pi.

  With log r = log pi_ref(y_t) - log pi(y_t) (Schulman, "Approximating KL divergence", 2020):
    k1 = -log r = logp - ref_logp        unbiased; can be negative per token
    k3 = (r - 1) - log r                 unbiased; always >= 0, lower variance
  k1 is the penalty of Ziegler et al. 2019, Stiennon et al. 2020 and Ouyang et al. 2022.
  For k3 the log ratio is clamped to [-log_ratio_clip, log_ratio_clip] before exp, so one
  extreme token cannot overflow it. `estimator` is static ('k1' or 'k3'). Not masked: the
  caller masks (`token_rewards`, `masked_mean`).
  """
  log_ratio = _f32(ref_logp_bt) - _f32(logp_bt)
  if estimator == "k1":
    return -log_ratio
  if estimator == "k3":
    log_ratio = jnp.clip(log_ratio, -log_ratio_clip, log_ratio_clip)
    return jnp.expm1(log_ratio) - log_ratio
  raise ValueError(f"Unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}.")


def _last_token_one_hot(mask_bt: Array) -> Array:
  """[batch, length] float: 1 at the last position where the mask is 1; all-zero rows stay 0."""
  length = mask_bt.shape[-1]
  real = mask_bt > 0
  last = length - 1 - jnp.argmax(jnp.flip(real, axis=-1), axis=-1)
  one_hot = jax.nn.one_hot(last, length, dtype=jnp.float32)
  return one_hot * jnp.any(real, axis=-1, keepdims=True)


def token_rewards(score_b: Array, kl_bt: Array, mask_bt: Array, beta) -> Array:
  """[batch, length] per-token PPO rewards: a KL penalty, plus the score at the last token.

    r_t = -beta * KL_t * m_t + score * [t == last real response token]

  This is Ziegler et al. 2019's R(x, y) = r(x, y) - beta * log(pi(y|x) / rho(y|x)) spread
  over tokens, as in Stiennon et al. 2020 and Ouyang et al. 2022. `score_b` ([batch]) is the
  reward-model score, already normalised or penalised (e.g. for a missing EOS); a row whose
  mask is all 0 gets no score. kl_bt from `kl_per_token`; beta a scalar (the KL controller's).
  """
  m = _f32(mask_bt)
  penalty = jnp.where(m > 0, -_f32(beta) * _f32(kl_bt), 0.0)
  return penalty + _f32(score_b)[:, None] * _last_token_one_hot(mask_bt)


@flax.struct.dataclass
class KLControllerState:
  """The KL coefficient and its controller's last step; a pytree, so it is checkpointed.

  beta: float32 scalar, the current KL coefficient.
  error: float32 scalar, the last clipped proportional error e (0 before any update).
  """

  beta: Array
  error: Array


def init_kl_controller(initial_beta: float) -> KLControllerState:
  """A KLControllerState at beta = `initial_beta` and error 0."""
  return KLControllerState(beta=jnp.asarray(initial_beta, jnp.float32), error=jnp.zeros(
      (), jnp.float32))


def update_kl_controller(state: KLControllerState, observed_kl, n_steps, target, horizon,
                         kind: str = "adaptive") -> KLControllerState:
  """Ziegler et al. 2019's adaptive KL controller: moves beta towards a target KL.

    e = clip((KL - target) / target, -0.2, 0.2)
    beta <- beta * (1 + K_beta * e),   K_beta = n_steps / horizon

  K_beta follows Ziegler et al.'s code (lm-human-preferences), where `n_steps` is the number
  of samples (episodes) in the rollout batch just taken and `horizon` (10000 there) sets how
  many samples it takes to close the gap: the step scales with the data seen, so the
  controller behaves the same whatever the batch size. The paper's constant K_beta = 0.1 is
  the same formula with n_steps = 0.1 and horizon = 1, so no separate argument is needed.
  kind (static): 'adaptive', or 'fixed', which returns `state` unchanged. observed_kl is the
  mean per-sequence KL of the rollout (sum over tokens of KL_t, averaged over rows).
  """
  if kind == "fixed":
    return state
  if kind != "adaptive":
    raise ValueError(f"Unknown KL controller {kind!r}; expected one of {KL_CONTROLLERS}.")
  error = jnp.clip((_f32(observed_kl) - target) / target, -0.2, 0.2)
  beta = state.beta * (1.0 + error * _f32(n_steps) / horizon)
  return KLControllerState(beta=beta.astype(jnp.float32), error=error)


# ----------------------------------------------------------------------------- advantages


def gae(rewards_bt: Array, values_bt: Array, mask_bt: Array, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2016), a reversed scan over time.

    delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    R_t     = A_t + V_t   (the value targets)

  The value after the last real token is 0 (the episode ends; m_{t+1} = 0 there), and
  m_{length} = 0. Rewards and values where the mask is 0 are ignored.

  Args:
    rewards_bt: [batch, length] per-token rewards (`token_rewards`).
    values_bt: [batch, length] value estimates V(s_t) from the rollout.
    mask_bt: [batch, length] {0, 1} response mask.
    gamma, lam: discount and GAE lambda (InstructGPT-style runs: 1.0 and 0.95).
  Returns:
    (advantages_bt, returns_bt): float32 [batch, length], 0 where the mask is 0.
  """
  m = _f32(mask_bt)
  real = m > 0
  rewards = jnp.where(real, _f32(rewards_bt), 0.0)
  values = jnp.where(real, _f32(values_bt), 0.0)
  zeros_b1 = jnp.zeros_like(m[:, :1])
  next_mask = jnp.concatenate([m[:, 1:], zeros_b1], axis=1)
  next_values = jnp.concatenate([values[:, 1:], zeros_b1], axis=1) * next_mask
  deltas = rewards + gamma * next_values - values

  def step(next_advantage_b, inputs):
    delta_b, next_mask_b = inputs
    advantage_b = delta_b + gamma * lam * next_mask_b * next_advantage_b
    return advantage_b, advantage_b

  _, advantages_tb = jax.lax.scan(step, jnp.zeros_like(m[:, 0]), (deltas.T, next_mask.T),
                                  reverse=True)
  advantages = jnp.where(real, advantages_tb.T, 0.0)
  return advantages, jnp.where(real, advantages + values, 0.0)


# ----------------------------------------------------------------------------- PPO losses


def clipped_policy_loss(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
                        clip_eps: float = 0.2):
  """PPO's clipped surrogate objective (Schulman et al. 2017, eq. 7) as a loss to minimise.

    ratio_t = exp(logp_t - old_logp_t)
    loss    = masked_mean( max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps)) )

  Args:
    logp_bt: [batch, length] log pi(y_t) under the current parameters (differentiated).
    old_logp_bt: [batch, length] log pi_old(y_t) from the rollout.
    advantages_bt: [batch, length] advantages (usually whitened).
    mask_bt: [batch, length] {0, 1} response mask.
    clip_eps: the clip range eps.
  Returns:
    (loss, stats): float32 scalar loss and a dict of float32 scalars, all masked means:
      clip_fraction: share of tokens where the clipped term was chosen,
        (-A * clip(ratio)) > (-A * ratio), i.e. that get no gradient;
      approx_kl: 0.5 * (logp - old_logp)^2, the k2 estimate of KL(pi_old || pi);
      approx_kl_k3: (ratio - 1) - (logp - old_logp), the k3 estimate (always >= 0);
      ratio_mean: mean of ratio (exactly 1 on the first minibatch of an iteration).
  """
  loss_bt, stats = clipped_surrogate(logp_bt, old_logp_bt, advantages_bt, mask_bt, clip_eps)
  return masked_mean(loss_bt, mask_bt), stats


def clipped_surrogate(logp_bt: Array, old_logp_bt: Array, advantages_bt: Array, mask_bt: Array,
                      clip_eps: float = 0.2):
  """The per-token terms of `clipped_policy_loss`, before any averaging.

    loss_t = max(-A_t * ratio_t, -A_t * clip(ratio_t, 1 - eps, 1 + eps))

  Returns ([batch, length] loss_t, 0 where the mask is 0; the stats of
  `clipped_policy_loss`, masked means over tokens). How the loss_t are averaged is the
  caller's (`clipped_policy_loss`: over every token; `aggregate_token_loss`: the options of
  the critic-free methods).
  """
  m = _f32(mask_bt)
  log_ratio = jnp.where(m > 0, _f32(logp_bt) - _f32(old_logp_bt), 0.0)
  advantages = jnp.where(m > 0, _f32(advantages_bt), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss_bt = jnp.maximum(unclipped, clipped)
  bounded_log_ratio = jnp.clip(log_ratio, -20.0, 20.0)
  stats = {
      "clip_fraction": masked_mean((clipped > unclipped).astype(jnp.float32), m),
      "approx_kl": masked_mean(0.5 * jnp.square(log_ratio), m),
      "approx_kl_k3": masked_mean(jnp.expm1(bounded_log_ratio) - bounded_log_ratio, m),
      "ratio_mean": masked_mean(ratio, m),
  }
  return loss_bt, jax.tree.map(jax.lax.stop_gradient, stats)


AGGREGATIONS = ("sequence_sum", "sequence_mean", "token_mean")


def aggregate_token_loss(loss_bt: Array, mask_bt: Array, how: str) -> Array:
  """A scalar loss from per-token terms [batch, length] over the masked tokens; `how` (static):

    sequence_sum:  mean_i sum_t m_it l_it            (REINFORCE on log pi(y|x) = sum_t log pi_t)
    sequence_mean: mean_i (sum_t m_it l_it / n_i)    (GRPO as in Shao et al. 2024; n_i = sum_t m_it)
    token_mean:    sum_it m_it l_it / sum_it m_it    (DAPO, Yu et al. 2025; PPO's masked mean)

  A row whose mask is all 0 contributes 0 (to the mean over rows too).
  """
  m = _f32(mask_bt)
  terms = jnp.where(m > 0, _f32(loss_bt), 0.0)
  if how == "sequence_sum":
    return jnp.mean(jnp.sum(terms, axis=1))
  if how == "sequence_mean":
    return jnp.mean(masked_mean(terms, m, axis=1))
  if how == "token_mean":
    return masked_mean(terms, m)
  raise ValueError(f"Unknown loss aggregation {how!r}; expected one of {AGGREGATIONS}.")


# ----------------------------------------------------------------------------- group baselines

GROUP_ADVANTAGES = ("rloo", "grpo")


def group_advantages(rewards_b: Array, group_size: int, kind: str, eps: float = 1e-4) -> Array:
  """[batch] per-sequence advantages from the rewards of groups of `group_size` samples of one
  prompt, the rows of a group contiguous (row i * k + j is sample j of prompt i).

    rloo: A_i = R_i - mean_{j != i} R_j = k / (k - 1) * (R_i - mean_j R_j)
          (Kool et al. 2019; Ahmadian et al. 2024)
    grpo: A_i = (R_i - mean_j R_j) / (std_j R_j + eps)
          (Shao et al. 2024; std with Bessel's correction, as TRL and verl compute it)

  The group statistics come from a [batch / k, k] reshape, so under jit the rows of one group
  may sit on different devices. group_size >= 2 (static); kind static.
  """
  k = group_size
  r = _f32(rewards_b).reshape(-1, k)
  total = jnp.sum(r, axis=1, keepdims=True)
  if kind == "rloo":
    advantages = (k * r - total) / (k - 1)
  elif kind == "grpo":
    centred = r - total / k
    std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / (k - 1))
    advantages = centred / (std + eps)
  else:
    raise ValueError(f"Unknown group advantage {kind!r}; expected one of {GROUP_ADVANTAGES}.")
  return advantages.reshape(-1)


def clipped_value_loss(values_bt: Array, old_values_bt: Array, returns_bt: Array, mask_bt: Array,
                       clip_eps: float = 0.2):
  """PPO's clipped value loss (Schulman et al. 2017's baselines code; Ziegler et al. 2019).

    v_clipped = old_v + clip(v - old_v, -eps, eps)
    loss      = 0.5 * masked_mean( max((v - R)^2, (v_clipped - R)^2) )

  Args:
    values_bt: [batch, length] current value predictions (differentiated).
    old_values_bt: [batch, length] value predictions from the rollout.
    returns_bt: [batch, length] value targets R (`gae`'s returns).
    mask_bt: [batch, length] {0, 1} response mask.
    clip_eps: the value clip range eps (0.2 in InstructGPT-style runs).
  Returns:
    (loss, stats): float32 scalar loss; stats['value_clip_fraction'] is the masked share of
    tokens where the clipped error was larger (and chosen), and stats['value_error'] the masked
    mean of (v - R)^2.
  """
  m = _f32(mask_bt)
  values = jnp.where(m > 0, _f32(values_bt), 0.0)
  old_values = jnp.where(m > 0, _f32(old_values_bt), 0.0)
  returns = jnp.where(m > 0, _f32(returns_bt), 0.0)
  values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  error = jnp.square(values - returns)
  error_clipped = jnp.square(values_clipped - returns)
  loss = 0.5 * masked_mean(jnp.maximum(error, error_clipped), m)
  stats = {
      "value_clip_fraction": masked_mean((error_clipped > error).astype(jnp.float32), m),
      "value_error": masked_mean(error, m),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, stats)


# ----------------------------------------------------------------------------- diagnostics


def token_entropy(logits_btv: Array) -> Array:
  """[batch, length] entropy of each next-token distribution, in float32.

    H_t = -sum_v p_t(v) log p_t(v),  p_t = softmax(logits_t)

  Reduces the vocabulary axis, so a caller that works in row chunks keeps [b, t], never the
  whole [b, t, v] logits. Logits of -inf / the float minimum (banned tokens) contribute 0.
  """
  log_p = jax.nn.log_softmax(_f32(logits_btv), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * jnp.where(log_p > -jnp.inf, log_p, 0.0), axis=-1)


def masked_entropy(logits_btv: Array, mask_bt: Array) -> Array:
  """Mean entropy of the policy's next-token distribution over response tokens (scalar).

    result = masked_mean(H_t)   (H_t from `token_entropy`)

  logits_btv: [batch, length, vocab] (already divided by the sampling temperature);
  mask_bt: [batch, length]. Used as a diagnostic or an entropy bonus (Schulman et al. 2017).
  """
  return masked_mean(token_entropy(logits_btv), mask_bt)


def explained_variance(values_bt: Array, returns_bt: Array, mask_bt: Array) -> Array:
  """How much of the returns' variance the values explain (a float32 scalar).

    EV = 1 - Var[R - V] / Var[R]      (masked variances; Schulman et al. 2017's baselines)

  1 for a perfect value function, 0 for a constant at the mean of R, negative when worse.
  Returns 0 when Var[R] = 0 (nothing to explain). values_bt, returns_bt, mask_bt: [b, t].
  """
  m = _f32(mask_bt)
  values = jnp.where(m > 0, _f32(values_bt), 0.0)
  returns = jnp.where(m > 0, _f32(returns_bt), 0.0)
  var_returns = masked_var(returns, m)
  var_residual = masked_var(returns - values, m)
  safe_var = jnp.where(var_returns > 0, var_returns, 1.0)
  return jnp.where(var_returns > 0, 1.0 - var_residual / safe_var, 0.0)
