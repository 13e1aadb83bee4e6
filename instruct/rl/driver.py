"""The PPO driver: rollout, scoring and update per iteration, on one mesh, resumable.

`train_ppo(config, workdir)` loads the policy and reference from `config.policy_from` (an SFT
run) and the reward model and critic from `config.reward_from` (an RM run), all directly into
their shardings, jits the sampler, the experience function and the update once each, and
iterates. The checkpoint holds the policy and critic train states (parameters and optimiser
states) and the KL controller; its extras hold the data positions, the rng and the config.
The frozen reference and reward model are not copied into PPO checkpoints: they are reloaded
from their source runs.
"""

from __future__ import annotations

import os
import time
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from instruct import checkpoint as ckpt_lib
from instruct import config_lib
from instruct import data as data_lib
from instruct import optim
from instruct import sharding as shd
from instruct.metrics import MetricWriter
from instruct.model import ModelConfig, Transformer
from instruct.rl import algo
from instruct.rl.ppo import (PPOConfig, critic_from_reward_model, make_experience_fn,
                             make_update_fn)
from instruct.rl.sampler import Samples, SamplingConfig, banned_token_ids, make_sampler
from instruct.stages import common
from instruct.state import state_factory
from instruct.trainer import (NonFiniteLossError, PreemptionWatcher, init_params_fn,
                              latest_params)


def _source_model(workdir: str, head: str, what: str) -> tuple[Transformer, dict]:
  """The model of an earlier run (its config.json), and that config."""
  path = os.path.join(workdir, "config.json")
  if not workdir or not os.path.exists(path):
    raise FileNotFoundError(f"config.{what}={workdir!r} is not a finished run directory "
                            f"(no {path}).")
  source = ckpt_lib.read_config(workdir)
  return Transformer(ModelConfig.from_dict(source["model"]), head=head), source


def _ppo_config(config, banned_ids: tuple[int, ...] = ()) -> PPOConfig:
  fields = {k: v for k, v in config.ppo.items() if k != "penalize_no_eos"}
  if not config.ppo.penalize_no_eos:
    fields["no_eos_score"] = None
  return PPOConfig(**fields, temperature=config.sampling.temperature, banned_ids=banned_ids)


def _source_model_config(workdir: str) -> ModelConfig | None:
  """The architecture of a source run, for validation; None if there is no such run (the
  validation then names the empty or wrong key)."""
  if not workdir or not os.path.exists(os.path.join(workdir, "config.json")):
    return None
  return ModelConfig.from_dict(ckpt_lib.read_config(workdir)["model"])


def _data(config, tokenizer):
  """Prompt batches and (for PPO-ptx) pretraining batches, host-local."""
  prompts = data_lib.make_prompt_batches(
      {"train": config.data.train_file, "validation": config.data.validation_file}, "train",
      tokenizer, global_batch_size=config.train.global_batch_size,
      prompt_length=config.data.prompt_length, seed=config.seed, shuffle=True, repeat=True,
      data_dir=common.tfds_dir(config), process_index=jax.process_index(),
      process_count=jax.process_count(), data_format=config.data.get("format", "records"),
      skip_invalid=config.data.get("skip_invalid", False))
  ptx = None
  if config.ppo.ptx_coef > 0:
    # `ptx.batch_size` rows per PPO epoch: every minibatch step of every epoch takes fresh
    # rows (see rl/ppo.py), so an iteration reads epochs x batch_size rows.
    ptx = data_lib.make_batches(
        "text", {"train": config.ptx.train_file}, "train", tokenizer,
        global_batch_size=config.ptx.batch_size * config.ppo.epochs,
        buckets=(config.ptx.length,),
        seed=config.seed, shuffle=True, repeat=True, data_dir=common.tfds_dir(config),
        process_index=jax.process_index(), process_count=jax.process_count())
  return prompts, ptx


