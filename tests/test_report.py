"""The pipeline report: the product targets, and report.md with its plots on a hand-made run;
the win rates and Wilson intervals the report's numbers come from."""

import copy
import json
import math
import os
import re

import numpy as np
import pytest

from experiments.world import evaluate as ev
from experiments.world import labelers as labelers_lib
from experiments.world import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ("base_small", "base_large", "sft", "ppo", "ppo_ptx")
SECTIONS = ("# Miniature InstructGPT: report", "## Targets", "## Win rates against SFT",
            "## PPO-ptx against the larger base model", "## Alignment tax", "## Reward model",
            "## Honesty and harmlessness", "## Every method against SFT", "## Over-optimisation",
            "## Training curves", "## Samples", "## Stage timings")


def win(rate, low, high, n=200):
  return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": n}


def make_results(*, ptx_win=(0.652, 0.583, 0.715), ppo_win=(0.671, 0.603, 0.733),
                 vs_large=(0.745, 0.680, 0.800), perplexity=None, preset="full",
                 size_ratio=13.5) -> dict:
  """A hand-made results dict in the schema of `evaluate/results.json`."""
  perplexity = perplexity or {
      "base_small": 20.0, "base_large": 15.0, "sft": 21.5, "ppo": 26.0, "ppo_ptx": 22.0
  }
  wins = {
      "base_small": (0.214, 0.162, 0.277), "base_large": (0.301, 0.241, 0.369),
      "sft": (0.505, 0.436, 0.574), "ppo": ppo_win, "ppo_ptx": ptx_win
  }
  models = {}
  for i, m in enumerate(MODELS):
    models[m] = {
        "run": m, "perplexity": perplexity[m], "mean_utility": 1.0 + 0.125 * i, "help": 0.1 * i,
        "honest": 0.5, "harmless": 0.5, "format": 0.25, "made_up_closed_qa": 0.40 - 0.05 * i,
        "toxic_respectful": 0.30 - 0.05 * i, "toxic_all": 0.35 - 0.05 * i,
        "complied_harmful": 0.9 - 0.1 * i, "win_vs_sft": win(*wins[m])
    }
  curve = lambda d: [{
      "step": s, "kl": 0.5 * s, "rm_score": 0.1 * s + d, "labeler_score": 1.0 + 0.01 * s - 0.002 * s
      * s
  } for s in (0, 10, 20)]
  return {
      "preset": preset,
      "seed": 3,
      "eval_prompts": 200,
      "temperature": 0.7,
      "models": models,
      "ppo_ptx_vs_base_large": win(*vs_large),
      "size_ratio": size_ratio,
      "over_optimization": {"ppo": curve(0.0), "ppo_ptx": curve(-0.05)},
      "rm": {
          "heldout_accuracy": 0.6875, "val_loss": 0.61, "labeler_agreement_train": 0.79,
          "labeler_agreement_heldout": 0.7625, "calibration": {"val_calibration_error": 0.0425},
          "comparisons": {"train": 500, "validation": 100}
      },
      "samples": [{
          "prompt": "request list three animals . answer :", "category": "brainstorming",
          "answers": {
              m: {
                  "text": f"answer of {m} | with a pipe", "ended": m != "sft",
                  "utility": 0.5 + 0.25 * i, "help": 1.0, "honest": 1.0, "harmless": 0.0,
                  "format": 1.0
              } for i, m in enumerate(MODELS)
          }
      }],
  }


def by_id(results) -> dict:
  return {t["id"]: t for t in report.targets(results)}


# --- targets(). ------------------------------------------------------------------------------


def test_targets_have_the_documented_fields():
  ts = report.targets(make_results())
  assert [t["id"] for t in ts] == ["a", "a_all", "b", "c", "d"]
  for t in ts:
    assert {"name", "value", "threshold", "met", "applies_to"} <= set(t)
    assert isinstance(t["met"], bool)
    assert t["applies_to"] == ("all" if t["id"] == "a_all" else "full")


