"""The main job end to end at its `test` preset: every stage, the report, resume, determinism;
that its RL stages do their job; its seed, RM epochs, KL coefficient and per-prompt outcomes."""

import dataclasses
import json
import math
import os
import re
import shutil

import numpy as np
import pytest

from experiments import instructgpt_mini as mini
from experiments.world import evaluate as ev
from experiments.world import labelers as labelers_lib
from experiments.world import tasks as T
from instruct import checkpoint as ckpt_lib
from instruct import config_lib
from instruct import metrics as metrics_lib
from instruct.model import ModelConfig
from tests.conftest import run_test_pipeline

PRESET = mini.PRESETS["test"]
TRAINING_STAGES = ("pretrain", "pretrain_large", "sft", "rm", "ppo", "ppo_ptx")


def _results(root):
  with open(os.path.join(root, "evaluate", "results.json")) as f:
    return json.load(f)


def test_every_stage_finishes_in_its_own_run_directory(pipeline_run):
  for stage in TRAINING_STAGES:
    config = mini.stage_config(stage, PRESET, pipeline_run)
    workdir = os.path.join(pipeline_run, stage)
    saved = ckpt_lib.read_config(workdir)
    assert saved["stage"] == config.stage
    checkpointer = ckpt_lib.Checkpointer(workdir)
    assert checkpointer.latest_step() == config.train.num_steps, stage
    checkpointer.close()
  # The larger base model is larger, by the ratio the report states.
  results = _results(pipeline_run)
  assert results["size_ratio"] == pytest.approx(
      mini._non_embedding_params(PRESET.large) / mini._non_embedding_params(PRESET.small))
  assert results["size_ratio"] > 1