class PPORun:
  """Everything one PPO run needs, built once: models, shardings, jitted programs."""

  def __init__(self, config, tokenizer, mesh, rules):
    self.config, self.mesh, self.rules = config, mesh, rules
    banned = banned_token_ids(tokenizer)
    ppo = _ppo_config(config, banned)
    self.shared = ppo.shared_value_head
    self.policy_model, _ = _source_model(config.policy_from,
                                         "policy_value" if self.shared else "lm", "policy_from")
    # The reward model's architecture; also the separate critic's (initialised from the RM).
    self.value_model, rm_source = _source_model(config.reward_from, "scalar", "reward_from")
    if rm_source.get("stage") != "rm":
      raise ValueError(f"config.reward_from={config.reward_from!r} is not a reward-model run.")
    updates = config.train.num_steps * ppo.epochs * ppo.num_minibatches
    self.policy_opt = optim.make_optimizer(config.optimizer, updates)
    self.value_opt = optim.make_optimizer(config.value_optimizer, updates)
    with jax.set_mesh(mesh):
      self.policy_factory = state_factory(init_params_fn(self.policy_model), self.policy_opt,
                                          mesh, rules)
      self.value_factory = state_factory(init_params_fn(self.value_model), self.value_opt,
                                         mesh, rules)
    batch, repl = shd.batch_sharding(mesh, rules), shd.replicated(mesh)
    self.batch_sharding, self.replicated = batch, repl
    pol_sh = self.policy_factory.shardings
    val_sh = None if self.shared else self.value_factory.shardings
    critic_model = self.policy_model if self.shared else self.value_model
    sampling = SamplingConfig(config.sampling.max_new_tokens, tokenizer.eos_token_id,
                              tokenizer.pad_token_id, config.sampling.temperature,
                              config.sampling.top_k, config.sampling.top_p, banned_ids=banned)
    samples_sh = Samples(batch, batch, batch, batch, repl)
    self.sample = jax.jit(make_sampler(self.policy_model, sampling),
                          in_shardings=(pol_sh.params, batch, batch, repl),
                          out_shardings=samples_sh)
    frozen_sh = {"policy": pol_sh.params, "reference": pol_sh.params,
                 "value": (val_sh or pol_sh).params,
                 "reward": self.value_factory.shardings.params, "reward_gain": repl,
                 "reward_bias": repl}
    self.experience = jax.jit(
        make_experience_fn(self.policy_model, critic_model, self.value_model, ppo),
        in_shardings=(frozen_sh, samples_sh, batch, batch, repl))
    self.update = jax.jit(
        make_update_fn(self.policy_model, critic_model, self.policy_opt, self.value_opt, ppo),
        in_shardings=(pol_sh, val_sh, None, None, repl),
        out_shardings=(pol_sh, val_sh, repl), donate_argnums=(0, 1))

  def initial(self, checkpointer) -> tuple[dict, dict, dict]:
    """(state, frozen params, extras): resumed from the workdir or started from the sources."""
    config = self.config
    abstract_policy = self.policy_factory.abstract.params
    reference = dict(latest_params(config.policy_from, {
        k: v for k, v in abstract_policy.items() if k != "value_head"}))
    if self.shared:  # A new zero value head on the SFT trunk (its values are unused for ref).
      reference["value_head"] = jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding),
          abstract_policy["value_head"])
    reward = latest_params(config.reward_from, self.value_factory.abstract.params)
    rm_ckpt = ckpt_lib.Checkpointer(config.reward_from)
    norm = rm_ckpt.restore_extras(rm_ckpt.latest_step()).get("reward_normalization")
    rm_ckpt.close()
    if norm is None:
      raise ValueError(f"config.reward_from={config.reward_from!r}: its last checkpoint has no "
                       "reward normalisation (the rm run did not finish).")
    frozen = {"reference": reference, "reward": reward,
              "reward_gain": jnp.float32(norm["gain"]), "reward_bias": jnp.float32(norm["bias"])}
    step = checkpointer.latest_step()
    if step is not None:
      logging.info("Resuming PPO from %s (iteration %d).", checkpointer.directory, step)
      kl = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                       sharding=self.replicated),
                        jax.eval_shape(algo.init_kl_controller, 0.0))
      abstract = {"policy": self.policy_factory.abstract, "kl": kl}
      if not self.shared:
        abstract["value"] = self.value_factory.abstract
      state, extras = checkpointer.restore(step, abstract)
      return state, frozen, extras
    state = {"policy": self.policy_factory.from_params(reference),
             "kl": algo.init_kl_controller(config.kl.initial_beta)}
    if not self.shared:
      state["value"] = self.value_factory.from_params(
          critic_from_reward_model(reward, frozen["reward_gain"], frozen["reward_bias"]))
    return state, frozen, {}


