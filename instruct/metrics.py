"""The metrics writer: a JSON-lines file and TensorBoard event files, from process 0 only.

`WORKDIR/metrics.jsonl` has one object per line, `{"step": int, "<name>": float, ...}`, which
notebooks read with `pandas.read_json(path, lines=True)`; TensorBoard events go to
`WORKDIR/tensorboard/`.

`WORKDIR` may be a bucket URL (`gs://bucket/run`, see `instruct.paths`). Objects cannot be
appended to, so there the writer keeps the file's lines in memory (read once when it starts,
for a resume's rollback) and rewrites the whole object at each write, which is atomic by
itself. tensorboardX cannot write to a bucket: its events go to a local temporary directory,
and each flush copies the event files that grew to `WORKDIR/tensorboard/` (whole objects
again), at every write and on close.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import numpy as np

from instruct import paths


def _to_python(value: Any):
  value = np.asarray(value)
  if value.ndim:
    return value.tolist()
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them visible as strings.
  return value


def _summary_writer(directory: str, purge_step: Optional[int] = None, filename_suffix: str = ""):
  from tensorboardX import SummaryWriter  # Lightweight; no TensorFlow needed.
  return SummaryWriter(directory, purge_step=purge_step, filename_suffix=filename_suffix)


def _record_step(line: str) -> float:
  """The step of a metrics.jsonl line; a damaged (half-written) line sorts last (dropped)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")


class MetricWriter:
  """Writes scalar metrics; a no-op on processes other than 0."""

  def __init__(self, workdir: str, process_index: Optional[int] = None):
    index = jax.process_index() if process_index is None else process_index
    self.active = index == 0
    self.path = paths.join(workdir, "metrics.jsonl")
    self._tb_dir = paths.join(workdir, "tensorboard")
    self._bucket = paths.is_url(workdir)
    # On a bucket: the lines of metrics.jsonl, the local event directory, the sizes of the
    # event files already copied, and a counter that names each new event file apart.
    self._lines: list[str] = []
    self._tb_local: Optional[str] = None
    self._tb_copied: dict[str, int] = {}
    self._tb_files = 0
    self._tb = None
    if self.active:
      paths.makedirs(workdir)
      if self._bucket:
        if paths.exists(self.path):
          self._lines = _lines(paths.read_text(self.path))
        self._tb_local = tempfile.mkdtemp(prefix="instruct-tensorboard-")
      self._tb = self._new_summary_writer()

  def _new_summary_writer(self, purge_step: Optional[int] = None):
    if not self._bucket:
      return _summary_writer(self._tb_dir, purge_step=purge_step)
    # Two writers opened in the same second would share a file name (tensorboardX names
    # files by the second); the counter keeps the earlier file's events.
    self._tb_files += 1
    return _summary_writer(self._tb_local, purge_step=purge_step,
                           filename_suffix=f".{os.getpid()}.{self._tb_files}")

  def _sync_tensorboard(self) -> None:
    """Copies the local event files that changed since the last sync to the bucket."""
    if not self._bucket:
      return
    for name in sorted(os.listdir(self._tb_local)):
      size = os.path.getsize(os.path.join(self._tb_local, name))
      if self._tb_copied.get(name) != size:
        paths.makedirs(self._tb_dir)
        paths.copy_file(os.path.join(self._tb_local, name), paths.join(self._tb_dir, name))
        self._tb_copied[name] = size

  def rollback(self, step: int) -> None:
    """Forgets what was written after `step` (a run resuming from its checkpoint at `step`).

    `metrics.jsonl` keeps only its records up to `step` (rewritten atomically); TensorBoard
    hides the events past it (a purge marker at `step + 1` in a new event file).
    """
    if not self.active:
      return
    lines = self._lines
    if not self._bucket:
      lines = _lines(paths.read_text(self.path)) if paths.exists(self.path) else []
    kept = [line for line in lines if _record_step(line) <= step]
    if len(kept) < len(lines):
      self._lines = kept if self._bucket else []
      paths.write_text_atomic(self.path, "".join(kept))
    self._tb.close()
    self._tb = self._new_summary_writer(purge_step=step + 1)
    self._sync_tensorboard()

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    line = json.dumps(record) + "\n"
    if self._bucket:
      self._lines.append(line)
      paths.write_text_atomic(self.path, "".join(self._lines))
    else:
      paths.append_text(self.path, line)
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, global_step=int(step))
    self._tb.flush()
    self._sync_tensorboard()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
      self._sync_tensorboard()
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None


def _lines(text: str) -> list[str]:
  """The non-empty lines of a metrics.jsonl text, each ending in a newline."""
  return [line + "\n" for line in text.split("\n") if line.strip()]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `WORKDIR/metrics.jsonl` (for notebooks and tests)."""
  return [
      json.loads(line) for line in _lines(paths.read_text(paths.join(workdir, "metrics.jsonl")))
  ]
