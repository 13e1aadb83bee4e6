"""Hindsight instruction relabeling (instruct/data/hindsight.py, experiments/world/hindsight.py):
the loss terms against a numpy loop, the encoding against hand-written tokens, bad records and
configs, a few sharded steps that resume bit-exactly, and the main job's rounds on the test
pipeline (records, resume, evaluation, report)."""

import json
import os
import shutil

import jax
from flax import linen as nn
import numpy as np
import pytest

from experiments import instructgpt_mini as mini
from experiments.world import generate as world_lib
from experiments.world import hindsight as hir
from experiments.world import report as report_lib
from instruct import config_lib
from instruct import objectives
from instruct import trainer
from instruct.data import hindsight as hs
from instruct.data import records
from instruct.data import tokenization
from instruct.stages import sft
from tests.test_sharding import load_config

RECORD = {
    "prompt": "request list two foods . answer :", "completion": " milk , cake .", "satisfied": True
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A small written world with hindsight records made from its demonstrations."""
  out = str(tmp_path_factory.mktemp("world"))
  config = world_lib.WorldConfig(pretrain_docs=32, pretrain_validation_docs=8, sft=64,
                                 sft_validation=16, rm_prompts=8, rm_validation_prompts=8,
                                 ppo_prompts=8, ppo_validation_prompts=8, eval_prompts=8)
  files = world_lib.write_world(out, config)
  for split in ("train", "validation"):
    rows = [json.loads(line) for line in open(files["sft"][split])]
    with open(os.path.join(out, f"hir_{split}.jsonl"), "w") as f:
      for i, r in enumerate(rows):
        f.write(
            json.dumps(
                {"prompt": r["prompt"], "completion": r["completion"], "satisfied": i % 3 != 0})
            + "\n")
  return out, files, tokenization.load_tokenizer(files["tokenizer_control"])


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_the_hir_terms_match_a_numpy_loop():
  rng = np.random.default_rng(0)
  b, t, v = 3, 6, 7
  logits, contrast = rng.normal(size=(2, b, t, v)).astype(np.float32)
  tokens = rng.integers(0, v, (b, t)).astype(np.int32)
  mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0] * 6], np.int32)  # Row 2: dummy.
  got = jax.device_get(objectives.hindsight_terms(logits, contrast, tokens, mask))
  nll = contrastive = neg_entropy = per_answer = 0.0
  for i in range(b):
    lp_pos = lp_neg = 0.0
    n = 0
    for j in range(1, t):
      if mask[i, j]:
        p_pos, p_neg = _log_softmax(logits[i, j - 1]), _log_softmax(contrast[i, j - 1])
        lp_pos, lp_neg, n = lp_pos + p_pos[tokens[i, j]], lp_neg + p_neg[tokens[i, j]], n + 1
        neg_entropy += float(np.sum(np.exp(p_pos) * p_pos))
    nll -= lp_pos
    if n:
      c = -np.log(np.exp(lp_pos) / (np.exp(lp_pos) + np.exp(lp_neg)))
      contrastive, per_answer = contrastive + n * c, per_answer + c
  for key, want in (("nll", nll), ("contrastive", contrastive), ("neg_entropy", neg_entropy),
                    ("contrastive_answers", per_answer), ("targets", 5), ("answers", 2)):
    np.testing.assert_allclose(got[key], want, rtol=1e-5, err_msg=key)


def test_a_record_encodes_behind_its_verdicts_instruction_token(world):
  _, _, tok = world
  good, bad = tok.get_vocab()["<|good|>"], tok.get_vocab()["<|bad|>"]
  prompt = tok.encode(RECORD["prompt"], add_special_tokens=False)
  completion = tok.encode(RECORD["completion"], add_special_tokens=False)
  tokens, mask, truncated = hs.encode(hs.Hindsight(), tok, 64, RECORD)
  assert list(tokens) == [good] + prompt + completion + [tok.eos_token_id] and not truncated
  assert list(mask) == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
  tokens, _, _ = hs.encode(hs.Hindsight(), tok, 64, dict(RECORD, satisfied=False))
  assert tokens[0] == bad
  # Too long: the prompt loses its left end, never the instruction token.
  tokens, mask, truncated = hs.encode(hs.Hindsight(), tok, 8, RECORD)
  assert truncated and len(tokens) == 8 and tokens[0] == good
  assert list(tokens[1:]) == (prompt + completion + [tok.eos_token_id])[-7:]
  with pytest.raises(ValueError, match=r"config.hindsight.good_token='<\|yes\|>' is not a token"):
    hs.encode(hs.Hindsight(good_token="<|yes|>"), tok, 64, RECORD)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a", "completion": " b"}', "missing field 'satisfied'"),
    ('{"prompt": "a", "completion": " b", "satisfied": 1}', "'satisfied' must be of type bool"),
    ('{"prompt": "a", "completion": " ", "satisfied": true}', "'completion' is empty"),
])
def test_bad_hindsight_records_name_the_file_and_line(tmp_path, line, message):
  path = tmp_path / "hir.jsonl"
  path.write_text(json.dumps(RECORD) + "\n" + line + "\n")
  with pytest.raises(records.RecordError, match=rf"hir.jsonl:2: .*{message}"):
    hs.read_hindsight(str(path))
  assert hs.read_hindsight(str(path), skip_invalid=True)[1] == 1


@pytest.mark.parametrize("key,value,pattern", [
    ("alpha", -1.0, r"config.hindsight.alpha=-1.0: must be a finite number >= 0"),
    ("beta", float("nan"), r"config.hindsight.beta=nan: must be"),
    ("bad_token", "<|good|>", r"config.hindsight.bad_token='<\|good\|>': must differ"),
])
def test_impossible_hindsight_configs_name_their_key(key, value, pattern):
  config = load_config("sft", "tiny,hir")
  config.hindsight[key] = value
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate_supervised(config, 1, 1)
  pretrain = load_config("pretrain", "tiny")
  pretrain.data.kind = hs.KIND
  with pytest.raises(ValueError, match="is read by the sft stage; the 'pretrain' stage"):
    config_lib.validate_supervised(pretrain, 1, 1)


def _hir_config(out, files, tfds_dir, **train):
  config = load_config("sft", "tiny,hir")
  config.data.tfds_dir = tfds_dir
  config.data.tokenizer = files["tokenizer_control"]
  config.data.train_file = os.path.join(out, "hir_train.jsonl")
  config.data.validation_file = os.path.join(out, "hir_validation.jsonl")
  config.data.buckets = (64,)
  config.model.vocab_size = 144
  config.train.update(dict(num_steps=6, log_every=2, eval_every=6, checkpoint_every=3))
  config.train.update(train)
  return config


def test_without_its_extra_terms_hir_is_sft_on_the_relabeled_sequences(world, tfds_dir):
  """alpha = beta = 0: the step's loss is the masked likelihood of the tagged sequences; the
  terms move it by alpha times the contrastive and beta times the negative entropy sums."""
  out, files, tok = world
  config = _hir_config(out, files, tfds_dir)
  batch = next(iter(sft.make_lm_data(config, tok, "train", repeat=True)))
  good, bad = hs.Hindsight().token_ids(tok)
  assert set(batch["tokens"][:, 0]) == {good, bad}
  model = sft.make_model(config.model)
  params = nn.meta.unbox(model.init(jax.random.key(0), batch["tokens"][:1]))["params"]
  plain, _ = sft.lm_loss(model, True)(params, batch, jax.random.key(1))
  losses = {}
  for alpha, beta in ((0.0, 0.0), (2.0, 0.0), (0.0, 0.5)):
    loss, sums = sft.hindsight_loss(model, hs.Hindsight(alpha=alpha, beta=beta), good,
                                    bad)(params, batch, jax.random.key(1))
    losses[alpha, beta] = float(loss)
  np.testing.assert_allclose(losses[0.0, 0.0], float(plain), rtol=1e-5)
  np.testing.assert_allclose(losses[2.0, 0.0] - losses[0.0, 0.0], 2.0 * float(sums["contrastive"]),
                             rtol=1e-4)
  np.testing.assert_allclose(losses[0.0, 0.5] - losses[0.0, 0.0], 0.5 * float(sums["neg_entropy"]),
                             rtol=1e-4)
  assert float(sums["neg_entropy"]) < 0 < float(sums["contrastive"])


def test_hir_trains_sharded_and_resumes_bit_exactly(world, tmp_path, tfds_dir):
  out, files, _ = world
  full = trainer.train_and_evaluate(_hir_config(out, files, tfds_dir), str(tmp_path / "a"))
  assert len(jax.devices()) == 8
  stopped = str(tmp_path / "b")
  trainer.train_and_evaluate(_hir_config(out, files, tfds_dir, stop_at_step=3), stopped)
  resumed = trainer.train_and_evaluate(_hir_config(out, files, tfds_dir), stopped)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(full.params), jax.device_get(resumed.params))
  rows = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  logged = [r for r in rows if "contrastive" in r]
  assert len(logged) == 3 and all(0 < r["contrastive"] and r["entropy"] > 0 for r in logged)
  assert all(r["loss"] != r["nll"] for r in logged)


def test_the_main_jobs_hir_rounds_resume_and_reach_the_report(pipeline_run, tmp_path):
  """`methods=hir` on a copy of the test pipeline: two rounds of sampling, relabeling and
  training from SFT, at PPO's sample budget; a rerun changes nothing; the evaluation's row is
  in the report's comparison and the run's summary."""
  config = config_lib.load_config_file(mini.JOB_CONFIG, "test")
  config.methods = "hir"
  preset = mini.preset_from_config(config)
  assert mini.pipeline_stages(preset)[-3:] == ("hir", "evaluate", "report")
  root = str(tmp_path / "run")
  shutil.copytree(pipeline_run, root, ignore=shutil.ignore_patterns(".lock"))
  mini.composite_stage("hir", preset, root)
  settings = hir.settings_for(preset)
  rounds = json.load(open(os.path.join(root, "hir", "rounds.json")))
  assert sum(r["samples"] for r in rounds.values()) == preset.ppo_iterations * preset.ppo_batch
  data = {
      r: [
          json.loads(line)
          for line in open(os.path.join(root, "hir", f"data_round_{r}_train.jsonl"))
      ] for r in (1, 2)
  }
  assert data[2][:len(data[1])] == data[1] and len(data[2]) > len(data[1])  # D grows.
  facts = world_lib.load_facts(os.path.join(root, "world"))
  for r in data[2]:
    judged = mini.T.judge(r["prompt"].split(), r["completion"].split(), facts)
    assert r["satisfied"] == hir.satisfied(judged)
  final = hir.final_policy_dir(root, preset)
  assert mini.run_lib.latest_step(final) == settings.steps_per_round
  saved = {
      n: open(os.path.join(root, "hir", n), "rb").read()
      for n in os.listdir(os.path.join(root, "hir")) if n.endswith(".json") or n.endswith(".jsonl")
  }
  mini.composite_stage("hir", preset, root)
  os.remove(os.path.join(root, "hir", "done.json"))  # Rounds themselves skip when finished.
  mini.composite_stage("hir", preset, root)
  assert {n: open(os.path.join(root, "hir", n), "rb").read() for n in saved} == saved
  results = json.load(open(os.path.join(root, "evaluate", "results.json")))
  files = world_lib.files(os.path.join(root, "world"))
  prompts = [json.loads(line)["prompt"] for line in open(files["eval_prompts"])]
  categories = [json.loads(line)["category"] for line in open(files["eval_prompts"])]
  texts = [json.loads(line)["text"] for line in open(files["pretrain"]["validation"])]
  _, judges = mini.labelers_lib.make_pools(preset.labelers)
  tok = tokenization.load_tokenizer(files["tokenizer"])
  sft_scores = mini.ev.judge_all(
      prompts,
      mini.ev.generate(mini.ev.load_policy(os.path.join(root, "sft")), tok, prompts,
                       seed=preset.seed + 17), facts)
  row = hir.evaluate_hir(root, preset, texts, prompts, categories, facts, judges, sft_scores,
                         seed=1)
  assert row["win_vs_sft"]["n"] == len(row["win_vs_sft"]["outcomes"]) == len(prompts)
  assert 0 <= row["win_vs_sft"]["ci_low"] <= row["win_vs_sft"]["win_rate"] <= 1
  assert np.isfinite(row["perplexity"]) and row["samples"] == sum(
      r["samples"] for r in rounds.values())
  results["methods"] = {"hir": row}
  report_lib.write_report(root, results, {})
  report = open(os.path.join(root, "report.md")).read()
  assert "| HIR | " in report and "## Hindsight instruction relabeling (HIR)" in report
  summary = mini.summary_metrics(results)
  assert summary["hir/win_vs_sft"] == row["win_vs_sft"]["win_rate"]
  assert summary["hir/perplexity_regression"] == pytest.approx(
      row["perplexity"] - results["models"]["base_small"]["perplexity"])
