"""One PPO iteration as two pure functions: make the experience, then update on it.

  experience = make_experience(models, sampled responses, beta)      # scoring, no gradients
  policy, value, metrics = update(policy, value, experience, ptx_batch, rng)

Experience: the policy's and the frozen reference's log-probs of the sampled tokens (with the
sampling temperature), the critic's values, the reward model's normalised score at the last
token (a fixed penalty score for responses that never emitted EOS), per-token rewards
`-beta * KL_t` plus the score at the final token, and GAE advantages and returns (Ziegler et al.
2019; Stiennon et al. 2020; Ouyang et al. 2022).

Update: `epochs` passes, each over a fresh permutation of the rollout split into
`num_minibatches`; per minibatch, the clipped surrogate policy loss (advantages whitened per
minibatch) plus `ptx_coef` times the LM loss of a pretraining minibatch in the SAME gradient
step (PPO-ptx), and the clipped value loss for the separate critic. Every minibatch step takes
fresh pretraining rows: the iteration's pretraining batch holds `epochs` x the rows of one
pass, so no row is reused across epochs while the rollouts are.

Rows are split into chunks and minibatches by stride (chunk i takes rows i, i + n, ...; as
`stages.common.split_microbatches`), so every chunk keeps the batch's sharding and nothing is
moved between devices to form it; only the per-epoch shuffle of the rollout is a gather.

The old log-probs are recomputed by the same forward function (same temperature, no dropout,
the same banned tokens as the sampler) on minibatch-sized chunks rather than taken from the
sampler, so on the first minibatch of the first epoch the ratio pi/pi_old is 1 up to float32
rounding: bitwise equality between two XLA programs is not
guaranteed (measured: 0 in the tests, up to 5e-7 in the benchmark's shapes).

Frozen models (reference, reward) enter as parameter pytrees, never as captured constants.
The scoring, the pretraining loss, the epoch / minibatch loop, the policy's state and the
consistency metrics are shared with the critic-free algorithms (`instruct.rl.online`).
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
from instruct import optim
from instruct.rl import algo
from instruct.rl import online
from instruct.rl.scoring import response_values, sequence_logprobs
from instruct.state import TrainState, init_params_fn, state_factory

Array = jax.Array


# yapf: disable
@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Hyperparameters of the PPO update (InstructGPT / Stiennon et al. defaults)."""

  epochs: int = 4
  num_minibatches: int = 4
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  gamma: float = 1.0
  lam: float = 0.95
  kl_estimator: str = "k1"
  whiten_rewards: bool = False
  no_eos_score: Optional[float] = -1.0  # Score of responses that never emit EOS; None: score
  # them as they are (truncated at max_new_tokens).
  temperature: float = 1.0
  banned_ids: tuple[int, ...] = ()  # Tokens the sampler never emits (pad, other specials):
  # log-probs are of the distribution without them.
  ptx_coef: float = 0.0        # PPO-ptx's coefficient on the per-token pretraining loss; 0 =
  # plain PPO. See `ptx_gamma_equivalent` for the paper's gamma.
  entropy_coef: float = 0.0
  shared_value_head: bool = False  # Critic = a value head on the policy trunk (one optimiser,
  vf_coef: float = 0.1             # loss = policy + vf_coef * value) instead of a separate
# yapf: enable
# model initialised from the RM.


@flax.struct.dataclass
class Experience:
  """A scored rollout; [b, p] prompt arrays and [b, r] response arrays, [b] per sequence."""

  prompt_tokens: Array
  prompt_mask: Array
  response_tokens: Array
  response_mask: Array
  old_logprobs: Array
  ref_logprobs: Array
  old_values: Array
  advantages: Array
  returns: Array
  scores: Array


# Strided row parts and chunked forward passes (`instruct.rl.online`).
split_rows, merge_rows, _chunked = online.split_rows, online.merge_rows, online.chunked


def ptx_gamma_equivalent(ptx_coef, response_length, advantage_std):
  """The coefficient gamma of InstructGPT's objective that `ptx_coef` amounts to.

  Ouyang et al. 2022 maximise E_(x,y)[r(x, y) - beta KL] + gamma E_pretrain[log pi(x)]: per
  episode, the policy gradient is sum_t A_t grad log pi(y_t), while the pretraining term is a
  per-token log-likelihood (the LM loss as GPT-3 reports it). Here the policy loss is a
  per-token MEAN of the surrogate with advantages whitened to unit variance, beside
  `ptx_coef` x the per-token mean pretraining loss. Relative to the paper's objective the
  policy term is therefore scaled by 1 / (T * sigma_A), with T the mean response length and
  sigma_A the standard deviation of the advantages before whitening, so

    gamma = ptx_coef * T * sigma_A,     i.e.   ptx_coef = gamma / (T * sigma_A).

  The paper's gamma is 27.8. PPO logs this value every iteration (`ptx_gamma_equivalent`).
  """
  return ptx_coef * response_length * advantage_std


