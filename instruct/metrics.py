"""The metrics writer: a JSON-lines file and TensorBoard event files, from process 0 only.

`WORKDIR/metrics.jsonl` has one object per line, `{"step": int, "<name>": float, ...}`, which
notebooks read with `pandas.read_json(path, lines=True)`; TensorBoard events go to
`WORKDIR/tensorboard/`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np


def _to_python(value: Any):
  value = np.asarray(value)
  if value.ndim:
    return value.tolist()
  value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them visible as strings.
  return value


def _summary_writer(directory: str, purge_step: Optional[int] = None):
  from tensorboardX import SummaryWriter  # Lightweight; no TensorFlow needed.
  return SummaryWriter(directory, purge_step=purge_step)


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
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb_dir = os.path.join(workdir, "tensorboard")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      self._tb = _summary_writer(self._tb_dir)

  def rollback(self, step: int) -> None:
    """Forgets what was written after `step` (a run resuming from its checkpoint at `step`).

    `metrics.jsonl` keeps only its records up to `step` (rewritten atomically); TensorBoard
    hides the events past it (a purge marker at `step + 1` in a new event file).
    """
    if not self.active:
      return
    if os.path.exists(self.path):
      with open(self.path) as f:
        lines = [line for line in f if line.strip()]
      kept = [line for line in lines if _record_step(line) <= step]
      if len(kept) < len(lines):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
          f.writelines(kept)
        os.replace(tmp, self.path)
    self._tb.close()
    self._tb = _summary_writer(self._tb_dir, purge_step=step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in metrics.items()})
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, global_step=int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `WORKDIR/metrics.jsonl` (for notebooks and tests)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