def test_target_a_needs_60_percent_and_a_lower_bound_above_half():
  t = by_id(make_results(ptx_win=(0.65, 0.55, 0.74)))
  assert t["a"]["met"] and t["a_all"]["met"]
  assert t["a"]["value"] == 0.65 and t["a"]["threshold"] == 0.6
  assert t["a_all"]["value"] == 0.55 and t["a_all"]["threshold"] == 0.5
  t = by_id(make_results(ptx_win=(0.65, 0.49, 0.78)))  # Too wide an interval: both fail.
  assert not t["a"]["met"] and not t["a_all"]["met"]
  t = by_id(make_results(ptx_win=(0.59, 0.52, 0.66)))  # Significant but under 60%.
  assert not t["a"]["met"] and t["a_all"]["met"]
  t = by_id(make_results(ptx_win=(0.60, 0.53, 0.67)))  # Exactly 60% meets it.
  assert t["a"]["met"]


def test_target_b_is_70_percent_against_the_larger_base_model():
  assert by_id(make_results(vs_large=(0.70, 0.63, 0.76)))["b"]["met"]
  t = by_id(make_results(vs_large=(0.695, 0.63, 0.76)))["b"]
  assert not t["met"] and t["value"] == 0.695 and t["threshold"] == 0.7


def test_target_c_compares_perplexity_regressions_against_the_base_model():
  ppl = {"base_small": 100.0, "base_large": 90.0, "sft": 103.0, "ppo": 110.0}
  # PPO regresses by 10; PPO-ptx by 6 (0.6x PPO's): fails.
  t = by_id(make_results(perplexity={**ppl, "ppo_ptx": 106.0}))["c"]
  assert not t["met"]
  assert t["value"] == pytest.approx(6.0) and t["threshold"] == pytest.approx(5.0)
  # By 4 (0.4x PPO's): met.
  t = by_id(make_results(perplexity={**ppl, "ppo_ptx": 104.0}))["c"]
  assert t["met"] and t["value"] == pytest.approx(4.0)
  # Regressions are against base_small, not SFT: against SFT PPO-ptx's would be 1 (met).
  t = by_id(make_results(perplexity={**ppl, "sft": 105.0, "ppo_ptx": 106.0}))["c"]
  assert not t["met"]
  # No regression at all (better than the base model) always meets it.
  t = by_id(make_results(perplexity={**ppl, "ppo": 95.0, "ppo_ptx": 99.0}))["c"]
  assert t["met"] and t["value"] == pytest.approx(-1.0)
  # ... but a regression where PPO has none does not.
  assert not by_id(make_results(perplexity={**ppl, "ppo": 95.0, "ppo_ptx": 101.0}))["c"]["met"]


def test_perplexity_regressions_are_against_base_and_sft():
  reg = report.perplexity_regressions(make_results())
  assert reg["ppo_ptx"] == pytest.approx({"perplexity": 22.0, "vs_base": 2.0, "vs_sft": 0.5})
  assert reg["ppo"]["vs_base"] == pytest.approx(6.0)
  assert reg["base_small"]["vs_base"] == 0.0
  # The default results: 2 <= 6 / 2, so (c) is met.
  assert by_id(make_results())["c"]["met"]


def test_target_d_is_within_5_points_of_ppo():
  t = by_id(make_results(ppo_win=(0.65, 0.58, 0.71), ptx_win=(0.60, 0.53, 0.67)))["d"]
  assert t["met"]  # Exactly 5 points.
  assert t["value"] == 0.60 and t["threshold"] == pytest.approx(0.60)
  # Exactly 5 points again, though 0.54 - 0.05 is 0.49000000000000005 in floats.
  assert by_id(make_results(ppo_win=(0.54, 0.47, 0.61), ptx_win=(0.49, 0.42, 0.56)))["d"]["met"]
  t = by_id(make_results(ppo_win=(0.65, 0.58, 0.71), ptx_win=(0.59, 0.52, 0.66)))["d"]
  assert not t["met"]
  assert by_id(make_results(ppo_win=(0.55, 0.48, 0.62), ptx_win=(0.70, 0.63, 0.76)))["d"]["met"]


