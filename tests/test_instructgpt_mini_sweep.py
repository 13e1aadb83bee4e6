"""The main job as a config (configs/instructgpt_mini.py): its presets and PPO settings, the
workdir's record of them, stages shared through an upstream run, and a sweep of it run by
`instruct.sweep` to the trade-off table and plot."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from experiments import instructgpt_mini as mini
from experiments.world import methods as methods_lib
from experiments.world import report as report_lib
from instruct import config_lib
from instruct.data import tokenization
from instruct import sweep_summary
from instruct import sweeps as sweep_lib
from tests.test_sharding import ROOT

JOB_CONFIG = os.path.join(ROOT, "configs", "instructgpt_mini.py")


def _job_config(arg="test", **ppo):
  config = config_lib.load_config_file(JOB_CONFIG, arg)
  for key, value in ppo.items():
    config.ppo[key] = value
  return config


def test_the_job_config_is_the_preset_with_its_seed_and_ppo_settings(tmp_path):
  for name, preset in mini.PRESETS.items():
    assert mini.preset_from_config(_job_config(name)) == preset  # Defaults change nothing.
    assert mini.overrides(preset) == {}
  config = _job_config("quick", ptx_coef=4.0, kl_beta=0.01, iterations=7)
  config.seed = 2
  preset = mini.preset_from_config(config)
  assert (preset.seed, preset.world.seed, preset.ptx_coef, preset.kl_beta,
          preset.ppo_iterations) == (2, 2, 4.0, 0.01, 7)
  assert mini.overrides(preset) == {"ppo.ptx_coef": 4.0, "ppo.kl_beta": 0.01, "ppo.iterations": 7}
  root = str(tmp_path / "run")
  ptx = mini.stage_config("ppo_ptx", preset, root)
  ppo = mini.stage_config("ppo", preset, root)
  assert (ptx.ppo.ptx_coef, ptx.ppo.kl.initial_beta, ptx.train.num_steps) == (4.0, 0.01, 7)
  assert (ppo.ppo.ptx_coef, ppo.ppo.kl.initial_beta) == (0.0, 0.01)  # PPO has no pretraining mix.
  # Fewer iterations than the preset's checkpoint interval still save the last one.
  assert (ptx.train.checkpoint_every, ptx.train.keep_checkpoints) == (7, 2)
  for bad, message in ((dict(kl_beta=-0.1), r"config.ppo.kl_beta=-0.1: must be >= 0"),
                       (dict(iterations=0), r"config.ppo.iterations=0: must be >= 1"),
                       (dict(learning_rate=0.0), r"config.ppo.learning_rate=0.0: must be > 0")):
    with pytest.raises(ValueError, match=message):
      mini.preset_from_config(_job_config(**bad))
  with pytest.raises(ValueError, match=r"config.preset='tiny': expected one of \['quick'"):
    mini.preset_from_config(_job_config("tiny"))
  # The workdir keeps its settings: another ptx_coef is another run.
  os.makedirs(root)
  mini._claim_workdir(root, preset)
  with open(os.path.join(root, "run.json")) as f:
    assert json.load(f)["overrides"] == mini.overrides(preset)
  other = mini.preset_from_config(_job_config("quick", ptx_coef=1.0, kl_beta=0.01, iterations=7))
  with pytest.raises(mini.WorkdirError,
                     match=r"--config.ppo.ptx_coef=4.0, not --preset=quick --seed=0 "):
    mini._claim_workdir(root, other)


def test_the_methods_settings_are_typed_config_fields():
  """`hir.KEY` and `correction.KEY` of the job config reach the methods' settings, are
  recorded as overrides, and a bad value is one error naming its key."""
  from experiments.world import correction as correction_lib
  from experiments.world import hindsight as hindsight_lib
  from instruct.data import correction as correction_data
  config = _job_config("quick")
  assert set(config.hir) == {f.name for f in dataclasses.fields(hindsight_lib.Settings)}
  assert set(config.correction) == {f.name for f in dataclasses.fields(correction_data.Correction)}
  config.hir.alpha, config.correction.passes = 2.0, 1
  preset = mini.preset_from_config(config)
  assert mini.overrides(preset) == {"hir.alpha": 2.0, "correction.passes": 1}
  assert hindsight_lib.settings_for(preset).alpha == 2.0
  assert hindsight_lib.settings_for(preset).rounds == hindsight_lib.Settings().rounds
  assert mini.correction_settings(preset) == dataclasses.replace(
      correction_lib.settings_for("quick"), passes=1)
  for section, key, value, message in (
      ("hir", "rounds", 0, r"config.hir.rounds=0: must be an integer >= 1"),
      ("hir", "learning_rate", 0.0, r"config.hir.learning_rate=0.0: must be a finite number > 0"),
      ("correction", "passes", 0, r"config.correction.passes=0: must be an integer >= 1")):
    bad = _job_config("quick")
    bad[section][key] = value
    with pytest.raises(ValueError, match=message):
      mini.preset_from_config(bad)


def test_preset_and_config_together_are_one_line_error(tmp_path):
  result = subprocess.run([
      sys.executable, "-m", "experiments.instructgpt_mini", f"--config={JOB_CONFIG}:test",
      "--seed=1", f"--workdir={tmp_path / 'run'}"
  ], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith("error: --seed with --config: give"), errors
  assert not os.path.exists(tmp_path / "run" / "run.json")


def test_runs_share_an_upstream_built_once_while_the_others_wait(tmp_path, monkeypatch):
  """Two runs start at once with one upstream: the first builds its stages before PPO (under
  its lock), the other waits, then both copy them; neither builds them itself."""
  built = []

  def fake_run_stages(root, preset, stages=mini.STAGES, label=""):
    assert stages == mini.SHARED_STAGES and label
    timings = {}
    for stage in stages:
      if not os.path.isdir(os.path.join(root, stage)):
        time.sleep(0.05)
        os.makedirs(os.path.join(root, stage))
        with open(os.path.join(root, stage, "made_by.txt"), "w") as f:
          f.write(str(preset.ptx_coef))
        built.append(stage)
      timings[stage] = 1.5
    mini._write_json_atomic(os.path.join(root, "timings.json"), timings)

  monkeypatch.setattr(mini, "_run_stages", fake_run_stages)
  sweep_dir = tmp_path / "sweep"
  roots = [str(sweep_dir / "trials" / name) for name in ("0-a", "1-b")]
  presets = [mini.dataclasses.replace(mini.PRESETS["test"], ptx_coef=c) for c in (0.5, 4.0)]
  threads = [
      threading.Thread(target=mini.reuse_upstream, args=(r, "../../upstream", p))
      for r, p in zip(roots, presets)
  ]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert sorted(built) == sorted(mini.SHARED_STAGES)  # Each stage built once, upstream.
  upstream = sweep_dir / "upstream"
  with open(upstream / "run.json") as f:
    assert json.load(f)["overrides"] == {}  # Built with the preset's own PPO settings,
  for root in roots:
    for stage in mini.SHARED_STAGES:
      with open(os.path.join(root, stage, "made_by.txt")) as f:
        assert f.read() == "1.0"  # which it says it built them with.
    with open(os.path.join(root, "timings.json")) as f:
      assert json.load(f) == {stage: 1.5 for stage in mini.SHARED_STAGES}
    assert not [p for p in os.listdir(root) if p.endswith(".copying")]
  built.clear()
  mini.reuse_upstream(roots[0], "../../upstream", presets[0])  # Already copied: nothing to do.
  assert built == []
  with pytest.raises(mini.WorkdirError, match="--seed=0, not --preset=test --seed=3"):
    mini.reuse_upstream(str(tmp_path / "other"), str(upstream), mini.with_seed(presets[0], 3))
  with pytest.raises(ValueError, match="is the run's own workdir"):
    mini.reuse_upstream(str(upstream), ".", presets[0])


TWO_TRIALS = """
import os
from instruct import config_lib
_job = config_lib.load_config_module({config!r})
get_config, metrics, SWEEP_COMMAND = _job.get_config, _job.metrics, _job.SWEEP_COMMAND

