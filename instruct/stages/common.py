"""The train-step skeleton shared by the supervised stages (pretraining, SFT, reward model).

A stage supplies a loss as sums over its batch; this module turns it into the pure step
`(state, batch, rng) -> (state, metrics)` with optional in-step gradient accumulation,
global-norm clipping and the optimiser update (both inside `optimizer`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instruct import paths
from instruct.state import TrainState

Batch = dict[str, jax.Array]
# (params, batch, rng) -> (loss_sum, sums): the batch's summed loss, and summed statistics.
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B/num, ...]; microbatch i takes rows i, i+num, ... so every microbatch
  keeps the batch sharding of the whole batch."""

  def split(x):
    return jnp.swapaxes(x.reshape((x.shape[0] // num, num) + x.shape[1:]), 0, 1)

  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, count_fn: Callable[[Batch], jax.Array],
                    metrics_fn: Callable[[dict], dict], optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1):
  """Builds the pure step minimising loss_sum / count_fn(batch).

  With `grad_accum_steps` = A > 1 the batch is processed as A microbatches in a `lax.scan`
  and the gradients summed. The loss is normalised by the count of the whole batch (tokens for
  LM losses, prompts for the reward model), so the update equals the one-shot step up to float
  rounding. `metrics_fn` maps the summed statistics to the metrics to report.
  """

  def objective(params, micro: Batch, total, rng):
    loss_sum, sums = loss_fn(params, micro, rng)
    return loss_sum / total, sums

  grad_fn = jax.grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: Batch, rng: jax.Array):
    total = jnp.maximum(count_fn(batch), 1.0).astype(jnp.float32)
    if grad_accum_steps == 1:
      grads, sums = grad_fn(state.params, batch, total, rng)
    else:
      micro = split_microbatches(batch, grad_accum_steps)

      def accumulate(carry, xs):
        one, i = xs
        out = grad_fn(state.params, one, total, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, out), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(grad_fn, state.params, first, total, rng))
      (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics_fn(sums), grad_norm=optax.tree.norm(grads),
                   learning_rate=schedule(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


@dataclasses.dataclass
class Task:
  """What a supervised stage plugs into the shared driver (`instruct.trainer`).

  Attributes:
    model: the Linen module whose parameters are trained.
    train_step: pure `(state, batch, rng) -> (state, metrics)`; metrics include `loss`,
      `accuracy` and `tokens` (the terminal log shows them).
    eval_step: pure `(params, batch) -> outputs` (a dict of arrays).
    summarize_eval: host-side, the fetched outputs of all validation batches -> metrics.
    make_data: `(split, repeat) -> Batches` of this stage's records.
    fresh_param_keys: top-level parameter names NOT taken from `config.init_from` (e.g. the
      reward model's new `scalar_head`); everything else is restored from that run.
    score_step: optional pure `(params, batch) -> [batch]` scores, for `finalize`.
    finalize: optional `(params, score) -> extras` run once at the final step; the result is
      stored in the final checkpoint and written to the metrics (`score(host_batch)` returns
      host scores).
    frozen_from: optional config key naming a run (e.g. 'init_from') whose model parameters,
      of this task's model, are a frozen input (a DPO reference): the driver loads them once
      through `instruct.run.load_run` into the parameters' shardings and passes them as the
      last argument, `train_step(state, batch, rng, frozen)` and `eval_step(params, batch,
      frozen)`. They are neither trained nor saved (read again on resume).
  """

  model: Any
  train_step: Callable
  eval_step: Callable
  summarize_eval: Callable[[list[dict]], dict]
  make_data: Callable[[str, bool], Any]
  fresh_param_keys: tuple[str, ...] = ()
  score_step: Optional[Callable] = None
  finalize: Optional[Callable] = None
  frozen_from: Optional[str] = None


def tfds_dir(config) -> str:
  """Where TFDS prepares datasets: config.data.tfds_dir, $TFDS_DATA_DIR or ~/tensorflow_datasets.

  A local directory only: the prepared ArrayRecord files are written and read by C++ code that
  takes local paths, and they are a cache, rebuilt identically from the input files, so each
  host keeps its own (under a file lock shared by the processes of a host).
  """
  directory = (config.data.tfds_dir or os.environ.get("TFDS_DATA_DIR")
               or os.path.expanduser("~/tensorflow_datasets"))
  if paths.is_url(directory):
    source = ("config.data.tfds_dir" if config.data.tfds_dir else "$TFDS_DATA_DIR")
    raise ValueError(f"{source}={directory!r} is a URL; prepared datasets go on each host's "
                     "local disk (ArrayRecord files are read through local paths): give a local "
                     "directory, or '' for ~/tensorflow_datasets. The workdir may be a bucket.")
  return directory


def sum_outputs(outputs: list[dict]) -> dict:
  """Adds up per-batch eval outputs (numpy)."""
  return {k: float(np.sum([o[k] for o in outputs])) for k in outputs[0]}