def test_missing_or_nan_inputs_do_not_meet_targets():
  results = make_results()
  results["models"]["ppo_ptx"]["win_vs_sft"]["win_rate"] = float("nan")
  del results["ppo_ptx_vs_base_large"]
  results["models"]["ppo"]["perplexity"] = None
  t = by_id(results)
  assert not t["a"]["met"] and not t["b"]["met"] and not t["c"]["met"] and not t["d"]["met"]
  assert t["a_all"]["met"]  # Its input (the lower bound) is still there.
  assert math.isnan(t["b"]["value"])


def test_pct_formatting():
  assert report.pct(0.652) == "65.2%"
  assert report.pct(0.5) == "50.0%"
  assert report.pct(float("nan")) == "n/a" and report.pct(None) == "n/a"


# --- write_report() on a hand-made run directory. --------------------------------------------


def write_jsonl(path, records):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def make_run(root, calibration=True):
  """A run directory: every training stage's metrics.jsonl (the MetricWriter's format)."""
  for stage, loss in (("pretrain", 5.0), ("pretrain_large", 4.8), ("sft", 3.0)):
    records = []
    for step in range(1, 7):
      records.append({"step": step, "loss": loss - 0.1 * step, "accuracy": 0.01 * step})
      if step % 3 == 0:
        records.append({"step": step, "val_loss": loss - 0.09 * step, "val_perplexity": 1.0})
    write_jsonl(os.path.join(root, stage, "metrics.jsonl"), records)
  rm = [{"step": s, "loss": 0.69 - 0.01 * s, "accuracy": 0.5 + 0.02 * s} for s in (1, 2, 3, 4)]
  val = {"step": 4, "val_loss": 0.61, "val_accuracy": 0.6875, "val_calibration_error": 0.0425}
  if calibration:
    val.update(calibration_predicted=[None, 0.25, 0.45, 0.55,
                                      0.8], calibration_observed=[None, 0.3, 0.5, 0.5, 0.75],
               calibration_count=[0, 10, 40, 35, 15])
  write_jsonl(os.path.join(root, "rm", "metrics.jsonl"), rm + [val])
  for stage in ("ppo", "ppo_ptx"):
    write_jsonl(
        os.path.join(root, stage, "metrics.jsonl"),
        [{"step": s, "score": 0.1 * s, "kl_k1": 0.01 * s, "beta": 0.05} for s in range(1, 5)])
    write_kl_config(root, stage,
                    {"controller": "fixed", "initial_beta": 0.05, "target": 6.0, "horizon": 10000})
  return root


def write_kl_config(root, stage, kl):
  """The part of a PPO run's saved config.json that the report reads."""
  with open(os.path.join(root, stage, "config.json"), "w") as f:
    json.dump({"stage": "rl", "algorithm": "ppo", "ppo": {"kl": kl}}, f)


