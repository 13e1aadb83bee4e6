"""What the online policy-gradient algorithms (PPO, RLOO, GRPO) share.

- Rows: `split_rows` / `merge_rows` split a batch by stride (part i holds rows i, i + n, ...)
  so every part keeps the batch's sharding; `chunked` maps a forward pass over such parts.
- Scoring a rollout (`score_rollout`): the policy's and the frozen reference's log-probs of
  the sampled tokens (sampling temperature and banned tokens as the sampler's), entropies, the
  reward model's normalised score with the fixed penalty for responses without EOS, the
  per-token KL under every estimator, and the metrics every algorithm reports (the
  sampler / scorer consistency included).
- The update: `ptx_loss` (PPO-ptx's per-token pretraining loss in the same gradient step),
  `ptx_parts` (a fresh part of the pretraining batch per minibatch step), `run_epochs` (passes
  over shuffled minibatches), `apply_gradients`.
- `PolicyAlgorithm`: the policy's train state and the KL controller, the state every
  algorithm on the seam (`instruct.rl.algorithms`) has; PPO adds its critic.

Consistency metrics (`consistency/...`, every iteration): the sampler returns the log-prob of
each token it drew (cache decode), and the scorer recomputes it with one full forward pass;
both are of the same distribution, so they differ only by float rounding, and a larger gap
means the ratio and KL are of another distribution than the one sampled (a temperature,
banned-token set or dropout mismatch, a cache bug). The update's first minibatch (first
epoch) takes the ratio pi / pi_old against the scorer's log-probs with the parameters that
produced them, so its spread is rounding too. Neither changes what is computed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from instruct import objectives
from instruct import optim
from instruct import reward as reward_lib
from instruct.rl import algo
from instruct.rl.scoring import reward_scores, sequence_logprobs
from instruct.stages import common
from instruct.state import TrainState, init_params_fn, state_factory

Array = jax.Array


def split_rows(tree, num: int):
  """[B, ...] -> [num, B/num, ...] by stride: part i holds rows i, i + num, i + 2 num, ...

  On a mesh that shards rows in contiguous blocks, every part keeps that sharding (each
  device contributes its own rows to every part), so forming the parts moves no data.
  """
  return common.split_microbatches(tree, num)


def merge_rows(tree):
  """The inverse of `split_rows`: [num, B/num, ...] -> [B, ...] in the original row order."""
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:]), tree)


def chunked(fn, num_chunks: int, *arrays):
  """fn over `num_chunks` strided row-chunks of the arrays (minibatch-sized), merged back."""
  out = jax.lax.map(lambda xs: fn(*xs), split_rows(arrays, num_chunks))
  return merge_rows(out)


# ----------------------------------------------------------------------------- consistency


def logprob_consistency(sampler_logp_bt: Array, scorer_logp_bt: Array, mask_bt: Array) -> dict:
  """|sampler log-prob - scorer log-prob| over response tokens: its mean and max.

  Both [b, r], 0 where the mask is 0. Keys `consistency/logprob_abs_diff_mean` and
  `consistency/logprob_abs_diff_max` (float32 scalars; 0 where nothing is masked in).
  """
  m = mask_bt > 0
  diff = jnp.where(m, jnp.abs(sampler_logp_bt.astype(jnp.float32) - scorer_logp_bt), 0.0)
  return {
      "consistency/logprob_abs_diff_mean": algo.masked_mean(diff, mask_bt),
      "consistency/logprob_abs_diff_max": jnp.max(diff),
  }


def ratio_spread(logp_bt: Array, old_logp_bt: Array, mask_bt: Array) -> dict:
  """The ratio pi / pi_old over response tokens: max |ratio - 1| and the ratio's std.

    ratio_t = exp(logp_t - old_logp_t);  max_dev = max_t m_t |ratio_t - 1|
    std = sqrt(masked population variance of ratio_t)

  Both stop-gradient float32 scalars (keys `max_dev`, `std`); the update reports them for its
  first minibatch of the first epoch (`first_ratio_metrics`).
  """
  max_dev = jnp.max(jnp.abs(jnp.exp(logp_bt - old_logp_bt) - 1.0) * mask_bt)
  ratio = jnp.exp(jnp.where(mask_bt > 0, logp_bt - old_logp_bt, 0.0))
  std = jnp.sqrt(algo.masked_var(ratio, mask_bt, unbiased=False))
  return jax.lax.stop_gradient({"max_dev": max_dev, "std": std})


def first_ratio_metrics(stats: dict) -> dict:
  """Pops the per-minibatch `ratio_max_dev` / `ratio_std` ([epochs, minibatches]) from the
  update's stats; returns the first minibatch's of the first epoch as
  `consistency/first_ratio_max_dev` and `consistency/first_ratio_std`."""
  return {
      "consistency/first_ratio_max_dev": stats.pop("ratio_max_dev")[0, 0],
      "consistency/first_ratio_std": stats.pop("ratio_std")[0, 0],
  }


# ----------------------------------------------------------------------------- scoring


def score_rollout(policy_model, reward_model, params: dict, samples, prompt_tokens: Array,
                  prompt_mask: Array, cfg, between: Callable[[Callable], Any] = None):
  """The scores of a sampled rollout that every online algorithm needs; no gradients.

  params: {policy, reference, reward, reward_gain, reward_bias}. cfg: the algorithm's static
  config, with `temperature`, `banned_ids` (the sampler's), `no_eos_score` (None: score
  responses without EOS as they are) and `num_minibatches` (the forward passes run on that
  many strided row chunks). `between(run_chunked)`, when given, runs after the reference's
  pass and before the reward model's (PPO's critic values, kept in PPO's program order);
  its result is returned as `extra`, `run_chunked(fn, params)` maps `fn(params, prompt
  tokens, prompt mask, response tokens, response mask)` over the chunks.

  Returns a dict: [b, r] `old_logprobs`, `ref_logprobs`, `entropy` and `kl` ({estimator:
  [b, r] masked KL_t}); [b] `raw` (RM), `normalised` and `scores` (normalised, or
  no_eos_score for responses without EOS); `extra`; and `metrics`: score, score_raw,
  score_normalised, kl_k1 and kl_k3 (mean over rows of sum_t KL_t), entropy,
  response_length, eos_fraction and the sampler / scorer `consistency/...` pair.
  """
  rt, rm = samples.response_tokens, samples.response_mask
  args = (prompt_tokens, prompt_mask, rt, rm)
  run_chunked = lambda fn, p: chunked(lambda *a: fn(p, *a), cfg.num_minibatches, *args)

  def logprobs(p, pt, pm, rt, rm):
    return sequence_logprobs(policy_model, p, pt, pm, rt, rm, cfg.temperature,
                             banned_ids=cfg.banned_ids)

  def policy_scores(p, *a):  # Per chunk: [b, r] log-probs and entropies, no logits.
    lp, logits = logprobs(p, *a)
    return lp, algo.token_entropy(logits)

  old_lp, entropy_bt = run_chunked(policy_scores, params["policy"])
  ref_lp, _ = run_chunked(logprobs, params["reference"])
  extra = between(run_chunked) if between is not None else None
  raw = run_chunked(lambda p, *a: reward_scores(reward_model, p, *a), params["reward"])
  normalised = reward_lib.normalize(raw, params["reward_gain"], params["reward_bias"])
  scores = normalised
  if cfg.no_eos_score is not None:
    scores = jnp.where(samples.ended_with_eos, normalised, cfg.no_eos_score)
  # Both estimates are logged; the algorithm's configured one is its penalty.
  kl_bt = {k: algo.kl_per_token(old_lp, ref_lp, k) * rm for k in algo.KL_ESTIMATORS}
  lengths = jnp.sum(rm, axis=1).astype(jnp.float32)
  metrics = {
      "score": jnp.mean(scores),
      "score_raw": jnp.mean(raw),
      "score_normalised": jnp.mean(normalised),
      **{f"kl_{k}": jnp.mean(jnp.sum(v, axis=1)) for k, v in kl_bt.items()},
      "entropy": algo.masked_mean(entropy_bt, rm),
      "response_length": jnp.mean(lengths),
      "eos_fraction": jnp.mean(samples.ended_with_eos.astype(jnp.float32)),
      **logprob_consistency(samples.response_logprobs, old_lp, rm),
  }
  return dict(old_logprobs=old_lp, ref_logprobs=ref_lp, entropy=entropy_bt, kl=kl_bt, raw=raw,
              normalised=normalised, scores=scores, extra=extra, metrics=metrics)


# ----------------------------------------------------------------------------- the update


def ptx_loss(policy_model, params, ptx: dict) -> Array:
  """PPO-ptx's pretraining term: the policy's per-token LM loss on the rows `ptx`
  ({tokens, loss_mask, attention_mask} [rows, L]), sum of NLL / number of targets."""
  logits = policy_model.apply({"params": params}, ptx["tokens"], ptx["attention_mask"]).logits
  nll, targets, _ = objectives.masked_next_token_loss(logits, ptx["tokens"], ptx["loss_mask"])
  return nll / jnp.maximum(targets, 1.0)


def ptx_parts(ptx_batch: dict, epochs: int, num_minibatches: int, on: bool) -> dict:
  """The iteration's pretraining batch [epochs * rows, L] as [epochs, minibatches, part, L]:
  a fresh strided part per minibatch step ({} when the pretraining mix is off)."""
  if not on:
    return {}
  parts = split_rows(ptx_batch, epochs * num_minibatches)
  return jax.tree.map(lambda x: x.reshape((epochs, num_minibatches) + x.shape[1:]), parts)


def run_epochs(minibatch_step, carry, experience, ptx: dict, rng, num_epochs: int,
               num_minibatches: int):
  """`num_epochs` passes over `experience` (a pytree of [b, ...] rows), each over a fresh
  permutation split into `num_minibatches`: `minibatch_step(carry, (minibatch, ptx part))`
  in a scan. Returns (carry, stats [epochs, minibatches, ...])."""
  b = jax.tree.leaves(experience)[0].shape[0]

  def epoch(carry, xs):
    epoch_rng, ptx = xs
    order = jax.random.permutation(epoch_rng, b).reshape(num_minibatches, b // num_minibatches)
    minibatches = jax.tree.map(lambda x: x[order], experience)
    return jax.lax.scan(minibatch_step, carry, (minibatches, ptx))

  return jax.lax.scan(epoch, carry, (jax.random.split(rng, num_epochs), ptx))


def apply_gradients(state: TrainState, grads, optimizer) -> TrainState:
  """One optimiser step on a TrainState."""
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  return TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state)


# ----------------------------------------------------------------------------- the state


class PolicyAlgorithm:
  """The policy's train state and the KL controller of an algorithm on the seam.

  State: `{"policy": TrainState, "kl": KLControllerState}` (subclasses may add entries).
  The policy starts from the frozen reference; the controller at `config.<section>.kl`'s
  initial beta. The optimiser's schedule counts minibatch updates (iterations x epochs x
  minibatches). Subclasses set `cfg` (static, with `epochs`, `num_minibatches`, `ptx_coef`).
  """

  samples_per_prompt = 1  # Rollout rows per prompt; the driver repeats each prompt so often.

  def __init__(self, config, roles, section: str, cfg):
    self.config, self.roles, self.section, self.cfg = config, roles, section, cfg
    self.updates_per_iteration = cfg.epochs * cfg.num_minibatches
    self.num_updates = config.train.num_steps * self.updates_per_iteration
    self.policy_opt = optim.make_optimizer(config.optimizer, self.num_updates)
    with jax.set_mesh(roles.mesh):
      self.policy_factory = state_factory(init_params_fn(roles.policy.model), self.policy_opt,
                                          roles.mesh, roles.rules)

  @property
  def ptx_rows(self) -> int:
    """Pretraining rows per iteration: `ptx.batch_size` per epoch, fresh every epoch."""
    return self.config.ptx.batch_size * self.cfg.epochs if self.cfg.ptx_coef > 0 else 0

  def abstract_state(self) -> dict:
    kl = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.roles.replicated),
        jax.eval_shape(algo.init_kl_controller, 0.0))
    return {"policy": self.policy_factory.abstract, "kl": kl}

  def init_state(self, frozen: dict) -> dict:
    return {
        "policy": self.policy_factory.from_params(frozen["reference"]),
        "kl": algo.init_kl_controller(self.config[self.section].kl.initial_beta)
    }

  def iterations_done(self, state) -> int:
    return int(state["policy"].step) // self.updates_per_iteration

  def policy_params(self, state):
    return state["policy"].params

  def kl_step(self, kl_state, metrics: dict, episodes: int):
    """The KL controller after an iteration that observed `metrics['kl_<estimator>']` over
    `episodes` sampled responses."""
    kl = self.config[self.section].kl
    return algo.update_kl_controller(kl_state, metrics[f"kl_{self.cfg.kl_estimator}"], episodes,
                                     kl.target, kl.horizon, kl.controller)

  def log_line(self, summary: dict) -> str:
    kl_name = f"kl_{self.cfg.kl_estimator}"
    return (f"score {summary['score']:.3f} | {kl_name} {summary[kl_name]:.3f} | "
            f"beta {summary['beta']:.4f} | eos {summary['eos_fraction']:.2f} | "
            f"len {summary['response_length']:.1f} | rollout {summary['rollout_seconds']:.2f}s "
            f"scoring {summary['scoring_seconds']:.2f}s update {summary['update_seconds']:.2f}s")
