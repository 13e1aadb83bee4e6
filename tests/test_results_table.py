"""experiments.results_table: the bootstrap over prompts and seeds, the table, the README."""

import json
import os

import numpy as np
import pytest

from experiments import results_table as rt
from experiments.world import evaluate as ev

MODELS = ("base_small", "base_large", "sft", "ppo", "ppo_ptx")


def outcomes(rate: float, n: int, rng) -> list[int]:
  """n judgments with exactly round(rate * n) wins, in random order."""
  wins = int(round(rate * n))
  return [int(x) for x in rng.permutation([1] * wins + [0] * (n - wins))]


# --- The bootstrap. --------------------------------------------------------------------------


def test_interval_contains_the_true_pooled_rate():
  """3 seeds x 400 prompts, each seed's judgments Bernoulli(p_s): over 40 such experiments
  the 95% interval holds the true pooled rate mean(p_s) about 95% of the time."""
  rng = np.random.default_rng(0)
  rates = (0.55, 0.60, 0.65)
  covered = 0
  for _ in range(40):
    groups = [(rng.random(400) < p).astype(int) for p in rates]
    low, high = rt.hierarchical_bootstrap(groups, num_resamples=4000)
    covered += low <= np.mean(rates) <= high
    assert low < np.mean(np.concatenate(groups)) < high  # The estimate is inside, too.
  assert covered >= 34  # 95% coverage; P(<= 33 of 40) < 1% at 0.95 (slightly wider here).


def test_seeds_that_disagree_widen_the_interval():
  rng = np.random.default_rng(1)
  agree = [outcomes(0.6, 400, rng) for _ in range(3)]
  disagree = [outcomes(p, 400, rng) for p in (0.45, 0.60, 0.75)]  # Same pooled rate, 60%.
  lo_a, hi_a = rt.hierarchical_bootstrap(agree)
  lo_d, hi_d = rt.hierarchical_bootstrap(disagree)
  assert np.mean(np.concatenate(agree)) == np.mean(np.concatenate(disagree)) == 0.6
  assert lo_a < 0.6 < hi_a and lo_d < 0.6 < hi_d
  # Agreeing seeds: about the binomial interval of 1200 prompts (+-2.8 points); seeds 15
  # points apart add their spread: more than twice as wide.
  assert hi_a - lo_a == pytest.approx(2 * 1.96 * np.sqrt(0.24 / 1200), rel=0.15)
  assert hi_d - lo_d > 2 * (hi_a - lo_a)


@pytest.mark.parametrize("wins,n", [(240, 400), (130, 200), (350, 400), (200, 400)])
def test_one_seed_is_about_the_wilson_interval(wins, n):
  rng = np.random.default_rng(2)
  low, high = rt.hierarchical_bootstrap([outcomes(wins / n, n, rng)])
  w_low, w_high = ev.wilson_interval(wins, n)
  assert low == pytest.approx(w_low, abs=0.01) and high == pytest.approx(w_high, abs=0.01)


def test_binomial_draws_match_resampling_prompt_indices():
  """The prompt level is drawn as a binomial; drawing the prompts' indices gives the same
  interval (written out naively here: seeds with replacement, then prompts within each)."""
  rng = np.random.default_rng(3)
  groups = [outcomes(p, n, rng) for p, n in ((0.5, 300), (0.7, 200), (0.6, 250))]
  stats = []
  for _ in range(4000):
    drawn = [np.asarray(groups[s]) for s in rng.integers(0, 3, size=3)]
    resampled = [g[rng.integers(0, len(g), size=len(g))] for g in drawn]
    stats.append(np.concatenate(resampled).mean())
  naive = np.quantile(stats, [0.025, 0.975])
  assert rt.hierarchical_bootstrap(groups) == pytest.approx(tuple(naive), abs=0.01)


def test_bootstrap_is_reproducible_and_checks_its_input():
  groups = [[1, 0, 1, 1], [0, 0, 1]]
  assert rt.hierarchical_bootstrap(groups) == rt.hierarchical_bootstrap(groups)
  with pytest.raises(ValueError, match="0 or 1"):
    rt.hierarchical_bootstrap([[1, 0.5]])
  with pytest.raises(ValueError, match="at least one"):
    rt.hierarchical_bootstrap([[1], []])


