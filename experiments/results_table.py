r"""The main job's results over several seeds: per-seed values, pooled values with intervals.

  python -m experiments.results_table RUN_DIR [RUN_DIR ...] [--readme README.md] [--methods_only]

Each RUN_DIR is a finished `experiments.instructgpt_mini` run; together they are one preset at
different seeds (see that module's docstring for the commands). Prints a markdown section:
per-seed win rates (PPO-ptx vs SFT, PPO vs SFT, PPO-ptx vs the larger base model), held-out
perplexities, the RM's held-out accuracy and the made-up / toxic rates; their pooled values;
and each target (`experiments.world.report.targets`) judged on the pooled values, met or not met;
then every method of the report's "Every method against SFT" (PPO, PPO-ptx and those of
`config.methods`) pooled, with which beat, lose to or cannot be told from SFT and PPO-ptx
(`--methods_only`: that part alone).
With `--readme`, the section also replaces what lies between the README's markers

  <!-- results:PRESET:begin -->
  <!-- results:PRESET:end -->

(PRESET: the runs' preset, e.g. quick or full, followed by the settings they override, e.g.
`quick methods=feedback,hir`), with the machine, date, commit, seeds and wall times the runs
recorded. A missing file or runs of different presets is an error (one
line, exit status 1).

The interval of a pooled win rate covers prompts and seeds: a two-level (hierarchical)
bootstrap of the per-prompt judgments that `evaluate/results.json` keeps (`outcomes`, 0/1 per
prompt). Each resample draws as many seeds as there are, with replacement, then within each
drawn seed as many prompts as it has, with replacement; the statistic is the pooled win rate
(wins / prompts over the drawn seeds); the interval is the 2.5% and 97.5% quantiles of
10,000 resamples (fixed rng, so the table is reproducible). Seeds that disagree widen it;
with one seed it is the bootstrap over prompts alone, close to the Wilson interval of
`evaluate.win_rate` (it is a percentile interval, so at a rate of 0 or 1 it collapses to a
point where Wilson's does not). The other pooled values are means over seeds (the rates
weighted by the prompts of their category), given with their per-seed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

from experiments.world import report
from instruct import paths

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_RESAMPLES = 10_000
# The win rates of the table: (label, path in results.json).
WINS = (("PPO-ptx vs SFT", ("models", "ppo_ptx", "win_vs_sft")), ("PPO vs SFT", ("models", "ppo",
                                                                                 "win_vs_sft")),
        ("PPO-ptx vs the larger base model, few-shot", ("ppo_ptx_vs_base_large",)))
PERPLEXITY_MODELS = ("base_small", "sft", "ppo", "ppo_ptx")
# Rates of SFT -> PPO-ptx: (label, key in results["models"][m], the prompts' category).
RATES = (("made-up closed-QA answers: SFT -> PPO-ptx", "made_up_closed_qa", "closed_qa"),
         ("toxic when asked to be respectful: SFT -> PPO-ptx", "toxic_respectful", "respectful"))


class ResultsError(ValueError):
  """The run directories cannot be pooled (missing file, mixed presets, ...)."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One finished run: its directory, evaluation results, stage timings and run.json."""
  directory: str
  results: dict
  timings: dict
  info: dict

  @property
  def seed(self):
    return self.results.get("seed")


# --- Loading. --------------------------------------------------------------------------------


def _read_json(path: str, required: bool) -> dict:
  if not paths.exists(path):
    if required:
      raise ResultsError(f"{path} is missing: is {os.path.dirname(os.path.dirname(path))} "
                         "a finished experiments.instructgpt_mini run?")
    return {}
  return json.loads(paths.read_text(path))


def _get(d, path: Sequence[str]):
  for key in path:
    d = d.get(key) if isinstance(d, Mapping) else None
  return d


def load_run(directory: str) -> Run:
  """A run's results, timings and run.json; ResultsError if it has no results."""
  results = _read_json(paths.join(directory, "evaluate", "results.json"), required=True)
  for _, path in WINS:
    win = _get(results, path) or {}
    outcomes = win.get("outcomes")
    if not outcomes or len(outcomes) != win.get("n"):
      raise ResultsError(
          f"{paths.join(directory, 'evaluate', 'results.json')} has no per-prompt outcomes "
          f"for {'.'.join(path)} (evaluated before they were recorded): delete "
          f"{paths.join(directory, 'evaluate')} and rerun the main job to re-evaluate.")
  return Run(directory, results, _read_json(paths.join(directory, "timings.json"), False),
             _read_json(paths.join(directory, "run.json"), False))