TIMINGS = {
    "world": 1.0, "pretrain": 20.5, "pretrain_large": 30.0, "sft": 10.0, "comparisons": 5.0,
    "rm": 8.0, "ppo": 40.0, "ppo_ptx": 45.0, "evaluate": 12.25, "report": 2.0
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = make_run(str(tmp_path_factory.mktemp("run")))
  results = make_results(preset="quick", size_ratio=4.0)
  path = report.write_report(root, copy.deepcopy(results), TIMINGS)
  with open(path) as f:
    return root, path, results, f.read()


def section(text, heading):
  """The text of one '## ' section."""
  start = text.index(heading + "\n")
  end = text.find("\n## ", start + len(heading))
  return text[start:end if end > 0 else None]


def table_rows(text):
  return [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in text.splitlines()
          if line.startswith("| ") and "---" not in line]


def test_report_has_every_section_and_valid_plots(written):
  root, path, _, text = written
  assert path == os.path.join(root, "report.md")
  for heading in SECTIONS:
    assert re.search(f"^{re.escape(heading)}$", text, re.M), heading
  images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert set(images) >= {
      "plots/win_rates.png", "plots/alignment_tax.png", "plots/safety.png",
      "plots/over_optimization.png", "plots/training_curves.png", "plots/rm_calibration.png",
      "plots/methods.png"
  }
  for image in images:
    assert not os.path.isabs(image)
    with open(os.path.join(root, image), "rb") as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, image
  assert sorted(os.listdir(os.path.join(root,
                                        "plots"))) == sorted(os.path.basename(i) for i in images)


def test_win_rate_table_matches_the_results(written):
  _, _, results, text = written
  rows = {r[0]: r for r in table_rows(section(text, "## Win rates against SFT"))}
  expected = {
      "base small (few-shot)": ("21.4%", "[16.2%, 27.7%]"),
      "base large (few-shot)": ("30.1%", "[24.1%, 36.9%]"), "SFT": ("50.5%", "[43.6%, 57.4%]"),
      "PPO": ("67.1%", "[60.3%, 73.3%]"), "PPO-ptx": ("65.2%", "[58.3%, 71.5%]")
  }
  assert set(rows) == set(expected) | {"Model"}
  for label, (rate, interval) in expected.items():
    assert rows[label][1:4] == [rate, interval, "200"], rows[label]
  assert rows["PPO-ptx"][4] == f"{results['models']['ppo_ptx']['mean_utility']:.3f}"
  vs_large = section(text, "## PPO-ptx against the larger base model")
  assert "74.5%" in vs_large and "[68.0%, 80.0%]" in vs_large


def test_targets_table_and_header(written):
  _, _, results, text = written
  assert "| quick | 3 | 200 | 0.70 | 4.00x |" in text
  header = text[:text.index("## Targets")]
  assert "PPO and PPO-ptx: fixed KL coefficient beta=0.05 (from the runs' saved " in header
  assert "quick preset uses a smaller ratio" in text  # 4x < 10x.
  rows = table_rows(section(text, "## Targets"))[1:]
  assert len(rows) == 5
  met = {t["id"]: t["met"] for t in report.targets(results)}
  assert [r[3] for r in rows] == ["✓" if met[i] else "✗" for i in ("a", "a_all", "b", "c", "d")]
  # (a, b, c, d) are the full preset's; only the weaker (a) applies to `quick`.
  assert [r[4] == "yes" for r in rows] == [False, True, False, False, False]
  assert rows[0][1] == "65.2%" and rows[3][1] == "+2.00" and rows[3][2].startswith("<= +3.00")


# yapf: disable
def test_tables_of_the_other_sections(written):
  _, _, _, text = written
  tax = {r[0]: r for r in table_rows(section(text, "## Alignment tax"))}
  assert tax["PPO-ptx"][1:] == ["22.00", "+2.00", "+0.50"]
  assert tax["PPO"][1:] == ["26.00", "+6.00", "+4.50"]
  assert "(0.33x PPO's)" in section(text, "## Alignment tax")
  rm = section(text, "## Reward model")
  assert "68.8%" in rm and "79.0%" in rm and "76.2%" in rm and "0.043" in rm
  safety = {r[0]: r for r in table_rows(section(text, "## Honesty and harmlessness"))}
  assert safety["PPO-ptx"][1:] == ["20.0%", "10.0%", "15.0%", "50.0%"]
  over = table_rows(section(text, "## Over-optimisation"))
  assert len(over) == 1 + 6 and ["PPO-ptx", "20", "10.0000", "1.950", "0.400"] in over
  training = {r[0]: r for r in table_rows(section(text, "## Training curves"))}
  assert training["sft"][1:] == ["6", "loss 2.400", "val_loss 2.460"]
  assert training["ppo_ptx"][2] == "score 0.400, KL (k1) 0.0400"
  samples = section(text, "## Samples")
  assert "> request list three animals . answer :" in samples
  assert "answer of ppo_ptx \\| with a pipe" in samples  # Escaped for the table.
  assert "answer of sft \\| with a pipe …" in samples    # Not ended: cut at the limit.
  timings = {r[0]: r for r in table_rows(section(text, "## Stage timings"))}
  assert timings["**total**"][1] == "**173.8**"
  assert timings["ppo_ptx"][1:] == ["45.0", f"{100 * 45 / 173.75:.1f}%"]
# yapf: enable


def test_every_method_is_judged_against_sft_beside_its_alignment_tax():
  results = make_results()
  rows = report.method_rows(results)
  assert [r["method"] for r in rows] == ["PPO", "PPO-ptx"]
  assert rows[1]["win"]["win_rate"] == 0.652 and rows[1]["regression"] == 22.0 - 20.0
  sft = {"win_vs_sft": win(0.55, 0.5, 0.6), "perplexity": 25.5, "honest": 0.7, "harmless": 0.8}
  results["pretraining_with_feedback"] = {
      name: {"sft": dict(sft, perplexity=25.5 + i)}
      for i, name in enumerate(("mle", "filter", "conditional"))
  }
  rows = report.method_rows(results)
  assert [r["method"] for r in rows[2:]
         ] == ["SFT from filtering pretraining",
               "SFT from conditional training pretraining"]  # MLE's SFT is the SFT model itself.
  assert [r["regression"] for r in rows[2:]] == [26.5 - 20.0, 27.5 - 20.0]
  assert rows[3]["honest"] == 0.7 and rows[3]["win"]["ci_low"] == 0.5
  text = "\n".join(report._section_methods(results, {"methods": "plots/methods.png"}))
  cells = table_rows(text)[1:]  # Without the header.
  assert cells[0][:4] == ["PPO", "67.1% [60.3%, 73.3%]", "", "+6.00"]
  assert cells[3][0] == "SFT from conditional training pretraining" and cells[3][4] == "70.0%"
  # A method judged head to head against PPO-ptx too (every method row of results["methods"]).
  results["methods"] = {
      "hir": dict(sft, label="HIR", win_vs_ppo_ptx=win(0.4, 0.35, 0.45), perplexity=30.0,
                  wall_seconds=61.4)
  }
  cells = table_rows("\n".join(report._section_methods(results, {"methods": "m.png"})))[1:]
  assert cells[-1] == [
      "HIR", "55.0% [50.0%, 60.0%]", "40.0% [35.0%, 45.0%]", "+10.00", "70.0%", "80.0%", "61"
  ]
  assert cells[0][-1] == ""  # PPO's row: no wall time of its own.
  assert report.plot_methods(results) is not None and report.plot_methods({}) is None


def test_report_is_deterministic(written):
  root, path, results, text = written
  plots = os.path.join(root, "plots")
  before = {n: open(os.path.join(plots, n), "rb").read() for n in os.listdir(plots)}
  report.write_report(root, results, TIMINGS)
  assert open(path).read() == text
  assert {n: open(os.path.join(plots, n), "rb").read() for n in os.listdir(plots)} == before


def test_report_of_a_sparse_run(tmp_path):
  """No metrics files, no calibration, no samples or curves: the report still renders."""
  root = str(tmp_path)
  results = make_results(size_ratio=13.5)
  for key in ("over_optimization", "samples"):
    del results[key]
  path = report.write_report(root, results, {})
  text = open(path).read()
  for heading in SECTIONS:
    assert heading in text
  assert "rm_calibration.png" not in text and "smaller ratio" not in text
  assert "KL" not in text[:text.index("## Targets")]  # No PPO config.json: no KL line.
  assert "| pretrain | n/a | no metrics |" in text
  for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
    assert open(os.path.join(root, image), "rb").read().startswith(PNG_MAGIC)
  # Every target applies to the full preset.
  rows = table_rows(section(text, "## Targets"))[1:]
  assert [r[4] for r in rows] == ["yes"] * 5


def test_calibration_is_read_from_the_rm_metrics(tmp_path):
  root = make_run(str(tmp_path / "with"))
  cal = report.rm_calibration(root, make_results())
  assert cal["predicted"][1:] == [0.25, 0.45, 0.55, 0.8] and cal["count"][2] == 40
  assert cal["error"] == 0.0425
  assert report.rm_calibration(make_run(str(tmp_path / "without"), calibration=False)) is None
  assert report.plot_rm_calibration(None) is None
  assert report.figure_png(report.plot_rm_calibration(cal)).startswith(PNG_MAGIC)


def test_kl_setting_is_read_from_the_ppo_runs_configs(tmp_path):
  root = str(tmp_path)
  assert report.kl_setting(root) is None
  for stage in ("ppo", "ppo_ptx"):
    os.makedirs(os.path.join(root, stage))
  write_kl_config(root, "ppo", {"controller": "fixed", "initial_beta": 0.02})
  assert report.kl_setting(root) == "PPO: fixed KL coefficient beta=0.02"
  write_kl_config(root, "ppo_ptx", {"controller": "fixed", "initial_beta": 0.02})
  assert report.kl_setting(root) == "PPO and PPO-ptx: fixed KL coefficient beta=0.02"
  write_kl_config(root, "ppo_ptx",
                  {"controller": "adaptive", "initial_beta": 0.05, "target": 6.0, "horizon": 10000})
  assert report.kl_setting(root) == (
      "PPO: fixed KL coefficient beta=0.02; PPO-ptx: adaptive KL controller (initial "
      "beta=0.05, target 6 nats, horizon 10000)")


# --- wilson_interval() and win_rate() (experiments/world/evaluate.py). -----------------------

Z = 1.96  # evaluate.wilson_interval's default.


def wilson_by_quadratic(k, n, z=Z):
  """The Wilson interval from its definition, written independently of evaluate.py: the p
  with |k/n - p| <= z sqrt(p (1 - p) / n), i.e. the roots of
  (1 + z^2/n) p^2 - (2 k/n + z^2/n) p + (k/n)^2 = 0."""
  phat = k / n
  a, b, c = 1 + z * z / n, -(2 * phat + z * z / n), phat * phat
  root = math.sqrt(b * b - 4 * a * c)
  return (-b - root) / (2 * a), (-b + root) / (2 * a)


@pytest.mark.parametrize("k,n", [(0, 1), (0, 50), (50, 50), (1, 1), (3, 10), (130, 200), (240, 400),
                                 (399, 400), (1, 800)])
def test_wilson_interval_against_its_definition(k, n):
  low, high = ev.wilson_interval(k, n)
  assert (low, high) == pytest.approx(wilson_by_quadratic(k, n), abs=1e-12)
  assert 0 <= low <= k / n <= high <= 1


def test_wilson_interval_hand_computed_bounds():
  # 0 of n: [0, z^2 / (n + z^2)]; n of n: [n / (n + z^2), 1].
  for n in (1, 10, 400):
    assert ev.wilson_interval(0, n) == pytest.approx((0.0, Z * Z / (n + Z * Z)), abs=1e-12)
    assert ev.wilson_interval(n, n) == pytest.approx((n / (n + Z * Z), 1.0), abs=1e-12)
  # 0 of 10 by hand: 3.8416 / 13.8416 = 0.27754...
  assert ev.wilson_interval(0, 10)[1] == pytest.approx(0.277540, abs=1e-6)
  # 5 of 10 by hand: centre 0.5, half-width 1.96 sqrt(0.025 + 0.009604) / 1.38416 = 0.263410.
  assert ev.wilson_interval(5, 10) == pytest.approx((0.5 - 0.263410, 0.5 + 0.263410), abs=1e-6)
  # No data: the whole range.
  assert ev.wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_interval_against_scipy():
  stats = pytest.importorskip("scipy.stats")
  z = stats.norm.ppf(0.975)  # 1.959964..., so scipy's bounds differ from z = 1.96 by ~1e-5.
  for k, n in ((0, 40), (17, 40), (40, 40), (240, 400)):
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert ev.wilson_interval(k, n, z=z) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert ev.wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-4)