def test_pooled_win_counts_every_prompt_of_every_seed():
  win = rt.pooled_win([[1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
  assert win["win_rate"] == 0.6 and win["n"] == 10 and win["seeds"] == 2
  assert 0 <= win["ci_low"] <= 0.6 <= win["ci_high"] <= 1


# --- Runs, the table and the README. ---------------------------------------------------------


def table_cells(line: str) -> list[str]:
  """A markdown table row's cells ([] for other lines and the separator)."""
  if not line.startswith("| "):
    return []
  return [c.strip() for c in line.strip().strip("|").split("|")]


def win(rate: float, n: int, rng) -> dict:
  o = outcomes(rate, n, rng)
  low, high = ev.wilson_interval(sum(o), n)
  return {"win_rate": sum(o) / n, "ci_low": low, "ci_high": high, "n": n, "ties": 0, "outcomes": o}


def make_run(root, seed: int, preset: str = "quick", ptx: float = 0.6, n: int = 400,
             outcomes_kept: bool = True) -> str:
  """A run directory holding what results_table reads: evaluate/results.json (the main job's
  schema), timings.json and run.json."""
  rng = np.random.default_rng(seed)
  models = {}
  for i, m in enumerate(MODELS):
    models[m] = {
        "perplexity": 3.0 + i, "made_up_closed_qa": 0.7 - 0.15 * i + 0.01 * seed,
        "toxic_respectful": 0.1 - 0.02 * i,
        "counts": {"closed_qa": 40 + 20 * seed,
                   "respectful": 40}, "win_vs_sft": win({"ppo_ptx": ptx, "ppo": 0.62}.get(m, 0.3),
                                                        n, rng)
    }
  results = {
      "preset": preset, "seed": seed, "eval_prompts": n, "models": models,
      "ppo_ptx_vs_base_large": win(0.72, n, rng),
      "rm": {"heldout_accuracy": 0.65 + 0.01 * seed, "labeler_agreement_heldout": 0.8}
  }
  if not outcomes_kept:
    del results["models"]["ppo"]["win_vs_sft"]["outcomes"]
  directory = os.path.join(str(root), f"{preset}_{seed}")
  os.makedirs(os.path.join(directory, "evaluate"))
  with open(os.path.join(directory, "evaluate", "results.json"), "w") as f:
    json.dump(results, f)
  with open(os.path.join(directory, "timings.json"), "w") as f:
    json.dump({"pretrain": 100.0, "ppo": 300.0 + seed}, f)
  with open(os.path.join(directory, "run.json"), "w") as f:
    json.dump(
        {
            "preset": preset, "seed": seed, "machine": "Test CPU @ 1.00GHz", "cpu_cores": 2,
            "commit": "abc123def456"
        }, f)
  return directory


def test_table_pools_the_seeds_and_judges_the_targets(tmp_path, capsys):
  dirs = [make_run(tmp_path, s, ptx=p) for s, p in ((2, 0.58), (0, 0.60), (1, 0.62))]
  assert rt.main(dirs) == 0
  text = capsys.readouterr().out
  assert "Preset `quick`, seeds 0, 1, 2; 400 held-out evaluation prompts per seed." in text
  assert "Test CPU @ 1.00GHz (2 cores)" in text and "commit abc123def456" in text
  rows = {cells[0]: cells for cells in map(table_cells, text.splitlines()) if cells}
  ptx = rows["PPO-ptx vs SFT"]
  assert [c.split()[0] for c in ptx[1:]] == ["60.0%", "62.0%", "58.0%", "60.0%"]  # By seed.
  assert rows["held-out corpus perplexity: base / SFT / PPO / PPO-ptx"][-1] == (
      "3.00 / 5.00 / 6.00 / 7.00")
  # Rates are pooled by their category's prompts: closed QA has 40, 60, 80 prompts at seeds
  # 0, 1, 2, so SFT's 40%, 41%, 42% pool to 74.2 / 180 = 41.2% (not their mean, 41.0%).
  assert rows["made-up closed-QA answers: SFT -> PPO-ptx"][1:] == [
      "40.0% -> 10.0%", "41.0% -> 11.0%", "42.0% -> 12.0%", "41.2% -> 11.2%"
  ]
  assert rows["RM accuracy on held-out labelers (labeler agreement)"][-1] == "66.0% (80.0%)"
  assert rows["wall time of the pipeline (timings.json)"][1:] == [
      "6 min 40 s", "6 min 41 s", "6 min 42 s", "mean 6 min 41 s"
  ]
  # Targets: PPO-ptx's pooled 60% is significant (a, all presets): met, and it applies.
  target = rows["(a, all presets) PPO-ptx preferred to SFT (95% CI lower bound)"]
  assert target[3:] == ["met", "yes"]
  assert rows["(b) PPO-ptx (small) preferred to the larger base model (few-shot)"][3:] == [
      "met", "no (full only)"
  ]
  assert "Targets, judged on the pooled values: 1 of 1 that apply to `quick` met." in text


def test_a_target_not_met_says_so(tmp_path, capsys):
  dirs = [make_run(tmp_path, s, ptx=0.5, preset="full") for s in (0, 1)]
  assert rt.main(dirs) == 0
  text = capsys.readouterr().out
  assert "| (a, all presets) PPO-ptx preferred to SFT (95% CI lower bound) |" in text
  line = next(l for l in text.splitlines() if l.startswith("| (a, all presets)"))
  assert table_cells(line)[3:] == ["not met", "yes"]


def test_readme_rewrite_changes_only_the_section(tmp_path, capsys):
  dirs = [make_run(tmp_path, s) for s in (0, 1)]
  readme = tmp_path / "README.md"
  before = ("# Title\n\ntext before\n\n<!-- results:full:begin -->\nfull stays\n"
            "<!-- results:full:end -->\n\n<!-- results:quick:begin -->\nold quick numbers\n"
            "<!-- results:quick:end -->\n\ntext after\n")
  readme.write_text(before)
  assert rt.main(dirs + ["--readme", str(readme)]) == 0
  printed = capsys.readouterr().out
  after = readme.read_text()
  head, rest = before.split("<!-- results:quick:begin -->")
  tail = rest.split("<!-- results:quick:end -->")[1]
  assert after.startswith(head + "<!-- results:quick:begin -->\n")
  assert after.endswith("<!-- results:quick:end -->" + tail)
  section = after[len(head)
                  + len("<!-- results:quick:begin -->"):-len("<!-- results:quick:end -->" + tail)]
  assert section.strip() == printed.strip() and "old quick numbers" not in section
  assert "seeds 0, 1" in section
  # Again: the same file (idempotent).
  assert rt.main(dirs + ["--readme", str(readme)]) == 0
  assert readme.read_text() == after


@pytest.mark.parametrize("text", [
    "no markers here\n", "<!-- results:quick:begin -->\nonly the start\n",
    "<!-- results:quick:end -->\nreversed\n<!-- results:quick:begin -->\n",
    "<!-- results:full:begin -->\nanother preset's\n<!-- results:full:end -->\n"
])
def test_readme_without_the_presets_markers_is_a_clear_error(tmp_path, capsys, text):
  readme = tmp_path / "README.md"
  readme.write_text(text)
  assert rt.main([make_run(tmp_path, 0), "--readme", str(readme)]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1
  assert "<!-- results:quick:begin -->" in err and "<!-- results:quick:end -->" in err
  assert readme.read_text() == text  # Untouched.


def test_mismatched_presets_are_an_error(tmp_path, capsys):
  dirs = [make_run(tmp_path, 0, preset="quick"), make_run(tmp_path, 1, preset="full")]
  assert rt.main(dirs) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "different presets" in err
  assert "quick" in err and "full" in err


def test_runs_of_different_ppo_settings_are_an_error(tmp_path, capsys):
  """Trials of a sweep of the main job (run.json `overrides`) are not seeds of one run."""
  dirs = [make_run(tmp_path, 0), make_run(tmp_path, 1)]
  path = os.path.join(dirs[1], "run.json")
  with open(path) as f:
    info = json.load(f)
  with open(path, "w") as f:
    json.dump({**info, "overrides": {"ppo.ptx_coef": 4.0}}, f)
  assert rt.main(dirs) == 1
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "differ in their PPO settings" in err
  assert "ppo.ptx_coef" in err and dirs[1] in err


@pytest.mark.parametrize("problem,message", [("missing", "results.json is missing"),
                                             ("repeated", "seeds repeat"),
                                             ("no_outcomes", "no per-prompt outcomes")])
def test_unusable_runs_are_an_error(tmp_path, capsys, problem, message):
  dirs = [make_run(tmp_path, 0)]
  if problem == "missing":
    dirs.append(str(tmp_path / "not_a_run"))
  elif problem == "repeated":
    dirs.append(make_run(tmp_path / "again", 0))
  else:
    dirs.append(make_run(tmp_path, 1, outcomes_kept=False))
  assert rt.main(dirs) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1 and message in err


def test_one_seed_pools_to_its_own_numbers(tmp_path):
  runs = rt.load_runs([make_run(tmp_path, 4)])
  pooled = rt.pooled_results(runs)
  own = runs[0].results["models"]["ppo_ptx"]["win_vs_sft"]
  mine = pooled["models"]["ppo_ptx"]["win_vs_sft"]
  assert mine["win_rate"] == own["win_rate"] and mine["n"] == own["n"]
  assert mine["ci_low"] == pytest.approx(own["ci_low"], abs=0.01)
  assert mine["ci_high"] == pytest.approx(own["ci_high"], abs=0.01)


def test_every_method_is_pooled_against_sft_and_ppo_ptx_with_a_verdict(tmp_path, capsys):
  """Method rows (`results["methods"]`, e.g. HIR) pool like the win rates: all seeds' prompts,
  the interval over prompts and seeds; the verdict follows the pooled interval."""
  dirs = []
  for seed, (hir, hir_vs_ptx) in enumerate(((0.70, 0.40), (0.72, 0.42), (0.68, 0.38))):
    directory = make_run(tmp_path, seed)
    path = os.path.join(directory, "evaluate", "results.json")
    results = json.load(open(path))
    rng = np.random.default_rng(10 + seed)
    wins = {"win_vs_sft": win(hir, 400, rng), "win_vs_ppo_ptx": win(hir_vs_ptx, 400, rng)}
    results["methods"] = {
        "hir": {
            "label": "HIR", **wins, "perplexity": 5.0 + seed, "honest": 0.9, "harmless": 1.0,
            "wall_seconds": 60.0 + 30 * seed
        }
    }
    # The frontier: SFT, then two checkpoints; gold peaks at the middle one.
    results["frontier"] = {
        "hir": {
            "points": [{"kl": 0.0, "labeler_score": 0.5, "rm_score": 0.0},
                       {"kl": 1.0, "labeler_score": 0.6 + 0.01 * seed, "rm_score": 1.0},
                       {"kl": 4.0, "labeler_score": 0.55, "rm_score": 2.0 + seed}], "fit": None
        }
    }
    json.dump(results, open(path, "w"))
    dirs.append(directory)
  assert rt.main(dirs) == 0
  text = capsys.readouterr().out
  rows = {}
  for cells in filter(None, map(table_cells, text.splitlines())):
    rows.setdefault(cells[0], cells)  # The methods table's row (the frontier's comes after).
  hir = rows["HIR"]
  assert hir[1].startswith("70.0% [") and hir[2] == "70.0% / 72.0% / 68.0%"
  assert hir[3].startswith("40.0% [") and hir[4:] == ["+3.00", "90.0%", "100.0%", "1 min 30 s"]
  frontier = [table_cells(line) for line in text.splitlines() if line.startswith("| HIR | 2.00 |")
             ][0]
  # Last d = sqrt(4); gold +0.05 every seed; proxy +2, +3, +4; best +0.10 [+0.10, +0.12] at d 1.
  assert frontier[2:] == [
      "+0.050 [+0.050, +0.050]", "+3.000 [+2.000, +4.000]", "+0.110 [+0.100, +0.120]", "1.00"
  ]
  pooled = rt.pooled_methods(rt.load_runs(dirs))
  assert pooled[-1]["win"]["n"] == 1200 and pooled[-1]["win"]["ci_high"] < 0.8
  assert "These beat SFT: PPO (" in text and "; HIR (70.0% [" in text
  assert "These lose to PPO-ptx: HIR (40.0% [" in text
  assert rows["PPO-ptx"][3] == ""  # Not judged against itself.
  assert rt.main(dirs + ["--methods_only"]) == 0
  alone = capsys.readouterr().out
  assert "Targets" not in alone and "| HIR | " + " | ".join(hir[1:]) + " |" in alone


def test_runs_with_overrides_rewrite_their_own_section(tmp_path, capsys):
  """Runs of a setting other than the preset's (run.json `overrides`) have their section, named
  by preset and settings; the plain preset's section stays."""
  dirs = []
  for seed in (0, 1):
    directory = make_run(tmp_path, seed)
    info = json.load(open(os.path.join(directory, "run.json")))
    json.dump(dict(info, overrides={"methods": "hir,flan"}),
              open(os.path.join(directory, "run.json"), "w"))
    dirs.append(directory)
  readme = tmp_path / "README.md"
  before = ("<!-- results:quick:begin -->\nplain quick\n<!-- results:quick:end -->\n"
            "<!-- results:quick methods=hir,flan:begin -->\nstale numbers\n"
            "<!-- results:quick methods=hir,flan:end -->\n")
  readme.write_text(before)
  assert rt.main(dirs + ["--readme", str(readme)]) == 0
  after = readme.read_text()
  assert after.startswith("<!-- results:quick:begin -->\nplain quick\n<!-- results:quick:end -->")
  assert "stale numbers" not in after and "seeds 0, 1" in after
