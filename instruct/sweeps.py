r"""Sweeps (`python -m instruct.sweep`): every trial of a config file's `sweep(add)`, each a run of
its own.

  python -m instruct.sweep --config=configs/sft.py:tiny[,sweep=NAME] --workdir=DIR \
      [--config.train.num_steps=200 ...] [--workers=2] [--max_attempts=2] \
      [--command="python -m instruct.launch --processes=2 --devices_per_process=4"]

A config file's `sweep(add, arg)` calls `add({"dotted.key": value, ...})` once per trial
(`config_lib.grid` makes grids; `sweep=NAME` in the config argument picks a named sweep), and
its optional `metrics()` gives `{metric: "min" | "max"}`, the first ranking the trials. Each
trial runs `--command` (default: the config file's `SWEEP_COMMAND`, else
`python -m instruct.train`) with `--config=FILE:ARG`,
`--workdir=DIR/trials/NAME`, the `--config.*` flags given here (every trial), then its own.

DIR/
  trials.json          the trials (name, overrides, command), written once; a rerun with
                       another sweep is an error
  trials/NAME/         each trial's run directory (NAME from its index and overrides)
  status/NAME.json     a trial's state: done / failed / running, runs, failures and their
                       error lines, wall time
  claims/NAME/.lock    a trial being run (gone when it is finished)
  logs/NAME.log        each attempt's output, as it comes (on a bucket: when it ends)
  sweep.md, sweep.json the comparison (`instruct.sweep_summary`), rewritten as trials finish
  sweep_<key>.png      the ranking metric against each swept key

Workers: `--workers=N` runs N trials at a time from this command, and the same command on
another machine (or in another shell) over the same DIR is N more. A worker claims a trial
with the lock of `claims/NAME` (a file lock, released by the kernel when its process dies;
on a bucket an owner record with a heartbeat that goes stale), skips finished trials, retries
a failed one until `--max_attempts`, and resumes an interrupted one from its checkpoints (the
trial's own run resumes). A worker stopped by SIGTERM passes it on to its trials (which save
and exit 75) and exits 75; one that is killed takes its trials with it (they get SIGTERM on
Linux), and the next worker to claim them resumes them. A trial can itself span several
processes or hosts: `--command` may be `python -m instruct.launch ...`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

from absl import logging

from instruct import config_lib
from instruct import loop
from instruct import paths
from instruct import sweep_summary
from instruct import workdir as workdir_lib

DONE, FAILED = "done", "failed"
# A trial's exit statuses that stop the sweep without counting as a failure: preempted after
# saving (SIGTERM), and Ctrl-C (which reaches the trial before this process).
INTERRUPTED = (loop.EXIT_PREEMPTED, 130)


@dataclasses.dataclass(frozen=True)
class Trial:
  name: str
  overrides: dict[str, Any]


class SweepChangedError(ValueError):
  """DIR holds another sweep than the one asked for."""


DEFAULT_COMMAND = "python -m instruct.train"


def load_sweep(config: str) -> tuple[list[Trial], dict[str, str], str]:
  """The trials of `FILE:ARG`'s `sweep(add, arg)`, its ranking metrics (`metrics()`) and what
  runs a trial (the file's `SWEEP_COMMAND`, default `python -m instruct.train`)."""
  file, _, arg = config.partition(":")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"--config={config}: no config file at {file}.")
  module = config_lib.load_config_module(file)
  if not hasattr(module, "sweep"):
    raise ValueError(f"--config={config}: {file} defines no sweep(add); see instruct/sweeps.py.")
  added: list[dict[str, Any]] = []

  def add(overrides=None, **kwargs):
    added.append({**(overrides or {}), **kwargs})

  takes_arg = len(inspect.signature(module.sweep).parameters) > 1
  module.sweep(add, arg) if takes_arg else module.sweep(add)
  if not added:
    raise ValueError(f"--config={config}: its sweep adds no trials.")
  names = trial_names(added)
  metrics = dict(module.metrics()) if hasattr(module, "metrics") else {}
  for key, direction in metrics.items():
    if direction not in ("min", "max"):
      raise ValueError(f"{file}: metrics() gives {key}: {direction!r}; expected 'min' or 'max'.")
  command = getattr(module, "SWEEP_COMMAND", DEFAULT_COMMAND)
  return [Trial(n, o) for n, o in zip(names, added)], metrics, command


def trial_names(trials: list[dict[str, Any]]) -> list[str]:
  """Directory names from each trial's index and overrides: `03-learning_rate=0.003,seed=1`
  (the last part of each key; the whole key where the last parts would collide). A key that
  every trial sets to the same value does not tell them apart and stays out of the names."""
  keys = sweep_summary.varied_keys(trials)
  short = {k: k.split(".")[-1] for k in keys}
  if len(set(short.values())) < len(keys):
    short = {k: k for k in keys}
  width = len(str(len(trials) - 1))
  names = []
  for i, overrides in enumerate(trials):
    parts = ",".join(f"{short[k]}={flag_value(v)}" for k, v in overrides.items() if k in short)
    names.append(re.sub(r"[^A-Za-z0-9._,=+-]", "_", f"{i:0{width}d}-{parts}")[:120])
  return names


