"""Critic-free policy gradients from k samples per prompt: what RLOO and GRPO share.

Both sample k responses to each prompt (the driver repeats every prompt k times, row by row:
row i * k + j is sample j of prompt i), score them like PPO (`online.score_rollout`: the
reward model's normalised score, the fixed penalty for responses without EOS, the per-token
KL to the frozen reference under PPO's estimators), and turn each response's SEQUENCE reward
into an advantage with a baseline from the other samples of its prompt, instead of a critic:

  R_i = score_i - beta * sum_t KL_t              (KL in the reward; GRPO may put it in the loss)
  RLOO: A_i = R_i - mean_{j != i} R_j            (Kool et al. 2019; Ahmadian et al. 2024)
  GRPO: A_i = (R_i - mean_j R_j) / (std_j R_j + eps)          (Shao et al. 2024)

(`algo.group_advantages`, on a [prompts, k] reshape inside jit). A_i is broadcast to every
token of response i, and the update is PPO's clipped surrogate per token
(`algo.clipped_surrogate`), aggregated over the minibatch by `loss_aggregation`
(`algo.aggregate_token_loss`), over `epochs` passes of `num_minibatches` shuffled
minibatches (`online.run_epochs`). With one epoch of one minibatch the ratio is 1 (the old
log-probs are recomputed by the same forward pass with the same parameters) and nothing is
clipped, so the gradient is REINFORCE's, -A_i grad sum_t log pi(y_it) with `sequence_sum`.

GRPO's `kl_in='loss'` adds beta * the aggregated per-token k3 estimate of KL(pi || pi_ref),
under the CURRENT parameters (differentiated), to the loss, as the paper does, instead of
subtracting it from the reward. PPO-ptx's pretraining term (`ptx_coef`) is added to every
minibatch step's loss as in PPO. There is no critic: `critic_kind` is 'none'.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

from instruct import config_lib
from instruct.rl import algo
from instruct.rl import online
from instruct.rl.scoring import sequence_logprobs
from instruct.state import TrainState

Array = jax.Array
KL_IN = ("reward", "loss")


# yapf: disable
@dataclasses.dataclass(frozen=True)
class GroupConfig:
  """The static settings of an RLOO / GRPO iteration (from `config.rloo` / `config.grpo`)."""

  advantage: str = "rloo"          # 'rloo' | 'grpo' (`algo.group_advantages`).
  samples_per_prompt: int = 4      # k.
  epochs: int = 1
  num_minibatches: int = 1
  clip_eps: float = 0.2
  kl_estimator: str = "k1"         # Of the KL penalty, in the reward or the loss.
  kl_in: str = "reward"            # 'reward': R_i -= beta sum_t KL_t; 'loss': + beta KL term.
  loss_aggregation: str = "sequence_sum"  # `algo.aggregate_token_loss`.
  std_eps: float = 1e-4            # GRPO's eps in (R - mean) / (std + eps).
  no_eos_score: Optional[float] = -1.0  # None: responses without EOS are scored as they are.
  temperature: float = 1.0
  banned_ids: tuple[int, ...] = ()
  ptx_coef: float = 0.0
# yapf: enable


@flax.struct.dataclass
class GroupExperience:
  """A scored rollout of k samples per prompt: [n, p] prompts, [n, r] responses, [n]
  advantages (n = prompts x k, groups contiguous)."""

  prompt_tokens: Array
  prompt_mask: Array
  response_tokens: Array
  response_mask: Array
  old_logprobs: Array
  ref_logprobs: Array
  advantages: Array


def sequence_rewards(scores_b: Array, kl_bt: Array, mask_bt: Array, beta) -> Array:
  """[n] R_i = score_i - beta * sum_t m_it KL_it (the KL-penalised sequence reward)."""
  kl = jnp.sum(jnp.where(mask_bt > 0, kl_bt, 0.0), axis=1)
  return scores_b.astype(jnp.float32) - jnp.asarray(beta, jnp.float32) * kl


def make_experience_fn(policy_model, reward_model, cfg: GroupConfig):
  """Returns pure `(params, samples, prompt_tokens, prompt_mask, beta) -> (GroupExperience,
  metrics)`; params: {policy, reference, reward, reward_gain, reward_bias}. The rows are
  groups of `cfg.samples_per_prompt` contiguous samples of one prompt."""
  k = cfg.samples_per_prompt

  def experience(params, samples, prompt_tokens, prompt_mask, beta):
    rm = samples.response_mask
    scored = online.score_rollout(policy_model, reward_model, params, samples, prompt_tokens,
                                  prompt_mask, cfg)
    in_reward = beta if cfg.kl_in == "reward" else 0.0
    rewards = sequence_rewards(scored["scores"], scored["kl"][cfg.kl_estimator], rm, in_reward)
    advantages = algo.group_advantages(rewards, k, cfg.advantage, cfg.std_eps)
    exp = GroupExperience(prompt_tokens, prompt_mask, samples.response_tokens, rm,
                          scored["old_logprobs"], scored["ref_logprobs"], advantages)
    groups = rewards.reshape(-1, k)
    group_std = jnp.std(groups, axis=1, ddof=1)
    metrics = {
        **scored["metrics"],
        "beta": jnp.asarray(beta, jnp.float32),
        "reward": jnp.mean(rewards),
        "advantage_mean": jnp.mean(advantages),
        "advantage_std": jnp.std(advantages),
        "group_reward_std": jnp.mean(group_std),
        # Groups whose k rewards are all equal: zero advantages, no policy gradient.
        "zero_std_group_fraction": jnp.mean(
            (jnp.max(groups, axis=1) == jnp.min(groups, axis=1)).astype(jnp.float32)),
    }
    return exp, metrics

  return experience


def policy_objective(logp_bt: Array, old_logp_bt: Array, ref_logp_bt: Array, advantages_b: Array,
                     mask_bt: Array, beta, cfg: GroupConfig):
  """The loss of a minibatch from its log-probs (PPO-ptx's term aside), and its stats.

    loss = aggregate_t,i( max(-A_i r_it, -A_i clip(r_it, 1 - eps, 1 + eps)) )
           [+ beta * aggregate_t,i( KL_it )   when cfg.kl_in == 'loss']

  r_it = exp(logp_it - old_logp_it); KL_it = `algo.kl_per_token(logp, ref_logp,
  cfg.kl_estimator)` of the CURRENT log-probs (so it is differentiated); aggregate is
  `algo.aggregate_token_loss(., mask, cfg.loss_aggregation)`. logp, old_logp, ref_logp,
  mask: [b, r]; advantages: [b]; beta: scalar. Stats: the surrogate's, `policy_loss` (the
  surrogate term), `kl_loss` (kl_in == 'loss'), `ratio_max_dev` and `ratio_std`.
  """
  advantages = advantages_b[:, None] * mask_bt
  terms, stats = algo.clipped_surrogate(logp_bt, old_logp_bt, advantages, mask_bt, cfg.clip_eps)
  loss = algo.aggregate_token_loss(terms, mask_bt, cfg.loss_aggregation)
  spread = online.ratio_spread(logp_bt, old_logp_bt, mask_bt)
  stats = dict(stats, policy_loss=loss, ratio_max_dev=spread["max_dev"], ratio_std=spread["std"])
  if cfg.kl_in == "loss":
    kl = algo.kl_per_token(logp_bt, ref_logp_bt, cfg.kl_estimator)
    kl_loss = algo.aggregate_token_loss(kl, mask_bt, cfg.loss_aggregation)
    stats["kl_loss"] = jax.lax.stop_gradient(kl_loss)
    loss = loss + beta * kl_loss
  return loss, stats


def make_update_fn(policy_model, policy_opt: optax.GradientTransformation, cfg: GroupConfig):
  """Returns pure `(policy, experience, ptx_batch, rng, beta) -> (policy, metrics)`.

  Per minibatch: `policy_objective` of the policy's log-probs [+ ptx_coef * the per-token
  pretraining loss of a fresh part of `ptx_batch`], one gradient step.
  """

  def policy_loss(params, mb: GroupExperience, ptx, beta):
    logp, _ = sequence_logprobs(policy_model, params, mb.prompt_tokens, mb.prompt_mask,
                                mb.response_tokens, mb.response_mask, cfg.temperature,
                                banned_ids=cfg.banned_ids)
    loss, stats = policy_objective(logp, mb.old_logprobs, mb.ref_logprobs, mb.advantages,
                                   mb.response_mask, beta, cfg)
    if cfg.ptx_coef > 0:
      stats["ptx_loss"] = online.ptx_loss(policy_model, params, ptx)
      loss = loss + cfg.ptx_coef * stats["ptx_loss"]
    return loss, stats

  def update(policy: TrainState, exp: GroupExperience, ptx_batch, rng, beta):

    def minibatch_step(policy, xs):
      mb, ptx = xs
      (_, stats), grads = jax.value_and_grad(policy_loss, has_aux=True)(policy.params, mb, ptx,
                                                                        beta)
      policy = online.apply_gradients(policy, grads, policy_opt)
      return policy, dict(stats, policy_grad_norm=optax.tree.norm(grads))

    ptx = online.ptx_parts(ptx_batch, cfg.epochs, cfg.num_minibatches, cfg.ptx_coef > 0)
    policy, stats = online.run_epochs(minibatch_step, policy, exp, ptx, rng, cfg.epochs,
                                      cfg.num_minibatches)
    first = online.first_ratio_metrics(stats)
    return policy, dict(jax.tree.map(jnp.mean, stats), **first)

  return update


# ----------------------------------------------------------------------------- config


# yapf: disable
def default_section(advantage: str) -> ml_collections.ConfigDict:
  """The fields `config.rloo` and `config.grpo` share, at RLOO's defaults."""
  c = ml_collections.ConfigDict()
  c.samples_per_prompt = 4       # k responses per prompt; the rollout has k x the prompts.
  c.epochs = 1                   # 1 epoch of 1 minibatch: REINFORCE (the ratio is 1).
  c.num_minibatches = 1
  c.clip_eps = 0.2
  c.kl_estimator = "k1"          # 'k1' | 'k3', as PPO's.
  c.loss_aggregation = "sequence_sum"  # 'sequence_sum' | 'sequence_mean' | 'token_mean'.
  c.penalize_no_eos = True       # Responses without EOS get no_eos_score; False:
  c.no_eos_score = -1.0          # score them as they are (truncated).
  c.ptx_coef = 0.0               # The per-token pretraining loss's coefficient (PPO-ptx).
  c.kl = ml_collections.ConfigDict()
  c.kl.controller = "fixed"      # 'fixed' | 'adaptive' (as PPO's; n_steps = responses).
  c.kl.initial_beta = 0.05
  c.kl.target = 6.0              # Nats per sequence (adaptive only).
  c.kl.horizon = 10000
  if advantage == "grpo":
    c.kl_in = "loss"             # 'loss' (Shao et al. 2024) | 'reward' (as RLOO).
    c.kl_estimator = "k3"
    c.kl.initial_beta = 0.04
    c.loss_aggregation = "sequence_mean"
    c.std_eps = 1e-4
  return c
