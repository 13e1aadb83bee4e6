"""Direct preference objectives (DPO, IPO, listwise DPO) as pure functions of arrays.

One batch element is one prompt with K responses (padded to the comparison data's
`max_responses`), ranked as the reward model's comparisons are: per-response ranks, 0 = best,
equal ranks are ties (no preference), a response mask marks the real responses. Every loss
reads the responses' sequence log-probabilities under the policy and under the frozen reference
(summed over the response tokens and EOS, never the prompt; `response_logprobs`), both
[batch, K], and the implicit reward of Rafailov et al. 2023,

  r_k = beta * (log pi(y_k | x) - log pi_ref(y_k | x)).

Ranked pairs are (i, j) with rank_i < rank_j (`objectives.preference_pairs`), as for the reward
model. Padded responses (mask 0) take part in nothing: their log-probs are replaced by 0 before
any arithmetic (`jnp.where`), so even NaN or Inf there reaches neither the loss, the statistics
nor the gradient.

Every loss returns `(loss_sum, num_prompts, stats)`: loss_sum sums per-prompt losses over the
prompts with at least one ranked pair, num_prompts counts those prompts (the step divides by
it), and stats holds sums for the metrics (see `preference_stats`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from instruct import objectives

Array = jax.Array


def response_logprobs(logits_btv: Array, tokens_bt: Array, loss_mask_bt: Array) -> Array:
  """[batch] sum of log pi(tokens[t+1] | tokens[:t+1]) over the targets the mask selects.

    logp[b] = sum_t m[b, t+1] * log softmax(logits[b, t])[tokens[b, t+1]]

  With the comparison batches' `loss_mask` (1 on response tokens and EOS) this is the
  log-probability of the response given the prompt. float32 whatever the logits' dtype.
  """
  log_p = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
  target = jnp.take_along_axis(log_p, tokens_bt[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(target * loss_mask_bt[:, 1:].astype(jnp.float32), axis=1)


def token_kl(logits_btv: Array, reference_logits_btv: Array, loss_mask_bt: Array):
  """(sum, count) of KL(pi || pi_ref) of the next-token distributions at the masked targets.

    kl[b, t] = sum_v pi(v | .) (log pi(v | .) - log pi_ref(v | .)),  counted where m[b, t+1]

  A measure of how far the policy moved from the reference on the data's responses.
  """
  log_p = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
  log_q = jax.nn.log_softmax(reference_logits_btv[:, :-1].astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  mask = loss_mask_bt[:, 1:].astype(jnp.float32)
  return jnp.sum(kl * mask), jnp.sum(mask)


def _logratios(policy_bk: Array, reference_bk: Array, response_mask_bk: Array) -> Array:
  """log pi - log pi_ref per response, 0 on padded responses (whatever they hold)."""
  valid = response_mask_bk > 0
  policy = jnp.where(valid, policy_bk.astype(jnp.float32), 0.0)
  reference = jnp.where(valid, reference_bk.astype(jnp.float32), 0.0)
  return policy - reference


def count_prompts(ranks_bk: Array, response_mask_bk: Array) -> Array:
  """The prompts with at least one ranked pair: the normaliser of every loss here."""
  pairs = objectives.preference_pairs(ranks_bk, response_mask_bk)
  return jnp.sum(jnp.any(pairs, axis=(1, 2)).astype(jnp.float32))


def preference_stats(logratio_bk: Array, ranks_bk: Array, response_mask_bk: Array,
                     beta: float) -> dict[str, Array]:
  """Sums for the metrics, from the masked log-ratios.

  Over ranked pairs, with r = beta * logratio: `pairs`, `correct_pairs` (r_i > r_j: the
  implicit reward prefers the better response) and `margin_sum` (sum of r_i - r_j). Over the
  prompts with a pair: the "chosen" responses are those at the prompt's best rank, the
  "rejected" ones those at its worst (for chosen/rejected and best-of-K records, every other
  response): `chosen_count`, `chosen_reward_sum`, `chosen_logratio_sum` (sum of log pi - log
  pi_ref) and the same for `rejected_*`.
  """
  valid = response_mask_bk > 0
  rewards = beta * logratio_bk
  pairs = objectives.preference_pairs(ranks_bk, response_mask_bk)
  diff = rewards[:, :, None] - rewards[:, None, :]
  big = jnp.iinfo(jnp.int32).max
  best = jnp.min(jnp.where(valid, ranks_bk, big), axis=1, keepdims=True)
  worst = jnp.max(jnp.where(valid, ranks_bk, -1), axis=1, keepdims=True)
  ranked = jnp.any(pairs, axis=(1, 2))[:, None]
  chosen = (valid & ranked & (ranks_bk == best)).astype(jnp.float32)
  rejected = (valid & ranked & (ranks_bk == worst)).astype(jnp.float32)
  return {
      "pairs": jnp.sum(pairs.astype(jnp.float32)), "correct_pairs": jnp.sum(
          jnp.where(pairs, diff > 0,
                    False).astype(jnp.float32)), "margin_sum": jnp.sum(jnp.where(pairs, diff, 0.0)),
      "chosen_count": jnp.sum(chosen), "chosen_reward_sum": jnp.sum(chosen * rewards),
      "chosen_logratio_sum": jnp.sum(chosen * logratio_bk), "rejected_count": jnp.sum(rejected),
      "rejected_reward_sum": jnp.sum(rejected * rewards),
      "rejected_logratio_sum": jnp.sum(rejected * logratio_bk)
  }


def _pairwise(pair_loss, policy_bk, reference_bk, ranks_bk, response_mask_bk, beta):
  """sum over prompts of (1 / its pair count) * sum over its ranked pairs of pair_loss."""
  logratio = _logratios(policy_bk, reference_bk, response_mask_bk)
  pairs = objectives.preference_pairs(ranks_bk, response_mask_bk)
  rewards = beta * logratio
  terms = pair_loss(rewards[:, :, None] - rewards[:, None, :],
                    logratio[:, :, None] - logratio[:, None, :])
  pairs_per_prompt = jnp.sum(pairs.astype(jnp.float32), axis=(1, 2))
  per_prompt = jnp.sum(jnp.where(pairs, terms, 0.0), axis=(1, 2))
  per_prompt = per_prompt / jnp.maximum(pairs_per_prompt, 1.0)
  return (jnp.sum(per_prompt), count_prompts(ranks_bk, response_mask_bk),
          preference_stats(logratio, ranks_bk, response_mask_bk, beta))


def dpo_loss(policy_bk: Array, reference_bk: Array, ranks_bk: Array, response_mask_bk: Array,
             beta: float, label_smoothing: float = 0.0):
  """DPO (Rafailov et al. 2023) over every ranked pair, each prompt's pairs weighted 1/P(x).

    loss(x) = 1/P(x) * sum_{rank_i < rank_j} -log sigmoid(r_i - r_j)

  with r = beta * (log pi - log pi_ref), so a chosen/rejected record (P = 1) is plain DPO and a
  K-wise ranking is weighted like the reward model's loss (1/C(K, 2)). `label_smoothing` eps
  > 0 is conservative DPO: the preference label is flipped with probability eps,
  -(1 - eps) log sigmoid(r_i - r_j) - eps log sigmoid(r_j - r_i).

  Args:
    policy_bk, reference_bk: [batch, K] response log-probs under the policy and the reference.
    ranks_bk: [batch, K] int ranks, 0 = best; ties form no pair.
    response_mask_bk: [batch, K] {0, 1}.
    beta: the inverse temperature of the implicit reward.
    label_smoothing: eps in [0, 0.5).
  Returns:
    (loss_sum, num_prompts, stats); see the module docstring.
  """

  def pair_loss(reward_diff, _):
    loss = -jax.nn.log_sigmoid(reward_diff)
    if label_smoothing:
      loss = (1.0 - label_smoothing) * loss - label_smoothing * jax.nn.log_sigmoid(-reward_diff)
    return loss

  return _pairwise(pair_loss, policy_bk, reference_bk, ranks_bk, response_mask_bk, beta)


def ipo_loss(policy_bk: Array, reference_bk: Array, ranks_bk: Array, response_mask_bk: Array,
             beta: float, label_smoothing: float = 0.0):
  """IPO (Azar et al. 2023) over the same pairs, with the same 1/P(x) weighting.

    loss(x) = 1/P(x) * sum_{rank_i < rank_j} (h_ij - 1 / (2 beta))^2,
    h_ij = (log pi(y_i) - log pi_ref(y_i)) - (log pi(y_j) - log pi_ref(y_j))

  beta plays the part of the paper's tau: the squared loss pulls every log-ratio margin to
  1/(2 beta) instead of pushing it without bound. Arguments and return as `dpo_loss`
  (`label_smoothing` must be 0).
  """
  if label_smoothing:
    raise ValueError(f"label_smoothing={label_smoothing}: only the dpo loss has one.")
  target = 1.0 / (2.0 * beta)
  return _pairwise(lambda _, h: jnp.square(h - target), policy_bk, reference_bk, ranks_bk,
                   response_mask_bk, beta)


def plackett_luce_loss(policy_bk: Array, reference_bk: Array, ranks_bk: Array,
                       response_mask_bk: Array, beta: float, label_smoothing: float = 0.0):
  """Listwise DPO: the Plackett-Luce likelihood of the ranking (Rafailov et al. 2023, A.3).

  For a ranking tau without ties, best first, the negative log-likelihood under the implicit
  rewards is

    -sum_{p=1}^{K-1} log( exp(r_tau(p)) / sum_{q >= p} exp(r_tau(q)) )

  (the last position, a denominator of one item, contributes 0). Ties (Breslow's handling): a
  tied group is unordered, and the denominator of each of its members holds every response
  ranked the same or worse, the member itself and its tied peers included. Only responses
  with a strictly worse response get a term, so the worst group contributes nothing: a
  best-of-K record gives exactly one term, the best against all K. Each term is computed as
  -log sigmoid(r_i - logsumexp_{j != i, rank_j >= rank_i} r_j).

  Each prompt's terms are averaged (divided by their count, K - 1 for a full ranking), so every
  prompt weighs the same whatever its K, as with the pairwise losses. With K = 2 the one term
  is the pair's DPO loss, so this equals `dpo_loss` on chosen/rejected records. Arguments and
  return as `dpo_loss` (`label_smoothing` must be 0).
  """
  if label_smoothing:
    raise ValueError(f"label_smoothing={label_smoothing}: only the dpo loss has one.")
  logratio = _logratios(policy_bk, reference_bk, response_mask_bk)
  rewards = beta * logratio
  # others[b, i, j]: response j is real, ranked the same as i or worse, and is not i.
  same_or_worse = ranks_bk[:, None, :] >= ranks_bk[:, :, None]
  not_self = ~jnp.eye(ranks_bk.shape[1], dtype=bool)
  others = (response_mask_bk > 0)[:, None, :] & same_or_worse & not_self
  # A row without others (a padded response, or one alone at the worst rank) gets finite
  # zeros, so that its unused logsumexp (and gradient) stays finite.
  empty = ~jnp.any(others, axis=2, keepdims=True)
  against = jnp.where(others, rewards[:, None, :], -jnp.inf)
  against = jnp.where(empty, 0.0, against)
  terms = -jax.nn.log_sigmoid(rewards - jax.nn.logsumexp(against, axis=2))
  pairs = objectives.preference_pairs(ranks_bk, response_mask_bk)
  has_worse = jnp.any(pairs, axis=2)
  num_terms = jnp.sum(has_worse.astype(jnp.float32), axis=1)
  per_prompt = jnp.sum(jnp.where(has_worse, terms, 0.0), axis=1) / jnp.maximum(num_terms, 1.0)
  return (jnp.sum(per_prompt), count_prompts(ranks_bk, response_mask_bk),
          preference_stats(logratio, ranks_bk, response_mask_bk, beta))


PREFERENCE_LOSSES = {"dpo": dpo_loss, "ipo": ipo_loss, "plackett_luce": plackett_luce_loss}
