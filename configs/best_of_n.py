r"""Best-of-N sampling against a trained reward model: a baseline with no training.

  python -m instruct.train --config=configs/best_of_n.py:tiny --workdir=/tmp/bon_tiny \
      --config.policy_from=/tmp/sft_tiny --config.reward_from=/tmp/rm_tiny

For every prompt of `best_of_n.split` (the validation prompts by default), `best_of_n.n`
responses are sampled from the SFT policy with the RL stage's sampler and scored by the reward
model with its stored normalisation (responses that never emit EOS score
`best_of_n.no_eos_score`, as in PPO). For N = 1, 2, 4, ..., n the run writes the expected
reward-model score of the best of N (an unbiased estimate from the n samples, see
instruct/rl/best_of_n.py) and the analytic KL from the policy, log N - (N - 1)/N, as metrics
at step N and in `results.json`; `samples.jsonl` holds every response with its score, for
judging the selected ones with another scorer (the held-out labelers' "gold" score of the
over-optimisation curves).

Presets: `tiny` (CPU, embedded prompts; n = 16) and `fsdp` (accelerators: the RL stage's
`fsdp` mesh and prompt / response lengths, n = 64).
"""

from instruct import config_lib
from instruct.rl import best_of_n

PRESETS = ("tiny", "fsdp")


def get_config(arg: str = "tiny"):
  """The best-of-N config for a preset name."""
  preset = config_lib.stage_arg(arg).preset
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/best_of_n.py; use one of {PRESETS}.")
  config = best_of_n.base_config()
  if preset == "fsdp":
    config.mesh.shape = (1, -1, 1)
    config.data.prompt_length = 512
    config.sampling.max_new_tokens = 128
    config.train.global_batch_size = 16
    config.best_of_n.n = 64
  return config
