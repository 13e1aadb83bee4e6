"""DPO, RLOO, GRPO and best-of-N in the main job, and the over-optimisation frontier."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from experiments import instructgpt_mini as mini
from experiments.world import beyond
from experiments.world import report as report_lib
from experiments.world import generate as world_lib
from instruct import config_lib
from instruct import metrics as metrics_lib
from instruct.data import tokenization
from instruct.rl import best_of_n as bon


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_the_fitted_forms_recover_the_curve_they_were_made_from(form):
  alpha, beta = 0.8, 0.3 if form == "bon" else 0.2
  d = np.asarray([0.0, 0.3, 0.7, 1.1, 1.6, 2.4])
  g = d if form == "bon" else np.log(np.maximum(d, 1e-12))
  gold = 0.25 + np.where(d > 0, d * (alpha - beta * g), 0.0)
  points = [{"kl": float(x * x), "labeler_score": float(y)} for x, y in zip(d, gold)]
  fit = beyond.fit_gold(points, form)
  assert fit["alpha"] == pytest.approx(alpha, abs=1e-9)
  assert fit["beta"] == pytest.approx(beta, abs=1e-9)
  assert fit["rmse"] < 1e-9 and fit["points"] == 5
  assert beyond.fit_gold(points[:2], form) is None  # One point at d > 0: nothing to fit.
  with pytest.raises(ValueError, match="form="):
    beyond.fit_gold(points, "linear")


def test_the_methods_stage_configs_are_on_equal_terms_with_ppo_and_the_rm(pipeline_run):
  config = config_lib.load_config_file(mini.JOB_CONFIG, "test")
  config.methods = "dpo,critic_free,best_of_n"
  preset = mini.preset_from_config(config)
  assert mini.pipeline_stages(preset)[-7:] == ("dpo", "dpo_pl", "rloo", "grpo", "best_of_n",
                                               "evaluate", "report")
  rm = mini.stage_config("rm", preset, pipeline_run)
  ppo = mini.stage_config("ppo", preset, pipeline_run)
  for stage, loss in (("dpo", "dpo"), ("dpo_pl", "plackett_luce")):
    c = mini.stage_config(stage, preset, pipeline_run)
    assert (c.stage, c.dpo.loss, c.init_from) == ("dpo", loss, rm.init_from)
    assert c.data.train_file == rm.data.train_file and c.train.num_steps == rm.train.num_steps
  for stage in ("rloo", "grpo"):
    c = mini.stage_config(stage, preset, pipeline_run)
    k = c[stage].samples_per_prompt
    assert (c.algorithm, k) == (stage, beyond.SAMPLES_PER_PROMPT)
    assert c.train.global_batch_size * k == ppo.train.global_batch_size  # Same samples.
    assert c.train.num_steps == ppo.train.num_steps
    assert c[stage].kl.initial_beta == ppo.ppo.kl.initial_beta
  c = mini.stage_config("best_of_n", preset, pipeline_run)
  assert c.best_of_n.n == beyond.BEST_OF_N_SIZE["test"]
  assert c.data.validation_file == world_lib.files(os.path.join(pipeline_run,
                                                                "world"))["eval_prompts"]


def test_the_methods_train_and_reach_the_frontier_and_the_report(pipeline_run, tmp_path):
  """`methods=dpo,critic_free,best_of_n` on a copy of the test pipeline: every stage trains,
  each is judged against SFT and PPO-ptx, and every method is on the frontier."""
  config = config_lib.load_config_file(mini.JOB_CONFIG, "test")
  config.methods = "dpo,critic_free,best_of_n"
  config.ppo.iterations = 2  # RLOO's and GRPO's (PPO's runs are the copied pipeline's).
  preset = mini.preset_from_config(config)
  root = str(tmp_path / "run")
  shutil.copytree(pipeline_run, root, ignore=shutil.ignore_patterns(".lock"))
  for stage in ("dpo", "dpo_pl", "rloo", "grpo", "best_of_n"):
    mini.train_stage(stage, preset, root)
  for stage in ("rloo", "grpo"):
    records = [r for r in metrics_lib.read_metrics(os.path.join(root, stage)) if "kl_k1" in r]
    assert len(records) == preset.ppo_iterations
  for stage in ("dpo", "dpo_pl"):
    steps = mini.run_lib.checkpoint_steps(os.path.join(root, stage))
    num_steps = mini.stage_config(stage, preset, root).train.num_steps
    # Points along the epoch for the frontier.
    assert steps[-1] == num_steps and len(steps) == min(beyond.DPO_CHECKPOINTS, num_steps)
  results = json.load(open(os.path.join(root, "evaluate", "results.json")))
  files = world_lib.files(os.path.join(root, "world"))
  facts = world_lib.load_facts(os.path.join(root, "world"))
  records = [json.loads(line) for line in open(files["eval_prompts"])]
  prompts, categories = [r["prompt"] for r in records], [r["category"] for r in records]
  texts = [json.loads(line)["text"] for line in open(files["pretrain"]["validation"])]
  _, judges = mini.labelers_lib.make_pools(preset.labelers)
  tok = tokenization.load_tokenizer(files["tokenizer"])
  scores = {
      name: mini.ev.judge_all(
          prompts,
          mini.ev.generate(mini.ev.load_policy(os.path.join(root, name)), tok, prompts,
                           seed=preset.seed + 17, temperature=preset.eval_temperature), facts)
      for name in ("sft", "ppo_ptx")
  }
  results["methods"] = {}
  mini._evaluate_beyond(preset, root, results, tok, prompts, categories, facts, judges, texts,
                        scores)
  methods, frontier = results["methods"], results["frontier"]
  assert set(methods) == {"dpo", "dpo_pl", "rloo", "grpo", "best_of_n"}
  for row in methods.values():
    assert row["win_vs_sft"]["n"] == len(prompts) and "win_vs_ppo_ptx" in row
    assert 0 <= row["win_vs_sft"]["ci_low"] <= row["win_vs_sft"]["win_rate"] <= 1
  assert set(frontier) == {"ppo", "ppo_ptx", "dpo", "dpo_pl", "rloo", "grpo", "best_of_n"}
  for name, entry in frontier.items():
    first = entry["points"][0]
    if name != "best_of_n":  # Step 0 is SFT itself: no KL, SFT's scores.
      assert first["step"] == 0 and abs(first["kl"]) < 1e-4
      assert first["labeler_score"] == frontier["ppo"]["points"][0]["labeler_score"]
  curve = frontier["best_of_n"]["points"]
  n = beyond.BEST_OF_N_SIZE["test"]
  assert [p["n"] for p in curve] == list(bon.sizes(n))
  assert [p["kl"] for p in curve] == [bon.analytic_kl(k) for k in bon.sizes(n)]
  # Best-of-1 is SFT's own answers: its proxy score is the mean over all of them.
  samples = [json.loads(line) for line in open(os.path.join(root, "best_of_n", bon.SAMPLES))]
  assert len(samples) == len(prompts)
  from instruct.reward import RewardModel
  flat = [a for group in beyond._answers(samples, tok) for a in group]
  flat_prompts = [r["prompt"] for r in samples for _ in range(n)]
  proxy = mini.ev.reward_scores(RewardModel.load(os.path.join(root, "rm")),
                                mini.ev.response_arrays(tok, flat_prompts, flat))
  assert curve[0]["rm_score"] == pytest.approx(float(np.mean(proxy)), abs=1e-6)
  assert curve[-1]["rm_score"] > curve[0]["rm_score"]  # The RM's choice scores higher by it.
  report_lib.write_report(root, results, {})
  report = open(os.path.join(root, "report.md")).read()
  assert "## The over-optimisation frontier" in report
  assert "| Best-of-4 (RM-selected SFT samples) |" in report
  for label in ("DPO (all ranked pairs)", "DPO, Plackett-Luce (K-wise)", "RLOO", "GRPO"):
    assert f"| {label} |" in report
  assert os.path.exists(os.path.join(root, "plots", "frontier.png"))
  assert math.isfinite(mini.summary_metrics(results)["rloo/win_vs_sft"])


def test_iterated_rlhf_runs_its_rounds_on_the_current_policy_and_resumes(pipeline_run, tmp_path):
  """`methods=iterated` on a copy of the test pipeline: two rounds, each ranking the current
  policy's answers, training a reward model on every round's comparisons so far and PPO-ptx
  from the last policy; a rerun changes nothing."""
  from experiments.world import iterated
  config = config_lib.load_config_file(mini.JOB_CONFIG, "test")
  config.methods = "iterated"
  assert iterated.iterations(
      mini.preset_from_config(config)) == mini.PRESETS["test"].ppo_iterations // 2
  config.iterated.iterations = 2  # Short rounds: what is tested is the rounds' plumbing.
  preset = mini.preset_from_config(config)
  assert iterated.rounds(preset) == 2 and iterated.iterations(preset) == 2
  root = str(tmp_path / "run")
  shutil.copytree(pipeline_run, root, ignore=shutil.ignore_patterns(".lock"))
  mini.composite_stage("iterated", preset, root)
  done = json.load(open(os.path.join(root, "iterated", "done.json")))
  assert done["policy"] == iterated.policy_dir(root,
                                               2) and done["step"] == iterated.iterations(preset)

  def lines(path):
    return open(path).read().splitlines()

  main = lines(os.path.join(root, "comparisons", "comparisons_train.jsonl"))
  union = {
      r: lines(os.path.join(iterated.round_dir(root, r), "comparisons", "comparisons_train.jsonl"))
      for r in (1, 2)
  }
  new = {
      r: lines(os.path.join(iterated.round_dir(root, r), "new", "comparisons_train.jsonl"))
      for r in (1, 2)
  }
  assert union[1] == main + new[1] and union[2] == main + new[1] + new[2]
  assert new[1] != new[2] and len(new[1]) > 0
  for r in (1, 2):
    c = json.load(open(os.path.join(iterated.policy_dir(root, r), "config.json")))
    assert c["policy_from"] == iterated.policy_dir(root, r - 1)
    assert c["reward_from"] == os.path.join(iterated.round_dir(root, r), "rm")
    records = [x for x in metrics_lib.read_metrics(iterated.policy_dir(root, r)) if "kl_k1" in x]
    assert len(records) == iterated.iterations(preset) and abs(records[0]["kl_k1"]) < 1e-3
  snapshot = {
      p: open(p, "rb").read() for p in (os.path.join(iterated.round_dir(root, r), d, f)
                                        for r in (1, 2) for d in ("new", "comparisons")
                                        for f in ("comparisons_train.jsonl",))
  }
  os.remove(os.path.join(root, "iterated", "done.json"))  # Finished rounds are skipped.
  mini.composite_stage("iterated", preset, root)
  assert {p: open(p, "rb").read() for p in snapshot} == snapshot
  config.iterated.rounds = 0
  with pytest.raises(ValueError, match="config.iterated.rounds=0"):
    mini.preset_from_config(config)
