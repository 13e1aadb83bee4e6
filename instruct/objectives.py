"""Training objectives as pure functions of arrays.

Shape suffixes: b = batch, t = length, v = vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instruct import reductions

Array = jax.Array


def _predicting(logits_btv: Array, tokens_bt: Array) -> tuple[Array, Array, int]:
  """(float32 logits, [b, n] targets, n): the token each logits position predicts, for
  [b, length, v] logits or [b, length - 1, v] ones without the last position; n = length - 1
  targets. With full-length logits the last position predicts nothing: it gets target 0, and
  the caller drops it from every per-position result (`[:, :n]`) after the vocabulary is
  reduced. Slicing the logits themselves instead would copy them forward and pad their
  gradient backward; every kept position's values are the same either way.
  """
  n = tokens_bt.shape[1] - 1
  targets = tokens_bt[:, 1:]
  if logits_btv.shape[1] == n + 1:
    targets = jnp.concatenate([targets, jnp.zeros_like(tokens_bt[:, :1])], axis=1)
  elif logits_btv.shape[1] != n:
    raise ValueError(f"logits of {logits_btv.shape[1]} positions for {tokens_bt.shape[1]} "
                     "tokens; expected the length or one less.")
  return logits_btv.astype(jnp.float32), targets, n


def masked_next_token_loss(logits_btv: Array, tokens_bt: Array, loss_mask_bt: Array):
  """Sum of next-token negative log-likelihoods over the positions the mask selects.

  The prediction at position t is scored against token t+1, and counts when
  `loss_mask_bt[:, t+1]` is 1. For SFT the mask is 1 on completion tokens and EOS (loss only
  on the completion, as in Ouyang et al. 2022); for pretraining it is 1 on every real token;
  padding is always 0. Prompt and padding targets therefore get no gradient.

    loss_sum = - sum_{b, t} m[b, t+1] * log softmax(logits[b, t])[tokens[b, t+1]]

  Args:
    logits_btv: [batch, length, vocab] float logits, or [batch, length - 1, vocab] without
      the last position's (`Transformer(..., logits_stop=-1)`, which never computes them).
    tokens_bt: [batch, length] int tokens.
    loss_mask_bt: [batch, length] {0, 1} target weights.
  Returns:
    (loss_sum, num_targets, num_correct): float32 scalars; the mean loss is
    loss_sum / num_targets and the token accuracy num_correct / num_targets.
  """
  logits, targets, n = _predicting(logits_btv, tokens_bt)
  weights = loss_mask_bt[:, 1:].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit)[:, :n]
  correct = (reductions.argmax(logits)[:, :n] == targets[:, :n]).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)


def weighted_next_token_loss(logits_btv: Array, tokens_bt: Array, weights_bt: Array):
  """Next-token loss with a signed weight per target (pretraining with feedback,
  `instruct.data.feedback`): a positive weight w scales the negative log-likelihood, a
  negative one makes the token an unlikelihood target (Welleck et al. 2019), 0 leaves it out.

    loss_sum = sum_{w > 0} w * -log p(x_{t+1})  +  sum_{w < 0} |w| * -log(1 - p(x_{t+1}))

  with w = weights[b, t+1] and p = softmax(logits[b, t]) (logits of every position, or of all
  but the last, as in `masked_next_token_loss`). Returns (loss_sum, num_targets,
  num_correct) over the targets with w != 0, as `masked_next_token_loss` does (with 0/1
  weights the two agree).
  """
  logits, targets, n = _predicting(logits_btv, tokens_bt)
  weights = weights_bt[:, 1:].astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  target_log_p = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0][:, :n]
  # -log(1 - p), kept finite as p -> 1 (p <= 1 - 1e-6).
  unlikely = -jnp.log1p(-jnp.exp(jnp.minimum(target_log_p, jnp.log1p(-1e-6))))
  terms = jnp.where(weights > 0, weights * -target_log_p,
                    jnp.where(weights < 0, -weights * unlikely, 0.0))
  active = (weights != 0).astype(jnp.float32)
  correct = (reductions.argmax(logits)[:, :n] == targets[:, :n]).astype(jnp.float32)
  return jnp.sum(terms), jnp.sum(active), jnp.sum(correct * active)


def _target_log_probs(logits_btv: Array, tokens_bt: Array):
  """log softmax(logits[b, t]) and the log-probability of token t+1 under it."""
  log_p = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
  return log_p, jnp.take_along_axis(log_p, tokens_bt[:, 1:, None], axis=-1)[..., 0]


def hindsight_terms(logits_btv: Array, contrast_logits_btv: Array, tokens_bt: Array,
                    loss_mask_bt: Array):
  """The per-target sums of HIR's loss (Zhang et al. 2023; `instruct.data.hindsight`).

  `logits_btv` are the model's outputs on the relabeled sequence (instruction i+ and output
  o), `contrast_logits_btv` on the same sequence under the contrasting instruction i- (the
  targets, selected by `loss_mask_bt` as in `masked_next_token_loss`, are the same). With
  log p(o | i) = sum of the targets' log-probabilities, each answer's contrastive term is

    c_b = -log p(o | i+) / (p(o | i+) + p(o | i-)) = softplus(log p(o | i-) - log p(o | i+))

  and the negative entropy at target position t is sum_v p log p under i+. Each answer's c_b
  counts once per target of it, so that the step's normalisation by the batch's target count
  (exact under gradient accumulation) makes every term a per-token mean, as the likelihood is.

  Returns:
    A dict of float32 sums: `nll` (the relabeled likelihood's), `contrastive` (sum_b n_b c_b),
    `neg_entropy`, `targets`, `correct`; and per answer `contrastive_answers` (sum_b c_b),
    `answers` (rows with a target).
  """
  mask = loss_mask_bt[:, 1:].astype(jnp.float32)
  log_p, target = _target_log_probs(logits_btv, tokens_bt)
  _, contrast_target = _target_log_probs(contrast_logits_btv, tokens_bt)
  logp_pos = jnp.sum(target * mask, axis=1)
  logp_neg = jnp.sum(contrast_target * mask, axis=1)
  per_answer = jax.nn.softplus(logp_neg - logp_pos)
  n = jnp.sum(mask, axis=1)
  neg_entropy = jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  correct = (reductions.argmax(log_p) == tokens_bt[:, 1:]).astype(jnp.float32)
  return {
      "nll": -jnp.sum(target * mask), "contrastive": jnp.sum(n * per_answer),
      "neg_entropy": jnp.sum(neg_entropy * mask), "targets": jnp.sum(mask),
      "correct": jnp.sum(correct * mask),
      "contrastive_answers": jnp.sum(jnp.where(n > 0, per_answer, 0.0)), "answers": jnp.sum(
          (n > 0).astype(jnp.float32))
  }


def preference_pairs(ranks_bk: Array, response_mask_bk: Array) -> Array:
  """[batch, K, K] bool: pair (i, j) is ranked, with response i preferred to response j.

  ranks_bk: [batch, K] int, 0 = best; equal ranks (ties, e.g. the non-best responses of a
  best-of-K comparison) form no pair. response_mask_bk: [batch, K], 1 on real responses.
  """
  valid = response_mask_bk > 0
  both = valid[:, :, None] & valid[:, None, :]
  return both & (ranks_bk[:, :, None] < ranks_bk[:, None, :])


def pairwise_ranking_loss(rewards_bk: Array, ranks_bk: Array, response_mask_bk: Array):
  """The K-wise reward-model loss of Ouyang et al. 2022 (eq. 1), one prompt per batch element.

    loss(x) = -1/P(x) * sum_{(w, l): y_w ranked above y_l} log sigmoid(r(x, y_w) - r(x, y_l))

  where P(x) is the number of ranked pairs of the prompt (C(K, 2) for a full ranking of K
  responses), so each prompt weighs the same whatever its K, and the K rewards come from K
  forward passes rather than C(K, 2) pair examples. Padded responses (mask 0) are in no pair,
  and their rewards are never used: whatever they hold (even NaN or Inf), the loss and its
  gradient are those of the real responses alone.

  Args:
    rewards_bk: [batch, K] float rewards.
    ranks_bk: [batch, K] int ranks, 0 = best; ties form no pair.
    response_mask_bk: [batch, K] {0, 1}.
  Returns:
    (loss_sum, num_prompts, stats): loss_sum sums the per-prompt losses over prompts with at
    least one pair; num_prompts counts them (the mean loss is loss_sum / num_prompts); stats
    has `pairs` (ranked pairs), `correct_pairs` (r_w > r_l) and `margin_sum` (sum r_w - r_l).
  """
  pairs, diff, stats = _pair_stats(rewards_bk, ranks_bk, response_mask_bk)
  pairs_per_prompt = jnp.sum(pairs, axis=(1, 2))
  per_prompt = -jnp.sum(pairs * jax.nn.log_sigmoid(diff), axis=(1, 2))
  per_prompt = per_prompt / jnp.maximum(pairs_per_prompt, 1.0)
  has_pairs = (pairs_per_prompt > 0).astype(jnp.float32)
  return jnp.sum(per_prompt * has_pairs), jnp.sum(has_pairs), stats


def _pair_stats(rewards_bk, ranks_bk, response_mask_bk):
  """Ranked pairs as float [b, K, K], reward differences r_i - r_j, and pair statistics.

  Padded responses' rewards are replaced by 0 before any arithmetic (`jnp.where`, whose
  gradient there is 0), so a NaN in a padded slot reaches neither the loss, the statistics nor
  the gradient (a product with a 0 pair weight would still give NaN).
  """
  pairs = preference_pairs(ranks_bk, response_mask_bk).astype(jnp.float32)
  rewards = jnp.where(response_mask_bk > 0, rewards_bk.astype(jnp.float32), 0.0)
  diff = rewards[:, :, None] - rewards[:, None, :]
  stats = {
      "pairs": jnp.sum(pairs), "correct_pairs": jnp.sum(pairs * (diff > 0)),
      "margin_sum": jnp.sum(pairs * diff)
  }
  return pairs, diff, stats


def best_of_k_loss(rewards_bk: Array, ranks_bk: Array, response_mask_bk: Array):
  """Ziegler et al. 2019's best-of-K loss: softmax cross-entropy on the best response.

    loss(x) = -log( exp r(x, y_best) / sum_i exp r(x, y_i) )

  The best response is the one with rank 0 (a full ranking's first, or a best-of-K choice);
  the sum runs over the real responses. Same return convention as `pairwise_ranking_loss`
  (num_prompts counts prompts with at least 2 responses).
  """
  valid = response_mask_bk > 0
  # Padded responses are left out of the softmax (-inf); a row with no real response (an
  # evaluation batch's dummy row) gets finite zeros so that its log-partition is not -inf.
  padding = jnp.where(jnp.any(valid, axis=1, keepdims=True), -jnp.inf, 0.0)
  rewards = jnp.where(valid, rewards_bk.astype(jnp.float32), padding)
  log_z = jax.nn.logsumexp(rewards, axis=1)
  is_best = valid & (ranks_bk == 0)
  best_reward = jnp.sum(jnp.where(is_best, rewards_bk, 0.0), axis=1) / jnp.maximum(
      jnp.sum(is_best, axis=1), 1)
  counted = ((jnp.sum(valid, axis=1) >= 2) & (jnp.sum(is_best, axis=1) == 1)).astype(jnp.float32)
  _, _, stats = _pair_stats(rewards_bk, ranks_bk, response_mask_bk)
  return jnp.sum((log_z - best_reward) * counted), jnp.sum(counted), stats


RANKING_LOSSES = {"pairwise": pairwise_ranking_loss, "best_of_k": best_of_k_loss}


def last_token_values(values_bt: Array, attention_mask_bt: Array) -> Array:
  """[...] value at the last real token of each row (left or right padding; 0 if empty).

  values_bt, attention_mask_bt: [..., length]. The reward model reads its reward there.
  """
  length = attention_mask_bt.shape[-1]
  last = length - 1 - jnp.argmax(jnp.flip(attention_mask_bt > 0, axis=-1), axis=-1)
  picked = jnp.take_along_axis(values_bt, last[..., None], axis=-1)[..., 0]
  return jnp.where(jnp.any(attention_mask_bt > 0, axis=-1), picked, 0.0)
