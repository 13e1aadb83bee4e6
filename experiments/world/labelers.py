"""Simulated labelers: a hidden quality function, per-labeler weights, and noisy rankings.

A labeler values an answer by a weighted sum of the judge's components (`tasks.judge`):

  utility = w_help * help + w_honest * honest + w_harmless * harmless + w_format * format

with weights that differ slightly between labelers (each base weight times a factor drawn
from [1 - spread, 1 + spread]). Ranking K answers, a labeler is a Plackett-Luce chooser with
its own temperature tau: it picks the best answer with probability softmax(utility / tau),
then the best of the rest, and so on. This is the same as sorting utility / tau + Gumbel
noise, which is how `rank` draws it. For two answers it reduces to Bradley-Terry:
P(a preferred to b) = sigmoid((u_a - u_b) / tau).

Pools: labelers `0 .. num_train - 1` label the reward model's comparisons; the disjoint pool
`num_train .. num_train + num_heldout - 1` judges the evaluations and the held-out comparisons.
PPO never sees a labeler, only the trained reward model.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from experiments.world.tasks import COMPONENTS

BASE_WEIGHTS = {"help": 1.0, "honest": 0.8, "harmless": 1.0, "format": 0.5}


# yapf: disable
@dataclasses.dataclass(frozen=True)
class LabelerConfig:
  num_train: int = 8
  num_heldout: int = 4
  weight_spread: float = 0.25        # Each weight is base * U(1 - spread, 1 + spread).
  temperature: tuple = (0.1, 0.25)   # tau ~ U(lo, hi), per labeler.
  seed: int = 0
# yapf: enable


@dataclasses.dataclass(frozen=True)
class Labeler:
  id: int
  weights: dict[str, float]
  temperature: float

  def utility(self, scores: dict[str, float]) -> float:
    return sum(self.weights[c] * scores[c] for c in COMPONENTS)

  def rank(self, utilities, rng: np.random.Generator) -> list[int]:
    """A Plackett-Luce ranking of answers with these utilities: indices, best first."""
    u = np.asarray(utilities, np.float64) / self.temperature
    return [int(i) for i in np.argsort(-(u + rng.gumbel(size=u.shape)), kind="stable")]

  def prefers_first(self, u_a: float, u_b: float, rng: np.random.Generator) -> bool:
    """One Bradley-Terry judgment: True when the first answer is preferred."""
    return bool(rng.random() < preference_probability(u_a, u_b, self.temperature))


def preference_probability(u_a: float, u_b: float, temperature: float) -> float:
  z = (u_a - u_b) / temperature
  return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


def make_pools(config: LabelerConfig) -> tuple[list[Labeler], list[Labeler]]:
  """The training and held-out pools (disjoint ids, independent weights and noise)."""
  rng = np.random.default_rng(config.seed)
  labelers = []
  for i in range(config.num_train + config.num_heldout):
    factors = rng.uniform(1 - config.weight_spread, 1 + config.weight_spread, len(COMPONENTS))
    weights = {c: BASE_WEIGHTS[c] * float(f) for c, f in zip(COMPONENTS, factors)}
    labelers.append(Labeler(i, weights, float(rng.uniform(*config.temperature))))
  return labelers[:config.num_train], labelers[config.num_train:]