def train_ppo(config, workdir: str, devices=None) -> dict:
  """Runs PPO as configured in `workdir` (on `devices`, default all); returns the final state."""
  mesh = shd.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.mesh)
  config_lib.validate_ppo(config, shd.data_parallel_size(mesh, rules), jax.process_count(),
                          policy_model=_source_model_config(config.policy_from),
                          reward_model=_source_model_config(config.reward_from))
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer,
                                      pad_token=config.data.get("pad_token", ""))
  run = PPORun(config, tokenizer, mesh, rules)
  os.makedirs(workdir, exist_ok=True)
  prompts, ptx = _data(config, tokenizer)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints)
  writer = MetricWriter(workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)
  with jax.set_mesh(mesh):
    state, frozen, extras = run.initial(checkpointer)
  if extras:
    prompts.set_state(extras["prompts"])
    if ptx is not None:
      ptx.set_state(extras["ptx"])
  rng = (jax.random.wrap_key_data(np.asarray(extras["rng"], np.uint32)) if extras
         else jax.random.key(config.seed))
  watcher = PreemptionWatcher()
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = _iterate(run, state, frozen, prompts, ptx, rng, checkpointer, writer, watcher)
  finally:
    watcher.close()
    checkpointer.close()
    writer.close()
  return state


def _iterate(run: PPORun, state, frozen, prompts, ptx, rng, checkpointer, writer, watcher):
  """The PPO loop: rollout -> experience -> update -> KL controller -> log / checkpoint."""
  config = run.config
  step, end = int(state["policy"].step) // _updates_per_iteration(config), config.train.num_steps
  if config.train.stop_at_step > 0:
    end = min(end, config.train.stop_at_step)
  while step < end:
    iteration_rng = jax.random.fold_in(rng, step)
    timer = time.perf_counter()
    batch = shd.host_batch_to_global(next(prompts), run.batch_sharding)
    samples = jax.block_until_ready(run.sample(
        state["policy"].params, batch["prompt_tokens"], batch["prompt_mask"],
        jax.random.fold_in(iteration_rng, 0)))
    rollout_s, timer = time.perf_counter() - timer, time.perf_counter()
    critic = state.get("value", state["policy"])
    params = dict(frozen, policy=state["policy"].params, value=critic.params)
    experience, metrics = run.experience(params, samples, batch["prompt_tokens"],
                                         batch["prompt_mask"], state["kl"].beta)
    jax.block_until_ready(experience)
    scoring_s, timer = time.perf_counter() - timer, time.perf_counter()
    ptx_batch = (shd.host_batch_to_global(next(ptx), run.batch_sharding)
                 if ptx is not None else {})
    policy, value, update_metrics = run.update(state["policy"], state.get("value"), experience,
                                               ptx_batch, jax.random.fold_in(iteration_rng, 1))
    jax.block_until_ready(policy)
    update_s = time.perf_counter() - timer
    kl_name = f"kl_{config.ppo.kl_estimator}"
    kl_state = algo.update_kl_controller(
        state["kl"], metrics[kl_name], config.train.global_batch_size, config.kl.target,
        config.kl.horizon, config.kl.controller)
    state = {"policy": policy, "kl": kl_state, **({"value": value} if value else {})}
    step += 1
    record = {k: float(v) for k, v in jax.device_get(dict(metrics, **update_metrics)).items()}
    if not all(np.isfinite(v) for v in record.values()):
      bad = sorted(k for k, v in record.items() if not np.isfinite(v))
      raise NonFiniteLossError(
          f"Non-finite {bad} at PPO iteration {step}. Stopping without saving; the last good "
          f"checkpoint ({checkpointer.latest_step()}) in {checkpointer.directory} is intact.")
    record.update(rollout_seconds=rollout_s, scoring_seconds=scoring_s, update_seconds=update_s,
                  kl_estimator_is_k3=float(config.ppo.kl_estimator == "k3"))
    writer.write(step, record)
    if step % config.train.log_every == 0 or step == end:
      logging.info("iter %d/%d | score %.3f | %s %.3f | beta %.4f | eos %.2f | len %.1f | "
                   "rollout %.2fs scoring %.2fs update %.2fs", step, end, record["score"],
                   kl_name, record[kl_name], record["beta"], record["eos_fraction"],
                   record["response_length"], rollout_s, scoring_s, update_s)
    preempted = watcher.should_stop(step)
    if step % config.train.checkpoint_every == 0 or step == end or preempted:
      extras = {"prompts": prompts.get_state(), "ptx": ptx.get_state() if ptx else None,
                "rng": np.asarray(jax.random.key_data(rng)).tolist(),
                "config": config.to_dict()}
      checkpointer.save(step, state, extras)
    if preempted:
      logging.warning("Preemption signal: saved iteration %d; rerun to resume.", step)
      break
  return state


def _updates_per_iteration(config) -> int:
  return config.ppo.epochs * config.ppo.num_minibatches

