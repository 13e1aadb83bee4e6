"""The main job end to end at its `test` preset: every stage, the report, resume, determinism."""

import json
import os
import re
import shutil

import pytest

from experiments import instructgpt_mini as mini
from instruct import checkpoint as ckpt_lib
from instruct import config_lib
from instruct.model import ModelConfig
from instruct.world import labelers as labelers_lib
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
  config = config_lib.load_config_file(os.path.join(root, "configs", "from_run.py"),
                                       str(tmp_path))
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
  for heading in ("## Targets", "## Win rates against SFT", "## Alignment tax",
                  "## Reward model", "## Honesty and harmlessness", "## Over-optimisation",
                  "## Samples", "## Training curves"):
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
  before = {s: os.path.getmtime(os.path.join(root, s, "config.json"))
            for s in TRAINING_STAGES if s != "ppo_ptx"}
  run_test_pipeline(root, str(tmp_path / "tfds"))
  assert _results(root) == _results(pipeline_run)
  for stage, mtime in before.items():  # Finished stages were not rerun.
    assert os.path.getmtime(os.path.join(root, stage, "config.json")) == mtime, stage


def test_same_seed_same_report_numbers(pipeline_run, tmp_path):
  root = run_test_pipeline(str(tmp_path / "again"), str(tmp_path / "tfds"))
  assert _results(root) == _results(pipeline_run)
  # The world itself is byte-identical.
  for name in sorted(os.listdir(os.path.join(root, "world"))):
    path = os.path.join(root, "world", name)
    if os.path.isfile(path):
      with open(path, "rb") as a, open(os.path.join(pipeline_run, "world", name), "rb") as b:
        assert a.read() == b.read(), name
