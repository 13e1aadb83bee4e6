"""RLOO (REINFORCE leave-one-out; Kool et al. 2019, Ahmadian et al. 2024) on the seam.

k responses per prompt (`config.rloo.samples_per_prompt`); each response's sequence reward
R_i = RM score (normalised; `no_eos_score` without EOS) - beta * sum_t KL_t, and its
advantage the leave-one-out baseline A_i = R_i - mean_{j != i} R_j. The defaults (one epoch
of one minibatch, `sequence_sum`) are plain REINFORCE, loss -A_i * sum_t log pi(y_it); more
epochs or minibatches give PPO's clipped ratio form. Shared with GRPO: `instruct.rl.group`.
"""

from __future__ import annotations

import ml_collections

from instruct.rl import group


def default_config() -> ml_collections.ConfigDict:
  """`config.rloo`: k, the update, the KL penalty in the reward (fixed beta 0.05 by default)."""
  return group.default_section("rloo")


def validate(config, policy_model=None) -> None:
  """RLOO's own checks (after the RL stage's); ValueError naming the key."""
  group.validate(config, policy_model, "rloo")


def critic_kind(config) -> str:
  """RLOO has no critic."""
  del config
  return "none"


class RLOO(group.GroupAlgorithm):
  """RLOO; state `{"policy", "kl"}` (`group.GroupAlgorithm`)."""

  def __init__(self, config, roles, banned_ids: tuple[int, ...] = ()):
    super().__init__(config, roles, banned_ids, "rloo", "rloo")


ALGORITHM = RLOO
