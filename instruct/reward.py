"""A trained reward model, ready to score: parameters, config and stored normalisation.

  rm = RewardModel.load(RM_WORKDIR)           # latest checkpoint of an `rm` run
  rewards = rm.score(tokens, attention_mask)  # normalised: gain * raw + bias

The normalisation (`reward_normalization` in the final checkpoint's extras) is what
`instruct.stages.rm` computed after training; every user of the RM goes through `score`, so
it is applied consistently (PPO, evaluation, notebooks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections

from instruct import checkpoint as ckpt_lib
from instruct.stages import rm as rm_stage
from instruct.trainer import init_params_fn


@dataclasses.dataclass
class RewardModel:
  """A scalar-head Transformer with its parameters and normalisation gain and bias."""

  model: Any
  params: Any
  gain: float = 1.0
  bias: float = 0.0
  step: Optional[int] = None

  @classmethod
  def load(cls, workdir: str, shardings: Any = None) -> "RewardModel":
    """Loads the latest checkpoint of an `rm` run (optionally into given param shardings)."""
    config = ml_collections.ConfigDict(ckpt_lib.read_config(workdir))
    if config.stage != "rm":
      raise ValueError(f"{workdir} is a {config.stage!r} run, not a reward model ('rm').")
    model = rm_stage.make_model(config.model)
    abstract = jax.eval_shape(init_params_fn(model), jax.random.key(0))
    abstract = jax.tree.map(
        lambda x, *s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s[0] if s else None),
        nn.meta.unbox(abstract), *([shardings] if shardings is not None else []))
    checkpointer = ckpt_lib.Checkpointer(workdir)
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"No reward-model checkpoint in {checkpointer.directory}.")
    params = checkpointer.restore_params(step, abstract)
    norm = checkpointer.restore_extras(step).get("reward_normalization")
    checkpointer.close()
    if norm is None:
      raise ValueError(f"Checkpoint {step} of {workdir} has no reward normalisation: the rm "
                       "run did not reach its final step (config.train.num_steps).")
    return cls(model, params, float(norm["gain"]), float(norm["bias"]), step)

  def raw_score(self, tokens, attention_mask):
    """Unnormalised rewards at the last real token; [..., length] -> [...]."""
    return rm_stage.sequence_rewards(self.model, self.params, tokens, attention_mask)

  def score(self, tokens, attention_mask):
    """Normalised rewards, gain * raw + bias; [..., length] -> [...]."""
    return self.gain * self.raw_score(tokens, attention_mask) + self.bias

