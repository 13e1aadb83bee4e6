"""The supervised training driver (pretraining and SFT): one function a notebook can call.

`train_and_evaluate(config, workdir)`:
  1. builds the mesh and rule table from `config.mesh` and validates the config;
  2. resumes from the latest checkpoint in `workdir` if there is one, else initialises from
     `config.init_from` (another stage's workdir), else from scratch, always directly sharded;
  3. jits the step once with explicit in/out shardings and the state donated;
  4. trains, logging to the terminal, `metrics.jsonl` and TensorBoard, evaluating and
     checkpointing periodically. A non-finite loss stops the run before anything is saved.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from instruct import checkpoint as ckpt_lib
from instruct import config_lib
from instruct import optim
from instruct import sharding as shd
from instruct.data import make_batches, load_tokenizer
from instruct.metrics import MetricWriter
from instruct.stages import sft
from instruct.state import StateFactory, TrainState, state_factory


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss."""


@dataclasses.dataclass
class Progress:
  """Turns step times into tokens/s and an ETA for the terminal log."""

  end_step: int
  last_time: float = dataclasses.field(default_factory=time.time)
  last_step: int = 0

  def rates(self, step: int, tokens: float) -> tuple[float, float]:
    now = time.time()
    elapsed = max(now - self.last_time, 1e-9)
    steps_per_s = (step - self.last_step) / elapsed
    self.last_time, self.last_step = now, step
    eta = (self.end_step - step) / steps_per_s if steps_per_s > 0 else float("inf")
    return tokens / elapsed, eta


class PreemptionWatcher:
  """Turns SIGTERM (how TPU/GPU schedulers announce preemption) into a checkpoint and exit.

  Single host: a signal handler sets a flag, checked after every step. Several hosts: JAX's
  preemption sync point (needs `jax.distributed.initialize()`), so all hosts stop at the
  same step.
  """

  def __init__(self):
    self._event = threading.Event()
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def tfds_dir(config) -> str:
  return (config.data.tfds_dir or os.environ.get("TFDS_DATA_DIR")
          or os.path.expanduser("~/tensorflow_datasets"))


def make_data(config, tokenizer, split: str, repeat: bool):
  """Host-local batches of `config.data` for `split` ('train' or 'validation')."""
  files = {"train": config.data.train_file, "validation": config.data.validation_file}
  return make_batches(
      config.data.kind, files, split, tokenizer,
      global_batch_size=config.train.global_batch_size, buckets=tuple(config.data.buckets),
      seed=config.seed, shuffle=config.data.shuffle and repeat, repeat=repeat,
      data_dir=tfds_dir(config), process_index=jax.process_index(),
      process_count=jax.process_count())


def latest_params(workdir: str, abstract_params: Any) -> Any:
  """The parameters of the latest checkpoint of another run (`config.init_from`)."""
  checkpointer = ckpt_lib.Checkpointer(workdir)
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"config.init_from={workdir!r} has no checkpoint in "
                            f"{checkpointer.directory}.")
  logging.info("Initialising parameters from %s (step %d).", workdir, step)
  params = checkpointer.restore_params(step, abstract_params)
  checkpointer.close()
  return params


def init_params_fn(model) -> Callable[[jax.Array], Any]:
  """rng -> boxed parameters of `model` (shapes do not depend on the dummy input length)."""
  return lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def _initial_state(config, factory: StateFactory, checkpointer):
  """(state, extras) from the workdir's checkpoint, else `config.init_from`, else scratch."""
  step = checkpointer.latest_step()
  if step is not None:
    logging.info("Resuming from %s (step %d).", checkpointer.directory, step)
    return checkpointer.restore(step, factory.abstract)
  if config.init_from:
    return factory.from_params(latest_params(config.init_from, factory.abstract.params)), {}
  return factory.init(jax.random.key(config.seed)), {}


