"""The supervised training driver (pretraining and SFT): one function a notebook can call.

`train_and_evaluate(config, workdir)`:
  1. builds the mesh and rule table from `config.mesh` and validates the config;
  2. resumes from the latest checkpoint in `workdir` if there is one, else initialises from
     `config.init_from` (another stage's workdir) or `config.model.hf_checkpoint` (a Hugging
     Face checkpoint, which also sets the architecture), else from scratch, always directly
     sharded;
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
from instruct import hf as hf_lib
from instruct import optim
from instruct import sharding as shd
from instruct.data import load_tokenizer
from instruct.metrics import MetricWriter
from instruct.model import ModelConfig
from instruct.stages import rm, sft
from instruct.stages.common import Task
from instruct.state import StateFactory, TrainState, state_factory


# Stage name (config.stage) -> make_task(config, tokenizer, optimizer, schedule).
TASKS = {"pretrain": sft.make_task, "sft": sft.make_task, "rm": rm.make_task}


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


def _initial_state(config, factory: StateFactory, task: Task, checkpointer):
  """(state, extras) from the workdir's checkpoint, else `config.init_from` or
  `config.model.hf_checkpoint`, else scratch.

  From `init_from` (that run's latest checkpoint) or the HF checkpoint, every parameter except
  `task.fresh_param_keys` is loaded directly into the state's shardings (a reward model takes
  the SFT backbone and a new scalar head).
  """
  step = checkpointer.latest_step()
  if step is not None:
    logging.info("Resuming from %s (step %d).", checkpointer.directory, step)
    return checkpointer.restore(step, factory.abstract)
  hf_checkpoint = config.model.get("hf_checkpoint", "")
  if config.init_from and hf_checkpoint:
    raise ValueError(f"config.init_from={config.init_from!r} and config.model.hf_checkpoint="
                     f"{hf_checkpoint!r} are both set; initialise from one of them.")
  if not (config.init_from or hf_checkpoint):
    return factory.init(jax.random.key(config.seed)), {}
  abstract = {k: v for k, v in factory.abstract.params.items()
              if k not in task.fresh_param_keys}
  if hf_checkpoint:
    params = dict(hf_lib.load_hf_params(
        hf_checkpoint, ModelConfig.from_dict(config.model),
        shardings=jax.tree.map(lambda x: x.sharding, abstract), head=task.model.head))
  else:
    params = dict(latest_params(config.init_from, abstract))
  if task.fresh_param_keys:
    fresh = factory.init(jax.random.key(config.seed)).params
    params.update({k: fresh[k] for k in task.fresh_param_keys})
  return factory.from_params(params), {}


def evaluate(task: Task, eval_step, params, data, batch_sharding,
             max_batches: int = -1) -> dict:
  """Runs the validation split through `eval_step`; `task.summarize_eval` makes the metrics."""
  data.set_state({"epoch": 0, "batch": 0})
  outputs = []
  for i, batch in enumerate(data):
    if 0 <= max_batches <= i:
      break
    outputs.append(eval_step(params, shd.host_batch_to_global(batch, batch_sharding)))
  return task.summarize_eval(jax.device_get(outputs))


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


def compile_steps(task: Task, state_sh, mesh, rules):
  """The jitted (train_step, eval_step, score_step), with explicit shardings.

  The train state is donated; frozen inputs (params of eval and score) are not.
  """
  batch_sh = shd.batch_sharding(mesh, rules)
  out = shd.replicated(mesh)
  train_step = jax.jit(task.train_step, in_shardings=(state_sh, batch_sh, out),
                       out_shardings=(state_sh, out), donate_argnums=(0,))
  eval_step = jax.jit(task.eval_step, in_shardings=(state_sh.params, batch_sh),
                      out_shardings=out)
  score_step = None
  if task.score_step is not None:
    score_step = jax.jit(task.score_step, in_shardings=(state_sh.params, batch_sh),
                         out_shardings=out)
  return train_step, eval_step, score_step


@dataclasses.dataclass
class Built:
  """A stage ready to run: mesh, rule table, task, state factory and the jitted steps."""

  mesh: Any
  rules: Any
  task: Task
  factory: StateFactory
  train_step: Callable
  eval_step: Callable
  score_step: Optional[Callable]
  batch_sharding: Any
  config: Any = None  # The config built from (config.model resolved from an HF checkpoint).


def build(config, tokenizer, devices: Optional[list[jax.Device]] = None) -> Built:
  """Validates the config and builds the stage's mesh, task, state factory and jitted steps.

  No state is created; `built.factory.init(rng)` creates it sharded. Use the steps under
  `jax.set_mesh(built.mesh)` and `nn.logical_axis_rules(built.rules)`. With
  `config.model.hf_checkpoint` set, the model's architecture is that checkpoint's
  (`built.config` is the config with `config.model` filled in from it).
  """
  config = hf_lib.resolve_config(config)
  mesh = shd.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.mesh)
  config_lib.validate(config, shd.data_parallel_size(mesh, rules), jax.process_count())
  if tokenizer is not None and len(tokenizer) > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {len(tokenizer)} tokens ({config.data.tokenizer}).")
  num_steps = config.train.num_steps
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  task = TASKS[config.stage](config, tokenizer, optimizer,
                             optim.make_schedule(config.optimizer, num_steps))
  # State shardings come from out_shardings, outside the rules context; logical constraints
  # are only wanted inside the steps.
  with jax.set_mesh(mesh):
    factory = state_factory(init_params_fn(task.model), optimizer, mesh, rules)
  steps = compile_steps(task, factory.shardings, mesh, rules)
  return Built(mesh, rules, task, factory, *steps, shd.batch_sharding(mesh, rules), config)


def train_and_evaluate(config, workdir: str,
                       devices: Optional[list[jax.Device]] = None) -> TrainState:
  """Trains the stage described by `config` in `workdir`; returns the final state."""
  tokenizer = load_tokenizer(config.data.tokenizer,
                             pad_token=config.data.get("pad_token", ""))
  built = build(config, tokenizer, devices)
  config = built.config
  os.makedirs(workdir, exist_ok=True)
  train_data = built.task.make_data("train", True)
  eval_data = built.task.make_data("validation", False)
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints)
  writer = MetricWriter(workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)
  with jax.set_mesh(built.mesh):
    state, extras = _initial_state(config, built.factory, built.task, checkpointer)
  with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
    if extras:
      train_data.set_state(extras["data"])
    base_rng = jax.random.wrap_key_data(
        np.asarray(extras["rng"], np.uint32)) if extras else jax.random.key(config.seed)
    loop = _Loop(config, built, train_data, eval_data, base_rng, checkpointer, writer)
    watcher = PreemptionWatcher()
    try:
      state = loop.run(state, watcher)
    finally:
      watcher.close()
      checkpointer.close()
      writer.close()
  return state


@dataclasses.dataclass
class _Loop:
  """The training loop: step, log, evaluate, checkpoint (and finalize at the last step)."""

  config: Any
  built: Built
  train_data: Any
  eval_data: Any
  base_rng: jax.Array
  checkpointer: ckpt_lib.Checkpointer
  writer: MetricWriter

  def run(self, state: TrainState, watcher: PreemptionWatcher) -> TrainState:
    t = self.config.train
    train_step, batch_sh = self.built.train_step, self.built.batch_sharding
    step = int(state.step)
    end = t.num_steps if t.stop_at_step < 0 else min(t.num_steps, t.stop_at_step)
    progress = Progress(end_step=end, last_step=step)
    logging.info("Training from step %d to %d on %d devices.", step, end, jax.device_count())
    pending = []
    while step < end:
      batch = shd.host_batch_to_global(next(self.train_data), batch_sh)
      state, metrics = train_step(state, batch, jax.random.fold_in(self.base_rng, step))
      step += 1
      pending.append(metrics)
      preempted = watcher.should_stop(step)
      save_now = step % t.checkpoint_every == 0 or step == end or preempted
      if step % t.log_every == 0 or save_now:
        self._log(pending, step, end, progress)
        pending = []
      if t.eval_every > 0 and (step % t.eval_every == 0 or step == end) and not preempted:
        results = evaluate(self.built.task, self.built.eval_step, state.params,
                           self.eval_data, batch_sh, t.eval_batches)
        self.writer.write(step, results)
        logging.info("step %d | %s", step, " | ".join(
            f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
      if save_now:
        self._save(state, step, final=step == t.num_steps)
      if preempted:
        logging.warning("Preemption signal: saved step %d; rerun the same command to resume.",
                        step)
        break
    return state

  def _log(self, pending, step, end, progress) -> None:
    try:
      summary = _summarise(pending, step)
    except NonFiniteLossError as e:
      raise NonFiniteLossError(
          f"{e} Stopping without saving; the last good checkpoint "
          f"({self.checkpointer.latest_step()}) in {self.checkpointer.directory} is intact."
      ) from None
    summary["tokens_per_second"], eta = progress.rates(step, summary.pop("tokens"))
    self.writer.write(step, summary)
    logging.info("step %d/%d | loss %.4f | acc %.3f | %.0f tok/s | ETA %s", step, end,
                 summary["loss"], summary["accuracy"], summary["tokens_per_second"],
                 _format_eta(eta))

  def _save(self, state, step: int, final: bool) -> None:
    extras = {"data": self.train_data.get_state(),
              "rng": np.asarray(jax.random.key_data(self.base_rng)).tolist(),
              "config": self.config.to_dict()}
    if final and self.built.task.finalize is not None:
      built = self.built
      score = lambda batch: np.asarray(jax.device_get(built.score_step(
          state.params, shd.host_batch_to_global(batch, built.batch_sharding))))
      finalized = built.task.finalize(state.params, score)
      self.writer.write(step, {k: v for k, v in finalized.items()
                               if isinstance(v, (int, float))})
      extras.update(finalized)
    self.checkpointer.save(step, state, extras)


def _format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  return time.strftime("%H:%M:%S", time.gmtime(seconds))
