"""The reward-model stage: K-wise rankings, all ranked pairs from K forward passes.

One batch element is one prompt with its K responses (padded to `config.rm.max_responses`):
`tokens`, `attention_mask` [batch, K, length], `ranks` and `response_mask` [batch, K]. The K
sequences go through the model as K rows, the reward is read at each one's last real token,
and all ranked pairs are formed inside the step from those K scalars (Ouyang et al. 2022).

At the final step the stage computes the reward normalisation (`finalize`): a bias so that
demonstrations score mean 0 (InstructGPT), or a gain and bias so that policy samples score
N(0, 1) (Ziegler et al. 2019). It is stored with the final checkpoint and applied by
`instruct.reward.RewardModel` wherever the RM is used.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from instruct import data as data_lib
from instruct.config_lib import NORMALIZATIONS
from instruct import objectives
from instruct.model import ModelConfig, Transformer
from instruct.stages import common

CALIBRATION_BINS = 10


def make_model(model_config) -> Transformer:
  return Transformer(ModelConfig.from_dict(model_config), head="scalar")


def sequence_rewards(model: Transformer, params, tokens, attention_mask, deterministic=True,
                     rng=None):
  """Raw rewards at the last real token; tokens/attention_mask: [..., length] -> [...]."""
  shape = tokens.shape
  flat_tokens = tokens.reshape(-1, shape[-1])
  flat_mask = attention_mask.reshape(-1, shape[-1])
  values = model.apply({"params": params}, flat_tokens, flat_mask, deterministic=deterministic,
                       rngs=None if rng is None else {"dropout": rng}).values
  return objectives.last_token_values(values, flat_mask).reshape(shape[:-1])


def ranking_loss(model: Transformer, loss_name: str, deterministic: bool):
  """(params, batch, rng) -> (loss_sum, sums) of the K-wise ranking loss."""
  loss = objectives.RANKING_LOSSES[loss_name]

  def loss_fn(params, batch, rng):
    rewards = sequence_rewards(model, params, batch["tokens"], batch["attention_mask"],
                               deterministic, rng)
    loss_sum, prompts, stats = loss(rewards, batch["ranks"], batch["response_mask"])
    real = batch["response_mask"].astype(jnp.float32)
    sums = dict(stats, loss_sum=loss_sum, prompts=prompts, responses=jnp.sum(real),
                reward_sum=jnp.sum(rewards * real),
                reward_sq_sum=jnp.sum(jnp.square(rewards) * real),
                tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32))
    return loss_sum, sums

  return loss_fn


def _train_metrics(sums: dict) -> dict:
  responses = jnp.maximum(sums["responses"], 1.0)
  mean = sums["reward_sum"] / responses
  pairs = jnp.maximum(sums["pairs"], 1.0)
  return {
      "loss": sums["loss_sum"] / jnp.maximum(sums["prompts"], 1.0),
      "accuracy": sums["correct_pairs"] / pairs, "margin": sums["margin_sum"] / pairs,
      "reward_mean": mean,
      "reward_std": jnp.sqrt(jnp.maximum(sums["reward_sq_sum"] / responses - mean ** 2,
                                         0)), "tokens": sums["tokens"]
  }


def make_eval_step(model: Transformer, loss_name: str) -> Callable:
  """(params, batch) -> per-response rewards and the batch's loss sums (host aggregates)."""
  loss = objectives.RANKING_LOSSES[loss_name]

  def eval_step(params, batch):
    rewards = sequence_rewards(model, params, batch["tokens"], batch["attention_mask"])
    loss_sum, prompts, _ = loss(rewards, batch["ranks"], batch["response_mask"])
    return {
        "rewards": rewards, "ranks": batch["ranks"], "response_mask": batch["response_mask"],
        "loss_sum": loss_sum, "prompts": prompts
    }

  return eval_step