def test_from_run_config_is_the_saved_config_and_overridable(pipeline_run, tmp_path):
  """configs/from_run.py:RUN_DIR gives the stage's saved config (tuples restored), and its
  model fields stay settable as the command line would set them, `attention_bias` saved as
  null included."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = os.path.join(pipeline_run, "sft")
  config = config_lib.load_config_file(os.path.join(root, "configs", "from_run.py"), workdir)
  assert json.loads(config.to_json()) == ckpt_lib.read_config(workdir)
  assert isinstance(config.data.buckets, tuple)
  assert ModelConfig.from_dict(config.model).attn_bias == config.model.use_bias
  # A run whose config saved `attention_bias: null` (config_lib.model_config's default).
  saved = ckpt_lib.read_config(workdir)
  saved["model"]["attention_bias"] = None
  with open(tmp_path / "config.json", "w") as f:
    json.dump(saved, f)
  config = config_lib.load_config_file(os.path.join(root, "configs", "from_run.py"), str(tmp_path))
  assert config.model.attention_bias is None
  config.model.attention_bias = False
  with pytest.raises(TypeError):
    config.model.attention_bias = "no"
  with pytest.raises(FileNotFoundError, match="no saved config"):
    config_lib.load_config_file(os.path.join(root, "configs", "from_run.py"), pipeline_run)


def test_comparisons_are_ranked_by_the_right_labeler_pools(pipeline_run):
  train_pool, heldout_pool = labelers_lib.make_pools(PRESET.labelers)
  pools = {"train": {l.id for l in train_pool}, "validation": {l.id for l in heldout_pool}}
  assert not pools["train"] & pools["validation"]
  for split, ids in pools.items():
    with open(os.path.join(pipeline_run, "comparisons", f"comparisons_{split}.jsonl")) as f:
      rows = [json.loads(line) for line in f]
    assert rows, split
    for row in rows:
      assert row["labeler"] in ids
      k = len(row["responses"])
      assert 2 <= k <= PRESET.responses_per_prompt
      assert sorted(row["ranking"]) == list(range(k))
      assert len(set(row["responses"])) == k  # Distinct answers only.


def test_report_is_complete(pipeline_run):
  results = _results(pipeline_run)
  assert set(results["models"]) == set(mini.MODELS)
  for name, model in results["models"].items():
    win = model["win_vs_sft"]
    assert 0 <= win["ci_low"] <= win["win_rate"] <= win["ci_high"] <= 1, name
    assert win["n"] == PRESET.world.eval_prompts
    assert model["perplexity"] > 1
  for name in ("ppo", "ppo_ptx"):
    steps = [p["step"] for p in results["over_optimization"][name]]
    assert steps == list(range(0, PRESET.ppo_iterations + 1, PRESET.checkpoint_every))
    assert results["over_optimization"][name][0]["kl"] == pytest.approx(0, abs=1e-4)
  with open(os.path.join(pipeline_run, "report.md")) as f:
    report = f.read()
  for heading in ("## Targets", "## Win rates against SFT", "## Alignment tax", "## Reward model",
                  "## Honesty and harmlessness", "## Over-optimisation", "## Samples",
                  "## Training curves"):
    assert heading in report, heading
  images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report)
  assert len(images) >= 5
  for image in images:
    with open(os.path.join(pipeline_run, image), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", image
  ptx = results["models"]["ppo_ptx"]["win_vs_sft"]["win_rate"]
  assert f"{100 * ptx:.1f}%" in report


def test_interrupted_pipeline_resumes_to_the_same_numbers(pipeline_run, tmp_path):
  """Drop the evaluation and PPO-ptx's last checkpoint: the rerun resumes PPO-ptx from its
  previous checkpoint, skips every finished stage, and reproduces the numbers exactly."""
  root = str(tmp_path / "run")
  shutil.copytree(pipeline_run, root)
  steps = ckpt_lib.Checkpointer(os.path.join(root, "ppo_ptx")).all_steps()
  shutil.rmtree(os.path.join(root, "ppo_ptx", "checkpoints", str(steps[-1])))
  shutil.rmtree(os.path.join(root, "evaluate"))
  os.remove(os.path.join(root, "report.md"))
  before = {
      s: os.path.getmtime(os.path.join(root, s, "config.json")) for s in TRAINING_STAGES
      if s != "ppo_ptx"
  }
  run_test_pipeline(root, str(tmp_path / "tfds"))
  assert _results(root) == _results(pipeline_run)
  for stage, mtime in before.items():  # Finished stages were not rerun.
    assert os.path.getmtime(os.path.join(root, stage, "config.json")) == mtime, stage


def test_the_same_seed_writes_the_same_world(pipeline_run, tmp_path):
  """The world is byte-identical when written again from the preset. (Every training stage's
  run reproduces itself bit for bit: the resume tests of each stage, and the rerun above that
  reproduces the evaluation's numbers.)"""
  root = str(tmp_path / "again")
  mini.world_stage(PRESET, root)
  names = sorted(os.listdir(os.path.join(root, "world")))
  assert "world.json" in names and len(names) > 10, names
  for name in sorted(os.listdir(os.path.join(root, "world"))):
    path = os.path.join(root, "world", name)
    if os.path.isfile(path):
      with open(path, "rb") as a, open(os.path.join(pipeline_run, "world", name), "rb") as b:
        assert a.read() == b.read(), name


# --- The RL stages do their job. -------------------------------------------------------------


def _ppo_series(root, stage, key):
  records = sorted((r for r in metrics_lib.read_metrics(os.path.join(root, stage)) if key in r),
                   key=lambda r: r["step"])
  assert [r["step"] for r in records] == list(range(1, PRESET.ppo_iterations + 1))
  return np.asarray([r[key] for r in records])


# yapf: disable
@pytest.mark.parametrize("stage", ["ppo", "ppo_ptx"])
def test_ppo_raises_its_reward_and_moves_away_from_sft(pipeline_run, stage):
  """Directional: PPO's training score (the RM's score; -1 for an answer without EOS) rises
  from its first four iterations to its last four, the policy moves away from SFT (KL to the
  reference), and the held-out labelers, whom PPO never sees, like its last checkpoint's
  answers to the evaluation prompts better than SFT's. A broken RL stage (no update, a wrong
  sign, a frozen policy, a KL penalty that pins it) fails: a batch's score varies by ~0.1.

  Measured with the test preset at seeds 0 / 1 / 2 (score rise: mean of the last 4
  iterations minus the first 4; KL: mean k1 of the last 4 iterations, nats per answer;
  labeler gain: held-out labeler score of the last checkpoint minus SFT's, 48 prompts):
    ppo      score +0.64 / +0.81 / +0.78   KL 2.59 / 2.28 / 2.39   labeler +0.54 / +0.47 / +0.39
    ppo_ptx  score +0.51 / +0.60 / +0.58   KL 4.33 / 3.72 / 4.20   labeler +0.57 / +0.56 / +0.26
  """
  score = _ppo_series(pipeline_run, stage, "score")
  kl = _ppo_series(pipeline_run, stage, "kl_k1")
  assert score[-4:].mean() - score[:4].mean() > 0.3, score  # Measured: +0.51 at least.
  assert kl[-4:].mean() > 1.0, kl                            # Measured: 2.28 at least.
  assert abs(kl[0]) < 1e-3  # The first rollout is the reference's own policy.
  curve = _results(pipeline_run)["over_optimization"][stage]
  gain = curve[-1]["labeler_score"] - curve[0]["labeler_score"]
  assert gain > 0.1, curve                                   # Measured: +0.26 at least.
# yapf: enable

# --- Seed, RM epochs, KL coefficient, per-prompt outcomes. -----------------------------------


def test_seed_replaces_the_presets_and_its_worlds_seed():
  for name, preset in mini.PRESETS.items():
    seeded = mini.with_seed(preset, 7)
    assert seeded.seed == 7 and seeded.world.seed == 7, name
    assert seeded.labelers == preset.labelers  # The same labelers at every seed.
    assert dataclasses.replace(seeded, seed=preset.seed,
                               world=dataclasses.replace(seeded.world,
                                                         seed=preset.world.seed)) == preset
  assert mini._SEED.default == 0


def test_a_workdir_keeps_its_preset_and_seed(pipeline_run, tmp_path):
  with open(os.path.join(pipeline_run, "run.json")) as f:
    info = json.load(f)
  assert (info["preset"], info["seed"]) == ("test", 0) and _results(pipeline_run)["seed"] == 0
  assert info["cpu_cores"] >= 1 and info["machine"]
  root = str(tmp_path)
  mini._claim_workdir(root, mini.with_seed(PRESET, 1))
  mini._claim_workdir(root, mini.with_seed(PRESET, 1))  # The same run: resumes.
  with pytest.raises(mini.WorkdirError, match="--seed=1, not --preset=test --seed=2"):
    mini.run(root, "test", seed=2)
  with pytest.raises(mini.WorkdirError, match="not --preset=quick --seed=1"):
    mini.run(root, "quick", seed=1)


def test_rm_trains_its_epochs_over_the_comparisons(pipeline_run, tmp_path):
  with open(os.path.join(pipeline_run, "comparisons", "comparisons_train.jsonl")) as f:
    rows = len(f.readlines())
  config = mini.stage_config("rm", PRESET, pipeline_run)
  assert config.train.num_steps == math.ceil(rows / mini.RM_BATCH) == math.ceil(
      rows / config.train.global_batch_size)
  root = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="comparisons stage"):
    mini.rm_num_steps(PRESET, root)
  os.makedirs(os.path.join(root, "comparisons"))
  with open(os.path.join(root, "comparisons", "comparisons_train.jsonl"), "w") as f:
    f.write("{}\n" * 65)
  for epochs, steps in ((1.0, 3), (2.0, 5), (0.5, 2), (0.001, 1)):
    assert mini.rm_num_steps(dataclasses.replace(PRESET, rm_epochs=epochs), root) == steps
  # One epoch in the real presets, over more RM prompts than the three (two) epochs before.
  assert mini.PRESETS["quick"].rm_epochs == mini.PRESETS["full"].rm_epochs == 1.0
  assert mini.PRESETS["quick"].world.rm_prompts == 3072
  assert mini.PRESETS["full"].world.rm_prompts == 8192


