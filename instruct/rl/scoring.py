"""Scoring sampled responses: log-probs, critic values and reward-model scores.

Every function here is a pure forward pass over `[prompt | response]` sequences (prompts
left-padded, responses right-padded), for the roles of `instruct.rl.roles`: the policy and the
frozen reference (`sequence_logprobs`, the same distribution the sampler draws from), the
critic (`response_values`) and the reward model (`reward_scores`, raw; the normalisation is
`instruct.reward.normalize`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from instruct import objectives
from instruct.model.transformer import Transformer
from instruct.rl.sampler import mask_banned

Array = jax.Array


def sequence_logprobs(model: Transformer, params: Any, prompt_tokens_bp: Array,
                      prompt_mask_bp: Array, response_tokens_br: Array, response_mask_br: Array,
                      temperature: float = 1.0, *, banned_ids: tuple[int, ...] = ()):
  """Log-probs of the response tokens by one full forward pass, as the sampler computes them.

    logits_t = mask_banned(logits(prefix_{<t}) / T, banned_ids);
    logp_t = log_softmax(logits_t)[response_t] * response_mask_t

  Pass the sampler's temperature and `banned_ids` (its `SamplingConfig`'s): then logp is
  log pi of the distribution actually sampled from (bar top-k / top-p), as PPO's ratio and KL
  need; the default () scores under the unmasked model. Returns ([b, r] logp, zero where
  masked; [b, r, v] the tempered, masked logits of the response positions). The prediction
  for response token t comes from the position before it.
  """
  tokens = jnp.concatenate([prompt_tokens_bp, response_tokens_br], axis=1)
  mask = jnp.concatenate([prompt_mask_bp, response_mask_br], axis=1)
  p = prompt_tokens_bp.shape[1]
  logits = model.apply({"params": params}, tokens, mask, logits_from=p - 1).logits[:, :-1]
  logits = mask_banned(logits / (temperature if temperature > 0 else 1.0), tuple(banned_ids))
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(log_probs, response_tokens_br[..., None], axis=-1)[..., 0]
  return chosen * response_mask_br, logits


def response_values(value_model, params, prompt_tokens, prompt_mask, response_tokens,
                    response_mask) -> Array:
  """[b, r] critic values V(s_t): the value at the position that predicts response token t."""
  tokens = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
  mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  p = prompt_tokens.shape[1]
  values = value_model.apply({"params": params}, tokens, mask).values[:, p - 1:-1]
  return values * response_mask


def reward_scores(reward_model, params, prompt_tokens, prompt_mask, response_tokens,
                  response_mask) -> Array:
  """[b] raw reward-model scores of the sequences, read at the last real token."""
  full = jnp.concatenate([prompt_tokens, response_tokens], axis=1)
  full_mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
  return objectives.last_token_values(
      reward_model.apply({"params": params}, full, full_mask).values, full_mask)
