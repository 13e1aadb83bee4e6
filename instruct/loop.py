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
  -1: never) and preemption (SIGTERM; JAX's sync point on several hosts): the loop saves a
  checkpoint and raises `Preempted`, which the commands turn into exit status
  `EXIT_PREEMPTED` (75) so that `a && b` chains and schedulers stop;
- resume that logs what an uninterrupted run logs: records past the restored step are
  dropped from `metrics.jsonl` and hidden in TensorBoard, and a checkpoint taken between two
  writes carries the unwritten steps' metrics (`pending_metrics`), so the next record averages
  the same window as it would have without the interruption.
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
from instruct import distributed
from instruct import workdir as workdir_lib
from instruct.metrics import MetricWriter


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss (or another non-finite metric)."""

  hint = ("lower config.optimizer.learning_rate (or check the data); a rerun resumes from the "
          "last good checkpoint.")


# Exit status of a command whose run was preempted (sysexits' EX_TEMPFAIL: try again later).
EXIT_PREEMPTED = 75


class Preempted(BaseException):
  """The run was preempted (SIGTERM); what could be saved was saved.

  A BaseException, like KeyboardInterrupt, so no `except Exception` on the way up (a
  checkpoint read, a pipeline stage) mistakes it for a failure of its own.
  """

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message


_SIGNALLED = threading.Event()
_IN_LOOP = threading.Event()


def _on_sigterm(signum, frame):
  del signum, frame
  _SIGNALLED.set()
  if not _IN_LOOP.is_set():
    raise Preempted("Preempted (SIGTERM) before training started (data preparation, "
                    "compilation or a restore); nothing new was saved. Rerun the same command "
                    "to resume.")


def install_preemption_handler() -> None:
  """Makes SIGTERM a preemption for the whole process (the commands call this first).

  Inside the loop it stops the run at the next step with a checkpoint; anywhere else (data
  preparation, compilation, a pipeline's sampling) it raises `Preempted` at once.
  """
  signal.signal(signal.SIGTERM, _on_sigterm)


class PreemptionWatcher:
  """Turns SIGTERM (how TPU/GPU schedulers announce preemption) into a checkpoint and exit.

  Single host: a signal handler sets a flag, checked after every step (the process-wide one of
  `install_preemption_handler`, else one installed for the loop's duration). Several hosts:
  JAX's preemption sync point (needs `jax.distributed.initialize()`), so all hosts stop at the
  same step.
  """

  def __init__(self):
    self._previous = None
    _IN_LOOP.set()
    if (threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is not _on_sigterm):
      _SIGNALLED.clear()
      self._previous = signal.signal(signal.SIGTERM, lambda *_: _SIGNALLED.set())

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return _SIGNALLED.is_set()

  def close(self) -> None:
    _IN_LOOP.clear()
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
  # In float64, so metrics carried through a checkpoint as JSON numbers average identically.
  summary = {k: float(np.mean(np.asarray([m[k] for m in fetched], np.float64))) for k in fetched[0]}
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
    extras: the extras of the checkpoint resumed from (its `pending_metrics` continue the
      window of the next record).
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
  extras: Optional[dict] = None

  def run(self, state, step: int, unit: str = "step"):
    """Runs from `step` (the state's) to the end step; returns the last state.

    Metrics are written every `write_every` steps and at `num_steps`; a checkpoint in between
    (`checkpoint_every`, `stop_at_step`, preemption) keeps the unwritten steps' metrics in its
    extras. Raises `Preempted` after saving when SIGTERM arrives.
    """
    t = self.train
    end = end_step(t.num_steps, t.stop_at_step)
    write_every = self.write_every or t.log_every
    # What a previous invocation logged past this checkpoint is dropped: each step once.
    self.writer.rollback(step)
    pending = [{k: np.asarray(v) for k, v in m.items()}
               for m in (self.extras or {}).get("pending_metrics", [])]
    logging.info("Training from %s %d to %d on %d devices.", unit, step, end, jax.device_count())
    watcher = PreemptionWatcher()
    last_time, last_step = time.time(), step - len(pending)
    try:
      while step < end:
        state, metrics = self.step_fn(state, jax.random.fold_in(self.base_rng, step))
        step += 1
        pending.append(metrics)
        preempted = watcher.should_stop(step)
        save_now = step % t.checkpoint_every == 0 or step == end or preempted
        write_now = step % write_every == 0 or step == t.num_steps
        if write_now or save_now:
          pending = jax.device_get(pending)
          summary = self._summary(pending, step)  # Raises on a non-finite value.
          now = time.time()
          elapsed, steps = max(now - last_time, 1e-9), step - last_step
          if "tokens" in summary:
            summary["tokens_per_second"] = summary.pop("tokens") / elapsed
          if write_now:
            self.writer.write(step, summary)
            last_time, last_step, pending = now, step, []
          if step % t.log_every == 0 or save_now:
            eta = (end - step) * elapsed / max(steps, 1)
            logging.info("%s %d/%d | %s | ETA %s", unit, step, end, self.log_line(summary),
                         format_eta(eta))
        if (self.evaluate is not None and t.eval_every > 0 and not preempted
            and (step % t.eval_every == 0 or step == t.num_steps)):
          results = self.evaluate(state)
          self.writer.write(step, results)
          logging.info(
              "%s %d | %s", unit, step,
              " | ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float)))
        if save_now:
          self._save(state, step, pending)
        if preempted:
          raise Preempted(f"Preempted (SIGTERM): saved {unit} {step} in "
                          f"{self.checkpointer.directory}; rerun the same command to resume.")
    finally:
      watcher.close()
    return state

  def _summary(self, pending, step) -> dict:
    try:
      return summarize(pending, step)
    except NonFiniteLossError as e:
      latest = self.checkpointer.latest_step()
      kept = (f"the last good checkpoint ({latest}) in {self.checkpointer.directory} is intact"
              if latest is not None else "no checkpoint had been written yet")
      raise NonFiniteLossError(f"{e} Stopped without saving; {kept}.") from None

  def _save(self, state, step: int, pending: list[dict]) -> None:
    extras = dict(
        self.data_state(), rng=np.asarray(jax.random.key_data(self.base_rng)).tolist(),
        config=self.config.to_dict(),
        pending_metrics=[{k: np.asarray(v).tolist() for k, v in m.items()} for m in pending])
    if step == self.train.num_steps and self.finalize is not None:
      finalized = self.finalize(state)
      self.writer.write(step, {k: v for k, v in finalized.items() if isinstance(v, (int, float))})
      extras.update(finalized)
    self.checkpointer.save(step, state, extras)


def open_run(workdir: str, config) -> tuple[ckpt_lib.Checkpointer, MetricWriter]:
  """The checkpointer and metrics writer of `workdir`, with the config saved beside them.

  Process 0 takes the workdir's lock (held until `checkpointer.close()`; WorkdirBusyError
  when another run holds it), and a workdir with checkpoints is resumed only under the config
  it was started with, but for `workdir.RESUMABLE_KEYS` (ConfigChangedError lists the rest).
  """
  distributed.check_agreement(config)
  lead = jax.process_index() == 0
  checkpointer = ckpt_lib.Checkpointer(workdir, config.train.keep_checkpoints, exclusive=lead)
  try:
    if lead and checkpointer.all_steps():
      workdir_lib.check_resume(workdir, config)
    writer = MetricWriter(workdir)
    if lead:
      ckpt_lib.write_config(workdir, config)
  except BaseException:
    checkpointer.close()
    raise
  return checkpointer, writer
