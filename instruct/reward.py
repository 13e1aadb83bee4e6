"""A trained reward model, ready to score: parameters, config and stored normalisation.

  rm = RewardModel.load(RM_WORKDIR)           # latest checkpoint of an `rm` run
  rewards = rm.score(tokens, attention_mask)  # normalised: gain * raw + bias

The normalisation (`reward_normalization` in the final checkpoint's extras) is what
`instruct.stages.rm` computed after training. Every user of the RM applies it through
`normalize` (here, RL scoring, evaluation, notebooks), so it is applied consistently.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax

from instruct import run as run_lib
from instruct.stages import rm as rm_stage


def normalize(raw, gain, bias):
  """The normalised reward, `gain * raw + bias`."""
  return gain * raw + bias


@dataclasses.dataclass
class RewardModel:
  """A scalar-head Transformer with its parameters and normalisation gain and bias."""

  model: Any
  params: Any
  gain: float = 1.0
  bias: float = 0.0
  step: Optional[int] = None

  @classmethod
  def load(cls, workdir: str, shardings: Any = None, step: Optional[int] = None) -> "RewardModel":
    """Loads a checkpoint (default: the latest) of an `rm` run (optionally into given param
    shardings)."""
    info = run_lib.describe(workdir)
    if info.stage.head != "scalar":
      raise ValueError(f"{workdir} is a {info.stage.name!r} run, not a reward model.")
    abstract = None
    if shardings is not None:
      abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                              run_lib.abstract_params(info.model), shardings)
    run = run_lib.load_run(workdir, step, abstract=abstract)
    gain, bias = run_lib.reward_normalization(run, workdir)
    return cls(run.model, run.params, gain, bias, run.step)

  def raw_score(self, tokens, attention_mask):
    """Unnormalised rewards at the last real token; [..., length] -> [...]."""
    return rm_stage.sequence_rewards(self.model, self.params, tokens, attention_mask)

  def score(self, tokens, attention_mask):
    """Normalised rewards, gain * raw + bias; [..., length] -> [...]."""
    return normalize(self.raw_score(tokens, attention_mask), self.gain, self.bias)
