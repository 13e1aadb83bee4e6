"""Supervised steps: SFT on demonstrations and language-model pretraining on plain text.

Both are the same pure step, `(state, batch, rng) -> (state, metrics)`: masked next-token
cross-entropy where the data's `loss_mask` selects completion tokens (SFT) or every real
token (pretraining). A batch is a dict of [batch, length] arrays: `tokens`, `loss_mask`,
`attention_mask`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from instruct import objectives
from instruct.model import ModelConfig, Transformer
from instruct.state import TrainState

Batch = dict[str, jax.Array]


def make_model(model_config) -> Transformer:
  return Transformer(ModelConfig.from_dict(model_config), head="lm")


def _split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B/num, ...]; microbatch i takes rows i, i+num, ... so every microbatch
  keeps the batch sharding of the whole batch."""
  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(model: Transformer, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1
                    ) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, dict]]:
  """Builds the pure SFT/pretraining step.

  With `grad_accum_steps` = A > 1 the batch is processed as A microbatches in a `lax.scan`
  and the gradients summed; the loss is normalised by the target count of the whole batch,
  so the update equals the one-shot step up to float rounding.
  """

  def loss_fn(params, micro: Batch, total_targets, rng):
    logits = model.apply({"params": params}, micro["tokens"], micro["attention_mask"],
                         deterministic=False, rngs={"dropout": rng}).logits
    loss_sum, targets, correct = objectives.masked_next_token_loss(
        logits, micro["tokens"], micro["loss_mask"])
    return loss_sum / total_targets, (loss_sum, targets, correct)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    total_targets = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]), 1).astype(jnp.float32)
    if grad_accum_steps == 1:
      grads, (loss_sum, targets, correct) = grad_fn(state.params, batch, total_targets, rng)
    else:
      def accumulate(carry, xs):
        micro, i = xs
        g, aux = grad_fn(state.params, micro, total_targets, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, aux)), None
      zeros = (jax.tree.map(jnp.zeros_like, state.params),
               (jnp.zeros(()), jnp.zeros(()), jnp.zeros(())))
      micro = _split_microbatches(batch, grad_accum_steps)
      (grads, (loss_sum, targets, correct)), _ = jax.lax.scan(
          accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / jnp.maximum(targets, 1.0),
        "accuracy": correct / jnp.maximum(targets, 1.0),
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": schedule(state.step),
        "target_tokens": targets,
        "tokens": jnp.sum(batch["attention_mask"]).astype(jnp.float32),
    }
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(model: Transformer) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """(params, batch) -> sums over the batch; dummy rows (all-zero masks) add nothing."""

  def eval_step(params, batch: Batch) -> dict[str, jax.Array]:
    logits = model.apply({"params": params}, batch["tokens"], batch["attention_mask"]).logits
    loss_sum, targets, correct = objectives.masked_next_token_loss(
        logits, batch["tokens"], batch["loss_mask"])
    return {"loss_sum": loss_sum, "targets": targets, "correct": correct}

  return eval_step