def calibration_table(rewards, ranks, mask, bins: int = CALIBRATION_BINS) -> dict:
  """Predicted vs observed preference probability over ranked pairs (i < j by position).

  For each ranked pair the model predicts P(i preferred to j) = sigmoid(r_i - r_j); the
  observation is 1 when i is ranked above j. Rows are bins of the prediction.
  """
  pairs = (mask[:, :, None] > 0) & (mask[:, None, :] > 0) & (ranks[:, :, None] != ranks[:, None, :])
  upper = np.triu(np.ones(pairs.shape[1:], bool), k=1)
  pairs &= upper[None]
  diff = (rewards[:, :, None] - rewards[:, None, :])[pairs]
  predicted = 1.0 / (1.0 + np.exp(-diff))
  observed = (ranks[:, :, None] < ranks[:, None, :])[pairs].astype(np.float64)
  index = np.minimum((predicted * bins).astype(int), bins - 1)
  count = np.bincount(index, minlength=bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_predicted = np.bincount(index, predicted, bins) / count
    mean_observed = np.bincount(index, observed, bins) / count
  ece = float(np.nansum(count * np.abs(mean_predicted - mean_observed)) / max(count.sum(), 1))
  nan_to_none = lambda a: [None if np.isnan(x) else float(x) for x in a]
  return {
      "calibration_predicted": nan_to_none(mean_predicted),
      "calibration_observed": nan_to_none(mean_observed), "calibration_count": count.tolist(),
      "val_calibration_error": ece
  }


def summarize_eval(outputs: list[dict]) -> dict:
  """Validation loss, pairwise accuracy (overall and by K), reward statistics, calibration."""
  rewards = np.concatenate([o["rewards"] for o in outputs]).astype(np.float64)
  ranks = np.concatenate([o["ranks"] for o in outputs])
  mask = np.concatenate([o["response_mask"] for o in outputs]) > 0
  pairs = mask[:, :, None] & mask[:, None, :] & (ranks[:, :, None] < ranks[:, None, :])
  diff = rewards[:, :, None] - rewards[:, None, :]
  prompts = max(sum(float(o["prompts"]) for o in outputs), 1.0)
  results = {
      "val_loss": sum(float(o["loss_sum"]) for o in outputs) / prompts,
      "val_accuracy": float(np.mean(diff[pairs] > 0)) if pairs.any() else float("nan"),
      "val_margin": float(np.mean(diff[pairs])) if pairs.any() else float("nan"),
      "val_reward_mean": float(np.mean(rewards[mask])),
      "val_reward_std": float(np.std(rewards[mask])),
      "val_pairs": int(pairs.sum()),
  }
  k_per_prompt = mask.sum(axis=1)
  for k in sorted(set(k_per_prompt.tolist()) - {0, 1}):
    rows = k_per_prompt == k
    results[f"val_accuracy_k{k}"] = float(np.mean(diff[rows][pairs[rows]] > 0))
  results.update(calibration_table(rewards, ranks, mask))
  return results


def normalization(scores: np.ndarray, mode: str) -> dict[str, float]:
  """Gain and bias with normalised = gain * raw + bias.

  'demonstrations': bias = -mean, so demonstrations score mean 0 (Ouyang et al. 2022).
  'policy_samples': gain = 1/std, bias = -mean/std, so policy samples score N(0, 1)
  (Ziegler et al. 2019). 'none': identity.
  """
  if mode == "none" or scores.size == 0:
    return {"gain": 1.0, "bias": 0.0}
  mean, std = float(np.mean(scores)), float(np.std(scores))
  if mode == "demonstrations":
    return {"gain": 1.0, "bias": -mean}
  if mode == "policy_samples":
    gain = 1.0 / max(std, 1e-6)
    return {"gain": gain, "bias": -mean * gain}
  raise ValueError(f"config.rm.normalization={mode!r}; expected one of {NORMALIZATIONS}.")


def make_task(config, tokenizer, optimizer, schedule) -> common.Task:
  """The reward-model task for the shared driver."""
  model = make_model(config.model)
  rm = config.rm

  def make_data(split: str, repeat: bool):
    data = config.data
    skip_invalid = rm.skip_invalid or data.get("skip_invalid", False)
    return data_lib.make_comparison_batches(
        {"train": data.train_file, "validation": data.validation_file}, split, tokenizer,
        global_batch_size=config.train.global_batch_size,
        batch_size_name="config.train.global_batch_size", max_responses=rm.max_responses,
        buckets=tuple(data.buckets), seed=config.seed, shuffle=data.shuffle and repeat,
        repeat=repeat, data_dir=common.tfds_dir(config), skip_invalid=skip_invalid,
        data_format=data.get("format", "records"), process_index=jax.process_index(),
        process_count=jax.process_count(), allow_truncation=data.get("allow_truncation", True))

  def score_step(params, batch):
    """Rewards of [batch, length] sequences; NaN marks padding rows (filtered on host)."""
    rewards = sequence_rewards(model, params, batch["tokens"], batch["attention_mask"])
    return jnp.where(jnp.any(batch["attention_mask"] > 0, axis=-1), rewards, jnp.nan)

  def finalize(params, score) -> dict[str, Any]:
    del params  # `score` closes over them.
    if rm.normalization == "none":
      norm = normalization(np.zeros(0), "none")
      return {"reward_normalization": dict(norm, mode="none", num_scored=0)}
    norm_format = rm.get("normalization_format", "records")
    batches = data_lib.make_batches("demonstrations", {"train": rm.normalization_file}, "train",
                                    tokenizer, global_batch_size=config.train.global_batch_size,
                                    buckets=tuple(config.data.buckets), seed=config.seed,
                                    shuffle=False, repeat=False, data_dir=common.tfds_dir(config),
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(), data_format=norm_format,
                                    skip_invalid=config.data.get("skip_invalid", False))
    scores = np.concatenate([score(b) for b in batches] or [np.zeros(0)])
    scores = scores[~np.isnan(scores)]
    norm = normalization(scores, rm.normalization)
    logging.info("Reward normalisation (%s over %d sequences): gain %.4f, bias %.4f",
                 rm.normalization, scores.size, norm["gain"], norm["bias"])
    return {
        "reward_normalization": dict(norm, mode=rm.normalization, num_scored=scores.size),
        "reward_gain": norm["gain"], "reward_bias": norm["bias"]
    }

  count = lambda batch: objectives.RANKING_LOSSES[rm.loss](jnp.zeros(batch["ranks"].shape), batch[
      "ranks"], batch["response_mask"])[1]
  train_step = common.make_train_step(ranking_loss(model, rm.loss,
                                                   deterministic=False), count, _train_metrics,
                                      optimizer, schedule, config.train.grad_accum_steps)
  return common.Task(model=model, train_step=train_step, eval_step=make_eval_step(model, rm.loss),
                     summarize_eval=summarize_eval, make_data=make_data,
                     fresh_param_keys=("scalar_head",), score_step=score_step, finalize=finalize)
