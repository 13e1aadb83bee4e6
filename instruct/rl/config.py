"""The RL stage's config: its own base (not the supervised one minus fields) and validation.

An RL config names its sources (`policy_from`: an SFT run; `reward_from`: a reward-model run),
the prompts, the sampler, the pretraining mix, the loop, and an algorithm
(`config.algorithm`, a key of `instruct.rl.algorithms.ALGORITHMS`) whose own section, named
after it (e.g. `config.ppo`), holds its hyperparameters and its KL settings. The models'
architectures and numerics are the source runs'; an RL config has no `config.model`.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from instruct import config_lib
from instruct.model import ModelConfig
from instruct.rl import algorithms
from instruct.run import model_config_or_none


# yapf: disable
def base_config(algorithm: str = "ppo") -> ml_collections.ConfigDict:
  """Every field of an RL experiment with `algorithm`, with defaults (CPU-sized)."""
  c = ml_collections.ConfigDict()
  c.stage = "rl"
  c.algorithm = algorithm      # A key of instruct.rl.algorithms.ALGORITHMS; its section below.
  c.seed = 0                   # The rollouts, the minibatch order and the data order.
  c.policy_from = ""           # SFT workdir: initial policy and frozen reference.
  c.reward_from = ""           # RM workdir: frozen reward model (+ normalisation) and critic.

  prompts = config_lib.embedded_files("prompts")
  c.data = config_lib.data_config()
  c.data.kind = "prompts"
  c.data.train_file = prompts["train"]
  c.data.validation_file = prompts["validation"]
  c.data.prompt_length = 32    # Prompts are left-padded (or left-truncated) to this.

  c.sampling = ml_collections.ConfigDict()
  c.sampling.max_new_tokens = 16
  c.sampling.temperature = 1.0
  c.sampling.top_k = 0
  c.sampling.top_p = 1.0
  # top-k / top-p sample from a filtered distribution while the ratio and KL are of the
  # unfiltered one, which makes the updates off-policy; refused unless this is set.
  c.sampling.allow_off_policy_filtering = False
  # Tokens never sampled, besides the tokenizer's special tokens (e.g. the control tokens of
  # a policy pretrained with them, instruct/data/feedback.py); the ratio and KL are of the
  # same renormalised distribution, so this keeps PPO on-policy.
  c.sampling.banned_tokens = ()

  # The pretraining mix (PPO-ptx): used when the algorithm's ptx_coef > 0.
  c.ptx = ml_collections.ConfigDict()
  c.ptx.train_file = config_lib.embedded_files("pretrain")["train"]  # {"text"} lines or .txt.
  c.ptx.batch_size = 16        # Rows per epoch over the rollout, split over its minibatch
  # steps; fresh rows every epoch.
  c.ptx.length = 64

  c.optimizer = config_lib.optimizer_config()        # The policy's.
  c.optimizer.learning_rate = 1e-4
  c.optimizer.schedule = "linear"
  c.optimizer.end_lr_fraction = 0.0
  c.optimizer.warmup_steps = 0
  # The original code's Adam (Ziegler et al. 2019; Stiennon et al. 2020): TensorFlow's
  # epsilon placement (instruct.optim.tf_adam_eps) with eps 1e-5, b2 0.999, no gradient
  # clipping. The supervised stages' defaults (b2 0.95, clipping at 1.0, PyTorch epsilon) are
  # deliberately not inherited.
  c.optimizer.eps = 1e-5
  c.optimizer.eps_style = "tf"
  c.optimizer.b2 = 0.999
  c.optimizer.grad_clip_norm = 0.0
  c.value_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())  # The critic's.
  c.value_optimizer.learning_rate = 3e-4

  c.train = config_lib.train_config()
  c.train.num_steps = 20       # Iterations (rollout, scoring, update).
  c.train.global_batch_size = 16  # Prompts per iteration (the rollout batch).
  c.train.log_every = 1
  c.train.checkpoint_every = 10
  c.mesh = config_lib.mesh_config()
  c[algorithm] = algorithms.get(algorithm).default_config()
  return c
# yapf: enable


def validate(config: ml_collections.ConfigDict, data_parallel: int, process_count: int) -> None:
  """The stage table's validation: `validate_rl` with the source runs' architectures."""
  validate_rl(config, data_parallel, process_count,
              policy_model=model_config_or_none(config.policy_from),
              reward_model=model_config_or_none(config.reward_from))


def validate_rl(config: ml_collections.ConfigDict, data_parallel: int, process_count: int,
                policy_model: Optional[ModelConfig] = None,
                reward_model: Optional[ModelConfig] = None) -> None:
  """Raises ValueError naming the key for impossible or silently wrong RL settings.

  `policy_model` / `reward_model`: the `ModelConfig`s of the SFT and RM runs (an RL config
  does not hold them). When given, a rollout (data.prompt_length + sampling.max_new_tokens
  tokens, scored by policy, reference, critic and reward model) and a pretraining row
  (ptx.length, policy only) must fit their learned position tables; None skips that check.
  Then the algorithm's own checks (`validate` of its module).
  """
  algorithm = algorithms.get(config.get("algorithm"))
  config_lib.validate_train(config.train, data_parallel, process_count)
  config_lib.validate_data_format(config, "prompts", reader="RL samples from")
  for key, value in (("policy_from", config.policy_from), ("reward_from", config.reward_from)):
    if not value:
      raise ValueError(f"config.{key} is empty: RL needs the workdir of the "
                       f"{'SFT' if key == 'policy_from' else 'reward-model'} run.")
  _validate_sampling(config)
  prompt_length = config.data.prompt_length
  if not (config_lib.is_int(prompt_length) and prompt_length >= 1):
    raise ValueError(f"config.data.prompt_length={prompt_length!r} must be an integer >= 1.")
  rollout = ("config.data.prompt_length + config.sampling.max_new_tokens = "
             f"{prompt_length} + {config.sampling.max_new_tokens}")
  rollout_length = prompt_length + config.sampling.max_new_tokens
  config_lib.check_fits(rollout_length, rollout, policy_model, "policy")
  config_lib.check_fits(rollout_length, rollout, reward_model, "reward model")
  t = config.train
  k = samples_per_prompt(config)
  if k > 1 and t.global_batch_size * k % data_parallel:
    raise ValueError(f"config.train.global_batch_size={t.global_batch_size} x "
                     f"config.{config.algorithm}.samples_per_prompt={k} = "
                     f"{t.global_batch_size * k} rollout rows is not divisible by the "
                     f"data-parallel size {data_parallel}.")
  if (k == 1 and t.global_batch_size % data_parallel) or t.global_batch_size % process_count:
    raise ValueError(f"config.train.global_batch_size={t.global_batch_size} is not divisible "
                     f"by the data-parallel size {data_parallel} (or the {process_count} "
                     "processes).")
  algorithm.validate(config, policy_model)


def samples_per_prompt(config: ml_collections.ConfigDict) -> int:
  """k, the responses sampled per prompt: `config.<algorithm>.samples_per_prompt` (1 for an
  algorithm without one, e.g. PPO). The rollout has global_batch_size x k rows, and it is
  those rows (not the prompts) that are split over the data-parallel devices."""
  name = config.algorithm
  k = config[name].get("samples_per_prompt", 1)
  if not (config_lib.is_int(k) and k >= 1):
    raise ValueError(f"config.{name}.samples_per_prompt={k!r} must be an integer >= 1.")
  return k


def check_tokenizer_fits(config: ml_collections.ConfigDict, tokenizer_size: int,
                         policy_model: Optional[ModelConfig],
                         reward_model: Optional[ModelConfig]) -> None:
  """Refuses a tokenizer (`config.data.tokenizer`, `tokenizer_size` = `len(tokenizer)`) with
  more tokens than the policy's or the reward model's vocabulary: their ids would index past
  the embedding table (NaN activations) instead of failing. None skips a model.

  The supervised stages check the same in `instruct.trainer.build`; an RL config has no
  `config.model`, so the RL driver calls this with the source runs' architectures.
  """
  models = [(policy_model, "policy", "policy_from"), (reward_model, "reward model", "reward_from")]
  for model, name, key in models:
    if model is not None and tokenizer_size > model.vocab_size:
      raise ValueError(f"config.data.tokenizer={config.data.tokenizer!r} has {tokenizer_size} "
                       f"tokens, more than the {name}'s vocab_size={model.vocab_size} "
                       f"(config.{key}={config[key]!r}): use the tokenizer its run was "
                       "trained with.")


def _validate_sampling(config) -> None:
  """`config_lib.validate_sampling`, then refuses top-k / top-p unless explicitly allowed.

  The rollout is drawn from the filtered distribution while the ratio and KL penalty
  (sampler log-probs and `sequence_logprobs`) are of the unfiltered one, so the updates are
  silently off-policy. Configs saved before `allow_off_policy_filtering` existed read False.
  """
  sampling = config.sampling
  config_lib.validate_sampling(sampling)
  if sampling.get("allow_off_policy_filtering", False):
    return
  for key, active in (("top_k", sampling.top_k > 0), ("top_p", sampling.top_p < 1)):
    if active:
      raise ValueError(
          f"config.sampling.{key}={sampling[key]!r} makes PPO off-policy: rollouts are drawn "
          f"from the {key}-filtered distribution but the ratio and KL use the unfiltered one. "
          "Set config.sampling.allow_off_policy_filtering=True to accept that.")