def flag_value(value: Any) -> str:
  """`value` as ml_collections parses it from a `--config.key=` flag."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def trial_command(command: str, config: str, sweep_dir: str, trial: Trial,
                  base: list[str]) -> list[str]:
  """The argv of one trial: `command`, its config and workdir, the sweep's flags, its own."""
  argv = shlex.split(command)
  if argv[:1] == ["python"]:
    argv[0] = sys.executable
  return argv + [
      f"--config={config}", f"--workdir={paths.join(sweep_dir, 'trials', trial.name)}", *base,
      *[f"--config.{k}={flag_value(v)}" for k, v in trial.overrides.items()]
  ]


def write_trials(sweep_dir: str, config: str, trials: list[Trial], base: list[str]) -> None:
  """Writes DIR/trials.json once; a rerun must ask for the same sweep."""
  path = paths.join(sweep_dir, "trials.json")
  record = {
      "config": config, "flags": base,
      "trials": [{"name": t.name, "overrides": t.overrides} for t in trials]
  }
  if paths.exists(path):
    saved = json.loads(paths.read_text(path))
    if saved != json.loads(json.dumps(record)):
      raise SweepChangedError(
          f"{path} holds another sweep (config {saved.get('config')!r}, flags "
          f"{saved.get('flags')}, {len(saved.get('trials', []))} trials); rerun that command "
          "or use another --workdir.")
    return
  paths.makedirs(sweep_dir)
  paths.write_text_atomic(path, json.dumps(record, indent=1))


def _write_status(sweep_dir: str, name: str, status: dict) -> None:
  paths.makedirs(paths.join(sweep_dir, "status"))
  paths.write_text_atomic(paths.join(sweep_dir, "status", f"{name}.json"), json.dumps(status))


def _error_line(log: str, returncode: int) -> str:
  """A failed attempt's error: its last `error:` line, else its last line, else the status."""
  lines = [line.strip() for line in log.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or [f"exit status {returncode}"])[-1][:500]


def _die_with_parent() -> None:
  """In the child: SIGTERM when the worker that started it dies (Linux), so a killed worker
  leaves no trial running unclaimed."""
  try:
    import ctypes  # pylint: disable=import-outside-toplevel
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except OSError:
    pass