def critic_from_reward_model(reward_params, gain, bias):
  """Critic parameters from the reward model's, with the RM normalisation folded into the head.

  The returns the critic learns are built from the normalised score `gain * raw + bias`
  (`make_experience_fn`), so the critic starts from the RM with `scalar_head` replaced by
  kernel * gain and bias * gain + bias: its first values are the normalised RM scores at
  every position, not raw ones the clipped value loss would take |bias| / value_clip_eps
  iterations to shift.
  """
  head = reward_params["scalar_head"]
  folded = {"kernel": head["kernel"] * gain, "bias": head["bias"] * gain + bias}
  return dict(reward_params, scalar_head=folded)


def make_experience_fn(policy_model, value_model, reward_model, cfg: PPOConfig):
  """Returns pure `(params, samples, prompt_tokens, prompt_mask, beta) -> (Experience, metrics)`.

  `params` is a dict with `policy`, `reference`, `value`, `reward` parameter pytrees and
  `reward_gain`, `reward_bias` (the RM's stored normalisation).
  """

  def experience(params, samples, prompt_tokens, prompt_mask, beta):
    rt, rm = samples.response_tokens, samples.response_mask
    values_of = lambda run: run(lambda p, *a: response_values(value_model, p, *a), params["value"])
    scored = online.score_rollout(policy_model, reward_model, params, samples, prompt_tokens,
                                  prompt_mask, cfg, between=values_of)
    values, scores = scored["extra"], scored["scores"]
    # The configured estimate is the penalty (and drives the controller).
    rewards = algo.token_rewards(scores, scored["kl"][cfg.kl_estimator], rm, beta)
    if cfg.whiten_rewards:
      rewards = algo.masked_whiten(rewards, rm, shift_mean=False)
    advantages, returns = algo.gae(rewards, values, rm, cfg.gamma, cfg.lam)
    exp = Experience(prompt_tokens, prompt_mask, rt, rm, scored["old_logprobs"],
                     scored["ref_logprobs"], values, advantages, returns, scores)
    metrics = {
        **scored["metrics"],
        "beta": jnp.asarray(beta, jnp.float32),
        "explained_variance": algo.explained_variance(values, returns, rm),
        "advantage_mean": algo.masked_mean(advantages, rm),
        "advantage_std": jnp.sqrt(algo.masked_var(advantages, rm)),
    }
    if cfg.ptx_coef > 0:
      metrics["ptx_gamma_equivalent"] = ptx_gamma_equivalent(cfg.ptx_coef,
                                                             metrics["response_length"],
                                                             metrics["advantage_std"])
    return exp, metrics

  return experience