# yapf: enable

PRESETS = ("tiny", "tiny_ptx", "fsdp", "fsdp_ptx")


def preset_config(section: str, arg: str):
  """configs/rloo.py's and configs/grpo.py's config for a preset name (`PRESETS`): every
  field of the RL stage with `section` as the algorithm, PPO-ptx's pretraining mix in the
  `_ptx` presets, `accelerator_preset` in the `fsdp` ones."""
  from instruct import config_lib
  from instruct.rl import config as rl_config  # It imports the algorithms, this module too.
  preset = config_lib.stage_arg(arg).preset
  if preset not in PRESETS:
    raise ValueError(f"Unknown preset {preset!r} for configs/{section}.py; use one of "
                     f"{PRESETS}.")
  config = rl_config.base_config(section)  # Every field, with the CPU-sized defaults.
  config[section].ptx_coef = 1.0 if preset.endswith("_ptx") else 0.0
  if preset.startswith("fsdp"):
    accelerator_preset(config, section)
  return config


def accelerator_preset(config, section: str) -> None:
  """The `fsdp` / `fsdp_ptx` presets of configs/rloo.py and configs/grpo.py (their docstrings):
  PPO's accelerator settings (configs/ppo.py) with 64 prompts x 8 responses per iteration."""
  c = config[section]
  config.mesh.shape = (1, -1, 1)
  config.data.prompt_length = 512
  config.sampling.max_new_tokens = 128
  config.train.update(global_batch_size=64, num_steps=500, checkpoint_every=25)
  c.update(samples_per_prompt=8, num_minibatches=8)
  c.kl.update(controller="fixed", initial_beta=0.02)
  config.optimizer.learning_rate = 3e-6
  config.optimizer.warmup_steps = 10 * c.epochs * c.num_minibatches
  config.ptx.update(train_file="", batch_size=64, length=1024)
  if c.ptx_coef > 0:
    c.ptx_coef = 0.45  # configs/ppo.py's: gamma 27.8 / (T ~ 64 tokens * sigma_A ~ 1).