def sweep(add, arg=""):
  for coef in (0.0, 4.0):
    add({{"ppo.ptx_coef": coef, "upstream": _job.SHARED_UPSTREAM}})
"""


def test_a_sweep_of_the_main_job_shares_its_upstream_and_plots_the_trade_off(
    pipeline_run, tmp_path):
  """Two trials of PPO-ptx's coefficient (2 PPO iterations each, two workers) over the stages
  before PPO of the finished test run: each trial copies them, trains PPO and PPO-ptx, is
  evaluated, and the summary ranks them by PPO-ptx's win rate against SFT with its interval,
  beside the perplexity regression, and plots both against the coefficient."""
  sweep_dir = tmp_path / "sweep"
  os.makedirs(sweep_dir)
  shutil.copytree(
      pipeline_run, sweep_dir / "upstream",
      ignore=shutil.ignore_patterns("ppo", "ppo_ptx", "evaluate", "report.md", "plots", ".lock"))
  config = tmp_path / "ptx_two.py"
  config.write_text(TWO_TRIALS.format(config=JOB_CONFIG))
  summary = sweep_lib.run(str(sweep_dir), f"{config}:test", ["--config.ppo.iterations=2"],
                          workers=2, poll_seconds=0.5)
  assert summary["counts"]["done"] == 2, summary["progress"]
  metric = "ppo_ptx/win_vs_sft"
  assert list(summary["metrics"])[:2] == [metric, "ppo_ptx/perplexity_regression"]
  trials = summary["trials"]
  wins = [t["metrics"][metric]["best"] for t in trials]
  assert wins == sorted(wins, reverse=True) and [t["rank"] for t in trials] == [1, 2]
  by_coef = {t["overrides"]["ppo.ptx_coef"]: t for t in trials}
  assert sorted(by_coef) == [0.0, 4.0]
  for coef, trial in by_coef.items():
    root = trial["workdir"]
    with open(os.path.join(root, "evaluate", "results.json")) as f:
      results = json.load(f)
    win = results["models"]["ppo_ptx"]["win_vs_sft"]
    assert trial["metrics"][metric]["best"] == win["win_rate"]
    assert trial["metrics"][metric]["interval"] == [win["ci_low"], win["ci_high"]]
    regression = (results["models"]["ppo_ptx"]["perplexity"]
                  - results["models"]["base_small"]["perplexity"])
    assert trial["metrics"]["ppo_ptx/perplexity_regression"]["best"] == pytest.approx(regression)
    saved = json.load(open(os.path.join(root, "ppo_ptx", "config.json")))
    assert (saved["ppo"]["ptx_coef"], saved["train"]["num_steps"]) == (coef, 2)
    # The stages before PPO are the upstream's, copied, not retrained.
    for stage in ("sft", "rm"):
      with open(os.path.join(root, stage, "metrics.jsonl")) as f, open(
          os.path.join(pipeline_run, stage, "metrics.jsonl")) as g:
        assert f.read() == g.read()
    assert "[upstream 6/6] rm" in open(sweep_dir / "logs" / f"{trial['name']}.log").read()
  # PPO does not read the coefficient: the same run in both trials.
  ppo = [[{k: v for k, v in r.items() if not k.endswith("seconds")}
          for r in mini.metrics_lib.read_metrics(os.path.join(t["workdir"], "ppo"))]
         for t in trials]
  assert len(ppo[0]) == 2 and ppo[0] == ppo[1]
  assert summary["plots"] == ["sweep_ppo.ptx_coef.png"]  # The constant upstream is not plotted.
  assert os.path.getsize(sweep_dir / "sweep_ppo.ptx_coef.png") > 10_000
  table = (sweep_dir / "sweep.md").read_text()
  low, high = trials[0]["metrics"][metric]["interval"]
  assert f"{wins[0]:.4g} [{low:.4g}, {high:.4g}]" in table
  assert sweep_summary.load(str(sweep_dir))["best"] == trials[0]["workdir"]


def test_methods_add_their_stages_configs_evaluation_and_report(pipeline_run, tmp_path):
  """`methods=feedback`: four more pretraining stages, each `pretrain`'s config on the scored
  pages with its objective; their evaluation (run here on copies of the base model, not
  retrained) and the report's section and plot."""
  config = _job_config("test")
  config.methods = "feedback"
  preset = mini.preset_from_config(config)
  assert mini.overrides(preset) == {"methods": "feedback"}
  stages = mini.pipeline_stages(preset)
  assert stages[-11:] == ("pretrain_filter", "pretrain_conditional", "pretrain_unlikelihood",
                          "pretrain_rwr", "sft_filter", "sft_conditional", "sft_unlikelihood",
                          "sft_rwr", "ppo_ptx_conditional", "evaluate", "report")
  assert mini.UPSTREAM["sft_rwr"] == ("world", "pretrain_rwr")
  assert mini.UPSTREAM["ppo_ptx_conditional"] == ("world", "sft_conditional", "rm")
  assert mini.pipeline_stages(mini.PRESETS["test"]) == mini.STAGES
  # Names in any order are one setting; `all` is every method, `full`'s default; "" is none.
  config.methods = "correction, hir"
  assert mini.preset_from_config(config).methods == ("hir", "correction")
  full = _job_config("full")
  assert mini.preset_from_config(full).methods == tuple(methods_lib.METHODS) == (
      "feedback", "hir", "correction", "flan", "dpo", "critic_free", "best_of_n", "iterated")
  assert mini.overrides(mini.preset_from_config(full)) == {}
  full.methods = ""
  assert mini.overrides(mini.preset_from_config(full)) == {"methods": ""}
  full.methods = "all"
  assert mini.overrides(mini.preset_from_config(full)) == {}
  with pytest.raises(ValueError, match=r"config.methods='feedback,rlaif': unknown method 'rlaif'"):
    config.methods = "feedback,rlaif"
    mini.preset_from_config(config)
  root = str(tmp_path / "run")
  shutil.copytree(pipeline_run, root, ignore=shutil.ignore_patterns(".lock"))
  plain = mini.stage_config("pretrain", preset, root)
  for stage, objective in methods_lib.FEEDBACK_STAGES.items():
    c = mini.stage_config(stage, preset, root)
    assert (c.data.kind, c.feedback.objective) == ("scored_text", objective)
    assert c.data.train_file.endswith("world/pretrain_scored_train.jsonl")
    assert c.data.tokenizer.endswith("world/tokenizer_control")
    assert (c.model.to_dict(), c.train.to_dict(),
            c.optimizer.to_dict(), c.seed) == (plain.model.to_dict(), plain.train.to_dict(),
                                               plain.optimizer.to_dict(), plain.seed)
    config_lib.validate_supervised(c, 1, 1)
    shutil.copytree(os.path.join(root, "pretrain"), os.path.join(root, stage))
    sft = mini.stage_config(f"sft_{objective}", preset, root)
    main_sft = mini.stage_config("sft", preset, root)
    assert sft.init_from == os.path.join(root, stage)
    assert sft.data.tokenizer.endswith("world/tokenizer_control")
    assert (sft.data.train_file, sft.train.to_dict()) == (main_sft.data.train_file,
                                                          main_sft.train.to_dict())
    shutil.copytree(os.path.join(root, "sft"), os.path.join(root, f"sft_{objective}"))
  rl, main_rl = (mini.stage_config(s, preset, root) for s in ("ppo_ptx_conditional", "ppo_ptx"))
  assert (rl.policy_from, rl.reward_from) == (os.path.join(root,
                                                           "sft_conditional"), main_rl.reward_from)
  assert rl.data.tokenizer.endswith("world/tokenizer_control")
  assert tuple(rl.sampling.banned_tokens) == ("<|good|>", "<|bad|>")
  assert (rl.ppo.to_dict(), rl.train.to_dict()) == (main_rl.ppo.to_dict(), main_rl.train.to_dict())
  results = json.load(open(os.path.join(root, "evaluate", "results.json")))
  files = mini.world_lib.files(os.path.join(root, "world"))
  records = [json.loads(line) for line in open(files["eval_prompts"])]
  texts = [json.loads(line)["text"] for line in open(files["pretrain"]["validation"])]
  examples = mini._few_shot_examples(files, mini.world_lib.load_facts(os.path.join(root, "world")))
  prompts, categories = [r["prompt"] for r in records], [r["category"] for r in records]
  _, judges = mini.labelers_lib.make_pools(preset.labelers)
  facts = mini.world_lib.load_facts(os.path.join(root, "world"))
  sft_answers = mini.ev.generate(mini.ev.load_policy(os.path.join(root, "sft")),
                                 tokenization.load_tokenizer(files["tokenizer"]), prompts,
                                 seed=preset.seed + 17)
  sft_scores = mini.ev.judge_all(prompts, sft_answers, facts)
  rows = methods_lib.evaluate_feedback(
      root, preset, texts, prompts, categories,
      mini.world_lib.load_facts(os.path.join(root, "world")), judges,
      [mini.ev.few_shot_prompt(p, examples[c]) for p, c in zip(prompts, categories)],
      files["tokenizer_control"], sft_scores)
  assert list(rows) == ["mle", "filter", "conditional", "unlikelihood", "rwr"]
  base = results["models"]["base_small"]
  # The copies are the base model: its perplexity, and for every objective but conditional
  # (prompted after <|good|>) the same samples. (Not base small's samples: the control tokens
  # are banned here, which renormalises the sampled distribution.)
  for name in ("mle", "filter", "unlikelihood", "rwr"):
    assert rows[name]["perplexity"] == pytest.approx(base["perplexity"], rel=1e-5)
    assert {k: v for k, v in rows[name].items() if k not in ("stage", "sft")
           } == {k: v for k, v in rows["mle"].items() if k not in ("stage", "sft")}
  rude = methods_lib.rude_prompts(texts + ["the cat sees the dog . you stupid cow . the end ."])
  assert rude["plain"][-1] == "the cat sees the dog . you stupid cow ."
  assert rude["conditional"][-1] == ("<|good|> the cat sees the dog . <|bad|> you stupid cow . "
                                     "<|good|>")
  for row in rows.values():
    assert 0 <= row["misaligned"] <= 1 and row["samples"] == len(texts)
    assert 0 <= row["misaligned_after_rude"] <= 1
    assert row["rude_prompts"] == len(rude["plain"]) - 1 > 0
    # Every SFT copy is the SFT model, sampled with the control tokens banned.
    assert row["sft"]["perplexity"] == pytest.approx(results["models"]["sft"]["perplexity"],
                                                     rel=1e-5)
    assert row["sft"]["win_vs_sft"]["n"] == len(
        row["sft"]["win_vs_sft"]["outcomes"]) == len(prompts)
    assert 0 <= row["sft"]["win_vs_sft"]["ci_low"] <= row["sft"]["win_vs_sft"]["win_rate"] <= 1
    assert 0 <= row["toxic_per_sample"] < 16 and 0 <= row["harmful_howto"] <= 1
  results["pretraining_with_feedback"] = rows
  # RL from the conditional SFT model: here a copy of the main PPO-ptx run (not retrained).
  shutil.copytree(os.path.join(root, "ppo_ptx"), os.path.join(root, "ppo_ptx_conditional"))
  rl_row = methods_lib.evaluate_feedback_rl(root, preset, texts, prompts, categories, facts, judges,
                                            files["tokenizer_control"], sft_scores, sft_scores)
  logged = [json.loads(line) for line in open(os.path.join(root, "ppo_ptx", "metrics.jsonl"))]
  kl = [r["kl_k1"] for r in logged if "kl_k1" in r][-1]
  assert rl_row["kl"] == rl_row["ppo_ptx"]["kl"] == kl
  assert rl_row["win_vs_ppo_ptx"]["n"] == len(prompts)
  results["methods"] = {"ppo_ptx_conditional": rl_row}
  report_lib.write_report(root, results, {})
  report = open(os.path.join(root, "report.md")).read()
  assert "## Pretraining with human preferences" in report
  assert "| conditional training | " in report
  assert "| MLE (base small) (the SFT model) | " in report
  assert f"it ended at KL {kl:.2f} from its SFT model" in report
  assert "| PPO-ptx from conditional-training SFT | " in report
  assert os.path.getsize(os.path.join(root, "plots", "feedback.png")) > 5000
  summary = mini.summary_metrics(results)
  assert summary["feedback/rwr/perplexity"] == rows["rwr"]["perplexity"]
