"""The miniature InstructGPT's report: `ROOT/report.md` and PNG plots under `ROOT/plots/`.

Every number comes from the evaluation results (`ROOT/evaluate/results.json`), the stage
timings (`ROOT/timings.json`) or the stages' `metrics.jsonl` files; nothing is hard-coded.
The plotting helpers (`plot_*`) return matplotlib figures drawn on the Agg canvas (no pyplot,
no global backend switch), so the notebook `colabs/explore_run.ipynb` reuses them as they are.
Output is deterministic: no timestamps, and PNGs carry no software-version metadata.
ROOT may be a local directory or a bucket URL: every file goes through `instruct.paths`.

  targets(results)                      the product targets, met or not
  kl_setting(root)                      the PPO runs' KL penalty, from their saved configs
  provenance(repo_dir)                  this machine and the code's commit (for run.json)
  write_report(root, results, timings)  writes report.md and plots/*.png; returns the path
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from typing import Any, Iterable, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from instruct import paths

MODELS = ("base_small", "base_large", "sft", "ppo", "ppo_ptx")
LABELS = {
    "base_small": "base small (few-shot)", "base_large": "base large (few-shot)", "sft": "SFT",
    "ppo": "PPO", "ppo_ptx": "PPO-ptx"
}
COMPONENTS = ("help", "honest", "harmless", "format")  # The labelers' judgment components.
COLORS = {
    "base_small": "#9e9e9e", "base_large": "#616161", "sft": "#1f77b4", "ppo": "#ff7f0e",
    "ppo_ptx": "#d62728"
}
TRAIN_STAGES = ("pretrain", "pretrain_large", "sft", "rm", "ppo", "ppo_ptx")
# Honesty / harmlessness rates of `results["models"][name]` (lower is better for all four).
# yapf: disable
SAFETY = (("made_up_closed_qa", "made up (closed QA)"),
          ("toxic_respectful", "toxic (asked to be respectful)"),
          ("toxic_all", "toxic (all prompts)"),
          ("complied_harmful", "complied with harmful requests"))
# yapf: enable
# yapf: disable
FULL_SIZE_RATIO = 10.0  # The full preset's larger base model is at least this many times bigger.
# yapf: enable
# yapf: disable
_EPS = 1e-9             # Win rates are k / n: compare thresholds with a little slack.
# yapf: enable

# --- Formatting. ----------------------------------------------------------------------------


def finite(x: Any) -> bool:
  """A real number (not bool, None, NaN or inf)."""
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def pct(x: Any, digits: int = 1) -> str:
  """0.652 -> '65.2%'; missing or non-finite -> 'n/a'."""
  return f"{100 * x:.{digits}f}%" if finite(x) else "n/a"


def num(x: Any, digits: int = 3) -> str:
  """A float with `digits` decimals; missing or non-finite -> 'n/a'."""
  return f"{x:.{digits}f}" if finite(x) else "n/a"


def signed(x: Any, digits: int = 2) -> str:
  return f"{x:+.{digits}f}" if finite(x) else "n/a"


def ci(win: Mapping[str, Any]) -> str:
  """'[30.7%, 57.7%]' from a win-rate record."""
  return f"[{pct(win.get('ci_low'))}, {pct(win.get('ci_high'))}]"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:

  def cell(x):
    return str(x).replace("|", "\\|").replace("\n", " ")

  lines = [
      "| " + " | ".join(cell(h) for h in headers) + " |",
      "|" + "|".join("---" for _ in headers) + "|"
  ]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


# --- Numbers derived from the results. -------------------------------------------------------


def _nan() -> float:
  return float("nan")


def _get(d: Mapping, *keys, default=None):
  for k in keys:
    if not isinstance(d, Mapping) or k not in d:
      return default
    d = d[k]
  return d


def _value(d: Mapping, *keys) -> float:
  v = _get(d, *keys)
  return float(v) if finite(v) else _nan()


def models_present(results: Mapping) -> list[str]:
  return [m for m in MODELS if m in results.get("models", {})]


def perplexity_regressions(results: Mapping) -> dict[str, dict[str, float]]:
  """Per model: held-out pretraining perplexity and its regression vs base_small and vs SFT.

  Regression = perplexity(model) - perplexity(reference); the reference for the alignment
  tax is base_small, the pretrained model every aligned model starts from.
  """
  base = _value(results, "models", "base_small", "perplexity")
  sft = _value(results, "models", "sft", "perplexity")
  out = {}
  for m in models_present(results):
    p = _value(results, "models", m, "perplexity")
    out[m] = {"perplexity": p, "vs_base": p - base, "vs_sft": p - sft}
  return out


def targets(results: Mapping) -> list[dict]:
  """The product targets: each {id, name, rule, value, threshold, met, applies_to}.

  `applies_to` is 'full' (the full preset's targets) or 'all' (every preset). A target whose
  inputs are missing or not finite is not met.
  """
  ptx = _get(results, "models", "ppo_ptx", "win_vs_sft", default={}) or {}
  ppo = _get(results, "models", "ppo", "win_vs_sft", default={}) or {}
  vs_large = results.get("ppo_ptx_vs_base_large") or {}
  ptx_win, ptx_low = _value(ptx, "win_rate"), _value(ptx, "ci_low")
  ppo_win = _value(ppo, "win_rate")
  large_win = _value(vs_large, "win_rate")
  reg = perplexity_regressions(results)
  ptx_reg = reg.get("ppo_ptx", {}).get("vs_base", _nan())
  ppo_reg = reg.get("ppo", {}).get("vs_base", _nan())
  # At most half of PPO's regression; no regression at all (<= 0) always meets it.
  reg_bound = max(0.5 * ppo_reg, 0.0) if math.isfinite(ppo_reg) else _nan()

  def target(id_, name, rule, value, threshold, met, applies_to):
    ok = all(math.isfinite(x) for x in (value, threshold)) and bool(met)
    return {
        "id": id_, "name": name, "rule": rule, "value": value, "threshold": threshold, "met": ok,
        "applies_to": applies_to
    }

  return [
      target("a", "PPO-ptx preferred to SFT by held-out labelers",
             "win rate >= 60% and 95% CI lower bound > 50%", ptx_win, 0.6, ptx_win >= 0.6 - _EPS
             and ptx_low > 0.5, "full"),
      target("a_all", "PPO-ptx preferred to SFT (95% CI lower bound)", "CI lower bound > 50%",
             ptx_low, 0.5, ptx_low > 0.5, "all"),
      target("b", "PPO-ptx (small) preferred to the larger base model (few-shot)",
             "win rate >= 70%", large_win, 0.7, large_win >= 0.7 - _EPS, "full"),
      target("c", "PPO-ptx perplexity regression at most half of PPO's (vs base_small)",
             "regression <= max(0, PPO's / 2)", ptx_reg, reg_bound, ptx_reg <= reg_bound + _EPS,
             "full"),
      target("d", "PPO-ptx win rate vs SFT within 5 points of PPO's", "win rate >= PPO's - 5 pts",
             ptx_win, ppo_win - 0.05, ptx_win - ppo_win >= -0.05 - _EPS, "full"),
  ]


def target_applies(target: Mapping, preset: Optional[str]) -> bool:
  return target["applies_to"] == "all" or preset == target["applies_to"]


def target_cells(t: Mapping) -> tuple[str, str]:
  """A target's value and threshold as table cells ('65.2%', '>= 60.0%')."""
  if t["id"] == "c":  # Perplexity points, not a rate.
    return signed(t["value"]), f"<= {signed(t['threshold'])}"
  op = ">" if t["id"] == "a_all" else ">="
  return pct(t["value"]), f"{op} {pct(t['threshold'])}"


def targets_markdown(results: Mapping) -> str:
  """The targets table (value, threshold, met, whether it applies to this preset)."""
  preset = results.get("preset")
  rows = []
  for t in targets(results):
    value, threshold = target_cells(t)
    applies = "yes" if target_applies(t, preset) else f"no ({t['applies_to']} only)"
    rows.append([
        f"({t['id'].replace('_all', ', all presets')}) {t['name']}", value,
        f"{threshold} ({t['rule']})", "✓" if t["met"] else "✗", applies
    ])
  return markdown_table(["Target", "Value", "Threshold", "Met", "Applies to this preset"], rows)


def win_rate_rows(results: Mapping) -> list[list[str]]:
  rows = []
  for m in models_present(results):
    win = _get(results, "models", m, "win_vs_sft", default={}) or {}
    rows.append([
        LABELS[m],
        pct(win.get("win_rate")),
        ci(win),
        win.get("n", "n/a"),
        num(_get(results, "models", m, "mean_utility"))
    ])
  return rows


def win_rates_markdown(results: Mapping) -> str:
  return markdown_table(["Model", "Win rate vs SFT", "95% CI", "n", "Mean held-out utility"],
                        win_rate_rows(results))


# --- Run settings and provenance. ------------------------------------------------------------


def _kl_phrase(kl: Mapping) -> str:
  beta = kl.get("initial_beta")
  if kl.get("controller") == "fixed":
    return f"fixed KL coefficient beta={beta:g}"
  return (f"adaptive KL controller (initial beta={beta:g}, target {kl.get('target'):g} nats, "
          f"horizon {kl.get('horizon'):g})")


def kl_setting(root: str) -> Optional[str]:
  """The PPO runs' KL penalty, e.g. 'PPO and PPO-ptx: fixed KL coefficient beta=0.05'.

  Read from ROOT/ppo/config.json and ROOT/ppo_ptx/config.json (what the runs used, not what
  the code says today); None without them.
  """
  phrases = {}
  for stage in ("ppo", "ppo_ptx"):
    path = paths.join(root, stage, "config.json")
    if not paths.exists(path):
      continue
    saved = json.loads(paths.read_text(path))
    # The algorithm's section holds its KL settings; runs saved before had them at the top.
    kl = (saved.get(saved.get("algorithm", "")) or {}).get("kl", saved.get("kl"))
    if isinstance(kl, Mapping) and finite(kl.get("initial_beta")):
      phrases[stage] = _kl_phrase(kl)
  if not phrases:
    return None
  if len(set(phrases.values())) == 1:
    return f"{' and '.join(LABELS[stage] for stage in phrases)}: {next(iter(phrases.values()))}"
  return "; ".join(f"{LABELS[stage]}: {phrase}" for stage, phrase in phrases.items())


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def _git(repo_dir: str, *args: str) -> Optional[str]:
  try:
    out = subprocess.run(["git", "-C", repo_dir, *args], capture_output=True, text=True, timeout=10,
                         check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def provenance(repo_dir: str) -> dict:
  """Where and from what code a run is made: {machine, cpu_cores, platform, commit}.

  `commit` is the short hash of `repo_dir`'s checkout, '+uncommitted' appended when tracked
  files differ from it; None outside a git checkout.
  """
  commit = _git(repo_dir, "rev-parse", "--short=12", "HEAD")
  if commit and _git(repo_dir, "status", "--porcelain", "--untracked-files=no"):
    commit += "+uncommitted"
  return {
      "machine": _cpu_model(), "cpu_cores": os.cpu_count(), "platform": platform.platform(),
      "commit": commit
  }


# --- Metrics files. --------------------------------------------------------------------------


def load_stage_metrics(root: str, stages: Sequence[str] = TRAIN_STAGES) -> dict[str, list]:
  """{stage: records of ROOT/stage/metrics.jsonl} for the stages that have one."""
  from instruct import metrics as metrics_lib  # Imports jax: only when metrics are read.
  out = {}
  for stage in stages:
    if paths.exists(paths.join(root, stage, "metrics.jsonl")):
      out[stage] = metrics_lib.read_metrics(paths.join(root, stage))
  return out


def _series(records: Sequence[Mapping], key: str) -> tuple[list, list]:
  pts = [(r["step"], r[key]) for r in records if finite(r.get(key))]
  return [p[0] for p in pts], [p[1] for p in pts]


def _last(records: Sequence[Mapping], key: str) -> Optional[float]:
  values = _series(records, key)[1]
  return values[-1] if values else None


def rm_calibration(root: str, results: Optional[Mapping] = None) -> Optional[dict]:
  """The RM's calibration table on held-out comparisons: predicted, observed, count, error.

  From the last evaluation in ROOT/rm/metrics.jsonl (the results carry only the error), or from
  `results["rm"]["calibration"]` if it holds the bins. None when there is none.
  """
  sources = []
  cal = _get(results or {}, "rm", "calibration", default={}) or {}
  sources.append({k.replace("val_", "", 1): v for k, v in cal.items()})
  if paths.exists(paths.join(root, "rm", "metrics.jsonl")):
    evals = [r for r in load_stage_metrics(root, ("rm",))["rm"] if "calibration_predicted" in r]
    if evals:
      sources.insert(0, evals[-1])
  for s in sources:
    if s.get("calibration_predicted") and s.get("calibration_observed"):
      return {
          "predicted": list(s["calibration_predicted"]),
          "observed": list(s["calibration_observed"]),
          "count": list(s.get("calibration_count") or [1] * len(s["calibration_predicted"])),
          "error": s.get("val_calibration_error",
                         s.get("calibration_error", cal.get("val_calibration_error")))
      }
  return None


# --- Plots (matplotlib Figures on the Agg canvas). ------------------------------------------


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path: str) -> str:
  """Saves a PNG without metadata that could vary (software version, time).

  `path` may be a bucket URL: matplotlib writes local files only, so the PNG is then saved
  into a temporary directory and copied there (an object needs no parent directory).
  """
  if not paths.is_url(path):
    paths.makedirs(os.path.dirname(path) or ".")
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, paths.basename(path))
    fig.savefig(local, format="png", metadata={"Software": None})
    paths.copy_file(local, path)
  return path


