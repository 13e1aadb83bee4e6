"""The RL driver: rollout, scoring and update per iteration, on one mesh, resumable.

`train(config, workdir)`:
  1. builds the mesh, validates the config (the stage table's `rl` record), and builds the
     roles (`instruct.rl.roles`) from the source runs' architectures and the algorithm
     (`config.algorithm`, `instruct.rl.algorithms`) from the roles: the jitted sampler,
     experience and update programs, each with explicit shardings;
  2. loads the frozen roles (reference from `config.policy_from`, reward model and its
     normalisation from `config.reward_from`) through the run layer, directly into their
     shardings, and resumes the algorithm's state from the workdir or starts it from them;
  3. runs iterations in the shared loop (`instruct.loop`): sample -> experience -> update,
     every iteration's metrics written with its rollout / scoring / update seconds. An
     algorithm with `samples_per_prompt` k > 1 (RLOO, GRPO) samples k responses to each
     prompt: the prompt batch is repeated k times, row by row, before the sampler.

The checkpoint holds the algorithm's state (PPO: policy and critic train states and the KL
controller; RLOO and GRPO: the policy and the KL controller); its extras hold the data
positions, the rng and the config. The frozen reference and reward model are not copied into
RL checkpoints: they are reloaded from their source runs.
"""

from __future__ import annotations

import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from instruct import data as data_lib
from instruct import loop as loop_lib
from instruct import paths
from instruct.data import tokenization
from instruct import sharding as shd
from instruct.rl import algorithms
from instruct.rl import config as rl_config
from instruct.rl.roles import build_roles, load_frozen, source_architectures
from instruct.rl.sampler import SamplingConfig, banned_token_ids
from instruct.stages import common
from instruct.stages import table


def make_data(config, tokenizer, ptx_rows: int):
  """Prompt batches and (when `ptx_rows` > 0) pretraining batches, host-local."""
  data = config.data
  prompts = data_lib.make_prompt_batches(
      {"train": data.train_file, "validation": data.validation_file}, "train", tokenizer,
      global_batch_size=config.train.global_batch_size,
      batch_size_name="config.train.global_batch_size", prompt_length=data.prompt_length,
      seed=config.seed, shuffle=True, repeat=True, data_dir=common.tfds_dir(config),
      process_index=jax.process_index(), process_count=jax.process_count(),
      data_format=data.get("format", "records"), skip_invalid=data.get("skip_invalid", False),
      allow_truncation=data.get("allow_truncation", True))
  ptx = None
  if ptx_rows > 0:
    # Pretraining documents longer than a row are cut to config.ptx.length: always allowed.
    ptx = data_lib.make_batches("text", {"train": config.ptx.train_file}, "train", tokenizer,
                                global_batch_size=ptx_rows, buckets=(config.ptx.length,),
                                seed=config.seed, shuffle=True, repeat=True,
                                data_dir=common.tfds_dir(config), process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                batch_size_name="config.ptx.batch_size x the epochs")
  return prompts, ptx


def data_metrics(prompts, ptx) -> dict:
  """Invalid records skipped and examples truncated when loading (every metrics record)."""
  metrics = prompts.data_metrics("train")
  if ptx is not None:
    metrics.update(ptx.data_metrics("ptx"))
  return metrics


def repeat_prompts(batch: dict, samples_per_prompt: int) -> dict:
  """Each host-local prompt row `samples_per_prompt` (k) times in a row: [b, ...] -> [b k, ...].

  Row i * k + j is sample j of prompt i, so a group is k contiguous rows and `[b, k]` reshapes
  of the rollout (inside jit, on the global array, which concatenates the processes' rows in
  order) are the groups, wherever their rows are sharded. k = 1 returns `batch` as it is.
  """
  if samples_per_prompt == 1:
    return batch
  return {k: np.repeat(np.asarray(v), samples_per_prompt, axis=0) for k, v in batch.items()}


def sampling_config(config, tokenizer) -> SamplingConfig:
  """The rollout's sampler settings; the tokenizer's special tokens other than EOS banned, and
  `config.sampling.banned_tokens`."""
  s = config.sampling
  extra = tokenization.vocabulary_ids(
      tokenizer, {f"banned_tokens[{i}]": t for i, t in enumerate(s.get("banned_tokens", ()))},
      "sampling", "a banned token must be in the vocabulary")
  banned = tuple(sorted({*banned_token_ids(tokenizer), *extra}))
  return SamplingConfig(s.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id,
                        s.temperature, s.top_k, s.top_p, banned_ids=banned)


