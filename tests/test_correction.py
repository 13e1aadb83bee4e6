"""Self-correction (Welleck et al. 2022): the pair distribution against hand-computed values and
its draw, the settings' errors, the world's feedback and corrector prompts, and the method end
to end on a `test` preset world: data, training, a rerun that skips, a resumed round that
re-creates its data byte for byte, and the evaluation's numbers."""

import json
import math
import os
import shutil

import numpy as np
import pytest

from experiments import instructgpt_mini as mini
from experiments.world import correction as C
from experiments.world import evaluate as ev
from experiments.world import generate as world_lib
from experiments.world import labelers as labelers_lib
from experiments.world import language as L
from experiments.world import report as report_lib
from experiments.world import tasks as T
from instruct import config_lib
from instruct import paths
from instruct import run as run_lib
from instruct.data import correction as lib
from instruct.data import tokenization
from instruct.stages import table

# Three answers of one input: v = 0.25, 0.5, 1.0; s(y0, y1) = 2 * 3 / 8, the others share no word.
ANSWERS = [("a", "b", "c", "d"), ("a", "b", "c", "e"), ("x", "y")]
VALUES = [0.25, 0.5, 1.0]
ALPHA, BETA = 2.0, 1.0


def _by_hand():
  """P[i, j] of the module docstring for ANSWERS, VALUES, ALPHA, BETA, computed term by term."""
  e01 = math.exp(ALPHA * (0.5 - 0.25) + BETA * 0.75)
  e02 = math.exp(ALPHA * (1.0 - 0.25) + BETA * 0.0)
  return np.array([[0.0, e01 / (e01 + e02), e02 / (e01 + e02)], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])


def test_pair_probabilities_match_the_formula_by_hand():
  assert lib.proximity(ANSWERS[0], ANSWERS[1]) == pytest.approx(0.75)
  assert lib.proximity(ANSWERS[0], ANSWERS[2]) == 0.0
  assert lib.proximity((), ()) == 1.0
  assert lib.value_improving_pairs(VALUES) == [(0, 1), (0, 2), (1, 2)]
  assert lib.value_improving_pairs([0.5, 0.5, 0.25]) == [(2, 0), (2, 1)]  # Ties never pair.
  got = lib.pool_probabilities(ANSWERS, VALUES, ALPHA, BETA)
  np.testing.assert_allclose(got, _by_hand(), rtol=1e-12)
  # Proximity given directly; alpha = beta = 0 is uniform over the better answers.
  s = np.array([[1.0, 0.9, 0.1], [0.9, 1.0, 0.3], [0.1, 0.3, 1.0]])
  np.testing.assert_allclose(lib.pair_probabilities(VALUES, s, 0.0, 0.0),
                             [[0, 0.5, 0.5], [0, 0, 1], [0, 0, 0]])
  np.testing.assert_allclose(
      lib.pair_probabilities(VALUES, s, 0.0, 2.0)[0, 1:],
      np.exp([1.8, 0.2]) / np.exp([1.8, 0.2]).sum())
  # Large weights stay finite (the softmax is shifted), and favour the best improvement.
  sharp = lib.pair_probabilities(VALUES, s, 1e4, 0.0)
  assert np.all(np.isfinite(sharp)) and sharp[0, 2] == pytest.approx(1.0)
  assert np.all(lib.pair_probabilities([0.5, 0.5], np.eye(2), 1.0, 1.0) == 0)