class StubJudge:
  """A judge whose utility is the answer's 'u' and who always prefers the higher one (equal:
  a coin flip), so the wins of a comparison are known without running win_rate's logic."""

  def utility(self, scores):
    return scores["u"]

  def prefers_first(self, u_a, u_b, rng):
    return bool(rng.random() < 0.5) if u_a == u_b else u_a > u_b


def scores(*utilities):
  return [{"u": u} for u in utilities]


@pytest.mark.parametrize("better,n", [(0, 20), (20, 20), (7, 20), (130, 200)])
def test_win_rate_counts_wins_with_a_wilson_interval(better, n):
  a = scores(*([1.0] * better + [0.0] * (n - better)))
  win = ev.win_rate(a, scores(*([0.5] * n)), [StubJudge(), StubJudge()], seed=0)
  assert win["n"] == n and win["ties"] == 0
  assert win["win_rate"] == better / n
  assert (win["ci_low"], win["ci_high"]) == pytest.approx(wilson_by_quadratic(better, n), abs=1e-12)
  if better == 0:
    assert win["ci_low"] == pytest.approx(0, abs=1e-12)
  if better == n:
    assert win["ci_high"] == pytest.approx(1, abs=1e-12)


def test_win_rate_counts_ties_and_flips_a_coin_for_them():
  n, ties = 400, 300
  a = scores(*([1.0] * 40 + [0.5] * ties + [0.0] * 60))  # 40 better, 300 equal, 60 worse.
  win = ev.win_rate(a, scores(*([0.5] * n)), [StubJudge()], seed=3)
  assert win["ties"] == ties
  wins = round(win["win_rate"] * n)
  # The 300 ties are coin flips: 150 +- 3 sd (26) of them won, besides the 40 sure wins.
  assert 40 + 150 - 26 <= wins <= 40 + 150 + 26
  assert ev.win_rate(a, scores(*([0.5] * n)), [StubJudge()], seed=3) == win  # By seed.