def make_update_fn(policy_model, value_model, policy_opt: optax.GradientTransformation,
                   value_opt: optax.GradientTransformation, cfg: PPOConfig):
  """Returns pure `(policy, value, experience, ptx_batch, rng) -> (policy, value, metrics)`.

  policy and value are TrainStates; with `cfg.shared_value_head` value is None, value_model
  is the policy's model (head 'policy_value') and value_opt is unused. ptx_batch: pretraining
  {tokens, loss_mask, attention_mask} [epochs * b_ptx, L], split by stride into epochs x
  num_minibatches parts, one fresh part per minibatch step (ignored when ptx_coef == 0).
  """

  def policy_loss(params, mb: Experience, ptx):
    logp, logits = sequence_logprobs(policy_model, params, mb.prompt_tokens, mb.prompt_mask,
                                     mb.response_tokens, mb.response_mask, cfg.temperature,
                                     banned_ids=cfg.banned_ids)
    adv = algo.masked_whiten(mb.advantages, mb.response_mask)
    loss, stats = algo.clipped_policy_loss(logp, mb.old_logprobs, adv, mb.response_mask,
                                           cfg.clip_eps)
    # Without an entropy bonus the entropy is a diagnostic: no gradient is taken through it
    # (0 x its gradient over [b, r, v] would be computed and added to the loss's).
    bonus = cfg.entropy_coef != 0
    entropy = algo.masked_entropy(logits if bonus else jax.lax.stop_gradient(logits),
                                  mb.response_mask)
    spread = online.ratio_spread(logp, mb.old_logprobs, mb.response_mask)
    stats = dict(stats, policy_loss=loss, entropy_update=entropy, ratio_max_dev=spread["max_dev"],
                 ratio_std=spread["std"])
    if bonus:
      loss = loss - cfg.entropy_coef * entropy
    if cfg.ptx_coef > 0:
      ptx_loss = online.ptx_loss(policy_model, params, ptx)
      stats["ptx_loss"] = ptx_loss
      loss = loss + cfg.ptx_coef * ptx_loss
    return loss, stats

  def value_loss(params, mb: Experience):
    values = response_values(value_model, params, mb.prompt_tokens, mb.prompt_mask,
                             mb.response_tokens, mb.response_mask)
    loss, stats = algo.clipped_value_loss(values, mb.old_values, mb.returns, mb.response_mask,
                                          cfg.value_clip_eps)
    return loss, dict(stats, value_loss=loss)

  def shared_loss(params, mb: Experience, ptx):
    p_loss, p_stats = policy_loss(params, mb, ptx)
    v_loss, v_stats = value_loss(params, mb)
    return p_loss + cfg.vf_coef * v_loss, dict(p_stats, **v_stats)

  def minibatch_step(carry, xs):
    policy, value = carry
    mb, ptx = xs
    if cfg.shared_value_head:  # `value` is None; value_model is the policy's own model.
      (_, stats), grads = jax.value_and_grad(shared_loss, has_aux=True)(policy.params, mb, ptx)
      policy = online.apply_gradients(policy, grads, policy_opt)
      return (policy, value), dict(stats, policy_grad_norm=optax.tree.norm(grads))
    (_, p_stats), p_grads = jax.value_and_grad(policy_loss, has_aux=True)(policy.params, mb, ptx)
    (_, v_stats), v_grads = jax.value_and_grad(value_loss, has_aux=True)(value.params, mb)
    policy = online.apply_gradients(policy, p_grads, policy_opt)
    value = online.apply_gradients(value, v_grads, value_opt)
    stats = dict(p_stats, **v_stats, policy_grad_norm=optax.tree.norm(p_grads),
                 value_grad_norm=optax.tree.norm(v_grads))
    return (policy, value), stats

  def update(policy: TrainState, value: TrainState, exp: Experience, ptx_batch, rng):
    epochs, m = cfg.epochs, cfg.num_minibatches
    ptx = online.ptx_parts(ptx_batch, epochs, m, cfg.ptx_coef > 0)
    (policy, value), stats = online.run_epochs(minibatch_step, (policy, value), exp, ptx, rng,
                                               epochs, m)
    # The ratio on the first minibatch of the first epoch: 1 up to float rounding.
    first = online.first_ratio_metrics(stats)
    metrics = dict(jax.tree.map(jnp.mean, stats), **first,
                   first_ratio_error=first["consistency/first_ratio_max_dev"])
    return policy, value, metrics

  return update


# ----------------------------------------------------------------------------- the algorithm


# yapf: disable
def default_config() -> ml_collections.ConfigDict:
  """`config.ppo`: PPO's hyperparameters and its KL penalty (InstructGPT-style defaults)."""
  c = ml_collections.ConfigDict()
  c.epochs = 4
  c.num_minibatches = 4
  c.clip_eps = 0.2
  c.value_clip_eps = 0.2
  c.gamma = 1.0
  c.lam = 0.95
  c.kl_estimator = "k1"          # 'k1' (log ratio) | 'k3' (always >= 0).
  c.whiten_rewards = False
  c.penalize_no_eos = True       # Responses without EOS get no_eos_score; False:
  c.no_eos_score = -1.0          # score them as they are (truncated).
  c.ptx_coef = 0.0               # PPO-ptx: the per-token pretraining loss's coefficient.
  c.entropy_coef = 0.0
  c.shared_value_head = False    # True: the critic is a zero-initialised value head on
  c.vf_coef = 0.1                # the policy trunk (loss += vf_coef * value loss).
  c.kl = ml_collections.ConfigDict()
  c.kl.controller = "adaptive"   # 'fixed' | 'adaptive' (Ziegler et al. 2019).
  c.kl.initial_beta = 0.05
  c.kl.target = 6.0              # Nats per sequence.
  c.kl.horizon = 10000
  return c
# yapf: enable


def validate(config, policy_model=None) -> None:
  """PPO's own checks (after the RL stage's); ValueError naming the key."""
  ppo = config.ppo
  if config.train.global_batch_size % ppo.num_minibatches:
    raise ValueError(f"config.train.global_batch_size={config.train.global_batch_size} is not "
                     f"divisible by config.ppo.num_minibatches={ppo.num_minibatches}.")
  if ppo.ptx_coef > 0:
    config_lib.validate_ptx(config, f"config.ppo.ptx_coef={ppo.ptx_coef}",
                            "config.ppo.num_minibatches", ppo.num_minibatches, policy_model)
  if ppo.kl_estimator not in algo.KL_ESTIMATORS:
    raise ValueError(f"config.ppo.kl_estimator={ppo.kl_estimator!r}; expected one of "
                     f"{algo.KL_ESTIMATORS}.")
  if ppo.kl.controller not in algo.KL_CONTROLLERS:
    raise ValueError(f"config.ppo.kl.controller={ppo.kl.controller!r}; expected one of "
                     f"{algo.KL_CONTROLLERS}.")


