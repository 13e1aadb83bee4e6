"""The training loop every stage runs: step, write metrics, evaluate, checkpoint, resume.

A stage gives the loop a step function `(state, rng) -> (state, metrics)` (it takes its own
batch), and the loop owns everything around it, once for every stage and algorithm:

- rng: step `s` gets `fold_in(base_rng, s)`; the base rng is saved with every checkpoint;
- metrics: averaged over the steps since the last write (`write_every`), checked for NaN or
  Inf in every value before anything is written or saved (a non-finite value stops the run and
  the last good checkpoint stays the latest), written to `metrics.jsonl` and TensorBoard, and
  a line on the terminal every `log_every` steps with tokens/s (when the step reports
  `tokens`) and an ETA;
- evaluation every `eval_every` steps and at the end (not when preempted);
- checkpoints every `checkpoint_every` steps, at the end and on preemption, with the extras
  that make resume exact: the data position (`data_state()`), the base rng and the config;
  at the final step `finalize(state)` adds the stage's last extras (a reward model's
  normalisation);
- `stop_at_step` (> 0: stop there with a checkpoint, as a scheduler's time limit would;
  -1: never) and preemption (SIGTERM; JAX's sync point on several hosts).
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from instruct import checkpoint as ckpt_lib
from instruct.metrics import MetricWriter


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss (or another non-finite metric)."""


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


def end_step(num_steps: int, stop_at_step: int) -> int:
  """Where this invocation stops: `num_steps`, or `stop_at_step` when that is positive."""
  return min(num_steps, stop_at_step) if stop_at_step > 0 else num_steps


def base_rng(extras: dict, seed: int) -> jax.Array:
  """The run's base rng: restored from a checkpoint's extras, else from `seed`."""
  if extras:
    return jax.random.wrap_key_data(np.asarray(extras["rng"], np.uint32))
  return jax.random.key(seed)


def summarize(pending: list[dict], step: int) -> dict[str, float]:
  """Means of the metrics of the steps since the last write (`tokens` is summed).

  Raises NonFiniteLossError naming the step and the metrics when any value is NaN or Inf.
  """
  fetched = jax.device_get(pending)
  for offset, metrics in enumerate(fetched):
    bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
    if bad:
      at = step - len(fetched) + offset + 1
      what = (f"loss ({metrics['loss']})" if bad == ["loss"] else ", ".join(
          f"{k} ({metrics[k]})" for k in bad))
      raise NonFiniteLossError(f"Non-finite {what} at step {at}.")
  summary = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  if "tokens" in summary:
    summary["tokens"] = float(np.sum([m["tokens"] for m in fetched]))
  return summary


def format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


@dataclasses.dataclass
class Loop:
  """One stage's loop (see the module docstring). Every callable is host code of the stage.

  Attributes:
    step_fn: `(state, rng) -> (state, metrics)`; the metrics may be device arrays (they are
      fetched at the next write, so steps stay asynchronous) or host floats.
    train: the stage's `config.train` (num_steps, stop_at_step, log_every, checkpoint_every,
      eval_every).
    config: the stage's full config (saved in every checkpoint's extras).
    base_rng: from `base_rng(extras, config.seed)`.
    checkpointer, writer: the run's checkpoints and metrics.
    data_state: `() -> dict` of the data positions to save (merged into the extras).
    log_line: `summary -> str`, the stage's part of the terminal line.
    write_every: steps per metrics record (default `train.log_every`; RL writes every
      iteration).
    evaluate: optional `(state) -> metrics` on the validation data.
    finalize: optional `(state) -> extras` run once at the final step (`num_steps`).
  """

  step_fn: Callable[[Any, jax.Array], tuple[Any, dict]]
  train: Any
  config: Any
  base_rng: jax.Array
  checkpointer: ckpt_lib.Checkpointer
  writer: MetricWriter
  data_state: Callable[[], dict]
  log_line: Callable[[dict], str]
  write_every: Optional[int] = None
  evaluate: Optional[Callable[[Any], dict]] = None
  finalize: Optional[Callable[[Any], dict]] = None

  def run(self, state, step: int, unit: str = "step"):
    """Runs from `step` (the state's) to the end step; returns the last state."""
    t = self.train
    end = end_step(t.num_steps, t.stop_at_step)
    write_every = self.write_every or t.log_every
    logging.info("Training from %s %d to %d on %d devices.", unit, step, end, jax.device_count())
    watcher = PreemptionWatcher()
    last_time, last_step, pending = time.time(), step, []
    try:
      while step < end:
        state, metrics = self.step_fn(state, jax.random.fold_in(self.base_rng, step))
        step += 1
        pending.append(metrics)
        preempted = watcher.should_stop(step)
        save_now = step % t.checkpoint_every == 0 or step == end or preempted
        if step % write_every == 0 or save_now:
          summary = self._summary(pending, step)
          now = time.time()
          elapsed, steps = max(now - last_time, 1e-9), step - last_step
          last_time, last_step, pending = now, step, []
          if "tokens" in summary:
            summary["tokens_per_second"] = summary.pop("tokens") / elapsed
          self.writer.write(step, summary)
          if step % t.log_every == 0 or save_now:
            eta = (end - step) * elapsed / steps
            logging.info("%s %d/%d | %s | ETA %s", unit, step, end, self.log_line(summary),
                         format_eta(eta))
        if (self.evaluate is not None and t.eval_every > 0 and not preempted
            and (step % t.eval_every == 0 or step == end)):
          results = self.evaluate(state)
          self.writer.write(step, results)
          logging.info(
              "%s %d | %s", unit, step,
              " | ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
        if save_now:
          self._save(state, step)
        if preempted:
          logging.warning("Preemption signal: saved %s %d; rerun the same command to resume.", unit,
                          step)
          break
    finally:
      watcher.close()
    return state

  def _summary(self, pending, step) -> dict:
    try:
      return summarize(pending, step)
    except NonFiniteLossError as e:
      raise NonFiniteLossError(
          f"{e} Stopping without saving; the last good checkpoint "
          f"({self.checkpointer.latest_step()}) in {self.checkpointer.directory} is intact."
      ) from None

  def _save(self, state, step: int) -> None:
    extras = dict(self.data_state(), rng=np.asarray(jax.random.key_data(self.base_rng)).tolist(),
                  config=self.config.to_dict())
    if step == self.train.num_steps and self.finalize is not None:
      finalized = self.finalize(state)
      self.writer.write(step, {k: v for k, v in finalized.items() if isinstance(v, (int, float))})
      extras.update(finalized)
    self.checkpointer.save(step, state, extras)


def open_run(workdir: str, config) -> tuple[ckpt_lib.Checkpointer, MetricWriter]:
  """The checkpointer and metrics writer of `workdir`, with the config saved beside them."""
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints)
  writer = MetricWriter(workdir)
  if jax.process_index() == 0:
    ckpt_lib.write_config(workdir, config)
  return checkpointer, writer