def evaluate(eval_step, params, data, batch_sharding, max_batches: int = -1) -> dict:
  """Validation loss, perplexity and token accuracy over the validation split."""
  data.set_state({"epoch": 0, "batch": 0})
  totals = None
  for i, batch in enumerate(data):
    if 0 <= max_batches <= i:
      break
    sums = eval_step(params, shd.host_batch_to_global(batch, batch_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  targets = max(float(totals["targets"]), 1.0)
  loss = float(totals["loss_sum"]) / targets
  return {"val_loss": loss, "val_perplexity": float(np.exp(min(loss, 80.0))),
          "val_accuracy": float(totals["correct"]) / targets}


def _summarise(pending: list[dict], step: int) -> dict[str, float]:
  """Averages the metrics of the steps since the last log; raises on a non-finite loss."""
  fetched = jax.device_get(pending)
  for offset, metrics in enumerate(fetched):
    if not np.isfinite(metrics["loss"]):
      bad = step - len(fetched) + offset + 1
      raise NonFiniteLossError(f"Non-finite loss ({metrics['loss']}) at step {bad}.")
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  summary["tokens"] = float(np.sum([m["tokens"] for m in fetched]))
  return summary


def compile_steps(model, optimizer, schedule, config, state_sh, mesh, rules):
  """The jitted (train_step, eval_step), with explicit shardings; the state is donated."""
  batch_sh = shd.batch_sharding(mesh, rules)
  train_step = jax.jit(
      sft.make_train_step(model, optimizer, schedule, config.train.grad_accum_steps),
      in_shardings=(state_sh, batch_sh, shd.replicated(mesh)),
      out_shardings=(state_sh, shd.replicated(mesh)), donate_argnums=(0,))
  eval_step = jax.jit(sft.make_eval_step(model), in_shardings=(state_sh.params, batch_sh),
                      out_shardings=shd.replicated(mesh))
  return train_step, eval_step


def train_and_evaluate(config, workdir: str,
                       devices: Optional[list[jax.Device]] = None) -> TrainState:
  """Trains the supervised stage described by `config` in `workdir`; returns the final state."""
  mesh = shd.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.mesh)
  config_lib.validate(config, shd.data_parallel_size(mesh, rules), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  tokenizer = load_tokenizer(config.data.tokenizer)
  if len(tokenizer) > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {len(tokenizer)} tokens ({config.data.tokenizer}).")
  train_data = make_data(config, tokenizer, "train", repeat=True)
  eval_data = make_data(config, tokenizer, "validation", repeat=False)
  model = sft.make_model(config.model)
  num_steps = config.train.num_steps
  schedule = optim.make_schedule(config.optimizer, num_steps)
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints)
  writer = MetricWriter(workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)

  # State is created outside the rules context: its layout comes from out_shardings, and
  # logical constraints are only wanted inside the steps.
  with jax.set_mesh(mesh):
    factory = state_factory(init_params_fn(model), optimizer, mesh, rules)
    state, extras = _initial_state(config, factory, checkpointer)
    state_sh = factory.shardings
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    if extras:
      train_data.set_state(extras["data"])
    base_rng = jax.random.wrap_key_data(
        np.asarray(extras["rng"], np.uint32)) if extras else jax.random.key(config.seed)
    batch_sh = shd.batch_sharding(mesh, rules)
    train_step, eval_step = compile_steps(model, optimizer, schedule, config, state_sh, mesh,
                                          rules)
    watcher = PreemptionWatcher()
    try:
      state = _loop(config, state, train_step, eval_step, train_data, eval_data, batch_sh,
                    base_rng, checkpointer, writer, watcher)
    finally:
      watcher.close()
      checkpointer.close()
      writer.close()
  return state


def _loop(config, state, train_step, eval_step, train_data, eval_data, batch_sh, base_rng,
          checkpointer, writer, watcher) -> TrainState:
  """The training loop: step, log, evaluate, checkpoint."""
  t = config.train
  step = int(state.step)
  end = t.num_steps if t.stop_at_step < 0 else min(t.num_steps, t.stop_at_step)
  progress = Progress(end_step=end, last_step=step)
  logging.info("Training from step %d to %d on %d devices.", step, end, jax.device_count())
  pending = []
  while step < end:
    batch = shd.host_batch_to_global(next(train_data), batch_sh)
    state, metrics = train_step(state, batch, jax.random.fold_in(base_rng, step))
    step += 1
    pending.append(metrics)
    preempted = watcher.should_stop(step)
    save_now = step % t.checkpoint_every == 0 or step == end or preempted
    if step % t.log_every == 0 or save_now:
      try:
        summary = _summarise(pending, step)
      except NonFiniteLossError as e:
        raise NonFiniteLossError(
            f"{e} Stopping without saving; the last good checkpoint "
            f"({checkpointer.latest_step()}) in {checkpointer.directory} is intact.") from None
      pending = []
      summary["tokens_per_second"], eta = progress.rates(step, summary.pop("tokens"))
      writer.write(step, summary)
      logging.info("step %d/%d | loss %.4f | acc %.3f | %.0f tok/s | ETA %s", step, end,
                   summary["loss"], summary["accuracy"], summary["tokens_per_second"],
                   _format_eta(eta))
    if t.eval_every > 0 and (step % t.eval_every == 0 or step == end) and not preempted:
      results = evaluate(eval_step, state.params, eval_data, batch_sh, t.eval_batches)
      writer.write(step, results)
      logging.info("step %d | val_loss %.4f | val_ppl %.2f", step, results["val_loss"],
                   results["val_perplexity"])
    if save_now:
      checkpointer.save(step, state, {
          "data": train_data.get_state(),
          "rng": np.asarray(jax.random.key_data(base_rng)).tolist(),
          "config": config.to_dict() if hasattr(config, "to_dict") else {}})
    if preempted:
      logging.warning("Preemption signal: saved step %d; rerun the same command to resume.",
                      step)
      break
  return state


def _format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  return time.strftime("%H:%M:%S", time.gmtime(seconds))
