"""The supervised training driver (pretraining, SFT, reward model, DPO): one function a
notebook can call.

`train_and_evaluate(config, workdir)`:
  1. builds the mesh and rule table from `config.mesh` and validates the config;
  2. resumes from the latest checkpoint in `workdir` if there is one, else initialises from
     `config.init_from` (another stage's workdir, read through `instruct.run`) or
     `config.model.hf_checkpoint` (a Hugging Face checkpoint, which also sets the
     architecture), else from scratch, always directly sharded;
  3. jits the stage's steps (its `Task`, from the stage table) once with explicit in/out
     shardings and the state donated;
  4. runs them in the shared loop (`instruct.loop`): metrics, evaluation, checkpoints,
     preemption and resume.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from instruct import hf as hf_lib
from instruct import loop as loop_lib
from instruct import optim
from instruct import paths
from instruct import run as run_lib
from instruct import sharding as shd
from instruct.data import load_tokenizer
from instruct.model import ModelConfig
from instruct.stages import table
from instruct.stages.common import Task
from instruct.state import StateFactory, TrainState, init_params_fn, state_factory


def _initial_state(config, factory: StateFactory, task: Task, checkpointer):
  """(state, extras) from the workdir's checkpoint, else `config.init_from` or
  `config.model.hf_checkpoint`, else scratch.

  From `init_from` (that run's latest checkpoint) or the HF checkpoint, every parameter except
  `task.fresh_param_keys` is loaded directly into the state's shardings (a reward model takes
  the SFT backbone and a new scalar head).
  """
  latest = checkpointer.restore_latest(factory.abstract)
  if latest is not None:
    step, state, extras = latest
    logging.info("Resuming from %s (step %d).", checkpointer.directory, step)
    return state, extras
  hf_checkpoint = config.model.get("hf_checkpoint", "")
  if config.init_from and hf_checkpoint:
    raise ValueError(f"config.init_from={config.init_from!r} and config.model.hf_checkpoint="
                     f"{hf_checkpoint!r} are both set; initialise from one of them.")
  if not (config.init_from or hf_checkpoint):
    return factory.init(jax.random.key(config.seed)), {}
  abstract = {k: v for k, v in factory.abstract.params.items() if k not in task.fresh_param_keys}
  if hf_checkpoint:
    params = dict(
        hf_lib.load_hf_params(hf_checkpoint, ModelConfig.from_dict(config.model),
                              shardings=jax.tree.map(lambda x: x.sharding,
                                                     abstract), head=task.model.head))
  else:
    source = run_lib.load_run(config.init_from, abstract=abstract, what="config.init_from")
    logging.info("Initialising parameters from %s (step %d).", config.init_from, source.step)
    params = dict(source.params)
  if task.fresh_param_keys:
    fresh = factory.init(jax.random.key(config.seed)).params
    params.update({k: fresh[k] for k in task.fresh_param_keys})
  return factory.from_params(params), {}


def load_frozen(config, factory: StateFactory, task: Task):
  """The task's frozen input (`Task.frozen_from`): that run's latest model parameters,
  restored into the state's parameter shardings; None for a task without one."""
  if task.frozen_from is None:
    return None
  key = task.frozen_from
  source = run_lib.load_run(config[key], abstract=factory.abstract.params, what=f"config.{key}")
  logging.info("Frozen input from %s (step %d).", config[key], source.step)
  return source.params


def evaluate(task: Task, eval_step, params, data, batch_sharding, max_batches: int = -1) -> dict:
  """Runs the validation split through `eval_step`; `task.summarize_eval` makes the metrics."""
  data.set_state({"epoch": 0, "batch": 0})
  outputs = []
  for i, batch in enumerate(data):
    if 0 <= max_batches <= i:
      break
    outputs.append(eval_step(params, shd.host_batch_to_global(batch, batch_sharding)))
  return task.summarize_eval(jax.device_get(outputs))


def compile_steps(task: Task, state_sh, mesh, rules):
  """The jitted (train_step, eval_step, score_step), with explicit shardings.

  The train state is donated; frozen inputs (params of eval and score, a task's frozen
  parameters, sharded like the params) are not.
  """
  batch_sh = shd.batch_sharding(mesh, rules)
  out = shd.replicated(mesh)
  frozen = () if task.frozen_from is None else (state_sh.params,)
  train_step = jax.jit(task.train_step, in_shardings=(state_sh, batch_sh, out) + frozen,
                       out_shardings=(state_sh, out), donate_argnums=(0,))
  eval_step = jax.jit(task.eval_step, in_shardings=(state_sh.params, batch_sh) + frozen,
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
  stage = table.get(config.stage)
  mesh = shd.make_mesh(config.mesh, devices)
  rules = shd.rules_from_config(config.mesh)
  stage.check(config, shd.data_parallel_size(mesh, rules), jax.process_count())
  if tokenizer is not None and len(tokenizer) > config.model.vocab_size:
    raise ValueError(f"config.model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {len(tokenizer)} tokens ({config.data.tokenizer}).")
  num_steps = config.train.num_steps
  optimizer = optim.make_optimizer(config.optimizer, num_steps)
  task = stage.make_task(config, tokenizer, optimizer,
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
  tokenizer = load_tokenizer(config.data.tokenizer, pad_token=config.data.get("pad_token", ""))
  built = build(config, tokenizer, devices)
  config, task = built.config, built.task
  paths.makedirs(workdir)
  train_data = task.make_data("train", True)
  eval_data = task.make_data("validation", False)
  # Invalid records skipped and examples truncated when loading: in every metrics record.
  data_metrics = dict(train_data.data_metrics("train"), **eval_data.data_metrics("validation"))
  checkpointer, writer = loop_lib.open_run(workdir, config)
  try:
    with jax.set_mesh(built.mesh):
      state, extras = _initial_state(config, built.factory, task, checkpointer)
      frozen = load_frozen(config, built.factory, task)
  except BaseException:
    checkpointer.close()
    writer.close()
    raise
  if extras:
    train_data.set_state(extras["data"])
  batch_sh = built.batch_sharding
  frozen_args = () if frozen is None else (frozen,)
  eval_step = lambda params, batch: built.eval_step(params, batch, *frozen_args)

  def step_fn(state, rng):
    state, metrics = built.train_step(state, shd.host_batch_to_global(next(train_data), batch_sh),
                                      rng, *frozen_args)
    return state, dict(metrics, **data_metrics)

  def finalize(state):
    score = lambda batch: np.asarray(
        jax.device_get(built.score_step(state.params, shd.host_batch_to_global(batch, batch_sh))))
    return task.finalize(state.params, score)

  loop = loop_lib.Loop(
      step_fn, config.train, config, loop_lib.base_rng(extras, config.seed), checkpointer, writer,
      data_state=lambda: {"data": train_data.get_state()}, log_line=_log_line,
      evaluate=lambda state: evaluate(task, eval_step, state.params, eval_data, batch_sh,
                                      max_batches=config.train.eval_batches),
      finalize=finalize if task.finalize is not None else None, extras=extras)
  try:
    with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
      state = loop.run(state, int(state.step))
  finally:
    checkpointer.close()
    writer.close()
  return state


def _log_line(summary: dict) -> str:
  return (f"loss {summary['loss']:.4f} | acc {summary['accuracy']:.3f} | "
          f"{summary['tokens_per_second']:.0f} tok/s")
