"""`rl.config.validate_rl` refuses settings that used to fail silently, naming the key.

Each case starts from `configs/ppo.py:tiny` (prompt_length 32, max_new_tokens 16, ptx.length
64), breaks one setting and expects a ValueError whose message names that key. Position-table
cases pass the policy's (or reward model's) ModelConfig, which a PPO config does not hold.
"""

import os
import re

import pytest

from instruct import config_lib
from instruct.rl import config as rl_config
from instruct.model import ModelConfig, preset

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def ppo_config(arg="tiny"):
  config = config_lib.load_config_file(os.path.join(CONFIGS_DIR, "ppo.py"), arg)
  config.policy_from, config.reward_from = "/runs/sft", "/runs/rm"
  return config


def model(max_length, position="learned"):
  return ModelConfig(
      **dict(preset("tiny" if position == "learned" else "tiny_llama"), max_length=max_length))


def _set(key, value):

  def apply(config):
    section, name = key.split(".")
    config[section][name] = value

  return apply


def _ptx(length):

  def apply(config):
    config.ppo.ptx_coef = 1.0
    config.ptx.length = length

  return apply


# (key named in the error, how to break it, models passed to validate_rl).
BAD = {
    "top_k_negative": ("config.sampling.top_k", _set("sampling.top_k", -1), {}),
    "top_p_zero": ("config.sampling.top_p", _set("sampling.top_p", 0.0), {}),
    "top_p_negative": ("config.sampling.top_p", _set("sampling.top_p", -0.5), {}),
    "top_p_above_one": ("config.sampling.top_p", _set("sampling.top_p", 1.5), {}),
    "temperature_negative": ("config.sampling.temperature", _set("sampling.temperature", -0.1), {}),
    "max_new_tokens_zero": ("config.sampling.max_new_tokens", _set("sampling.max_new_tokens",
                                                                   0), {}),
    # Filtering makes PPO off-policy: refused unless allow_off_policy_filtering is set.
    "top_k_off_policy": ("config.sampling.top_k", _set("sampling.top_k", 20), {}),
    "top_p_off_policy": ("config.sampling.top_p", _set("sampling.top_p", 0.9), {}),
    "ptx_length_one": ("config.ptx.length", _ptx(1), {}),
    "prompt_length_zero": ("config.data.prompt_length", _set("data.prompt_length", 0), {}),
    # 32 + 16 = 48 tokens on a 40-position policy (or reward model): positions would clamp.
    "rollout_past_policy_positions": ("config.data.prompt_length", lambda c: None,
                                      {"policy_model": model(40)}),
    "rollout_past_reward_positions": ("config.sampling.max_new_tokens", lambda c: None,
                                      {"reward_model": model(40)}),
    # 64 pretraining tokens on a 48-position policy (the rollout itself fits).
    "ptx_past_policy_positions": ("config.ptx.length", _ptx(64), {"policy_model": model(48)}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_validate_ppo_names_the_bad_key(case):
  key, breaks, models = BAD[case]
  config = ppo_config()
  if not models:
    rl_config.validate_rl(config, 1, 1)  # So the error below is the change's.
  breaks(config)
  with pytest.raises(ValueError, match=re.escape(key)):
    rl_config.validate_rl(config, 1, 1, **models)


def test_valid_settings_pass():
  """The presets pass; so do a rollout that exactly fills a learned table, any length on
  rotary positions, and top-k / top-p once allowed by name (configs saved before the field
  existed read it as False)."""
  for arg in ("tiny", "tiny_ptx"):
    rl_config.validate_rl(ppo_config(arg), 1, 1, policy_model=model(64), reward_model=model(48))
  rl_config.validate_rl(ppo_config("tiny_ptx"), 1, 1, policy_model=model(16, "rope"))
  config = ppo_config()
  config.sampling.top_k, config.sampling.top_p = 20, 0.9
  config.sampling.allow_off_policy_filtering = True
  rl_config.validate_rl(config, 1, 1)
  del config.sampling["allow_off_policy_filtering"]  # An old saved config.
  with pytest.raises(ValueError, match="allow_off_policy_filtering"):
    rl_config.validate_rl(config, 1, 1)


def test_validate_sampling_takes_a_prefix_and_refuses_non_integers():
  from instruct.rl.sampler import SamplingConfig
  with pytest.raises(ValueError, match=re.escape("generate.top_k")):
    config_lib.validate_sampling(SamplingConfig(4, 0, 1, top_k=2.5), prefix="generate")
  with pytest.raises(ValueError, match=re.escape("generate.max_new_tokens")):
    config_lib.validate_sampling(SamplingConfig(4.0, 0, 1), prefix="generate")
  with pytest.raises(ValueError, match=re.escape("config.sampling.temperature")):
    config_lib.validate_sampling(SamplingConfig(4, 0, 1, temperature=float("nan")))
  config_lib.validate_sampling(SamplingConfig(4, 0, 1, temperature=0.0, top_k=5, top_p=0.5))