def ppo_config(config, banned_ids: tuple[int, ...] = ()) -> PPOConfig:
  """The static `PPOConfig` of an RL config's `config.ppo` and sampling temperature."""
  fields = {k: v for k, v in config.ppo.items() if k not in ("penalize_no_eos", "kl")}
  if not config.ppo.penalize_no_eos:
    fields["no_eos_score"] = None
  return PPOConfig(**fields, temperature=config.sampling.temperature, banned_ids=banned_ids)


def critic_kind(config) -> str:
  """The critic role PPO needs (`instruct.rl.roles.build_roles`)."""
  return "shared" if config.ppo.shared_value_head else "separate"


class PPO(online.PolicyAlgorithm):
  """PPO / PPO-ptx on the algorithm seam (`instruct.rl.algorithms`).

  State: `{"policy": TrainState, "value": TrainState (separate critic only), "kl":
  KLControllerState}`. Built from roles alone; `init_state(frozen)` starts it from the
  frozen parameters (the policy from the reference, the critic from the reward model with its
  normalisation folded in).
  """

  samples_per_prompt = 1

  def __init__(self, config, roles, banned_ids: tuple[int, ...] = ()):
    super().__init__(config, roles, "ppo", ppo_config(config, banned_ids))
    self.value_opt = optim.make_optimizer(config.value_optimizer, self.num_updates)
    with jax.set_mesh(roles.mesh):
      self.value_factory = None if roles.critic is None else state_factory(
          init_params_fn(roles.critic.model), self.value_opt, roles.mesh, roles.rules)

  def abstract_state(self) -> dict:
    state = super().abstract_state()
    if self.value_factory is not None:
      state["value"] = self.value_factory.abstract
    return state

  def init_state(self, frozen: dict) -> dict:
    state = super().init_state(frozen)
    if self.value_factory is not None:
      state["value"] = self.value_factory.from_params(
          critic_from_reward_model(frozen["reward"], frozen["reward_gain"], frozen["reward_bias"]))
    return state

  def make_experience_fn(self):
    """The jitted `(state, frozen, samples, prompt_tokens, prompt_mask) -> (experience,
    metrics)`."""
    roles, batch, repl = self.roles, self.roles.batch_sharding, self.roles.replicated
    critic = roles.critic or roles.policy
    frozen_sh = {
        "policy": roles.policy.shardings, "reference": roles.reference.shardings,
        "value": critic.shardings, "reward": roles.reward.shardings, "reward_gain": repl,
        "reward_bias": repl
    }
    experience = jax.jit(
        make_experience_fn(roles.policy.model, critic.model, roles.reward.model, self.cfg),
        in_shardings=(frozen_sh, roles.samples_sharding, batch, batch, repl))

    def run(state, frozen, samples, prompt_tokens, prompt_mask):
      critic_state = state.get("value", state["policy"])
      params = dict(frozen, policy=state["policy"].params, value=critic_state.params)
      return experience(params, samples, prompt_tokens, prompt_mask, state["kl"].beta)

    run.jitted = experience  # For compile-cache checks (benchmarks/rollout.py).
    return run

  def make_update_fn(self):
    """`(state, experience, experience metrics, ptx batch, rng) -> (state, metrics)`: the
    jitted update (state donated), then the KL controller."""
    pol_sh = self.policy_factory.shardings
    val_sh = None if self.value_factory is None else self.value_factory.shardings
    critic_model = (self.roles.critic or self.roles.policy).model
    update = jax.jit(
        make_update_fn(self.roles.policy.model, critic_model, self.policy_opt, self.value_opt,
                       self.cfg), in_shardings=(pol_sh, val_sh, None, None, self.roles.replicated),
        out_shardings=(pol_sh, val_sh, self.roles.replicated), donate_argnums=(0, 1))
    batch_size = self.config.train.global_batch_size

    def run(state, experience, metrics, ptx_batch, rng):
      policy, value, update_metrics = update(state["policy"], state.get("value"), experience,
                                             ptx_batch, rng)
      kl_state = self.kl_step(state["kl"], metrics, batch_size)
      state = {"policy": policy, "kl": kl_state, **({"value": value} if value else {})}
      return state, dict(update_metrics, kl_estimator_is_k3=float(self.cfg.kl_estimator == "k3"))

    run.jitted = update
    return run


ALGORITHM = PPO
