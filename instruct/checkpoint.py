"""Checkpoints: the one module that talks to Orbax.

A checkpoint in `WORKDIR/checkpoints/<step>/` holds the train state (sharded arrays), the data
iterator position, the base rng and the run's config. The last `keep` checkpoints are kept.
A state with a non-finite value is never written: `save` raises instead, so the last good
checkpoint stays the latest one.
"""

from __future__ import annotations

import json
import logging as std_logging
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from instruct import paths
from instruct import workdir as workdir_lib


class NonFiniteStateError(FloatingPointError):
  """Raised instead of writing a state with NaN or Inf values."""

  hint = ("lower config.optimizer.learning_rate (or check the data); a rerun resumes from the "
          "latest good checkpoint.")


class NoReadableCheckpointError(FileNotFoundError):
  """Every checkpoint of a workdir was damaged (each was moved aside, none deleted)."""


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [
      jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def all_finite(tree) -> bool:
  """True when every floating-point leaf of `tree` is finite."""
  return bool(_all_finite(tree))


def _ignore_closed_event_loop_callbacks() -> None:
  """Drops the follow-on errors of a failed Orbax restore.

  When a restore fails, Orbax closes its event loop while TensorStore reads are still in
  flight; each of them then fails to call back into the closed loop and reports it as an
  unraisable exception (`RuntimeError: Event loop is closed`, a traceback each), and asyncio
  logs each failed read's task ("Task exception was never retrieved"): dozens of tracebacks
  per damaged checkpoint after the one line that says what happened. Only these are dropped,
  from the first resume on.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop", False):
    return

  def hook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_loop = True
  sys.unraisablehook = hook
  # The other reads' own failures, logged by asyncio when their tasks are collected.
  std_logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in str(record.msg))


def orbax_directory(directory: str):
  """`directory` as Orbax's CheckpointManager takes it: an `epath.Path` for a bucket URL
  (Orbax then writes through its own bucket support), the absolute path itself when local."""
  return paths.as_path(directory) if paths.is_url(directory) else directory


class Checkpointer:
  """Saves and restores (state, extras) in `workdir/checkpoints`, keeping the last `keep`.

  `workdir` may be a local directory or a bucket URL (`gs://bucket/run`); see
  `instruct.paths`.
  """

  def __init__(self, workdir: str, keep: int = 3, exclusive: bool = False):
    """`exclusive`: this process writes the run, and holds `workdir`'s lock until `close()`
    (`instruct.workdir.lock`; WorkdirBusyError when another live run holds it)."""
    self._lock = workdir_lib.lock(workdir) if exclusive else None
    self.directory = paths.join(paths.absolute(workdir), "checkpoints")
    # Damaged checkpoints are moved here on resume (never deleted); see `restore_latest`.
    self.damaged_directory = paths.join(paths.absolute(workdir), "checkpoints_damaged")
    self._options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False)
    self._manager = self._open_manager()

  def _open_manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(orbax_directory(self.directory), options=self._options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, extras: dict[str, Any]) -> None:
    """Writes `state` (a pytree of arrays) and `extras` (JSON-serialisable) at `step`."""
    if not all_finite(state):
      latest = self.latest_step()
      kept = (f"the latest good checkpoint is {latest}"
              if latest is not None else "no checkpoint had been written yet")
      raise NonFiniteStateError(
          f"Non-finite values (NaN or Inf) in the state at step {step}: checkpoint {step} was "
          f"not written to {self.directory}; {kept}.")
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      extras=ocp.args.JsonSave(extras)))
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores the state into the shardings of `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      extras=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["extras"])

  def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict[str, Any]]]:
    """(step, state, extras) of the newest checkpoint that can be read; None if there is none.

    A checkpoint that cannot be read (truncated or missing files, a damaged manifest or
    metadata) is reported in one line naming its step and the error, moved aside to
    `checkpoints_damaged/<step>` (never deleted) and the previous one is tried; when every
    checkpoint was damaged, `NoReadableCheckpointError` says where they went.
    """
    # Installed before the first read: a failing read's follow-ons can come before its error.
    _ignore_closed_event_loop_callbacks()
    moved = []
    while (step := self.latest_step()) is not None:
      try:
        state, extras = self.restore(step, abstract_state)
        return step, state, extras
      except Exception as e:  # pylint: disable=broad-except  (Orbax raises many kinds)
        where = self._move_aside(step)
        moved.append(where)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = message.split(" [tensorstore_spec")[0]
        logging.warning(
            "Checkpoint %d in %s cannot be read (%s: %s); moved it to %s and "
            "trying the previous one.", step, self.directory,
            type(e).__name__, message[:300], where)
    if moved:
      raise NoReadableCheckpointError(
          f"No readable checkpoint in {self.directory}: every one was damaged and moved to "
          f"{self.damaged_directory} ({', '.join(moved)}). Start the run again in a new "
          "workdir, or move a checkpoint back if it can be repaired.")
    return None

  def _move_aside(self, step: int) -> str:
    """Moves checkpoint `step` to `checkpoints_damaged/` and re-reads the step list (on a
    bucket the move is a copy then a delete: `paths.move`)."""
    paths.makedirs(self.damaged_directory)
    target = paths.join(self.damaged_directory, str(step))
    suffix = 1
    while paths.exists(target):
      target = paths.join(self.damaged_directory, f"{step}.{suffix}")
      suffix += 1
    paths.move(paths.join(self.directory, str(step)), target)
    self._manager.close()
    self._manager = self._open_manager()
    return target

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Restores only `state.params` (for initialising a later stage from this run)."""
    return self.restore_partial(step, {"params": abstract_params})["params"]

  def restore_partial(self, step: int, abstract_item: Any) -> Any:
    """Restores the part of the state that `abstract_item` names (a sub-tree of the state),
    e.g. `{"policy": {"params": ...}}` from a PPO checkpoint."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_item, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_item), partial_restore=True)))
    return restored["state"]

  def restore_extras(self, step: int) -> dict[str, Any]:
    """Only the JSON extras of a checkpoint (data position, rng, reward normalisation...)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(extras=ocp.args.JsonRestore()))
    return dict(restored["extras"])

  def close(self) -> None:
    self._manager.close()
    if self._lock is not None:
      self._lock.release()


def write_config(workdir: str, config) -> str:
  """Writes the run's config as JSON beside the checkpoints (atomically: a reader sees the
  old file or the new one); returns the path."""
  path = paths.join(workdir, "config.json")
  paths.write_text_atomic(path, config.to_json_best_effort(indent=2, sort_keys=True))
  return path


def read_config(workdir: str) -> dict[str, Any]:
  return json.loads(paths.read_text(paths.join(workdir, "config.json")))