def group_config(config, section: str, advantage: str, banned_ids: tuple[int,
                                                                         ...] = ()) -> GroupConfig:
  """The static `GroupConfig` of `config.<section>` and the sampling temperature."""
  c = config[section]
  fields = {k: v for k, v in c.items() if k not in ("penalize_no_eos", "kl")}
  if not c.penalize_no_eos:
    fields["no_eos_score"] = None
  return GroupConfig(advantage=advantage, **fields, temperature=config.sampling.temperature,
                     banned_ids=tuple(banned_ids))


def validate(config, policy_model, section: str) -> None:
  """RLOO's / GRPO's own checks (after the RL stage's); ValueError naming the key."""
  c, key = config[section], f"config.{section}"
  k = c.samples_per_prompt
  if not (config_lib.is_int(k) and k >= 2):
    raise ValueError(f"{key}.samples_per_prompt={k!r} must be an integer >= 2: a response's "
                     "baseline is the other responses to its prompt.")
  for name in ("epochs", "num_minibatches"):
    if not (config_lib.is_int(c[name]) and c[name] >= 1):
      raise ValueError(f"{key}.{name}={c[name]!r} must be an integer >= 1.")
  batch = config.train.global_batch_size
  if batch * k % c.num_minibatches:
    raise ValueError(f"config.train.global_batch_size={batch} x {key}.samples_per_prompt={k} = "
                     f"{batch * k} rollout rows is not divisible by {key}.num_minibatches="
                     f"{c.num_minibatches}.")
  if c.ptx_coef > 0:
    config_lib.validate_ptx(config, f"{key}.ptx_coef={c.ptx_coef}", f"{key}.num_minibatches",
                            c.num_minibatches, policy_model)
  choices = (("kl_estimator", algo.KL_ESTIMATORS), ("loss_aggregation", algo.AGGREGATIONS),
             ("kl_in", KL_IN))
  for name, allowed in choices:
    if name in c and c[name] not in allowed:
      raise ValueError(f"{key}.{name}={c[name]!r}; expected one of {allowed}.")
  if c.kl.controller not in algo.KL_CONTROLLERS:
    raise ValueError(f"{key}.kl.controller={c.kl.controller!r}; expected one of "
                     f"{algo.KL_CONTROLLERS}.")
  if c.get("kl_in") == "loss" and c.kl_estimator != "k3":
    raise ValueError(f"{key}.kl_estimator={c.kl_estimator!r} with {key}.kl_in='loss': the k1 "
                     "term's gradient is zero in expectation; use 'k3' (or kl_in='reward').")
  for name in ("clip_eps", "std_eps"):
    if name in c and not c[name] > 0:
      raise ValueError(f"{key}.{name}={c[name]!r} must be > 0.")


