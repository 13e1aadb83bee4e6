"""Instruction-tuning mixtures: the weighted mixture reader (instruct/data/mixture.py) against
hand-computed shares, its errors, a mixture SFT run that resumes bit-exactly on 8 devices, and
the world's FLAN method (experiments/world/flan.py): templates, files, the main job's configs,
evaluation and report section."""

import collections
import json
import os
import shutil

import jax
import numpy as np
import pytest

from experiments import instructgpt_mini as mini
from experiments.world import flan
from experiments.world import generate as world_lib
from experiments.world import language as L
from experiments.world import report as report_lib
from experiments.world import tasks as T
from instruct import config_lib
from instruct import trainer
from instruct.data import mixture
from instruct.data import tokenization
from instruct.stages import sft
from tests.test_sharding import load_config


def _component_files(tmp_path, name, n, n_val=2):
  out = {}
  for split, count in (("train", n), ("validation", n_val)):
    path = tmp_path / f"{name}_{split}.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": f"request {name} {i} answer :", "completion": f" {name}"}) + "\n"
        for i in range(count)))
    out[f"{split}_file"] = str(path)
  return out


def test_shares_follow_the_weights_by_largest_remainders():
  # 10 rows at weights 1:1:1 -> 3.33 each: the first gets the extra row.
  assert mixture.shares([5, 5, 5], [1, 1, 1], 10) == [4, 3, 3]
  # 2:1 of 9 rows, whatever the components' own sizes.
  assert mixture.shares([1, 100], [2.0, 1.0], 9) == [6, 3]
  assert mixture.shares([4, 4], [0.0, 1.0], 8) == [0, 8]


def test_a_mixture_epoch_has_each_components_share_repeating_the_small_ones():
  sources = [[{"c": "a", "i": i} for i in range(3)], [{"c": "b", "i": i} for i in range(10)]]
  parts = [mixture.Component("a", "", "", 3.0), mixture.Component("b", "", "", 1.0)]
  source = mixture.mixture_source(parts, sources, "train", seed=0)
  rows = [source[i] for i in range(len(source))]
  assert len(rows) == 13 and source.counts == {"a": 10, "b": 3}  # 13 * 3/4 = 9.75 -> 10.
  a = collections.Counter(r["i"] for r in rows if r["c"] == "a")
  assert sorted(a.values()) == [3, 3, 4]  # Every row of a, then a fresh pass.
  assert len({r["i"] for r in rows if r["c"] == "b"}) == 3  # A subset of b, no repeats.
  again = mixture.mixture_source(parts, sources, "train", seed=0)
  assert [again[i] for i in range(13)] == rows
  other = mixture.mixture_source(parts, sources, "train", seed=1)
  assert [other[i] for i in range(13)] != rows
  validation = mixture.mixture_source(parts, sources, "validation", seed=0)
  key = lambda r: (r["c"], r["i"])
  assert sorted((validation[i] for i in range(13)), key=key) == sources[0] + sources[1]
  assert "component 'b'" in source.describe(12)


@pytest.mark.parametrize("change,pattern", [
    ({"weight": -1.0}, r"config.data.mixture.a.weight=-1.0: must be a finite number >= 0"),
    ({"train_file": ""}, r"config.data.mixture.a.train_file is empty"),
    ({"rate": 1.0}, r"config.data.mixture.a.rate: unknown key"),
    ({"weight": 0.0}, r"config.data.mixture: every weight is 0"),
])
def test_impossible_mixtures_name_their_key(tmp_path, change, pattern):
  config = load_config("sft", "tiny")
  config.data.mixture = {"a": {**_component_files(tmp_path, "a", 4), "weight": 1.0, **change}}
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate_supervised(config, 1, 1)


