"""GRPO (group relative policy optimisation; Shao et al. 2024, DeepSeekMath) on the seam.

k responses per prompt (`config.grpo.samples_per_prompt`); each response's advantage is its
reward normalised within its group, A_i = (R_i - mean_j R_j) / (std_j R_j + std_eps), on
every token; the clipped ratio objective aggregated as the paper does (`sequence_mean`: the
mean over a response's tokens, then over responses; `token_mean` is DAPO's). The KL to the
reference is a loss term beta * k3 (`kl_in='loss'`, the paper's) or, with `kl_in='reward'`,
subtracted from R_i as in RLOO. Shared with RLOO: `instruct.rl.group`.
"""

from __future__ import annotations

import ml_collections

from instruct.rl import group


def default_config() -> ml_collections.ConfigDict:
  """`config.grpo`: k, the update, the KL (a k3 loss term, fixed beta 0.04, by default)."""
  return group.default_section("grpo")


def validate(config, policy_model=None) -> None:
  """GRPO's own checks (after the RL stage's); ValueError naming the key."""
  group.validate(config, policy_model, "grpo")


def critic_kind(config) -> str:
  """GRPO has no critic."""
  del config
  return "none"


class GRPO(group.GroupAlgorithm):
  """GRPO; state `{"policy", "kl"}` (`group.GroupAlgorithm`)."""

  def __init__(self, config, roles, banned_ids: tuple[int, ...] = ()):
    super().__init__(config, roles, banned_ids, "grpo", "grpo")


ALGORITHM = GRPO