def test_the_draw_is_deterministic_and_follows_the_probabilities():
  """Hypotheses y0 and y1 (y2 has no better answer) are drawn 1/2 each, then y' by row; with
  20,000 draws each frequency's standard deviation is below 0.0036, the tolerance 0.015 over
  4 of them."""
  pools = [(ANSWERS, VALUES), ([("z",)], [0.5]), ([("p",), ("q",)], [0.5, 0.5])]
  draws = lib.draw_pairs(pools, 20000, ALPHA, BETA, np.random.default_rng(3))
  assert draws == lib.draw_pairs(pools, 20000, ALPHA, BETA, np.random.default_rng(3))
  assert draws[:50] != lib.draw_pairs(pools, 50, ALPHA, BETA, np.random.default_rng(4))
  assert {x for x, _, _ in draws} == {0}  # The other pools have no value-improving pair,
  assert all(VALUES[i] < VALUES[j] for _, i, j in draws)  # and every pair improves.
  p = _by_hand()
  expected = {(0, 1): p[0, 1] / 2, (0, 2): p[0, 2] / 2, (1, 2): 0.5}
  counts = {k: sum((i, j) == k for _, i, j in draws) / len(draws) for k in expected}
  for pair, frequency in counts.items():
    assert frequency == pytest.approx(expected[pair], abs=0.015), pair
  assert lib.draw_pairs(pools[1:], 10, ALPHA, BETA, np.random.default_rng(0)) == []


@pytest.mark.parametrize("key,value,message", [
    ("samples", 1, r"config.correction.samples=1: must be an integer >= 2"),
    ("alpha", -1.0, r"config.correction.alpha=-1.0: must be a finite number >= 0"),
    ("beta", float("nan"), r"config.correction.beta=nan: must be a finite number >= 0"),
    ("passes", 0, r"config.correction.passes=0: must be an integer >= 1"),
    ("rounds", 0, r"config.correction.rounds=0: must be an integer >= 1"),
    ("steps", 2.5, r"config.correction.steps=2.5: must be an integer >= 1"),
    ("pairs_per_prompt", 0.0, r"config.correction.pairs_per_prompt=0.0: must be a finite number >"),
    ("learning_rate", 0, r"config.correction.learning_rate=0: must be a finite number > 0"),
    ("validation_fraction", 1.0, r"config.correction.validation_fraction=1.0: must be in \(0, 1\)"),
    ("keep_perfect", 1, r"config.correction.keep_perfect=1: must be True or False"),
])
def test_impossible_settings_name_their_key(key, value, message):
  with pytest.raises(ValueError, match=message):
    lib.Correction.from_dict({key: value})
  with pytest.raises(ValueError, match=r"config.correction.gamma: unknown key"):
    lib.Correction.from_dict({"gamma": 1.0})
  lib.Correction().check()
  for name in ("test", "quick", "full"):
    C.settings_for(name).check()


def _scores(**failed):
  scores = {c: 1.0 for c in T.COMPONENTS}
  scores.update(failed)
  return scores