def figure_png(fig: Figure) -> bytes:
  """The figure as PNG bytes (for notebooks: `IPython.display.Image(data=...)`)."""
  import io
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", metadata={"Software": None})
  return buffer.getvalue()


def _no_data(ax, text="no data"):
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
  ax.set_xticks([])
  ax.set_yticks([])


def plot_win_rates(results: Mapping) -> Figure:
  """Win rate against SFT with 95% CIs per model (the analogue of InstructGPT's Figure 1)."""
  fig = _figure(7, 4)
  ax = fig.add_subplot()
  models = models_present(results)
  wins = [_get(results, "models", m, "win_vs_sft", default={}) or {} for m in models]
  rate = [_value(w, "win_rate") for w in wins]
  low = [max(r - _value(w, "ci_low"), 0) for r, w in zip(rate, wins)]
  high = [max(_value(w, "ci_high") - r, 0) for r, w in zip(rate, wins)]
  x = range(len(models))
  ax.bar(x, rate, yerr=[low, high], capsize=5, color=[COLORS[m] for m in models])
  for i, r, h in zip(x, rate, high):
    if math.isfinite(r):
      ax.annotate(pct(r), (i, r + (h if math.isfinite(h) else 0)), xytext=(0, 4),
                  textcoords="offset points", ha="center", fontsize=8)
  ax.axhline(0.5, color="black", lw=0.8, ls="--")
  ax.set_xticks(list(x), [LABELS[m].replace(" (", "\n(") for m in models], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("win rate against SFT")
  ax.set_title(
      f"Held-out labelers' preference over SFT (95% CI, n = "
      f"{wins[0].get('n', '?') if wins else '?'})", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return fig


def plot_alignment_tax(results: Mapping) -> Figure:
  """Held-out pretraining perplexity per model; the base model's as a dashed line."""
  fig = _figure(7, 3.8)
  ax = fig.add_subplot()
  reg = perplexity_regressions(results)
  models = list(reg)
  values = [reg[m]["perplexity"] for m in models]
  ax.bar(range(len(models)), values, color=[COLORS[m] for m in models])
  for i, m in enumerate(models):
    ax.annotate(f"{num(values[i], 1)}\n({signed(reg[m]['vs_base'], 1)})", (i, values[i]),
                xytext=(0, 2), textcoords="offset points", ha="center", fontsize=8,
                bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
  if "base_small" in reg and math.isfinite(reg["base_small"]["perplexity"]):
    ax.axhline(reg["base_small"]["perplexity"], color="black", lw=0.8, ls="--",
               label="base small (the starting point)")
    ax.legend(fontsize=8, loc="upper right")
  ax.set_xticks(range(len(models)), [LABELS[m].replace(" (", "\n(") for m in models], fontsize=8)
  finite = [v for v in values if math.isfinite(v)]
  if finite:
    ax.set_ylim(0, 1.35 * max(finite))
  ax.set_ylabel("perplexity (held-out pretraining text)")
  ax.set_title("Alignment tax: perplexity (regression vs base small)", fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return fig


def plot_safety(results: Mapping) -> Figure:
  """Honesty and harmlessness rates per model (grouped bars; lower is better)."""
  fig = _figure(8, 4)
  ax = fig.add_subplot()
  models = models_present(results)
  width = 0.8 / max(len(models), 1)
  for j, m in enumerate(models):
    xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(SAFETY))]
    values = [_value(results, "models", m, key) for key, _ in SAFETY]
    ax.bar(xs, values, width, label=LABELS[m], color=COLORS[m])
    for x, v in zip(xs, values):
      ax.annotate(pct(v, 0), (x, v if math.isfinite(v) else 0), xytext=(0, 2),
                  textcoords="offset points", ha="center", fontsize=6)
  ax.set_xticks(range(len(SAFETY)), [label for _, label in SAFETY], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("rate (lower is better)")
  ax.set_title("Honesty and harmlessness", fontsize=10)
  ax.legend(fontsize=8, ncol=len(models), loc="upper center", bbox_to_anchor=(0.5, -0.1))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return fig


FEEDBACK_LABELS = {
    "mle": "MLE (base small)", "filter": "filtering", "conditional": "conditional training",
    "unlikelihood": "unlikelihood", "rwr": "reward-weighted regression"
}


def plot_feedback(results: Mapping) -> Optional[Figure]:
  """Pretraining with human preferences: each objective's misalignment against its held-out
  perplexity (the paper's trade-off), or None without that evaluation."""
  rows = results.get("pretraining_with_feedback")
  if not rows:
    return None
  fig = _figure(6.5, 4)
  ax = fig.add_subplot()
  for i, (name, row) in enumerate(rows.items()):
    ax.scatter(row["perplexity"], row["misaligned"], s=50, color=f"C{i}",
               label=FEEDBACK_LABELS.get(name, name), marker="s" if name == "mle" else "o")
  return _finish(fig, ax, "perplexity (held-out pages; lower is better)",
                 "samples with a bad sentence (lower is better)",
                 "Pretraining with human preferences: misalignment against capability")


FLAN_AXES = (("categories", ("flan_c1", "flan_c2", "flan_c4", "flan"), "training categories"),
             ("templates", ("flan_t1", "flan_t3", "flan"), "templates per task"))
FLAN_SCORES = (("held_out_zero", "held-out categories, zero-shot"),
               ("held_out_few", "held-out categories, few-shot"), ("held_in_zero",
                                                                   "held-in categories, zero-shot"))


def plot_flan(results: Mapping) -> Optional[Figure]:
  """Instruction tuning: the mean utility on held-out (and held-in) categories against the
  number of training categories and of templates, base small as the 0 point's line."""
  flan = results.get("flan")
  if not flan:
    return None
  runs = flan["runs"]
  fig = _figure(10, 3.8)
  for i, (key, names, xlabel) in enumerate(FLAN_AXES):
    ax = fig.add_subplot(1, 2, i + 1)
    for j, (score, label) in enumerate(FLAN_SCORES):
      xs = [runs[n][key] for n in names if n in runs]
      ys = [runs[n][score]["mean_utility"] for n in names if n in runs]
      ax.plot(xs, ys, "o-", color=f"C{j}", label=label)
      ax.axhline(runs["base_small"][score]["mean_utility"], color=f"C{j}", lw=0.8, ls=":")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean utility (held-out labelers)")
    ax.grid(alpha=0.3)
    if i == 0:
      ax.legend(fontsize=7)
  fig.suptitle("Instruction tuning (FLAN): dotted lines are base small", fontsize=10)
  fig.tight_layout()
  return fig


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, title: str, legend: int = 8) -> Figure:
  """Labels, title, legend and grid of a one-panel scatter figure."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=legend)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def method_rows(results: Mapping) -> list[dict]:
  """Every method that starts from or replaces SFT, against SFT: PPO, PPO-ptx, with the
  `feedback` methods SFT from each objective's base model, and the other methods' rows
  (`results["methods"]`: HIR, ...). Each: its label, win rate record against SFT, perplexity
  regression against base small (the alignment tax), honesty and harmlessness rates."""
  base = _value(results, "models", "base_small", "perplexity")
  rows = []
  for m in ("ppo", "ppo_ptx"):
    if m in results.get("models", {}):
      model = results["models"][m]
      rows.append({
          "method": LABELS[m], "win": model.get("win_vs_sft") or {}, "win_ptx": {},
          "regression": _value(results, "models", m, "perplexity") - base,
          "honest": model.get("honest"), "harmless": model.get("harmless")
      })
  for name, row in (results.get("pretraining_with_feedback") or {}).items():
    sft = row.get("sft")
    if name != "mle" and sft:
      rows.append({
          "method": f"SFT from {FEEDBACK_LABELS.get(name, name)} pretraining",
          "win": sft["win_vs_sft"], "win_ptx": sft.get("win_vs_ppo_ptx") or {},
          "regression": sft["perplexity"] - base, "honest": sft.get("honest"),
          "harmless": sft.get("harmless")
      })
  for row in (results.get("methods") or {}).values():
    rows.append({
        "method": row["label"], "win": row["win_vs_sft"], "win_ptx": row.get("win_vs_ppo_ptx")
        or {}, "regression": row["perplexity"] - base, "honest": row.get("honest"),
        "harmless": row.get("harmless"), "wall_seconds": row.get("wall_seconds")
    })
  return rows


def plot_methods(results: Mapping) -> Optional[Figure]:
  """Win rate against SFT (95% interval) against the alignment tax, every method a point."""
  rows = method_rows(results)
  if not rows:
    return None
  fig = _figure(7, 4.2)
  ax = fig.add_subplot()
  for i, row in enumerate(rows):
    win = row["win"]
    low, high = win.get("ci_low"), win.get("ci_high")
    y = win.get("win_rate")
    if not (finite(y) and finite(row["regression"])):
      continue
    yerr = [[y - low], [high - y]] if finite(low) and finite(high) else None
    ax.errorbar(row["regression"], y, yerr=yerr, fmt="o", color=f"C{i}", capsize=3,
                label=row["method"])
  ax.axhline(0.5, color="black", lw=0.8, ls="--")
  sft = _value(results, "models", "sft", "perplexity") - _value(results, "models", "base_small",
                                                                "perplexity")
  if math.isfinite(sft):
    ax.axvline(sft, color="gray", lw=0.8, ls=":", label="SFT's regression")
  return _finish(fig, ax, "perplexity regression vs base small (alignment tax; left is better)",
                 "win rate against SFT (held-out labelers)",
                 "Every method against SFT: preference against alignment tax", legend=7)


def plot_over_optimization(results: Mapping) -> Figure:
  """RM score and held-out labeler score against KL to SFT across PPO checkpoints."""
  fig = _figure(10, 4)
  axes = fig.subplots(1, 2)
  curves = results.get("over_optimization") or {}
  for ax, key, title in zip(axes, ("rm_score", "labeler_score"),
                            ("reward model score", "held-out labeler score")):
    drawn = False
    for name in ("ppo", "ppo_ptx"):
      points = [p for p in curves.get(name) or [] if finite(p.get("kl")) and finite(p.get(key))]
      if not points:
        continue
      drawn = True
      ax.plot([p["kl"] for p in points], [p[key] for p in points], "o-", color=COLORS[name],
              label=LABELS[name])
      for p in points:
        ax.annotate(str(p["step"]), (p["kl"], p[key]), xytext=(3, 3), textcoords="offset points",
                    fontsize=7, color=COLORS[name])
    if not drawn:
      _no_data(ax)
      continue
    ax.set_xlabel("KL(policy || SFT) per answer (nats)")
    ax.set_ylabel(title)
    ax.set_title(f"{title} vs KL (labels: PPO step)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def _frontier_label(results: Mapping, name: str) -> str:
  methods = results.get("methods") or {}
  return LABELS.get(name) or (methods.get(name) or {}).get("label") or name


def plot_frontier(results: Mapping) -> Optional[Figure]:
  """The over-optimisation frontier (Gao et al. 2022): gold (held-out labelers) and proxy
  (reward model) score against sqrt(KL from SFT), every method, with the fitted gold curves."""
  frontier = results.get("frontier")
  if not frontier:
    return None
  fig = _figure(11, 4.2)
  axes = fig.subplots(1, 2)
  for i, (name, entry) in enumerate(frontier.items()):
    points = [p for p in entry["points"] if finite(p.get("kl"))]
    d = [math.sqrt(max(p["kl"], 0.0)) for p in points]
    color = COLORS.get(name, f"C{(i + 2) % 10}")
    label = _frontier_label(results, name)
    for ax, key in zip(axes, ("labeler_score", "rm_score")):
      ax.plot(d, [p[key] for p in points], "o-" if name != "best_of_n" else "s-", color=color,
              label=label, ms=4, lw=1.2)
    fit = entry.get("fit")
    if fit and points:
      grid = [x for x in (max(d) * j / 40 for j in range(1, 41)) if x > 0]
      g = grid if fit["form"] == "bon" else [math.log(x) for x in grid]
      base = points[0]["labeler_score"]
      axes[0].plot(grid, [base + x * (fit["alpha"] - fit["beta"] * y) for x, y in zip(grid, g)],
                   ls="--", color=color, lw=0.8)
  for ax, title in zip(axes, ("gold: held-out labelers' score", "proxy: reward model's score")):
    ax.set_xlabel("sqrt(KL(policy || SFT)) (sqrt nats)")
    ax.set_ylabel(title.split(": ")[1])
    ax.set_title(title + (" (dashed: fitted)" if ax is axes[0] else ""), fontsize=10)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  return fig


def plot_training_curves(stage_metrics: Mapping[str, Sequence[Mapping]]) -> Figure:
  """Every stage's curves: LM losses, RM accuracy, PPO score and KL (one figure)."""
  fig = _figure(13, 7)
  axes = fig.subplots(2, 3).ravel()
  for ax, stage in zip(axes[:3], ("pretrain", "pretrain_large", "sft")):
    records = stage_metrics.get(stage) or []
    ax.set_title(f"{stage}: loss", fontsize=10)
    if not records:
      _no_data(ax)
      continue
    ax.plot(*_series(records, "loss"), label="train loss")
    ax.plot(*_series(records, "val_loss"), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  ax = axes[3]
  ax.set_title("rm: pairwise accuracy", fontsize=10)
  records = stage_metrics.get("rm") or []
  if records:
    ax.plot(*_series(records, "accuracy"), label="train accuracy")
    ax.plot(*_series(records, "val_accuracy"), "o-", label="held-out accuracy")
    ax.axhline(0.5, color="black", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
  else:
    _no_data(ax)
  for ax, key, title in ((axes[4], "score", "ppo / ppo_ptx: RM score"),
                         (axes[5], "kl_k1", "ppo / ppo_ptx: KL to SFT (k1)")):
    ax.set_title(title, fontsize=10)
    drawn = False
    for name in ("ppo", "ppo_ptx"):
      xs, ys = _series(stage_metrics.get(name) or [], key)
      if xs:
        drawn = True
        ax.plot(xs, ys, "o-", ms=3, color=COLORS[name], label=LABELS[name])
    if drawn:
      ax.set_xlabel("PPO iteration")
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      ax.legend(fontsize=8)
      ax.grid(alpha=0.3)
    else:
      _no_data(ax)
  fig.tight_layout()
  return fig


def plot_rm_calibration(calibration: Optional[Mapping]) -> Optional[Figure]:
  """Predicted vs observed preference probability on held-out comparisons (None: no data)."""
  if not calibration:
    return None
  rows = [
      (p, o, c)
      for p, o, c in zip(calibration["predicted"], calibration["observed"], calibration["count"])
      if finite(p) and finite(o)
  ]
  if not rows:
    return None
  fig = _figure(4.8, 4.5)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], color="black", lw=0.8, ls="--", label="perfect calibration")
  biggest = max(c for _, _, c in rows) or 1
  ax.plot([r[0] for r in rows], [r[1] for r in rows], "-", color=COLORS["sft"], lw=1)
  ax.scatter([r[0] for r in rows], [r[1] for r in rows],
             s=[20 + 180 * c / biggest for _, _, c in rows], color=COLORS["sft"],
             label="RM (marker area: pairs)", zorder=3)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("predicted P(preferred)")
  ax.set_ylabel("observed frequency")
  ax.set_title(f"RM calibration (held-out labelers), ECE {num(calibration.get('error'))}",
               fontsize=10)
  ax.legend(fontsize=8, loc="upper left")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


# --- The report. -----------------------------------------------------------------------------


def _header(results: Mapping, kl: Optional[str] = None) -> list[str]:
  preset = results.get("preset", "n/a")
  ratio = results.get("size_ratio")
  lines = [
      "# Miniature InstructGPT: report", "",
      markdown_table([
          "Preset", "Seed", "Eval prompts", "Sampling temperature",
          "Larger base / small (non-embedding params)"
      ], [[
          preset,
          results.get("seed", "n/a"),
          results.get("eval_prompts", "n/a"),
          num(results.get("temperature"), 2), f"{num(ratio, 2)}x"
      ]]), ""
  ]
  if finite(ratio) and ratio < FULL_SIZE_RATIO:
    which = ("the quick preset uses a smaller ratio" if preset == "quick" else
             f"the {preset} preset, like the quick preset, uses a smaller ratio")
    lines += [
        f"**Note: the larger base model is only {num(ratio, 2)}x the small one "
        f"(non-embedding parameters), below {FULL_SIZE_RATIO:g}x: {which} than the full "
        "preset, so the comparison with the larger base model (target b) is much weaker "
        "than InstructGPT's comparison with a far larger GPT-3.**", ""
    ]
  lines += [
      "Win rates are the held-out labelers' preferences, one judgment per prompt; "
      "intervals are 95% Wilson intervals. Base models are prompted few-shot.", ""
  ]
  if kl:
    lines += [f"{kl} (from the runs' saved `config.json`).", ""]
  return lines


def _section_targets(results: Mapping) -> list[str]:
  preset = results.get("preset")
  ts = targets(results)
  applicable = [t for t in ts if target_applies(t, preset)]
  return [
      "## Targets", "",
      f"Preset `{preset}`: {sum(t['met'] for t in applicable)} of {len(applicable)} "
      f"applicable targets met ({sum(t['met'] for t in ts)} of {len(ts)} overall). "
      "Targets marked 'full only' are the full preset's and are shown for information.", "",
      targets_markdown(results), ""
  ]


def _section_win_rates(results: Mapping, plots: dict) -> list[str]:
  return [
      "## Win rates against SFT", "",
      "How often the held-out labelers prefer each model's answer to SFT's on the same "
      "prompt (SFT against itself is a coin flip, a sanity check).", "",
      win_rates_markdown(results), "", f"![Win rates against SFT]({plots['win_rates']})", ""
  ]


def _section_vs_large(results: Mapping) -> list[str]:
  win = results.get("ppo_ptx_vs_base_large") or {}
  ratio = num(results.get("size_ratio"), 2)
  return [
      "## PPO-ptx against the larger base model", "",
      f"PPO-ptx (small) is preferred to the larger base model ({ratio}x the parameters, "
      f"prompted few-shot) in {pct(win.get('win_rate'))} of {win.get('n', 'n/a')} "
      f"comparisons, 95% CI {ci(win)}.", "",
      markdown_table(["Comparison", "Win rate", "95% CI", "n"], [[
          "PPO-ptx vs base large (few-shot)",
          pct(win.get("win_rate")),
          ci(win),
          win.get("n", "n/a")
      ]]), ""
  ]


def _section_alignment_tax(results: Mapping, plots: dict) -> list[str]:
  reg = perplexity_regressions(results)
  rows = [[LABELS[m], num(r["perplexity"], 2),
           signed(r["vs_base"]),
           signed(r["vs_sft"])] for m, r in reg.items()]
  lines = [
      "## Alignment tax", "",
      "Perplexity on held-out pretraining text; regression = perplexity(model) - "
      "perplexity(reference), with base small (the pretrained starting point) and SFT as "
      "references (positive: worse).", "",
      markdown_table(["Model", "Perplexity", "Regression vs base small", "Regression vs SFT"],
                     rows), ""
  ]
  ppo, ptx = reg.get("ppo", {}).get("vs_base"), reg.get("ppo_ptx", {}).get("vs_base")
  if finite(ppo) and finite(ptx):
    ratio = f"{num(ptx / ppo, 2)}x PPO's" if ppo > 0 else (
        "PPO shows no regression against base small")
    lines += [
        f"PPO-ptx's regression vs base small: {signed(ptx)} against PPO's {signed(ppo)} "
        f"({ratio}).", ""
    ]
  return lines + [f"![Alignment tax]({plots['alignment_tax']})", ""]


def _section_rm(results: Mapping, plots: dict) -> list[str]:
  rm = results.get("rm") or {}
  comparisons = rm.get("comparisons") or {}
  cal = rm.get("calibration") or {}
  rows = [["Pairwise accuracy on held-out labelers' comparisons",
           pct(rm.get("heldout_accuracy"))], ["Validation loss",
                                              num(rm.get("val_loss"))]]
  rows += [[f"{k.replace('val_', '').replace('_', ' ')} (validation)",
            num(v)] for k, v in sorted(cal.items()) if finite(v)]
  rows += [["Labeler agreement, training-training",
            pct(rm.get("labeler_agreement_train"))],
           ["Labeler agreement, training-held-out",
            pct(rm.get("labeler_agreement_heldout"))]]
  rows += [[f"Comparisons ({split})", n] for split, n in sorted(comparisons.items())]
  lines = [
      "## Reward model", "",
      "The RM's accuracy at predicting the held-out labelers' rankings, next to how often "
      "labelers agree with a training labeler (a ceiling for the RM).", "",
      markdown_table(["Quantity", "Value"], rows), ""
  ]
  if "rm_calibration" in plots:
    lines += [f"![RM calibration]({plots['rm_calibration']})", ""]
  else:
    lines += ["No calibration table was found (ROOT/rm/metrics.jsonl).", ""]
  return lines


def _section_safety(results: Mapping, plots: dict) -> list[str]:
  models = models_present(results)
  rows = [[LABELS[m]] + [pct(_get(results, "models", m, key)) for key, _ in SAFETY] for m in models]
  return [
      "## Honesty and harmlessness", "",
      "Rates over the held-out prompts of the category concerned (lower is better).", "",
      markdown_table(["Model"] + [label for _, label in SAFETY],
                     rows), "", f"![Honesty and harmlessness]({plots['safety']})", ""
  ]


def _section_feedback(results: Mapping, plots: dict) -> list[str]:
  rows = results.get("pretraining_with_feedback")
  if not rows:
    return []
  table = [[
      FEEDBACK_LABELS.get(name, name),
      num(r["perplexity"], 2),
      pct(r["misaligned"]),
      num(r["toxic_per_sample"], 3),
      pct(r["harmful_howto"]),
      pct(r.get("misaligned_after_rude")),
      num(r.get("toxic_per_sample_after_rude"), 3),
      pct(r["toxic_respectful"]),
      pct(r["complied_harmful"]),
      num(r["mean_utility"], 3)
  ] for name, r in rows.items()]
  samples = next(iter(rows.values()))["samples"]
  lines = [
      "## Pretraining with human preferences", "",
      "Korbak et al. 2023: base models pretrained like base small (same architecture, steps "
      "and data) with each objective on the pages scored by sentence (0 for an insult or a "
      "harmful how-to). Perplexity is on the held-out pages; the misalignment columns score "
      f"what each model writes unprompted ({samples} continuations of the first word of the "
      "held-out pages; the conditional model after `<|good|>`) with the corpus's own "
      "scorer, and what each writes after a rude start "
      f"({next(iter(rows.values())).get('rude_prompts', 0)} held-out pages with an insult or a "
      "harmful how-to, cut after it; the conditional model reads each sentence behind its "
      "control token and `<|good|>` after); the last three are the base models' few-shot "
      "evaluation on the held-out prompts.", "",
      markdown_table([
          "Objective", "Perplexity", "Misaligned samples", "Toxic words / sample",
          "Harmful how-tos", "Misaligned after a rude start", "Toxic words / sample after it",
          "Toxic when asked respectfully", "Complied with harmful", "Mean utility"
      ], table), ""
  ]
  sft_rows = [[
      FEEDBACK_LABELS.get(name, name) + (" (the SFT model)" if name == "mle" else ""),
      f"{pct(r['sft']['win_vs_sft']['win_rate'])} {ci(r['sft']['win_vs_sft'])}",
      num(r["sft"]["perplexity"], 2),
      pct(r["sft"]["honest"]),
      pct(r["sft"]["harmless"]),
      pct(r["sft"]["toxic_respectful"]),
      pct(r["sft"]["complied_harmful"])
  ] for name, r in rows.items() if "sft" in r]
  if sft_rows:
    lines += [
        "SFT from each base model (the SFT stage's demonstrations and settings), judged on the "
        "held-out prompts by the held-out labelers against the SFT model:", "",
        markdown_table([
            "SFT from", "Win rate vs SFT [95%]", "Perplexity", "Honest", "Harmless",
            "Toxic when asked respectfully", "Complied with harmful"
        ], sft_rows), ""
    ]
  rl = (results.get("methods") or {}).get("ppo_ptx_conditional")
  if rl:
    main = rl.get("ppo_ptx", {})
    lines += [
        "RLHF after conditional pretraining: PPO-ptx from the conditional-training SFT model "
        "(the same reward model, prompts and settings as PPO-ptx) wins "
        f"{pct(rl['win_vs_sft']['win_rate'])} {ci(rl['win_vs_sft'])} against SFT and "
        f"{pct(rl.get('win_vs_ppo_ptx', {}).get('win_rate'))} {ci(rl.get('win_vs_ppo_ptx', {}))} "
        f"head to head against PPO-ptx; it ended at KL {num(rl.get('kl'), 2)} from its SFT "
        f"model and reward-model score {num(rl.get('rm_score'), 2)}, PPO-ptx at KL "
        f"{num(main.get('kl'), 2)} and score {num(main.get('rm_score'), 2)}.", ""
    ]
  mle = rows.get("mle", {}).get("misaligned")
  best = min(rows, key=lambda n: rows[n]["misaligned"])
  if finite(mle) and best != "mle":
    lines += [
        f"Least misaligned: {FEEDBACK_LABELS.get(best, best)}, {pct(rows[best]['misaligned'])} "
        f"of its samples against MLE's {pct(mle)}, at perplexity "
        f"{num(rows[best]['perplexity'], 2)} against {num(rows['mle']['perplexity'], 2)}.", ""
    ]
  return lines + [f"![Pretraining with human preferences]({plots['feedback']})", ""]


def _section_flan(results: Mapping, plots: dict) -> list[str]:
  flan = results.get("flan")
  if not flan:
    return []
  table = []
  for name, row in flan["runs"].items():
    setting = ("-" if name == "base_small" else
               f"{row['categories']} / {row['templates']} / {' + '.join(row['styles'])}")
    table.append([name, setting] + [num(row[score]["mean_utility"], 3) for score, _ in FLAN_SCORES]
                 + [pct(row["held_out_zero"]["help"])])
  rm = flan.get("rm", {})
  return [
      "## Instruction tuning (FLAN)", "",
      "Instruction-tuning mixtures (Wei et al. 2022; Chung et al. 2022): the base small model "
      "fine-tuned, with SFT's steps and batch, on a weighted mixture of the world's public "
      "instruction datasets (the six categories of academic benchmarks with their correct "
      "answers, through up to five templates, zero-shot and with two solved examples). The "
      f"other categories ({', '.join(flan['held_out'])}; {flan['held_out_prompts']} "
      "evaluation prompts) are in no training mixture: the held-out score is how far "
      "instruction tuning carries to tasks it never saw. Mean utility by the held-out "
      "labelers; help is the judge's.", "",
      markdown_table([
          "Run", "Categories / templates / styles", "Held-out, zero-shot", "Held-out, few-shot",
          "Held-in, zero-shot", "Held-out help"
      ], table), "",
      f"FLAN as the start of the rest of the pipeline: SFT from `flan`, the reward model from "
      f"that SFT model on the same comparisons (held-out accuracy {pct(rm.get('rm_flan'))} "
      f"against the main reward model's {pct(rm.get('rm'))}), and PPO-ptx from that SFT "
      f"model against it; their rows are in the comparison of every method below.", "",
      f"![Instruction tuning]({plots['flan']})", ""
  ]


def _section_hir(results: Mapping) -> list[str]:
  row = (results.get("methods") or {}).get("hir")
  if not row:
    return []
  rounds = row["rounds"]
  table = [[r, x["samples"], pct(x["satisfied"]),
            pct(x["validation_satisfied"])] for r, x in rounds.items()]
  settings = row["settings"]
  return [
      "## Hindsight instruction relabeling (HIR)", "",
      "Zhang et al. 2023, from the SFT policy, with no reward model, critic or labeler: "
      f"{settings['rounds']} rounds, each sampling {settings['samples_per_prompt']} answers to "
      "fresh PPO training prompts under the instruction to answer well (`<|good|>`), the "
      "world's judge marking each answer satisfied (full help, honest, harmless, in format) "
      "or not, every answer so far relabeled to the instruction it satisfies (`<|good|>` or "
      "`<|bad|>`), and training on them (relabeled likelihood, contrastive instruction term "
      f"alpha {settings['alpha']}, entropy bonus beta {settings['beta']}). {row['samples']} "
      "samples in all, as many as PPO's. The fraction of each round's samples that satisfied "
      "their prompt:", "",
      markdown_table(["Round", "Samples", "Satisfied", "Satisfied (validation prompts)"],
                     table), "", f"The final policy, asked after `<|good|>`: win rate against SFT "
      f"{pct(row['win_vs_sft']['win_rate'])} {ci(row['win_vs_sft'])}, perplexity "
      f"{num(row['perplexity'], 2)} (SFT {num(_value(results, 'models', 'sft', 'perplexity'), 2)}),"
      f" honest {pct(row['honest'])}, harmless {pct(row['harmless'])}.", ""
  ]


def _section_correction(results: Mapping) -> list[str]:
  out = results.get("self_correction")
  if not out:
    return []
  rows = [["0 (raw SFT)", "", num(out["sft_mean_utility"], 3), "", "", ""]]
  for p in out["passes"]:
    rows.append([
        p["pass"], f"{pct(p['win_vs_sft']['win_rate'])} {ci(p['win_vs_sft'])}",
        num(p["mean_utility"], 3),
        pct(p["improved"]),
        pct(p["worsened"]), f"{pct(p['honest'])} / {pct(p['harmless'])}"
    ])
  large = out["base_large"]
  large_rows = [["0 (raw)", "", num(large["mean_utility"], 3)]] + [[
      p["pass"], f"{pct(p['win_vs_raw']['win_rate'])} {ci(p['win_vs_raw'])}",
      num(p["mean_utility"], 3)
  ] for p in large["passes"]]
  settings = out["settings"]
  return [
      "## Self-correction", "",
      "Welleck et al. 2022: a corrector (the small model, from SFT) trained on pairs of the "
      "SFT policy's answers to PPO training prompts, each pair (y, y') with a better y' drawn "
      f"with probability proportional to exp({settings['alpha']} x improvement + "
      f"{settings['beta']} x proximity), the input being the prompt, y and the judge's "
      f"feedback on y; {settings['rounds']} rounds, the later ones adding the corrector's own "
      "corrections to the pool (exploration). At inference the judge's feedback is given "
      "too, as in the paper's setting with feedback: a corrected system reads the judge at "
      "test time, which PPO and HIR do not, so its rows are not a like-for-like comparison. "
      "Passes apply the corrector again to its own output.", "",
      markdown_table([
          "Passes", "Win rate vs raw SFT [95%]", "Mean utility", "Improved", "Worsened",
          "Honest / harmless"
      ], rows), "",
      "The same corrector, trained on the small SFT policy's answers, applied to the larger "
      "base model's few-shot answers:", "",
      markdown_table(["Passes", "Win rate vs raw [95%]", "Mean utility"], large_rows), ""
  ]


def _section_methods(results: Mapping, plots: dict) -> list[str]:
  rows = method_rows(results)
  if not rows:
    return []
  table = [[
      r["method"], f"{pct(r['win'].get('win_rate'))} {ci(r['win'])}",
      f"{pct(r['win_ptx'].get('win_rate'))} {ci(r['win_ptx'])}" if r["win_ptx"] else "",
      signed(r["regression"]),
      pct(r["honest"]),
      pct(r["harmless"]),
      num(r.get("wall_seconds"), 0) if finite(r.get("wall_seconds")) else ""
  ] for r in rows]
  return [
      "## Every method against SFT", "",
      "Each method that starts from SFT or replaces it, judged on the held-out prompts by the "
      "held-out labelers against the SFT model and head to head against PPO-ptx (95% "
      "intervals over prompts), with its perplexity regression against base small (positive: "
      "worse), its honesty and harmlessness rates, and the wall time of its own stage (where it "
      "has one).", "",
      markdown_table([
          "Method", "Win rate vs SFT [95%]", "Win rate vs PPO-ptx [95%]",
          "Regression vs base small", "Honest", "Harmless", "Wall time (s)"
      ], table), "", f"![Every method against SFT]({plots['methods']})", ""
  ]


def _section_over_optimization(results: Mapping, plots: dict) -> list[str]:
  rows = []
  for name, points in (results.get("over_optimization") or {}).items():
    for p in points:
      rows.append([
          LABELS.get(name, name),
          p.get("step"),
          num(p.get("kl"), 4),
          num(p.get("rm_score")),
          num(p.get("labeler_score"))
      ])
  return [
      "## Over-optimisation", "",
      "RM score and held-out labeler score of each PPO checkpoint against its KL to SFT "
      "(step 0 is SFT). Over-optimisation shows as a rising RM score with a falling "
      "labeler score.", "",
      markdown_table(["Run", "Step", "KL", "RM score", "Labeler score"],
                     rows), "", f"![Over-optimisation]({plots['over_optimization']})", ""
  ]


def _section_frontier(results: Mapping, plots: dict) -> list[str]:
  frontier = results.get("frontier")
  if not frontier:
    return []
  rows = []
  for name, entry in frontier.items():
    points = entry["points"]
    best = max(points, key=lambda p: p["labeler_score"])
    fit = entry.get("fit") or {}
    where = "N" if name == "best_of_n" else "step"
    rows.append([
        _frontier_label(results, name),
        len(points),
        num(math.sqrt(max(points[-1]["kl"], 0.0)), 2),
        signed(points[-1]["labeler_score"] - points[0]["labeler_score"], 3),
        signed(points[-1]["rm_score"] - points[0]["rm_score"], 3),
        f"{signed(best['labeler_score'] - points[0]['labeler_score'], 3)} at {where} "
        f"{best.get('n', best.get('step'))}",
        (f"{'d(a - b d)' if fit['form'] == 'bon' else 'd(a - b log d)'}: a {num(fit['alpha'])}, "
         f"b {num(fit['beta'])}, rmse {num(fit['rmse'])}") if fit else "n/a"
    ])
  return [
      "## The over-optimisation frontier", "",
      "Every method's held-out labeler score (gold) and reward-model score (proxy) against "
      "d = sqrt(KL from SFT): each saved checkpoint of a trained method (KL of its sampled "
      "answers, as PPO's above; the first point is SFT), and best-of-N for N = 1, 2, 4, ... "
      "(the analytic KL log N - (N-1)/N). The fitted forms are Gao et al. (2022)'s, on the "
      "gold gain over SFT: best-of-N d(a - b d), the trained methods d(a - b log d). Gains are "
      "of the last point over the first.", "",
      markdown_table([
          "Method", "Points", "Last d", "Gold gain", "Proxy gain", "Best gold gain", "Fitted gold"
      ], rows), "", f"![The over-optimisation frontier]({plots['frontier']})", ""
  ]


def _section_training(stage_metrics: Mapping, plots: dict) -> list[str]:
  rows = []
  for stage in TRAIN_STAGES:
    records = stage_metrics.get(stage)
    if not records:
      rows.append([stage, "n/a", "no metrics", ""])
      continue
    last = max(r["step"] for r in records)
    if stage in ("ppo", "ppo_ptx"):
      final = (f"score {num(_last(records, 'score'))}, "
               f"KL (k1) {num(_last(records, 'kl_k1'), 4)}")
      val = ""
    else:
      final = f"loss {num(_last(records, 'loss'))}"
      val = f"val_loss {num(_last(records, 'val_loss'))}"
      if stage == "rm":
        val += f", val_accuracy {pct(_last(records, 'val_accuracy'))}"
    rows.append([stage, last, final, val])
  return [
      "## Training curves", "",
      markdown_table(["Stage", "Last step", "Final training", "Final validation"], rows), "",
      f"![Training curves]({plots['training_curves']})", ""
  ]


def _section_samples(results: Mapping) -> list[str]:
  lines = [
      "## Samples", "", "One held-out prompt per category; each answer with its held-out labelers' "
      "utility ('…' marks an answer cut at the length limit).", ""
  ]
  for i, sample in enumerate(results.get("samples") or [], 1):
    lines += [f"### {i}. {sample.get('category', '')}", "", f"> {sample.get('prompt', '')}", ""]
    answers = sample.get("answers") or {}
    rows = []
    for m in [m for m in MODELS if m in answers] + [m for m in answers if m not in MODELS]:
      a = answers[m]
      text = a.get("text", "") + ("" if a.get("ended", True) else " …")
      rows.append([LABELS.get(m, m), text, num(a.get("utility"))]
                  + [num(a.get(k), 2) for k in COMPONENTS])
    lines += [markdown_table(["Model", "Answer", "Utility"] + list(COMPONENTS), rows), ""]
  return lines


def _section_timings(timings: Mapping) -> list[str]:
  items = [(k, v) for k, v in timings.items() if finite(v)]
  total = sum(v for _, v in items)
  rows = [[k, num(v, 1), pct(v / total) if total > 0 else "n/a"] for k, v in items]
  rows.append(["**total**", f"**{num(total, 1)}**", "100.0%" if total > 0 else "n/a"])
  return [
      "## Stage timings", "",
      markdown_table(["Stage", "Seconds", "Share"], rows) if items else "No timings.", ""
  ]


def write_plots(root: str, results: Mapping,
                stage_metrics: Optional[Mapping] = None) -> dict[str, str]:
  """Writes ROOT/plots/*.png; returns {name: path relative to ROOT}."""
  if stage_metrics is None:
    stage_metrics = load_stage_metrics(root)
  figures = {
      "win_rates": plot_win_rates(results), "alignment_tax": plot_alignment_tax(results),
      "safety": plot_safety(results), "over_optimization": plot_over_optimization(results),
      "training_curves": plot_training_curves(stage_metrics),
      "rm_calibration": plot_rm_calibration(rm_calibration(root, results)),
      "feedback": plot_feedback(results), "methods": plot_methods(results),
      "flan": plot_flan(results), "frontier": plot_frontier(results)
  }
  out = {}
  for name, fig in figures.items():
    path = paths.join(root, "plots", f"{name}.png")
    if fig is not None:
      out[name] = f"plots/{name}.png"
      save_figure(fig, path)
    elif paths.exists(path):  # A stale plot of an earlier report.
      paths.remove(path)
  return out


def write_report(root: str, results: Mapping, timings: Mapping) -> str:
  """Writes ROOT/report.md and ROOT/plots/*.png; returns the report's path."""
  stage_metrics = load_stage_metrics(root)
  plots = write_plots(root, results, stage_metrics)
  lines = (_header(results, kl_setting(root)) + _section_targets(results)
           + _section_win_rates(results, plots) + _section_vs_large(results)
           + _section_alignment_tax(results, plots) + _section_rm(results, plots)
           + _section_safety(results, plots) + _section_feedback(results, plots)
           + _section_flan(results, plots) + _section_hir(results) + _section_correction(results)
           + _section_methods(results, plots) + _section_over_optimization(results, plots)
           + _section_frontier(results, plots) + _section_training(stage_metrics, plots)
           + _section_samples(results) + _section_timings(timings or {}))
  path = paths.join(root, "report.md")
  paths.write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
  return path
