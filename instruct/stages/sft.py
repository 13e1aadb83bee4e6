"""Supervised steps: SFT on demonstrations and language-model pretraining on plain text.

Both are the same pure step, `(state, batch, rng) -> (state, metrics)`: masked next-token
cross-entropy where the data's `loss_mask` selects completion tokens (SFT) or every real
token (pretraining). A batch is a dict of [batch, length] arrays: `tokens`, `loss_mask`,
`attention_mask`. Two data kinds change the loss: scored text (pretraining with human
preferences, `instruct.data.feedback`: signed per-token weights) and hindsight records (HIR,
`instruct.data.hindsight`: the relabeled likelihood plus a contrastive instruction term and an
entropy bonus, from a second forward pass under the contrasting instruction).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instruct import data as data_lib
from instruct.data import feedback as feedback_lib
from instruct.data import hindsight as hindsight_lib
from instruct.data import mixture as mixture_lib
from instruct import objectives
from instruct.model import ModelConfig, Transformer
from instruct.stages import common

Batch = dict[str, jax.Array]


def make_model(model_config) -> Transformer:
  return Transformer(ModelConfig.from_dict(model_config), head="lm")


def lm_loss(model: Transformer, deterministic: bool, weights: str = "mask"):
  """(params, batch, rng) -> (loss_sum, sums) of the next-token loss.

  `weights`: "mask" (the data's 0/1 `loss_mask`), "signed" (scored text's signed target
  weights, `objectives.weighted_next_token_loss`), or "all" (every real token: the plain
  likelihood of scored text, what its evaluation reports whatever the objective).
  """

  def loss_fn(params, batch: Batch, rng):
    logits = model.apply({"params": params}, batch["tokens"], batch["attention_mask"],
                         deterministic=deterministic, rngs={"dropout": rng}).logits
    if weights == "signed":
      loss_sum, targets, correct = objectives.weighted_next_token_loss(
          logits, batch["tokens"], batch["loss_mask"])
    else:
      mask = batch["attention_mask"] if weights == "all" else batch["loss_mask"]
      loss_sum, targets, correct = objectives.masked_next_token_loss(logits, batch["tokens"], mask)
    tokens = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
    return loss_sum, {
        "loss_sum": loss_sum, "targets": targets, "correct": correct, "tokens": tokens
    }

  return loss_fn


def hindsight_loss(model: Transformer, hindsight: hindsight_lib.Hindsight, good_id: int,
                   bad_id: int):
  """(params, batch, rng) -> (loss_sum, sums) of HIR's loss on hindsight batches: per target
  token, -log p(o_t | i+) + alpha * c(answer) + beta * sum_v p log p
  (`objectives.hindsight_terms`). i- is the batch's sequence with its instruction token (at
  position 0) swapped for the other one."""

  def loss_fn(params, batch: Batch, rng):
    tokens = batch["tokens"]
    first = tokens[:, :1]
    contrast = jnp.concatenate([jnp.where(first == good_id, bad_id, good_id), tokens[:, 1:]],
                               axis=1)
    rngs = jax.random.split(rng)
    logits, contrast_logits = (model.apply({"params": params}, t, batch["attention_mask"],
                                           deterministic=False, rngs={"dropout": r}).logits
                               for t, r in ((tokens, rngs[0]), (contrast, rngs[1])))
    sums = objectives.hindsight_terms(logits, contrast_logits, tokens, batch["loss_mask"])
    loss_sum = (sums["nll"] + hindsight.alpha * sums["contrastive"]
                + hindsight.beta * sums["neg_entropy"])
    sums = dict(sums, loss_sum=loss_sum,
                tokens=jnp.sum(batch["attention_mask"]).astype(jnp.float32))
    return loss_sum, sums

  return loss_fn


def _hindsight_metrics(sums: dict) -> dict:
  targets = jnp.maximum(sums["targets"], 1.0)
  return dict(_metrics(sums), nll=sums["nll"] / targets,
              contrastive=sums["contrastive_answers"] / jnp.maximum(sums["answers"], 1.0),
              entropy=-sums["neg_entropy"] / targets)


def _metrics(sums: dict) -> dict:
  targets = jnp.maximum(sums["targets"], 1.0)
  return {
      "loss": sums["loss_sum"] / targets, "accuracy": sums["correct"] / targets,
      "target_tokens": sums["targets"], "tokens": sums["tokens"]
  }


def make_train_step(model: Transformer, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1, scored: bool = False,
                    hindsight: tuple | None = None) -> Callable:
  """The pure SFT / pretraining step (see `common.make_train_step`); `scored`: the batches
  are scored text with signed target weights (`instruct.data.feedback`); `hindsight`:
  `(Hindsight, good_id, bad_id)` for HIR on hindsight batches."""
  count = lambda batch: jnp.sum(batch["loss_mask"][:, 1:] != 0)  # Targets (of any weight).
  if hindsight is not None:
    return common.make_train_step(hindsight_loss(model, *hindsight), count, _hindsight_metrics,
                                  optimizer, schedule, grad_accum_steps)
  return common.make_train_step(lm_loss(model, False, "signed" if scored else "mask"), count,
                                _metrics, optimizer, schedule, grad_accum_steps)


def make_eval_step(model: Transformer,
                   scored: bool = False) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """(params, batch) -> sums over the batch; dummy rows (all-zero masks) add nothing. Scored
  text is evaluated by its plain likelihood (every real token)."""
  loss_fn = lm_loss(model, deterministic=True, weights="all" if scored else "mask")
  return lambda params, batch: loss_fn(params, batch, jax.random.key(0))[1]


def summarize_eval(outputs: list[dict]) -> dict:
  """Validation loss, perplexity and token accuracy."""
  sums = common.sum_outputs(outputs)
  targets = max(sums["targets"], 1.0)
  loss = sums["loss_sum"] / targets
  return {
      "val_loss": loss, "val_perplexity": float(np.exp(min(loss, 80.0))),
      "val_accuracy": sums["correct"] / targets
  }


def make_lm_data(config, tokenizer, split: str, repeat: bool):
  """Host-local batches of `config.data` (demonstrations, text, scored text or hindsight
  records; one file per split, or a weighted mixture, `instruct.data.mixture`) for `split`."""
  encoder = None
  if config.data.kind == feedback_lib.KIND:
    encoder = functools.partial(feedback_lib.encode, feedback_lib.Feedback.from_config(config))
  elif config.data.kind == hindsight_lib.KIND:
    encoder = functools.partial(hindsight_lib.encode, hindsight_lib.Hindsight.from_config(config))
  args = dict(global_batch_size=config.train.global_batch_size,
              batch_size_name="config.train.global_batch_size", buckets=tuple(config.data.buckets),
              seed=config.seed, shuffle=config.data.shuffle and repeat, repeat=repeat,
              data_dir=common.tfds_dir(config), process_index=jax.process_index(),
              process_count=jax.process_count(), data_format=config.data.get("format", "records"),
              skip_invalid=config.data.get("skip_invalid", False),
              allow_truncation=config.data.get("allow_truncation", True), encoder=encoder)
  if config.data.get("mixture"):
    return mixture_lib.make_mixture_batches(config.data.kind,
                                            mixture_lib.components(config.data.mixture), split,
                                            tokenizer,
                                            mixture_size=config.data.get("mixture_size", 0), **args)
  files = {"train": config.data.train_file, "validation": config.data.validation_file}
  return data_lib.make_batches(config.data.kind, files, split, tokenizer, **args)


def make_task(config, tokenizer, optimizer, schedule) -> common.Task:
  """The SFT / pretraining task for the shared driver."""
  model = make_model(config.model)
  scored = config.data.kind == feedback_lib.KIND
  hindsight = None
  if config.data.kind == hindsight_lib.KIND:
    settings = hindsight_lib.Hindsight.from_config(config)
    hindsight = (settings, *settings.token_ids(tokenizer))
  return common.Task(
      model=model, train_step=make_train_step(model, optimizer, schedule,
                                              config.train.grad_accum_steps, scored, hindsight),
      eval_step=make_eval_step(model, scored), summarize_eval=summarize_eval,
      make_data=lambda split, repeat: make_lm_data(config, tokenizer, split, repeat))
