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


class MetricWriter:
  """Writes scalar metrics; a no-op on processes other than 0."""

  def __init__(self, workdir: str, process_index: Optional[int] = None):
    index = jax.process_index() if process_index is None else process_index
    self.active = index == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if self.active:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # Lightweight; no TensorFlow needed.
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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
