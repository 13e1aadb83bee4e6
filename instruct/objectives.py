"""Training objectives as pure functions of arrays.

Shape suffixes: b = batch, t = length, v = vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def masked_next_token_loss(logits_btv: Array, tokens_bt: Array, loss_mask_bt: Array):
  """Sum of next-token negative log-likelihoods over the positions the mask selects.

  The prediction at position t is scored against token t+1, and counts when
  `loss_mask_bt[:, t+1]` is 1. For SFT the mask is 1 on completion tokens and EOS (loss only
  on the completion, as in Ouyang et al. 2022); for pretraining it is 1 on every real token;
  padding is always 0. Prompt and padding targets therefore get no gradient.

    loss_sum = - sum_{b, t} m[b, t+1] * log softmax(logits[b, t])[tokens[b, t+1]]

  Args:
    logits_btv: [batch, length, vocab] float logits.
    tokens_bt: [batch, length] int tokens.
    loss_mask_bt: [batch, length] {0, 1} target weights.
  Returns:
    (loss_sum, num_targets, num_correct): float32 scalars; the mean loss is
    loss_sum / num_targets and the token accuracy num_correct / num_targets.
  """
  logits = logits_btv[:, :-1].astype(jnp.float32)
  targets = tokens_bt[:, 1:]
  weights = loss_mask_bt[:, 1:].astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights), jnp.sum(correct * weights)