def _mixture_config(tmp_path, tfds_dir, **train):
  config = load_config("sft", "tiny")
  config.data.tfds_dir = tfds_dir
  config.data.mixture = {
      "big": dict(_component_files(tmp_path, "dog", 40), weight=1.0),
      "small": dict(_component_files(tmp_path, "cat", 5), weight=3.0)
  }
  config.data.train_file = config.data.validation_file = ""
  config.train.update(dict(num_steps=6, log_every=2, eval_every=6, checkpoint_every=3))
  config.train.update(train)
  return config


def test_a_mixture_trains_sharded_and_resumes_bit_exactly(tmp_path, tfds_dir, tokenizer):
  config = _mixture_config(tmp_path, tfds_dir)
  config_lib.validate_supervised(config, 1, 1)
  batches = sft.make_lm_data(config, tokenizer, "train", repeat=True)
  assert batches.num_examples == 45
  seen = collections.Counter()
  for _ in range(batches.batches_per_epoch):
    batch = next(batches)
    for tokens, mask in zip(batch["tokens"], batch["attention_mask"]):
      seen[tokenizer.decode(tokens[mask > 0]).split()[1]] += 1  # The word after `request`.
  # 3:1 by weight: 34 rows of cat and 11 of dog in the epoch, of which full batches hold 32.
  assert seen["cat"] > 2 * seen["dog"] > 0 and sum(seen.values()) == 32
  validation = sft.make_lm_data(config, tokenizer, "validation", repeat=False)
  assert validation.num_examples == 4
  full = trainer.train_and_evaluate(config, str(tmp_path / "a"))
  assert len(jax.devices()) == 8
  stopped = str(tmp_path / "b")
  trainer.train_and_evaluate(_mixture_config(tmp_path, tfds_dir, stop_at_step=3), stopped)
  resumed = trainer.train_and_evaluate(_mixture_config(tmp_path, tfds_dir), stopped)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(full.params), jax.device_get(resumed.params))


def test_a_task_renders_through_each_template_in_the_worlds_words():
  import random
  facts = L.make_facts(random.Random(0))
  rng = random.Random(1)
  task, example = (T.make_task(rng, facts, "classification") for _ in range(2))
  body = " ".join(task.prompt[1:-2])
  assert flan.render(task, "request") == task.prompt_text
  assert flan.render(task, "here_is") == f"{body} here is the answer :"
  assert flan.render(
      task, "can_you",
      [example]) == (f"can you {' '.join(example.prompt[1:-2])} answer : {' '.join(example.ideal)} "
                     f"can you {body} answer :")
  words = set(L.vocabulary())
  assert all(set(b + a) <= words for b, a in flan.TEMPLATES.values())
  assert set(flan.HELD_OUT) == {"generation", "brainstorming", "harmful", "respectful"}