def build(config, tokenizer, devices=None):
  """(roles, algorithm, sampler) of an RL config: validated, built from the source runs'
  architectures; nothing is loaded."""
  mesh = shd.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.mesh)
  table.get(config.stage).check(config, shd.data_parallel_size(mesh, rules), jax.process_count())
  module = algorithms.get(config.algorithm)
  policy_cfg, reward_cfg = source_architectures(config.policy_from, config.reward_from)
  rl_config.check_tokenizer_fits(config, len(tokenizer), policy_cfg, reward_cfg)
  roles = build_roles(policy_cfg, reward_cfg, mesh, rules, critic=module.critic_kind(config))
  sampling = sampling_config(config, tokenizer)
  algorithm = module.ALGORITHM(config, roles, sampling.banned_ids)
  return roles, algorithm, roles.sampler(sampling)


def train(config, workdir: str, devices=None) -> Any:
  """Runs the RL stage as configured in `workdir` (on `devices`, default all); returns the
  final state."""
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer,
                                      pad_token=config.data.get("pad_token", ""))
  roles, algorithm, sample = build(config, tokenizer, devices)
  paths.makedirs(workdir)
  prompts, ptx = make_data(config, tokenizer, algorithm.ptx_rows)
  loaded = data_metrics(prompts, ptx)
  checkpointer, writer = loop_lib.open_run(workdir, config)
  try:
    frozen = load_frozen(roles, config.policy_from, config.reward_from)
    with jax.set_mesh(roles.mesh):
      latest = checkpointer.restore_latest(algorithm.abstract_state())
      if latest is not None:
        step, state, extras = latest
        logging.info("Resuming from %s (iteration %d).", checkpointer.directory, step)
        prompts.set_state(extras["prompts"])
        if ptx is not None:
          ptx.set_state(extras["ptx"])
      else:
        state, extras = algorithm.init_state(frozen), {}
  except BaseException:
    checkpointer.close()
    writer.close()
    raise
  experience_fn, update_fn = algorithm.make_experience_fn(), algorithm.make_update_fn()
  batch_sh = roles.batch_sharding

  def iteration(state, rng):
    timer = time.perf_counter()
    batch = shd.host_batch_to_global(repeat_prompts(next(prompts), algorithm.samples_per_prompt),
                                     batch_sh)
    samples = jax.block_until_ready(
        sample(algorithm.policy_params(state), batch["prompt_tokens"], batch["prompt_mask"],
               jax.random.fold_in(rng, 0)))
    rollout_s, timer = time.perf_counter() - timer, time.perf_counter()
    experience, metrics = experience_fn(state, frozen, samples, batch["prompt_tokens"],
                                        batch["prompt_mask"])
    jax.block_until_ready(experience)
    scoring_s, timer = time.perf_counter() - timer, time.perf_counter()
    ptx_batch = shd.host_batch_to_global(next(ptx), batch_sh) if ptx is not None else {}
    state, update_metrics = update_fn(state, experience, metrics, ptx_batch,
                                      jax.random.fold_in(rng, 1))
    jax.block_until_ready(state)
    record = jax.device_get(dict(metrics, **update_metrics))
    record.update(rollout_seconds=rollout_s, scoring_seconds=scoring_s,
                  update_seconds=time.perf_counter() - timer, **loaded)
    return state, record

  def data_state():
    return {"prompts": prompts.get_state(), "ptx": ptx.get_state() if ptx is not None else None}

  loop = loop_lib.Loop(iteration, config.train, config, loop_lib.base_rng(extras, config.seed),
                       checkpointer, writer, log_line=algorithm.log_line, write_every=1,
                       data_state=data_state, extras=extras)
  try:
    with jax.set_mesh(roles.mesh), nn.logical_axis_rules(roles.rules):
      state = loop.run(state, algorithm.iterations_done(state), unit="iteration")
  finally:
    checkpointer.close()
    writer.close()
  return state