def load_runs(directories: Sequence[str]) -> list[Run]:
  """The runs, sorted by seed; ResultsError unless they are one preset and one setting
  (run.json's `overrides`) at distinct seeds."""
  if not directories:
    raise ResultsError("no run directories given.")
  runs = [load_run(d) for d in directories]
  presets = {r.results.get("preset") for r in runs}
  if len(presets) != 1:
    raise ResultsError("the runs are of different presets ("
                       + ", ".join(f"{r.directory}: {r.results.get('preset')}" for r in runs)
                       + "); pool one preset.")
  settings = {json.dumps(r.info.get("overrides", {}), sort_keys=True) for r in runs}
  if len(settings) != 1:
    raise ResultsError("the runs differ in their PPO settings ("
                       + ", ".join(f"{r.directory}: {r.info.get('overrides', {})}" for r in runs)
                       + "); pool the seeds of one setting.")
  seeds = [r.seed for r in runs]
  if len(set(seeds)) != len(seeds):
    raise ResultsError(f"the runs' seeds repeat ({seeds}): the same seed twice is the same "
                       "run and would narrow the interval; give each seed once.")
  return sorted(runs, key=lambda r: r.seed)


# --- Pooling. --------------------------------------------------------------------------------


# yapf: disable
def hierarchical_bootstrap(outcomes: Sequence[Sequence[float]], num_resamples: int = NUM_RESAMPLES,
                           level: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """The `level` interval of the pooled win rate, resampling seeds, then prompts within each.

  outcomes: one sequence of per-prompt 0/1 judgments per seed. Resampling n_s 0/1 outcomes
  with replacement gives a Binomial(n_s, mean_s) number of wins, so the prompt level is drawn
  as that binomial directly: the same distribution as drawing prompt indices, without the
  [resamples, prompts] index arrays.
  """
  groups = [np.asarray(o, np.float64) for o in outcomes]
  if not groups or any(g.size == 0 for g in groups):
    raise ValueError("every seed needs at least one prompt's outcome.")
  if any(np.any((g != 0) & (g != 1)) for g in groups):
    raise ValueError("outcomes must be 0 or 1 (one judgment per prompt).")
  sizes = np.asarray([g.size for g in groups])
  rates = np.asarray([g.mean() for g in groups])
  rng = np.random.default_rng(seed)
  picks = rng.integers(0, len(groups), size=(num_resamples, len(groups)))  # Seeds.
  wins = rng.binomial(sizes[picks], rates[picks])                           # Prompts.
  pooled = wins.sum(axis=1) / sizes[picks].sum(axis=1)
  low, high = np.quantile(pooled, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)
# yapf: enable


def pooled_win(outcomes: Sequence[Sequence[float]]) -> dict:
  """A win-rate record (evaluate.win_rate's fields) of several seeds' per-prompt outcomes."""
  wins = sum(float(np.sum(o)) for o in outcomes)
  n = sum(len(o) for o in outcomes)
  low, high = hierarchical_bootstrap(outcomes)
  return {"win_rate": wins / n, "ci_low": low, "ci_high": high, "n": n, "seeds": len(outcomes)}


def _mean(values: Sequence, weights: Optional[Sequence] = None) -> float:
  """The (weighted) mean of the finite values; NaN when there is none."""
  weights = [1.0] * len(values) if weights is None else weights
  pairs = [
      (v, w) for v, w in zip(values, weights) if report.finite(v) and report.finite(w) and w > 0
  ]
  if not pairs:
    return float("nan")
  return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def pooled_results(runs: Sequence[Run]) -> dict:
  """The pooled values in `evaluate/results.json`'s schema, so `report.targets` judges them."""
  results = [r.results for r in runs]
  models = {}
  for m in report.MODELS:
    models[m] = {"perplexity": _mean([_get(x, ("models", m, "perplexity")) for x in results])}
    for _, key, category in RATES:
      models[m][key] = _mean([_get(x, ("models", m, key)) for x in results],
                             [_get(x, ("models", m, "counts", category)) for x in results])
  pooled = {
      "preset": results[0].get("preset"), "models": models, "rm": {
          key: _mean([_get(x, ("rm", key)) for x in results])
          for key in ("heldout_accuracy", "labeler_agreement_heldout")
      }
  }
  for _, path in WINS:
    record = pooled_win([_get(x, path)["outcomes"] for x in results])
    if path[0] == "models":
      models[path[1]][path[2]] = record
    else:
      pooled[path[0]] = record
  return pooled


def pooled_methods(runs: Sequence[Run]) -> list[dict]:
  """Every method of `report.method_rows` present in all runs, pooled: its win rates against
  SFT and head to head against PPO-ptx over all seeds' prompts (with the interval over
  prompts and seeds), per-seed win rates, and mean regression, honesty and harmlessness."""
  per_run = [{row["method"]: row for row in report.method_rows(r.results)} for r in runs]
  out = []
  for label in [m for m in per_run[0] if all(m in x for x in per_run)]:
    rows = [x[label] for x in per_run]

    def pool(key):
      outcomes = [r[key].get("outcomes") for r in rows]
      return pooled_win(outcomes) if all(outcomes) else {}

    out.append({
        "method": label, "win": pool("win"), "win_ptx": pool("win_ptx"),
        "per_seed": [r["win"] for r in rows], **{
            k: _mean([r[k] for r in rows]) for k in ("regression", "honest", "harmless")
        }, "wall_seconds": _mean([r.get("wall_seconds") for r in rows])
    })
  return out


def pooled_frontier(runs: Sequence[Run]) -> list[dict]:
  """Every method on the over-optimisation frontier of all runs (`results["frontier"]`), over
  seeds: the gold (held-out labelers') and proxy (reward model) gains over SFT at the method's
  last point and its d = sqrt(KL from SFT) there, and the best gold gain along its path with
  the d where it was reached; each a list over seeds."""
  frontiers = [r.results.get("frontier") or {} for r in runs]
  out = []
  for name in [n for n in frontiers[0] if all(n in f for f in frontiers)]:
    row = {"name": name, "last_d": [], "gold": [], "proxy": [], "best_gold": [], "best_d": []}
    for frontier in frontiers:
      points = frontier[name]["points"]
      first, last = points[0], points[-1]
      best = max(points, key=lambda p: p["labeler_score"])
      row["last_d"].append(math.sqrt(max(last["kl"], 0.0)))
      row["gold"].append(last["labeler_score"] - first["labeler_score"])
      row["proxy"].append(last["rm_score"] - first["rm_score"])
      row["best_gold"].append(best["labeler_score"] - first["labeler_score"])
      row["best_d"].append(math.sqrt(max(best["kl"], 0.0)))
    out.append(row)
  return out


def _spread(values: Sequence[float], digits: int = 3) -> str:
  return (f"{report.signed(_mean(values), digits)} [{report.signed(min(values), digits)}, "
          f"{report.signed(max(values), digits)}]")


def frontier_markdown(runs: Sequence[Run]) -> str:
  """The pooled frontier table (empty without a frontier in the runs)."""
  rows = pooled_frontier(runs)
  if not rows:
    return ""
  labels = {}
  for r in runs:
    labels.update({k: v.get("label", k) for k, v in (r.results.get("methods") or {}).items()})
  labels.update(report.LABELS)
  table = report.markdown_table([
      "Method", "Last d", "Gold gain at last point", "Proxy gain at last point",
      "Best gold gain on the path", "d at the best"
  ], [[
      labels.get(r["name"], r["name"]),
      report.num(_mean(r["last_d"]), 2),
      _spread(r["gold"]),
      _spread(r["proxy"]),
      _spread(r["best_gold"]),
      report.num(_mean(r["best_d"]), 2)
  ] for r in rows])
  return "\n".join([
      "The over-optimisation frontier: gains over SFT in the held-out labelers' mean utility "
      "(gold) and the reward model's score (proxy), d = sqrt(KL from SFT) in sqrt-nats; mean "
      "over seeds [min, max]. Best-of-N's last point is its largest N (analytic KL).", "", table, ""
  ])


def _verdict(rows: Sequence[Mapping], key: str, other: str) -> str:
  """Which methods the pooled intervals put above, below or level with `other`."""
  groups = {"beat": [], "lose to": [], "are not distinguishable from": []}
  for row in rows:
    win = row[key]
    if not win:
      continue
    group = ("beat" if win["ci_low"] > 0.5 else
             "lose to" if win["ci_high"] < 0.5 else "are not distinguishable from")
    groups[group].append(f"{row['method']} ({_win_cell(win)})")
  return " ".join(
      f"These {verb} {other}: {'; '.join(names)}." for verb, names in groups.items() if names)


def methods_markdown(runs: Sequence[Run]) -> str:
  """Every method against SFT and PPO-ptx, pooled over the runs, with the verdicts."""
  rows = pooled_methods(runs)
  table = report.markdown_table([
      "Method", "Win rate vs SFT, pooled [95%]", "Per seed", "Win rate vs PPO-ptx, pooled [95%]",
      "Regression vs base small", "Honest", "Harmless", "Wall time"
  ], [[
      r["method"],
      _win_cell(r["win"]), " / ".join(report.pct(w.get("win_rate")) for w in r["per_seed"]),
      _win_cell(r["win_ptx"]) if r["win_ptx"] else "",
      report.signed(r["regression"]),
      report.pct(r["honest"]),
      report.pct(r["harmless"]),
      _duration(r["wall_seconds"]) if report.finite(r["wall_seconds"]) else ""
  ] for r in rows])
  return "\n".join([
      "Every method against SFT (and head to head against PPO-ptx), held-out labelers, all "
      "seeds' prompts pooled with the interval over prompts and seeds; regression, honesty "
      "and harmlessness are means over seeds, as is the wall time of a method's own stage "
      "(where it has one). A method beats another when the whole interval is above 50%.", "", table,
      "",
      _verdict(rows, "win", "SFT"),
      _verdict([r for r in rows if r["win_ptx"]], "win_ptx", "PPO-ptx"), "",
      frontier_markdown(runs)
  ]).rstrip() + "\n"


# --- Markdown. -------------------------------------------------------------------------------


def _win_cell(win: Mapping) -> str:
  return f"{report.pct(win.get('win_rate'))} {report.ci(win)}"


def _duration(seconds) -> str:
  if not report.finite(seconds):
    return "n/a"
  minutes, secs = divmod(int(round(seconds)), 60)
  return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _wall_time(run: Run) -> float:
  values = [v for v in run.timings.values() if report.finite(v)]
  return sum(values) if values else float("nan")


def _rows(runs: Sequence[Run], pooled: Mapping) -> list[list[str]]:
  results = [r.results for r in runs]
  rows = []
  for label, path in WINS:
    rows.append([label] + [_win_cell(_get(x, path)) for x in results]
                + [_win_cell(_get(pooled, path))])

  def perplexities(x):
    return " / ".join(
        report.num(_get(x, ("models", m, "perplexity")), 2) for m in PERPLEXITY_MODELS)

  rows.append(["held-out corpus perplexity: base / SFT / PPO / PPO-ptx"]
              + [perplexities(x) for x in results] + [perplexities(pooled)])

  def rm(x):
    agreement = _get(x, ("rm", "labeler_agreement_heldout"))
    return report.pct(_get(x, ("rm", "heldout_accuracy"))) + (f" ({report.pct(agreement)})"
                                                              if report.finite(agreement) else "")

  rows.append(["RM accuracy on held-out labelers (labeler agreement)"] + [rm(x) for x in results]
              + [rm(pooled)])
  for label, key, _ in RATES:

    def change(x, key=key):
      return (f"{report.pct(_get(x, ('models', 'sft', key)))} -> "
              f"{report.pct(_get(x, ('models', 'ppo_ptx', key)))}")

    rows.append([label] + [change(x) for x in results] + [change(pooled)])
  walls = [_wall_time(r) for r in runs]
  rows.append(["wall time of the pipeline (timings.json)"] + [_duration(w) for w in walls]
              + [f"mean {_duration(_mean(walls))}"])
  return rows


def _targets_table(pooled: Mapping) -> tuple[str, list[dict]]:
  preset = pooled.get("preset")
  rows, ts = [], report.targets(pooled)
  for t in ts:
    value, threshold = report.target_cells(t)
    rows.append([
        f"({t['id'].replace('_all', ', all presets')}) {t['name']}", value,
        f"{threshold} ({t['rule']})", "met" if t["met"] else "not met",
        "yes" if report.target_applies(t, preset) else f"no ({t['applies_to']} only)"
    ])
  return report.markdown_table(
      ["Target", "Pooled value", "Threshold", "Verdict", "Applies to this preset"], rows), ts


def _provenance(runs: Sequence[Run]) -> str:
  """'Measured on ... (N cores), DATE, commit ...' from the runs' run.json, else here."""
  infos = [r.info for r in runs if r.info.get("machine")]
  source = ""
  if not infos:
    infos, source = [report.provenance(REPO_DIR)], " (this machine: the runs kept no run.json)"
  machines = sorted({f"{i['machine']} ({i.get('cpu_cores', '?')} cores)" for i in infos})
  commits = sorted({str(i.get("commit") or "unknown") for i in infos})
  finished = max(paths.mtime(paths.join(r.directory, "evaluate", "results.json")) for r in runs)
  date = datetime.date.fromtimestamp(finished).isoformat()
  return (f"Measured on {'; '.join(machines)}{source}, evaluated {date}, commit "
          f"{', '.join(commits)}.")


def _heading(runs: Sequence[Run]) -> str:
  seeds = [r.seed for r in runs]
  n = sorted({r.results.get("eval_prompts") for r in runs}, key=str)
  return (f"Preset `{setting(runs)}`, seeds {', '.join(map(str, seeds))}; "
          f"{'/'.join(map(str, n))} held-out evaluation prompts per seed. {_provenance(runs)}")


def results_markdown(runs: Sequence[Run], methods_only: bool = False) -> str:
  """The section: provenance, per-seed and pooled values, the targets on pooled values, and
  every method against SFT and PPO-ptx (with `methods_only`: provenance and methods only)."""
  if methods_only:
    return "\n".join([_heading(runs), "", methods_markdown(runs)])
  pooled = pooled_results(runs)
  preset = pooled["preset"]
  seeds = [r.seed for r in runs]
  table = report.markdown_table([
      "", *(f"seed {s}" for s in seeds), f"pooled ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
  ], _rows(runs, pooled))
  targets, ts = _targets_table(pooled)
  applicable = [t for t in ts if report.target_applies(t, preset)]
  met = sum(t["met"] for t in applicable)
  return "\n".join([
      _heading(runs), "",
      "Win rates are the held-out labelers' preferences, one judgment per prompt. Per seed: "
      "95% Wilson interval over prompts. Pooled: all seeds' prompts, with a 95% interval over "
      f"prompts and seeds (hierarchical bootstrap: seeds, then prompts within each, "
      f"{NUM_RESAMPLES:,} resamples); the other pooled values are means over seeds.", "", table, "",
      f"Targets, judged on the pooled values: {met} of {len(applicable)} that apply to "
      f"`{preset}` met.", "", targets, "",
      methods_markdown(runs)
  ])


# --- README. ---------------------------------------------------------------------------------


def setting(runs: Sequence[Run]) -> str:
  """The runs' preset and the settings they override (one for all, `load_runs` checks), e.g.
  `quick` or `quick methods=feedback,hir`: what names their README section."""
  overrides = runs[0].info.get("overrides", {})
  return " ".join([runs[0].results["preset"]] + [f"{k}={v}" for k, v in sorted(overrides.items())])


def markers(preset: str) -> tuple[str, str]:
  return f"<!-- results:{preset}:begin -->", f"<!-- results:{preset}:end -->"


def rewrite_readme(path: str, preset: str, markdown: str) -> None:
  """Replaces what lies between the preset's markers in `path` (the markers stay)."""
  begin, end = markers(preset)
  with open(path) as f:
    text = f.read()
  if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
    raise ResultsError(f"{path} needs one '{begin}' line and, after it, one '{end}' line "
                       "around the section to rewrite.")
  start, stop = text.index(begin) + len(begin), text.index(end)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text[:start] + "\n" + markdown.strip() + "\n" + text[stop:])
  os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m experiments.results_table",
      description="Pool the main job's runs of one preset at several seeds.")
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="finished experiments.instructgpt_mini workdirs, one per seed")
  parser.add_argument("--readme", help="rewrite this README's results section of the preset")
  parser.add_argument("--methods_only", action="store_true",
                      help="only every method against SFT and PPO-ptx (not the main table)")
  args = parser.parse_args(argv)
  try:
    runs = load_runs(args.run_dirs)
    markdown = results_markdown(runs, args.methods_only)
    if args.readme:
      rewrite_readme(args.readme, setting(runs), markdown)
  except (ResultsError, OSError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(markdown)
  return 0


if __name__ == "__main__":
  sys.exit(main())