def test_the_main_jobs_flan_stages_configs_evaluation_and_report(pipeline_run, tmp_path):
  """`methods=flan`: the files (training splits only), each run's mixture, the stages built on
  `flan`; the evaluation on copies of base small (not retrained) and the report section."""
  config = config_lib.load_config_file(mini.JOB_CONFIG, "test")
  config.methods = "flan"
  preset = mini.preset_from_config(config)
  assert mini.pipeline_stages(preset)[-13:-2] == flan.STAGES
  root = str(tmp_path / "run")
  shutil.copytree(pipeline_run, root, ignore=shutil.ignore_patterns(".lock"))
  world_dir = os.path.join(root, "world")
  flan.write_flan_files(world_dir, preset.seed, 8)
  names = sorted(os.listdir(flan.flan_dir(world_dir)))
  assert len(names) == 6 * 5 * 2 * 2 + 1
  vocabulary = set(L.vocabulary())
  for name in names:
    if name.endswith(".jsonl"):
      rows = [json.loads(line) for line in open(os.path.join(flan.flan_dir(world_dir), name))]
      assert len(rows) == (8 if "_train" in name else 2)
      for r in rows:
        assert set((r["prompt"] + r["completion"]).split()) <= vocabulary
        # The task, after two solved examples in the few-shot style.
        assert r["prompt"].count("answer :") == (3 if "_few_" in name else 1)
        assert r["prompt"].endswith("answer :") and r["category"] in flan.FLAN_CATEGORIES
  evaluation = {
      json.loads(line)["prompt"] for line in open(os.path.join(world_dir, "eval_prompts.jsonl"))
  }
  request = [
      json.loads(line) for line in open(flan.files_of(world_dir, "open_qa_request_zero")["train"])
  ]
  assert not {r["prompt"] for r in request} & evaluation
  sft_config = mini.stage_config("sft", preset, root)
  for run, (categories, templates, styles) in flan.RUNS.items():
    c = mini.stage_config(run, preset, root)
    assert len(c.data.mixture) == categories * templates * len(styles)
    assert c.init_from == os.path.join(root, "pretrain") and c.data.train_file == ""
    assert c.train.to_dict() == sft_config.train.to_dict()
    config_lib.validate_supervised(c, 1, 1)
  assert mini.stage_config("sft_flan", preset, root).init_from == os.path.join(root, "flan")
  assert mini.stage_config("rm_flan", preset, root).init_from == os.path.join(root, "sft_flan")
  ppo = mini.stage_config("ppo_ptx_flan", preset, root)
  assert (ppo.policy_from, ppo.reward_from,
          ppo.ppo.ptx_coef) == (os.path.join(root,
                                             "sft_flan"), os.path.join(root,
                                                                       "rm_flan"), preset.ptx_coef)
  assert mini.UPSTREAM["rm_flan"] == ("world", "sft_flan", "comparisons")
  for run in flan.RUNS:
    shutil.copytree(os.path.join(root, "pretrain"), os.path.join(root, run))
  files = world_lib.files(world_dir)
  records = [json.loads(line) for line in open(files["eval_prompts"])]
  prompts, categories = [r["prompt"] for r in records], [r["category"] for r in records]
  _, judges = mini.labelers_lib.make_pools(preset.labelers)
  facts = world_lib.load_facts(world_dir)
  out = flan.evaluate_flan(root, preset, prompts, categories, facts, judges, files["tokenizer"],
                           mini._few_shot_examples(files, facts))
  assert out["held_out_prompts"] == sum(c in flan.HELD_OUT for c in categories) > 0
  base = out["runs"]["base_small"]
  for run in flan.RUNS:  # Copies of base small: its numbers.
    assert {k: out["runs"][run][k] for k in base} == base
  results = json.load(open(os.path.join(root, "evaluate", "results.json")))
  results["flan"] = dict(out, rm={"rm": 0.6, "rm_flan": 0.7})
  report_lib.write_report(root, results, {})
  report = open(os.path.join(root, "report.md")).read()
  assert "## Instruction tuning (FLAN)" in report and "| flan_t3 | 6 / 3 / zero + few | " in report
  assert "(held-out accuracy 70.0% against the main reward model's 60.0%)" in report
  assert os.path.getsize(os.path.join(root, "plots", "flan.png")) > 5000
  tokenization.load_tokenizer(files["tokenizer"])


def test_a_directory_of_files_is_a_mixture_from_the_config_argument(tmp_path):
  for name in ("qa", "cls"):
    _component_files(tmp_path, name, 3)
  config = load_config("sft", f"tiny,mixture={tmp_path}")
  assert sorted(config.data.mixture) == ["cls", "qa"] and config.data.train_file == ""
  assert config.data.mixture.qa.to_dict() == {
      "train_file": str(tmp_path / "qa_train.jsonl"),
      "validation_file": str(tmp_path / "qa_validation.jsonl"), "weight": 1.0
  }
  config_lib.validate_supervised(config, 1, 1)
  os.remove(tmp_path / "qa_validation.jsonl")
  with pytest.raises(ValueError, match=r"qa_train.jsonl has no qa_validation.jsonl beside it"):
    load_config("sft", f"tiny,mixture={tmp_path}")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(ValueError, match=r"holds no NAME_train.jsonl files"):
    mixture.directory_mixture(str(empty))
