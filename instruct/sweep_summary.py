"""A sweep's comparison: `DIR/sweep.md`, `DIR/sweep.json` and one plot per swept key.

One row per trial (its overrides, status, attempts, steps, the final and best value of each
metric of the config's `metrics()`, wall time, its last error), ranked by the best value of
the first metric in its direction; `instruct.sweep` rewrites it whenever a trial finishes.
Notebooks read `sweep.json` (`load`) and each trial's `metrics.jsonl` for the curves.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from typing import Any, Optional

from instruct import paths

DEFAULT_METRICS = {"loss": "min"}


def _metric_records(trial_dir: str) -> list[dict]:
  path = paths.join(trial_dir, "metrics.jsonl")
  if not paths.exists(path):
    return []
  records = []
  for line in paths.read_text(path).splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # A line being written.
  return records


def _finite(value) -> Optional[float]:
  return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _values(records: list[dict], key: str, direction: str) -> dict[str, Any]:
  """The final and best value of `key` over a run's records, and the best's interval when the
  record gives one (`KEY_low`, `KEY_high`, e.g. a win rate's over prompts)."""
  found = [(v, r) for v, r in ((_finite(r.get(key)), r) for r in records) if v is not None]
  if not found:
    return {"final": None, "best": None, "interval": None}
  pick = min if direction == "min" else max
  best, record = pick(found, key=lambda pair: pair[0])
  interval = [_finite(record.get(f"{key}_low")), _finite(record.get(f"{key}_high"))]
  return {
      "final": found[-1][0], "best": best, "interval": interval if None not in interval else None
  }


def varied_keys(overrides: list[dict[str, Any]]) -> list[str]:
  """The keys that tell trials apart (sorted): all of them for one trial, else those that
  not every trial sets to the same value."""
  keys = sorted({k for o in overrides for k in o})
  if len(overrides) < 2:
    return keys
  return [k for k in keys if not all(k in o and o[k] == overrides[0].get(k) for o in overrides)]


def read_status(sweep_dir: str, name: str) -> Optional[dict]:
  """A trial's `DIR/status/NAME.json` (written by `instruct.sweeps`), or None before its
  first run ended."""
  path = paths.join(sweep_dir, "status", f"{name}.json")
  return json.loads(paths.read_text(path)) if paths.exists(path) else None


def _state(sweep_dir: str, name: str) -> tuple[str, dict]:
  status = read_status(sweep_dir, name) or {}
  state = status.get("status")
  if state not in ("done", "failed"):
    claimed = paths.exists(paths.join(sweep_dir, "claims", name))
    state = "running" if claimed else ("retrying" if status else "pending")
  return state, status


def rows(sweep_dir: str, trials, metrics: dict[str, str]) -> list[dict[str, Any]]:
  """One row per trial, ranked (trials without a value of the ranking metric last)."""
  metrics = metrics or DEFAULT_METRICS
  out = []
  for trial in trials:
    state, status = _state(sweep_dir, trial.name)
    records = _metric_records(paths.join(sweep_dir, "trials", trial.name))
    out.append({
        "name": trial.name, "overrides": trial.overrides, "status": state,
        "runs": status.get("runs", 0), "failures": status.get("failures", 0),
        "steps": records[-1]["step"] if records else 0,
        "metrics": {k: _values(records, k, d) for k, d in metrics.items()},
        "wall_seconds": status.get("wall_seconds"), "error": (status.get("errors") or [None])[-1],
        "workdir": paths.join(sweep_dir, "trials", trial.name)
    })
  key, direction = next(iter(metrics.items()))
  sign = 1.0 if direction == "min" else -1.0
  ranked = sorted(
      out, key=lambda r: (r["metrics"][key]["best"] is None, sign *
                          (r["metrics"][key]["best"] or 0.0)))
  for rank, row in enumerate(ranked, 1):
    row["rank"] = rank if row["metrics"][key]["best"] is not None else None
  return ranked


def progress(ranked: list[dict]) -> tuple[str, dict[str, int]]:
  """'3/4 done, 1 running, 0 failed, 0 pending; ETA 1m 40s' and the counts."""
  counts = {s: 0 for s in ("done", "running", "retrying", "failed", "pending")}
  for row in ranked:
    counts[row["status"]] += 1
  walls = [r["wall_seconds"] for r in ranked if r["status"] == "done" and r["wall_seconds"]]
  left = counts["pending"] + counts["retrying"] + 0.5 * counts["running"]
  line = (f"{counts['done']}/{len(ranked)} done, {counts['running']} running, "
          f"{counts['failed']} failed, {counts['pending'] + counts['retrying']} pending")
  if walls and left:
    eta = sum(walls) / len(walls) * left / max(1, counts["running"])
    line += f"; ETA {int(eta // 60)}m {int(eta % 60)}s"
  return line, counts


def _fmt(value) -> str:
  if value is None:
    return "-"
  return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(config: str, base: list[str], ranked: list[dict], metrics: dict[str, str], line: str,
             plots: list[str]) -> str:
  metrics = metrics or DEFAULT_METRICS
  key, direction = next(iter(metrics.items()))
  head = ["rank", "trial", "status", "runs", "steps"]
  for k in metrics:
    head += [f"{k} final", f"{k} {'min' if metrics[k] == 'min' else 'max'}"]
  head += ["wall (s)"]
  lines = [
      f"# Sweep `{config}`", "", f"Flags of every trial: `{' '.join(base) or '(none)'}`", "",
      f"Progress: {line} ({time.strftime('%Y-%m-%d %H:%M:%S %Z')}).", "",
      f"Ranked by the {'lowest' if direction == 'min' else 'highest'} `{key}` of each run.", "",
      "| " + " | ".join(head) + " |", "|" + "---|" * len(head)
  ]
  for row in ranked:
    cells = [
        _fmt(row["rank"]), f"`{row['name']}`", row["status"],
        str(row["runs"]),
        str(row["steps"])
    ]
    for k in metrics:
      value = row["metrics"][k]
      interval = value.get("interval")
      cells += [
          _fmt(value["final"]),
          _fmt(value["best"]) + (f" [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else "")
      ]
    wall = row["wall_seconds"]
    cells.append(f"{wall:.0f}" if wall else "-")
    lines.append("| " + " | ".join(cells) + " |")
  best = ranked[0] if ranked and ranked[0]["rank"] == 1 else None
  if best:
    lines += [
        "", f"Best: `{best['workdir']}` ({key} {_fmt(best['metrics'][key]['best'])}; "
        f"overrides {json.dumps(best['overrides'])})."
    ]
  failed = [r for r in ranked if r["error"] and r["status"] != "done"]
  if failed:
    lines += ["", "Errors (last attempt):", ""]
    lines += [f"- `{r['name']}` ({r['status']}): {r['error']}" for r in failed]
  lines += [""] + [f"![{p}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def plot(sweep_dir: str, ranked: list[dict], metrics: dict[str, str]) -> list[str]:
  """`sweep_<key>.png` per swept key (`figure`). Returns the file names."""
  metrics = metrics or DEFAULT_METRICS
  keys = varied_keys([r["overrides"] for r in ranked])
  if not any(r["metrics"][m]["best"] is not None for r in ranked for m in metrics):
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  names = []
  for key in keys:
    fig = figure(ranked, metrics, key)
    name = "sweep_" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".png"
    with tempfile.TemporaryDirectory() as tmp:
      fig.savefig(os.path.join(tmp, name), dpi=100)
      paths.copy_file(os.path.join(tmp, name), paths.join(sweep_dir, name))
    plt.close(fig)
    names.append(name)
  return names


def figure(ranked: list[dict], metrics: dict[str, str], key: str):
  """A panel per metric: its best value over each trial's run (with the interval the run
  gives, if any) against the trial's value of `key`, and the mean over trials sharing a
  value as a line; a log axis when positive values span a factor of 5 or more."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  metrics = metrics or DEFAULT_METRICS
  columns = min(len(metrics), 2)
  rows_ = math.ceil(len(metrics) / columns)
  fig, axes = plt.subplots(rows_, columns, figsize=(4.8 * columns, 3.4 * rows_), squeeze=False)
  for ax, (metric, direction) in zip(axes.flat, metrics.items()):
    _panel(ax, key, metric, direction,
           [r for r in ranked if r["metrics"][metric]["best"] is not None])
  for ax in list(axes.flat)[len(metrics):]:
    ax.set_visible(False)
  fig.tight_layout()
  return fig


def _panel(ax, key: str, metric: str, direction: str, points: list[dict]) -> None:
  xs_raw = [r["overrides"].get(key) for r in points]
  numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_raw)
  levels = None if numeric else sorted(set(map(str, xs_raw)))
  xs = xs_raw if numeric else [levels.index(str(x)) for x in xs_raw]
  values = [r["metrics"][metric] for r in points]
  ys = [v["best"] for v in values]
  ax.scatter(xs, ys, alpha=0.7)
  for x, v in zip(xs, values):
    if v.get("interval"):
      ax.plot([x, x], v["interval"], color="C0", alpha=0.5, lw=1.5)
  by_x: dict[Any, list[float]] = {}
  for x, y in zip(xs, ys):
    by_x.setdefault(x, []).append(y)
  mean_x = sorted(by_x)
  if mean_x:
    ax.plot(mean_x, [sum(by_x[x]) / len(by_x[x]) for x in mean_x], "-", label="mean")
  if numeric and mean_x and min(mean_x) > 0 and max(mean_x) / min(mean_x) >= 5:
    ax.set_xscale("log")
  if not numeric:
    ax.set_xticks(range(len(levels)), levels, rotation=20)
  ax.set_xlabel(key)
  ax.set_ylabel(f"{metric} ({direction} over the run)", fontsize=8)
  ax.grid(alpha=0.3)


def write(sweep_dir: str, trials, metrics: dict[str, str]) -> dict[str, Any]:
  """Writes sweep.md, sweep.json and the plots; returns the summary (as in sweep.json)."""
  saved = json.loads(paths.read_text(paths.join(sweep_dir, "trials.json")))
  ranked = rows(sweep_dir, trials, metrics)
  line, counts = progress(ranked)
  plots = plot(sweep_dir, ranked, metrics)
  best = ranked[0]["workdir"] if ranked and ranked[0]["rank"] == 1 else None
  summary = {
      "config": saved["config"], "flags": saved["flags"], "metrics": metrics or DEFAULT_METRICS,
      "progress": line, "counts": counts, "best": best, "trials": ranked, "plots": plots
  }
  paths.write_text_atomic(paths.join(sweep_dir, "sweep.json"), json.dumps(summary, indent=1))
  paths.write_text_atomic(paths.join(sweep_dir, "sweep.md"),
                          markdown(saved["config"], saved["flags"], ranked, metrics, line, plots))
  return summary


def load(sweep_dir: str) -> dict[str, Any]:
  """`DIR/sweep.json` (for notebooks): the ranked trials with their workdirs."""
  return json.loads(paths.read_text(paths.join(sweep_dir, "sweep.json")))
