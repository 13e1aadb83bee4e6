"""Who owns a workdir: one run at a time, and a resume only under the config it started with.

- `WorkdirLock`: an exclusive `fcntl.flock` on `WORKDIR/.lock`, taken by process 0 of the run
  that writes the workdir. The kernel drops it when the process exits, however it exits (a
  crash or SIGKILL leaves nothing stuck); the file records who holds it, for the error message.
  flock works on local disks (and NFSv4); a bucket has no locks (see docs/design.md).
- `check_resume`: a run resuming from a checkpoint compares its config with the saved
  `config.json`; any difference outside `RESUMABLE_KEYS` (how long and how often, never what is
  computed) is refused with the keys listed, unless `config.train.allow_config_change` is set.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Any

# Keys a resume may change: the run's length, cadences and where it runs, not its maths.
RESUMABLE_KEYS = ("train.num_steps", "train.stop_at_step", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.allow_config_change", "mesh.shape", "mesh.axis_names")
LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock."""


class ConfigChangedError(ValueError):
  """A resume whose config differs from the saved one in keys that change the run."""


class WorkdirLock:
  """An exclusive lock on `workdir` for this process; `release()` (or exit) frees it."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = self._holder()
      os.close(self._fd)
      self._fd = None
      raise WorkdirBusyError(
          f"{workdir} is in use by another run ({holder}); wait for it to finish, or stop it, "
          "or use another --workdir.") from None
    os.ftruncate(self._fd, 0)
    os.write(
        self._fd,
        json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)
        }).encode())

  def _holder(self) -> str:
    try:
      with open(self.path) as f:
        info = json.load(f)
      return (f"pid {info['pid']} on {info['host']} since {info['started']}: "
              f"{info['command'][:200]}")
    except (OSError, ValueError, KeyError):
      return "its lock file is being written"

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __del__(self):
    self.release()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _moved_with(old: Any, new: Any, workdir: str) -> bool:
  """Whether two absolute paths name the same file relative to a directory that moved with
  the workdir (a run copied elsewhere, its inputs beside it, resumes there)."""
  if not (isinstance(old, str) and isinstance(new, str) and os.path.isabs(old)
          and os.path.isabs(new)):
    return False
  a, b = pathlib.PurePath(old).parts, pathlib.PurePath(new).parts
  common = 0
  while common < min(len(a), len(b)) - 1 and a[-1 - common] == b[-1 - common]:
    common += 1
  if not common:
    return False
  moved_root = pathlib.PurePath(*b[:len(b) - common])
  return moved_root in pathlib.PurePath(os.path.abspath(workdir)).parents


def config_differences(saved: dict, new: dict, workdir: str = "") -> list[str]:
  """Dotted keys whose values differ between two configs (as JSON), except resumable ones.

  Only keys both configs have are compared: a key that one of them lacks was added or
  removed by a newer version of the code (a run saved before `data.allow_truncation`
  existed still resumes), not changed by the user. Paths that moved with `workdir` (its
  parent directories renamed or copied, e.g. a pipeline's root) count as unchanged.
  """
  a, b = _flatten(saved), _flatten(new)
  return sorted(k for k in set(a) & set(b)
                if a[k] != b[k] and not _moved_with(a[k], b[k], workdir) and not any(
                    k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS))


def check_resume(workdir: str, config) -> None:
  """Refuses to resume `workdir` (which has checkpoints) under a config that changes the run.

  Raises ConfigChangedError naming the differing keys with both values, unless
  `config.train.allow_config_change` is set.
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path) or config.train.get("allow_config_change", False):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e}); the run's saved config is damaged. "
                     "Restore it, or set --config.train.allow_config_change=True to replace "
                     "it with this command's config.") from None
  new = json.loads(config.to_json_best_effort())
  differing = config_differences(saved, new, workdir)
  if differing:
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    shown = "; ".join(f"config.{k}: {flat_saved[k]!r} -> {flat_new[k]!r}" for k in differing[:8])
    more = f" (and {len(differing) - 8} more)" if len(differing) > 8 else ""
    raise ConfigChangedError(
        f"{workdir} holds a run with another config, which this command would resume: "
        f"{shown}{more}. Use another --workdir, or pass "
        "--config.train.allow_config_change=True to resume it under the new values.")