class Sweep:
  """The workers of one command over DIR."""

  def __init__(self, sweep_dir: str, config: str, trials: list[Trial], metrics: dict[str, str],
               base: list[str], command: str, max_attempts: int, poll_seconds: float):
    self.dir, self.config, self.trials, self.metrics = sweep_dir, config, trials, metrics
    self.base, self.command = base, command
    self.max_attempts, self.poll = max_attempts, poll_seconds
    self.stopping = threading.Event()
    self._children: set[subprocess.Popen] = set()
    self._lock = threading.Lock()
    self._report_lock = threading.Lock()
    self.preempted = False
    self.error: Optional[Exception] = None

  def stop(self) -> None:
    """Stops the workers: their trials get SIGTERM (and save); nothing new starts."""
    self.stopping.set()
    with self._lock:
      for child in self._children:
        child.send_signal(signal.SIGTERM)

  def _finished(self, trial: Trial) -> bool:
    status = sweep_summary.read_status(self.dir, trial.name)
    return status is not None and status["status"] in (DONE, FAILED)

  def _claim(self, trial: Trial):
    try:
      return workdir_lib.lock(paths.join(self.dir, "claims", trial.name))
    except (workdir_lib.WorkdirBusyError, OSError):
      return None  # Another worker's (or its directory went away as that worker finished).

  def work(self) -> None:
    """A worker thread: `_work`, with its error kept for `run` to raise (the others stop)."""
    try:
      self._work()
    except Exception as e:  # pylint: disable=broad-except  (re-raised by run())
      self.error = self.error or e
      self.stop()

  def _work(self) -> None:
    """Claims and runs trials until every trial is finished (or the sweep is stopped)."""
    while not self.stopping.is_set():
      pending = [t for t in self.trials if not self._finished(t)]
      if not pending:
        return
      ran = False
      for trial in pending:
        if self.stopping.is_set():
          return
        claim = self._claim(trial)
        if claim is None:
          continue
        try:
          ran_this = not self._finished(trial)  # It may have finished while this worker looked.
          if ran_this:
            self._run(trial)
        finally:
          claim.release()
          if self._finished(trial):
            paths.rmtree(paths.join(self.dir, "claims", trial.name))
        if ran_this:
          ran = True
          self.report()
      if not ran:
        self.stopping.wait(self.poll)  # Every pending trial is another worker's: wait.

  def _wait_for_workdir(self, trial: Trial) -> None:
    """Waits until no process holds the trial's own run lock (a killed worker's trial may
    still be saving its checkpoint)."""
    held = workdir_lib.lock_when_free(paths.join(self.dir, "trials", trial.name), self.poll,
                                      self.stopping)
    if held is not None:
      held.release()

  def _run(self, trial: Trial) -> None:
    """Runs `trial` until it succeeds, fails `max_attempts` times, or the sweep stops."""
    status = sweep_summary.read_status(self.dir, trial.name) or {
        "status": "running", "runs": 0, "failures": 0, "errors": [], "wall_seconds": 0.0
    }
    argv = trial_command(self.command, self.config, self.dir, trial, self.base)
    paths.makedirs(paths.join(self.dir, "logs"))
    log_path = paths.join(self.dir, "logs", f"{trial.name}.log")
    while not self.stopping.is_set():
      self._wait_for_workdir(trial)
      if self.stopping.is_set():
        return
      logging.info("[sweep] %s: starting (%s)", trial.name, " ".join(argv[-len(trial.overrides):]
                                                                     or ["no overrides"]))
      start = time.time()
      returncode, output = self._run_logged(argv, log_path)
      status["wall_seconds"] += time.time() - start
      status["runs"] += 1
      if returncode in INTERRUPTED or (self.stopping.is_set() and returncode != 0):
        # Preempted (saved) or interrupted: not a failure; the next claimant resumes it.
        self.preempted = True
        self.stop()
        _write_status(self.dir, trial.name, status)
        return
      if returncode == 0:
        status["status"] = DONE
        _write_status(self.dir, trial.name, status)
        logging.info("[sweep] %s: done", trial.name)
        return
      status["failures"] += 1
      status["errors"].append(_error_line(output, returncode))
      failed = status["failures"] >= self.max_attempts
      status["status"] = FAILED if failed else "running"
      _write_status(self.dir, trial.name, status)
      logging.warning("[sweep] %s: attempt %d of %d failed: %s", trial.name, status["failures"],
                      self.max_attempts, status["errors"][-1])
      if failed:
        return

  def _run_logged(self, argv: list[str], log_path: str) -> tuple[int, str]:
    """Runs one attempt with its output appended to `log_path` as it comes (on a bucket, when
    it ends); returns its exit status and output."""
    local = not paths.is_url(log_path)
    with tempfile.TemporaryDirectory() as tmp:
      target = log_path if local else os.path.join(tmp, "attempt.log")
      with open(target, "a") as log:
        log.write(f"--- {' '.join(argv)}\n")
        log.flush()
        start = log.tell()
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=_die_with_parent)
        with self._lock:
          self._children.add(child)
        child.wait()
        with self._lock:
          self._children.discard(child)
      with open(target, errors="replace") as log:
        if not local:
          old = paths.read_text(log_path) if paths.exists(log_path) else ""
          paths.write_text_atomic(log_path, old + log.read())
        log.seek(start)
        output = log.read()
    return child.returncode, output

  def report(self) -> None:
    """Rewrites the comparison and prints the progress line."""
    with self._report_lock:  # One writer (and one matplotlib figure) at a time.
      summary = sweep_summary.write(self.dir, self.trials, self.metrics)
    print(f"[sweep] {summary['progress']}", file=sys.stderr, flush=True)


def base_flags(argv: list[str]) -> list[str]:
  """The `--config.*` flags of this command (given to every trial)."""
  return [a for a in argv[1:] if a.startswith("--config.")]


def run(sweep_dir: str, config: str, base: list[str], workers: int = 1, max_attempts: int = 2,
        command: Optional[str] = None, poll_seconds: float = 5.0) -> dict:
  """Runs (or resumes) the sweep in `sweep_dir` with `workers` workers; returns the summary.

  `command` runs each trial (default: the config file's `SWEEP_COMMAND`, else
  `python -m instruct.train`)."""
  if workers < 1 or max_attempts < 1:
    raise ValueError(f"--workers={workers} --max_attempts={max_attempts}: both must be >= 1.")
  trials, metrics, default_command = load_sweep(config)
  command = command or default_command
  write_trials(sweep_dir, config, trials, base)
  sweep = Sweep(sweep_dir, config, trials, metrics, base, command, max_attempts, poll_seconds)
  previous = signal.signal(signal.SIGTERM, lambda *_: sweep.stop())
  threads = [threading.Thread(target=sweep.work, name=f"worker-{i}") for i in range(workers)]
  try:
    for thread in threads:
      thread.start()
    for thread in threads:
      while thread.is_alive():
        thread.join(0.5)
  except KeyboardInterrupt:
    sweep.stop()
    for thread in threads:
      thread.join()
    raise
  finally:
    signal.signal(signal.SIGTERM, previous)
  if sweep.error is not None:
    raise sweep.error
  summary = sweep_summary.write(sweep_dir, trials, metrics)
  if sweep.preempted:
    raise loop.Preempted(f"the sweep stopped with {summary['progress']}; rerun the same command "
                         "to go on.")
  return summary
