"""The direct preference optimisation stage: a policy trained on ranked comparisons.

The policy is an LM (head 'lm') initialised from an SFT run (`config.init_from`); that run's
parameters are also the frozen reference pi_ref. The reference enters the steps as an input
(`Task.frozen_from`: the driver loads it once through the run layer into the parameters'
shardings and passes it as the steps' last argument), never as a captured constant, and is not
saved in checkpoints: it is read again from `init_from` on resume.

The data are the reward model's comparison records (full rankings, chosen/rejected, best-of-K;
`instruct.data.comparisons`), batched with each response's `loss_mask`: one batch element is
one prompt with its K responses (padded to `config.rm.max_responses`), `tokens`,
`attention_mask`, `loss_mask` [batch, K, length], `ranks` and `response_mask` [batch, K]. The
K sequences run as K rows of one forward pass of the policy and one of the reference (no
gradient, per microbatch), each giving the sum of the response tokens' log-probabilities;
the loss (`config.dpo.loss`: `instruct.preference.PREFERENCE_LOSSES`) is formed from those
[batch, K] values inside the step.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from instruct import config_lib
from instruct import data as data_lib
from instruct import preference
from instruct import run as run_lib
from instruct.model import ModelConfig, Transformer
from instruct.stages import common

LABEL_SMOOTHING_MAX = 0.5


def make_model(model_config) -> Transformer:
  return Transformer(ModelConfig.from_dict(model_config), head="lm")


def _flat(x):
  """[batch, K, length] -> [batch * K, length]."""
  return x.reshape((-1, x.shape[-1]))


def sequence_logprobs(model: Transformer, params, batch, deterministic=True, rng=None,
                      with_logits=False):
  """[batch, K] log-probabilities of the responses given their prompts (`loss_mask` tokens).

  With `with_logits`, also the [batch * K, length, vocab] logits.
  """
  tokens = _flat(batch["tokens"])
  logits = model.apply({"params": params}, tokens, _flat(batch["attention_mask"]),
                       deterministic=deterministic,
                       rngs=None if rng is None else {"dropout": rng}).logits
  logps = preference.response_logprobs(logits, tokens, _flat(batch["loss_mask"]))
  logps = logps.reshape(batch["tokens"].shape[:2])
  return (logps, logits) if with_logits else logps


def preference_loss(model: Transformer, dpo, deterministic: bool) -> Callable:
  """(params, reference, batch, rng) -> (loss_sum, sums) of `config.dpo.loss`."""
  loss = preference.PREFERENCE_LOSSES[dpo.loss]

  def loss_fn(params, reference, batch, rng):
    policy = sequence_logprobs(model, params, batch, deterministic, rng)
    ref = jax.lax.stop_gradient(sequence_logprobs(model, reference, batch))
    loss_sum, prompts, stats = loss(policy, ref, batch["ranks"], batch["response_mask"], dpo.beta,
                                    dpo.get("label_smoothing", 0.0))
    tokens = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
    return loss_sum, dict(stats, loss_sum=loss_sum, prompts=prompts, tokens=tokens)

  return loss_fn


# Reported metric: (numerator, denominator) among the loss's sums.
RATIOS = {
    "loss": ("loss_sum", "prompts"),
    "accuracy": ("correct_pairs", "pairs"),
    "margin": ("margin_sum", "pairs"),
    "chosen_reward": ("chosen_reward_sum", "chosen_count"),
    "rejected_reward": ("rejected_reward_sum", "rejected_count"),
    "chosen_logratio": ("chosen_logratio_sum", "chosen_count"),
    "rejected_logratio": ("rejected_logratio_sum", "rejected_count"),
}


def _ratios(sums: dict, maximum=jnp.maximum) -> dict:
  """Loss, preference accuracy, reward margin and the chosen / rejected means."""
  return {name: sums[num] / maximum(sums[den], 1.0) for name, (num, den) in RATIOS.items()}


def _train_metrics(sums: dict) -> dict:
  return dict(_ratios(sums), tokens=sums["tokens"])


def make_train_step(model: Transformer, dpo, optimizer, schedule,
                    grad_accum_steps: int = 1) -> Callable:
  """The pure step `(state, batch, rng, reference) -> (state, metrics)`.

  `common.make_train_step` on the preference loss, its reference parameters bound to the
  step's input; the loss is normalised by the prompts with a ranked pair.
  """
  loss_fn = preference_loss(model, dpo, deterministic=False)
  count = lambda batch: preference.count_prompts(batch["ranks"], batch["response_mask"])

  def train_step(state, batch, rng, reference):
    step = common.make_train_step(lambda p, b, r: loss_fn(p, reference, b, r), count,
                                  _train_metrics, optimizer, schedule, grad_accum_steps)
    return step(state, batch, rng)

  return train_step


def make_eval_step(model: Transformer, dpo) -> Callable:
  """(params, batch, reference) -> the batch's sums (loss, pairs, rewards, token KL)."""
  loss = preference.PREFERENCE_LOSSES[dpo.loss]

  def eval_step(params, batch, reference):
    policy, logits = sequence_logprobs(model, params, batch, with_logits=True)
    ref, ref_logits = sequence_logprobs(model, reference, batch, with_logits=True)
    loss_sum, prompts, stats = loss(policy, ref, batch["ranks"], batch["response_mask"], dpo.beta,
                                    dpo.get("label_smoothing", 0.0))
    kl_sum, kl_tokens = preference.token_kl(logits, ref_logits, _flat(batch["loss_mask"]))
    return dict(stats, loss_sum=loss_sum, prompts=prompts, kl_sum=kl_sum, kl_tokens=kl_tokens)

  return eval_step