def test_feedback_and_corrector_prompts_are_in_the_worlds_words(world):
  assert C.feedback_words(_scores()) == "please"
  assert C.feedback_words(_scores(help=0.5, format=0.0)) == "please help short"
  assert C.feedback_words(_scores(help=0, honest=0, harmless=0,
                                  format=0)) == ("please help know kind short")
  # The judge's verdict on a made-up, insulting respectful description.
  facts = world_lib.load_facts(world["dir"])
  prompt = "request respectfully describe the cat . answer :"
  wrong = next(c for c in L.COLORS if c != facts.color["cat"])
  answer = ["the", "stupid", "cat", "is", wrong, "."]
  scores = T.judge(prompt.split(), answer, facts)
  assert C.feedback_words(scores) == "please help know kind"
  assert C.value(scores) == pytest.approx((0.5 + 0 + 0 + 1) / 4)
  text = C.corrector_prompt(prompt, answer, C.feedback_words(scores))
  assert text == (f"request respectfully describe the cat . answer : the stupid cat is {wrong} . "
                  "please help know kind answer :")
  vocabulary = set(L.vocabulary())
  assert set(text.split()) <= vocabulary and text.endswith(" answer :")
  assert set(" ".join(C.FIXES.values()).split()) <= vocabulary
  # The longest corrector input of the world's prompts (a 16-word answer, every criterion failed)
  # fits the corrector's prompt length, and its row the training bucket.
  tok = world["tokenizer"]
  longest = max((json.loads(line)["prompt"] for name in ("ppo_prompts", "sft")
                 for line in open(world["files"][name]["train"])), key=lambda p: len(p.split()))
  worst = C.corrector_prompt(longest, ["cat"] * 16, "please help know kind short")
  ids = tok.encode(worst, add_special_tokens=False)
  assert tok.unk_token_id not in ids
  assert len(ids) <= C.PROMPT_LENGTH and len(ids) + 17 <= C.BUCKET


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A `test`-preset run directory with its world (the SFT model is trained by the test that
  needs it)."""
  root = str(tmp_path_factory.mktemp("correction_run"))
  previous = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = str(tmp_path_factory.mktemp("correction_tfds"))
  try:
    preset = mini.PRESETS["test"]
    mini.world_stage(preset, root)
    files = world_lib.files(os.path.join(root, "world"))
    yield {
        "root": root, "tmp": tmp_path_factory.mktemp("correction_tmp"), "preset": preset,
        "dir": os.path.join(root, "world"), "files": files,
        "tokenizer": tokenization.load_tokenizer(files["tokenizer"])
    }
  finally:
    if previous is None:
      os.environ.pop("TFDS_DATA_DIR", None)
    else:
      os.environ["TFDS_DATA_DIR"] = previous


def _train(calls):

  def train(config, workdir):
    calls.append(workdir)
    table.get(config.stage).run(config, workdir)

  return train


def _snapshot(root):
  """Every file of the method's directory (bytes) and each round's checkpoint steps."""
  out = {}
  base = os.path.join(root, C.STAGE)
  for name in sorted(os.listdir(base)):
    if name.startswith("data_round_"):
      with open(os.path.join(base, name), "rb") as f:
        out[name] = (f.read(), os.path.getmtime(os.path.join(base, name)))
    elif name.startswith("round_"):
      out[name] = run_lib.checkpoint_steps(os.path.join(base, name))
  return out


def test_the_corrector_trains_resumes_and_is_evaluated(world):
  root, preset = world["root"], world["preset"]
  sft_config = mini.stage_config("sft", preset, root)
  sft_config.init_from = ""  # A few steps from scratch make a generator good enough here.
  table.get("sft").run(sft_config, os.path.join(root, "sft"))
  settings = C.settings_for("test")
  calls = []
  C.correction_stage(root, preset, sft_config, _train(calls), settings)
  assert calls == [C.round_dir(root, r) for r in (1, 2)]
  assert C.final_corrector(root, settings) == C.round_dir(root, 2)
  vocabulary = set(L.vocabulary())
  facts = world_lib.load_facts(world["dir"])
  prompts = {json.loads(line)["prompt"] for line in open(world["files"]["ppo_prompts"]["train"])}
  for r in (1, 2):
    assert run_lib.checkpoint_steps(C.round_dir(root, r)) == [settings.steps]
    saved = json.load(open(os.path.join(C.round_dir(root, r), "config.json")))
    assert saved["init_from"] == (os.path.join(root, "sft") if r == 1 else C.round_dir(root, 1))
    assert saved["data"]["train_file"] == C.data_files(root, r)["train"]
    assert tuple(saved["data"]["buckets"]) == (C.BUCKET,) and saved["stage"] == "sft"
    stats = json.load(open(C.stats_file(root, r)))
    for split in ("train", "validation"):
      rows = [json.loads(line) for line in open(C.data_files(root, r)[split])]
      assert len(rows) == stats[split]["pairs"] >= 1
      for row in rows:
        prompt, rest = row["prompt"].split(" answer : ", 1)
        prompt += " answer :"
        assert prompt in prompts and row["prompt"].endswith(" answer :")
        words = rest.split()[:-2]
        feedback = len(words) - 1 - words[::-1].index("please")
        y, target = words[:feedback], row["completion"].split()
        assert row["completion"].startswith(" ") and target
        assert set(row["prompt"].split() + target) <= vocabulary
        # The samples' judgments knew whether they ended; either way the feedback is y's and
        # the target is better.
        before = [T.judge(prompt.split(), y, facts, ended) for ended in (True, False)]
        assert " ".join(words[feedback:]) in [C.feedback_words(s) for s in before]
        assert max(C.value(T.judge(prompt.split(), target, facts, e)) for e in (True, False)) > min(
            C.value(s) for s in before)
    assert ("exploration" in stats) == (r == 2)
  assert json.load(open(C.stats_file(root, 2)))["exploration"]["corrections"] > 0

  # A rerun trains nothing and rewrites nothing.
  before = _snapshot(root)
  C.correction_stage(root, preset, sft_config, _train(calls), settings)
  assert len(calls) == 2 and _snapshot(root) == before
  # Round 2 lost: its data is made again, byte for byte (the exploration included), and only
  # it trains (here: its run is put back as it was).
  saved = str(world["tmp"] / "round_2")
  shutil.copytree(C.round_dir(root, 2), saved)
  paths.rmtree(C.round_dir(root, 2))
  for split in ("train", "validation"):
    os.remove(C.data_files(root, 2)[split])

  def put_back(config, workdir):
    calls.append(workdir)
    assert config.init_from == C.round_dir(root, 1) and config.train.num_steps == settings.steps
    shutil.copytree(saved, workdir)

  C.correction_stage(root, preset, sft_config, put_back, settings)
  assert calls[2:] == [C.round_dir(root, 2)]
  after = _snapshot(root)
  assert {k: v[0] if k.startswith("data") else v for k, v in after.items()
         } == {k: v[0] if k.startswith("data") else v for k, v in before.items()}

  # The evaluation on the held-out prompts.
  records = [json.loads(line) for line in open(world["files"]["eval_prompts"])][:24]
  eval_prompts, categories = [r["prompt"] for r in records], [r["category"] for r in records]
  tok = world["tokenizer"]
  _, judges = labelers_lib.make_pools(preset.labelers)
  sft = ev.load_policy(os.path.join(root, "sft"))
  sft_answers = ev.generate(sft, tok, eval_prompts, seed=0)
  other = ev.generate(sft, tok, eval_prompts, seed=1)  # A second generator's answers.
  results = C.evaluate_correction(root, preset, eval_prompts, categories, facts,
                                  judges, tok, sft_answers,
                                  ev.judge_all(eval_prompts, sft_answers, facts), other,
                                  ev.judge_all(eval_prompts, other, facts), settings)
  json.dumps(results)
  assert [p["pass"] for p in results["passes"]] == [1, 2]
  assert results["step"] == settings.steps and len(results["rounds"]) == 2
  for row, key in [(p, "win_vs_sft") for p in results["passes"]
                  ] + [(p, "win_vs_raw") for p in results["base_large"]["passes"]]:
    win = row[key]
    assert 0 <= win["win_rate"] <= 1 and win["n"] == len(eval_prompts)
    assert len(win["outcomes"]) == len(eval_prompts)
    assert math.isfinite(row["mean_utility"]) and 0 <= row["changed"] <= 1
    assert row["improved"] + row["worsened"] <= 1
  assert results["settings"]["passes"] == 2 and math.isfinite(results["base_large"]["mean_utility"])
  section = "\n".join(report_lib._section_correction({"self_correction": results}))
  assert "## Self-correction" in section and "| 2 | " in section
  assert f"| 0 (raw) |  | {results['base_large']['mean_utility']:.3f} |" in section
  config = config_lib.load_config_file(mini.JOB_CONFIG, "test")
  config.methods = "correction"
  assert mini.pipeline_stages(mini.preset_from_config(config))[-3:] == ("corrector", "evaluate",
                                                                        "report")