class GroupAlgorithm(online.PolicyAlgorithm):
  """RLOO / GRPO on the algorithm seam (`instruct.rl.algorithms`).

  State: `{"policy": TrainState, "kl": KLControllerState}`; the policy starts from the
  reference. `samples_per_prompt` (k) tells the driver to repeat every prompt k times.
  """

  def __init__(self, config, roles, banned_ids: tuple[int, ...], section: str, advantage: str):
    super().__init__(config, roles, section, group_config(config, section, advantage, banned_ids))
    self.samples_per_prompt = self.cfg.samples_per_prompt

  def make_experience_fn(self):
    """The jitted `(state, frozen, samples, prompt_tokens, prompt_mask) -> (experience,
    metrics)`."""
    roles, batch, repl = self.roles, self.roles.batch_sharding, self.roles.replicated
    frozen_sh = {
        "policy": roles.policy.shardings, "reference": roles.reference.shardings,
        "reward": roles.reward.shardings, "reward_gain": repl, "reward_bias": repl
    }
    experience = jax.jit(make_experience_fn(roles.policy.model, roles.reward.model, self.cfg),
                         in_shardings=(frozen_sh, roles.samples_sharding, batch, batch, repl))

    def run(state, frozen, samples, prompt_tokens, prompt_mask):
      params = dict(frozen, policy=state["policy"].params)
      return experience(params, samples, prompt_tokens, prompt_mask, state["kl"].beta)

    run.jitted = experience
    return run

  def make_update_fn(self):
    """`(state, experience, experience metrics, ptx batch, rng) -> (state, metrics)`: the
    jitted update (policy donated), then the KL controller (n_steps = responses sampled)."""
    pol_sh, repl = self.policy_factory.shardings, self.roles.replicated
    update = jax.jit(make_update_fn(self.roles.policy.model, self.policy_opt,
                                    self.cfg), in_shardings=(pol_sh, None, None, repl, repl),
                     out_shardings=(pol_sh, repl), donate_argnums=(0,))
    episodes = self.config.train.global_batch_size * self.samples_per_prompt

    def run(state, experience, metrics, ptx_batch, rng):
      policy, update_metrics = update(state["policy"], experience, ptx_batch, rng, state["kl"].beta)
      return {"policy": policy, "kl": self.kl_step(state["kl"], metrics, episodes)}, update_metrics

    run.jitted = update
    return run