def summarize_eval(outputs: list[dict]) -> dict:
  """Validation loss, preference accuracy, margin, chosen / rejected rewards and log-ratios,
  and the mean per-token KL(pi || pi_ref) over the responses (`val_token_kl`)."""
  sums = common.sum_outputs(outputs)
  results = {f"val_{k}": float(v) for k, v in _ratios(sums, np.maximum).items()}
  results["val_token_kl"] = sums["kl_sum"] / max(sums["kl_tokens"], 1.0)
  results["val_pairs"] = int(sums["pairs"])
  return results


def make_task(config, tokenizer, optimizer, schedule) -> common.Task:
  """The DPO task for the shared driver; its frozen input is the `init_from` run's policy."""
  model = make_model(config.model)

  def make_data(split: str, repeat: bool):
    data = config.data
    return data_lib.make_comparison_batches(
        {"train": data.train_file, "validation": data.validation_file}, split, tokenizer,
        global_batch_size=config.train.global_batch_size,
        batch_size_name="config.train.global_batch_size", max_responses=config.rm.max_responses,
        buckets=tuple(data.buckets), seed=config.seed, shuffle=data.shuffle and repeat,
        repeat=repeat, data_dir=common.tfds_dir(config), skip_invalid=data.get(
            "skip_invalid",
            False), data_format=data.get("format", "records"), process_index=jax.process_index(),
        process_count=jax.process_count(), allow_truncation=data.get("allow_truncation",
                                                                     True), response_masks=True)

  return common.Task(
      model=model, train_step=make_train_step(model, config.dpo, optimizer, schedule,
                                              config.train.grad_accum_steps),
      eval_step=make_eval_step(model, config.dpo), summarize_eval=summarize_eval,
      make_data=make_data, frozen_from="init_from")


def validate(config, data_parallel: int, process_count: int) -> None:
  """The supervised checks, then DPO's own (`config.dpo`); ValueError naming the key."""
  config_lib.validate_supervised(config, data_parallel, process_count)
  dpo = config.dpo
  if dpo.loss not in preference.PREFERENCE_LOSSES:
    raise ValueError(f"config.dpo.loss={dpo.loss!r}; expected one of "
                     f"{sorted(preference.PREFERENCE_LOSSES)}.")
  if not (isinstance(dpo.beta, (int, float)) and 0 < dpo.beta < np.inf):
    raise ValueError(f"config.dpo.beta={dpo.beta!r} must be a positive number.")
  smoothing = dpo.get("label_smoothing", 0.0)
  if not 0.0 <= smoothing < LABEL_SMOOTHING_MAX:
    raise ValueError(f"config.dpo.label_smoothing={smoothing} must be in "
                     f"[0, {LABEL_SMOOTHING_MAX}).")
  if smoothing and dpo.loss != "dpo":
    raise ValueError(f"config.dpo.label_smoothing={smoothing} is for config.dpo.loss='dpo' "
                     f"(conservative DPO), not {dpo.loss!r}.")
  if not 2 <= config.rm.max_responses <= 9:
    raise ValueError(f"config.rm.max_responses={config.rm.max_responses} must be in [2, 9].")
  if config.data.kind != "comparisons":
    raise ValueError(f"config.data.kind={config.data.kind!r}: the dpo stage reads "
                     "'comparisons'.")
  if config.data.get("mixture"):
    raise ValueError("config.data.mixture is read by the pretrain and sft stages; the dpo "
                     "stage reads config.data.train_file.")
  if config.model.get("hf_checkpoint", ""):
    raise ValueError(f"config.model.hf_checkpoint={config.model.hf_checkpoint!r}: the dpo "
                     "stage's reference is its config.init_from run; fine-tune the checkpoint "
                     "with the sft stage and give that run as --config.init_from.")
  if not config.init_from:
    raise ValueError("config.init_from is empty: DPO starts from an SFT run, which is also "
                     "its frozen reference (--config.init_from=SFT_WORKDIR).")
  try:
    source = run_lib.describe(config.init_from, "config.init_from")
  except FileNotFoundError:
    return  # Reported with the same key when the run is loaded.
  if source.stage.head != "lm":
    raise ValueError(f"config.init_from={config.init_from!r} is a {source.stage.name!r} run; "
                     "DPO starts from a policy (an sft run).")
