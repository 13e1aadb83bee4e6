"""Who owns a workdir: one run at a time, and a resume only under the config it started with.

- `lock(workdir)`, taken by process 0 of the run that writes the workdir:
  - `WorkdirLock` for a local workdir: an exclusive `fcntl.flock` on `WORKDIR/.lock`. The
    kernel drops it when the process exits, however it exits (a crash or SIGKILL leaves
    nothing stuck); the file records who holds it, for the error message. flock works on
    local disks (and NFSv4).
  - `BucketLock` for a bucket URL (`gs://...`), which has no locks: an owner record object
    `WORKDIR/.lock` with a heartbeat, free once the heartbeat is older than a stale limit.
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
import threading
import time
import uuid
from typing import Any, Optional, Union

from absl import logging

from instruct import paths

# Keys a resume may change: the run's length, cadences and where it runs, not its maths.
RESUMABLE_KEYS = ("train.num_steps", "train.stop_at_step", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.allow_config_change", "mesh.shape", "mesh.dcn_shape", "mesh.axis_names")
LOCK_FILE = ".lock"
# A bucket lock whose heartbeat is older than this is free (its run died without releasing).
STALE_AFTER_S = 15 * 60
# How often a bucket lock's holder refreshes its heartbeat.
HEARTBEAT_EVERY_S = 60


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


class BucketLock:
  """The lock of a workdir on a bucket: an owner record object `WORKDIR/.lock`.

  The record (JSON) holds the owner's pid, host, start time, command, a random token and a
  heartbeat time (seconds since the epoch) that a daemon thread refreshes every
  `heartbeat_every` seconds while the lock is held. A record whose heartbeat is older than
  `stale_after` seconds belongs to a run that died without releasing it (a crash, a SIGKILL,
  a lost machine), and is taken over with a warning; a fresher one makes the constructor
  raise WorkdirBusyError. `release()` deletes the record if it is still this lock's.

  Buckets have no atomic test-and-set through this API, so taking the lock is: read the
  record, write ours, read it back. Two runs starting within the same second (both read before
  either writes) can both see no live owner; the read-back catches the one whose record was
  overwritten before it read back, but not two runs that each read their own record back
  before the other's write landed: both then run. The earlier one notices at its next
  heartbeat (the record then holds the other's token) and logs an error; nothing stops it.
  Heartbeats compare the clocks of different hosts, so `stale_after` must exceed their skew.
  """

  def __init__(self, workdir: str, stale_after: float = STALE_AFTER_S,
               heartbeat_every: float = HEARTBEAT_EVERY_S):
    self.path = paths.join(workdir, LOCK_FILE)
    self._workdir = workdir
    self._stale_after = stale_after
    self._token = uuid.uuid4().hex
    self._record = {
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "token": self._token
    }
    self._held = False
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None
    paths.makedirs(workdir)
    holder = self._read()
    if holder is not None:
      age = _heartbeat_age(holder)
      if age <= stale_after:
        self._busy(holder)
      logging.warning(
          "Taking over the lock of %s: its holder (%s) has not renewed it for %.0f s "
          "(more than %.0f s).", workdir, _describe(holder), age, stale_after)
    self._write()
    holder = self._read()
    if holder is None or holder.get("token") != self._token:
      self._busy(holder)
    self._held = True
    self._thread = threading.Thread(target=self._beat, args=(heartbeat_every,), daemon=True,
                                    name=f"instruct-lock-heartbeat:{workdir}")
    self._thread.start()

  def _busy(self, holder: Optional[dict]):
    raise WorkdirBusyError(
        f"{self._workdir} is in use by another run ({_describe(holder)}); wait for it to "
        f"finish, or stop it (its lock is free {self._stale_after:.0f} s after its last "
        f"heartbeat, or delete {self.path} if no run uses it), or use another --workdir.")

  def _read(self) -> Optional[dict]:
    """The lock's record; None when there is none; {} when it cannot be parsed."""
    try:
      record = json.loads(paths.read_text(self.path))
    except FileNotFoundError:
      return None
    except ValueError:
      return {}
    return record if isinstance(record, dict) else {}

  def _write(self) -> None:
    paths.write_text_atomic(self.path, json.dumps(dict(self._record, heartbeat=time.time())))

  def heartbeat(self) -> None:
    """Refreshes the record's heartbeat (the daemon thread does this every `heartbeat_every`
    seconds); stops renewing, with an error logged, once another run holds the record."""
    if not self._held:
      return
    holder = self._read()
    if holder is not None and holder.get("token") not in (None, self._token):
      logging.error(
          "The lock of %s was taken over by another run (%s) while this one runs; "
          "both now write the workdir.", self._workdir, _describe(holder))
      self._stop.set()
      return
    self._write()

  def _beat(self, every: float) -> None:
    while not self._stop.wait(every):
      try:
        self.heartbeat()
      except Exception as e:  # pylint: disable=broad-except  (a failed write is retried)
        logging.warning("Could not renew the lock %s: %s", self.path, e)

  def release(self) -> None:
    if not self._held:
      return
    self._held = False
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    try:
      holder = self._read()
      if holder is not None and holder.get("token") == self._token:
        paths.remove(self.path)
    except Exception as e:  # pylint: disable=broad-except  (it then goes stale)
      logging.warning("Could not delete the lock %s (it is free once stale): %s", self.path, e)

  def __del__(self):
    self.release()


def _heartbeat_age(holder: dict) -> float:
  """Seconds since a bucket lock's record was renewed (infinite when it cannot be read)."""
  try:
    return time.time() - float(holder["heartbeat"])
  except (TypeError, KeyError, ValueError):
    return float("inf")


def _describe(holder: Optional[dict]) -> str:
  """Who holds a bucket lock, from its record."""
  try:
    age = _heartbeat_age(holder)
    return (f"pid {holder['pid']} on {holder['host']} since {holder['started']}, alive "
            f"{age:.0f} s ago: {holder['command'][:200]}")
  except (TypeError, KeyError, ValueError):
    return "its lock record cannot be read"


def lock(workdir: str) -> Union[WorkdirLock, BucketLock]:
  """The exclusive lock of `workdir` for this process: `WorkdirLock` (flock) for a local
  directory, `BucketLock` (an owner record with a heartbeat) for a bucket URL."""
  return BucketLock(workdir) if paths.is_url(workdir) else WorkdirLock(workdir)


def lock_when_free(workdir: str, poll_seconds: float = 5.0,
                   stopping: Optional[threading.Event] = None):
  """`lock(workdir)`, waiting while another process holds it (logged once); None when
  `stopping` is set first."""
  logged = False
  while True:
    try:
      return lock(workdir)
    except WorkdirBusyError as e:
      if not logged:
        logging.info("Waiting for %s: %s", workdir, e)
        logged = True
    if stopping is None:
      time.sleep(poll_seconds)
    elif stopping.wait(poll_seconds):
      return None


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _absolute_parts(path: Any) -> Optional[tuple[str, ...]]:
  """The components of an absolute local path or a URL (`('gs://', 'bucket', 'run')`);
  None for anything else."""
  if not isinstance(path, str):
    return None
  if paths.is_url(path):
    scheme, rest = path.split("://", 1)
    return (scheme + "://",) + tuple(p for p in rest.split("/") if p)
  if os.path.isabs(path):
    return pathlib.PurePath(path).parts
  return None


def _moved_with(old: Any, new: Any, workdir: str) -> bool:
  """Whether two absolute paths (or URLs) name the same file relative to a directory that
  moved with the workdir (a run copied elsewhere, its inputs beside it, resumes there)."""
  a, b = _absolute_parts(old), _absolute_parts(new)
  if a is None or b is None:
    return False
  common = 0
  while common < min(len(a), len(b)) - 1 and a[-1 - common] == b[-1 - common]:
    common += 1
  if not common:
    return False
  moved_root = b[:len(b) - common]
  parts = _absolute_parts(paths.absolute(workdir))
  return len(moved_root) < len(parts) and parts[:len(moved_root)] == moved_root


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
  path = paths.join(workdir, "config.json")
  if not paths.exists(path) or config.train.get("allow_config_change", False):
    return
  try:
    saved = json.loads(paths.read_text(path))
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