def test_ppo_uses_a_fixed_kl_coefficient(pipeline_run):
  for stage in ("ppo", "ppo_ptx"):
    saved = ckpt_lib.read_config(os.path.join(pipeline_run, stage))
    kl = saved[saved["algorithm"]]["kl"]  # The algorithm's section holds its KL settings.
    assert (saved["algorithm"], kl["controller"], kl["initial_beta"]) == ("ppo", "fixed", 0.05)
    assert np.all(_ppo_series(pipeline_run, stage, "beta") == np.float32(0.05))
  with open(os.path.join(pipeline_run, "report.md")) as f:
    assert "PPO and PPO-ptx: fixed KL coefficient beta=0.05" in f.read()


def test_results_keep_each_prompts_judgment(pipeline_run):
  results = _results(pipeline_run)
  records = [m["win_vs_sft"] for m in results["models"].values()]
  for win in records + [results["ppo_ptx_vs_base_large"]]:
    assert len(win["outcomes"]) == win["n"] == PRESET.world.eval_prompts
    assert set(win["outcomes"]) <= {0, 1}
    assert sum(win["outcomes"]) == round(win["win_rate"] * win["n"])


def _random_scores(rng, n):
  return [{c: float(rng.choice([0.0, 0.5, 1.0])) for c in T.COMPONENTS} for _ in range(n)]


def test_win_outcomes_are_the_judgments_win_rate_counted():
  _, judges = labelers_lib.make_pools(PRESET.labelers)
  rng = np.random.default_rng(0)
  sure = 0
  for seed in range(5):
    a, b = _random_scores(rng, 300), _random_scores(rng, 300)
    win = ev.win_rate(a, b, judges, seed=seed)
    assert len(win["outcomes"]) == win["n"] == 300
    assert sum(win["outcomes"]) == round(win["win_rate"] * win["n"])
    # Prompt by prompt: where every judge all but surely prefers one answer (a utility gap of
    # over 10 temperatures: probability above 0.99995), that answer is the one recorded as won.
    for o, x, y in zip(win["outcomes"], a, b):
      z = [(j.utility(x) - j.utility(y)) / j.temperature for j in judges]
      if min(z) > 10 or max(z) < -10:
        assert o == (min(z) > 10)
        sure += 1
  assert sure > 20