def test_win_rate_with_the_held_out_labelers():
  _, judges = labelers_lib.make_pools(labelers_lib.LabelerConfig())
  good = {"help": 1.0, "honest": 1.0, "harmless": 1.0, "format": 1.0}
  bad = {"help": 0.0, "honest": 0.0, "harmless": 0.0, "format": 0.0}
  # Identical answers: every pair a tie, about half won.
  same = ev.win_rate([good] * 2000, [good] * 2000, judges, seed=1)
  assert same["ties"] == 2000 and 0.46 < same["win_rate"] < 0.54
  assert same["ci_low"] < 0.5 < same["ci_high"]
  # A flawless answer against a useless one: every labeler's Bradley-Terry probability is
  # sigmoid(utility gap / temperature), near 1 at temperatures of at most 0.25.
  gaps = [j.utility(good) - j.utility(bad) for j in judges]
  p = np.mean(
      [labelers_lib.preference_probability(g, 0, j.temperature) for g, j in zip(gaps, judges)])
  assert p > 0.99
  sure = ev.win_rate([good] * 500, [bad] * 500, judges, seed=2)
  assert sure["ties"] == 0 and sure["win_rate"] >= 0.98
  flipped = ev.win_rate([bad] * 500, [good] * 500, judges, seed=2)
  assert flipped["win_rate"] <= 0.02


def test_provenance_names_the_machine_and_the_commit(tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  info = report.provenance(repo)
  assert info["machine"] and info["cpu_cores"] == os.cpu_count()
  if os.path.isdir(os.path.join(repo, ".git")):
    assert re.fullmatch(r"[0-9a-f]{12}(\+uncommitted)?", info["commit"]), info["commit"]
  assert report.provenance(str(tmp_path))["commit"] is None  # Not a git checkout.
