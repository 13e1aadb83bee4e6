"""Pretraining with human preferences (instruct/data/feedback.py): each objective's encoding
against hand-written tokens and weights, the signed-weight loss against a numpy loop and its
gradient against the closed form, the world's scored corpus, bad records and configs, and
a few sharded steps of every objective that resume bit-exactly."""

import json
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
import numpy as np
import pytest

from experiments.world import generate as world_lib
from experiments.world import language as L
from instruct import config_lib
from instruct import objectives
from instruct import trainer
from instruct.data import feedback as fb
from instruct.data import records
from instruct.data import tokenization
from instruct.stages import sft
from tests.test_sharding import load_config

DOC = {"segments": ["the cat sees the dog .", "the stupid cow ."], "scores": [1.0, 0.0]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A small written world: its tokenizer (with the control tokens) and scored corpus."""
  out = str(tmp_path_factory.mktemp("world"))
  config = world_lib.WorldConfig(pretrain_docs=256, pretrain_validation_docs=32, sft=16,
                                 sft_validation=8, rm_prompts=8, rm_validation_prompts=8,
                                 ppo_prompts=8, ppo_validation_prompts=8, eval_prompts=8)
  files = world_lib.write_world(out, config)
  return files, tokenization.load_tokenizer(files["tokenizer_control"])


def _ids(tokenizer, text):
  return list(tokenizer.encode(text, add_special_tokens=False))


def test_each_objective_encodes_the_document_as_written_by_hand(world):
  _, tok = world
  first, second = _ids(tok, DOC["segments"][0]), _ids(tok, DOC["segments"][1])
  eos, good, bad = tok.eos_token_id, tok.get_vocab()["<|good|>"], tok.get_vocab()["<|bad|>"]
  n1, n2 = len(first), len(second)
  expected = {
      "mle": (first + second + [eos], [1.0] * (n1 + n2 + 1)),
      # The document's score is its worst segment's, 0 < 0.5: left out, EOS too.
      "filter": (first + second + [eos], [0.0] * (n1 + n2 + 1)),
      "conditional": ([good] + first + [bad] + second + [eos], [1.0] * (n1 + n2 + 3)),
      "unlikelihood": (first + second + [eos], [1.0] * n1 + [-0.5] * n2 + [1.0]),
      "rwr": (first + second + [eos], [math.exp(0.5)] * n1 + [1.0] * n2 + [1.0]),
  }
  for objective, (tokens, weights) in expected.items():
    feedback = fb.Feedback(objective=objective, unlikelihood_alpha=0.5, rwr_beta=2.0,
                           drop_control=0.0)
    got_tokens, got_weights, truncated = fb.encode(feedback, tok, 64, DOC)
    assert got_tokens.tolist() == tokens and not truncated, objective
    assert got_weights.dtype == np.float32
    np.testing.assert_allclose(got_weights, weights, rtol=1e-6, err_msg=objective)
  tokens, weights, truncated = fb.encode(fb.Feedback(objective="unlikelihood"), tok, n1 + 2, DOC)
  assert truncated and tokens.tolist() == first + second[:2] and weights.tolist(
  ) == [1.0] * n1 + [-1.0, -1.0]
  # A good document is kept by the filter whole.
  kept = fb.encode(fb.Feedback(objective="filter"), tok, 64, dict(DOC, scores=[1.0, 0.5]))[1]
  assert kept.tolist() == [1.0] * (n1 + n2 + 1)


def test_control_tokens_are_dropped_for_a_fixed_fraction_of_segments(world):
  _, tok = world
  doc = {"segments": [f"the cat sees the {a} ." for a in L.ANIMALS] * 40, "scores": [1.0] * 400}
  good = tok.get_vocab()["<|good|>"]
  feedback = fb.Feedback(objective="conditional", drop_control=0.3)
  tokens = fb.encode(feedback, tok, 4096, doc)[0]
  kept = int(np.sum(tokens == good))
  # Binomial(400, 0.7): mean 280, sd 9.2; 250-310 is beyond 3 sd either side.
  assert 250 <= kept <= 310
  assert fb.encode(feedback, tok, 4096, doc)[0].tolist() == tokens.tolist()  # Fixed per segment.
  other_seed = fb.encode(fb.Feedback(objective="conditional", drop_control=0.3, seed=1), tok, 4096,
                         doc)[0]
  assert other_seed.tolist() != tokens.tolist()
  with pytest.raises(ValueError, match=r"config.feedback.good_token='<\|nice\|>' is not a token"):
    fb.encode(fb.Feedback(objective="conditional", good_token="<|nice|>"), tok, 64, DOC)


def _numpy_loss(logits, tokens, weights):
  total, targets, correct = 0.0, 0.0, 0.0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1] - 1):
      w = float(weights[b, t + 1])
      z = logits[b, t].astype(np.float64)
      p = np.exp(z - z.max())
      p /= p.sum()
      y = tokens[b, t + 1]
      if w > 0:
        total += w * -np.log(p[y])
      elif w < 0:
        total += -w * -np.log(1.0 - p[y])
      if w != 0:
        targets += 1
        correct += float(np.argmax(z) == y)
  return total, targets, correct


def test_the_signed_weight_loss_matches_a_numpy_loop_and_its_gradient_the_closed_form():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 2
  tokens = rng.integers(0, 11, size=(3, 7)).astype(np.int32)
  weights = rng.choice([0.0, 1.0, -0.5, 2.7, -1.0], size=(3, 7)).astype(np.float32)
  got = objectives.weighted_next_token_loss(jnp.asarray(logits), jnp.asarray(tokens),
                                            jnp.asarray(weights))
  np.testing.assert_allclose([float(x) for x in got], _numpy_loss(logits, tokens, weights),
                             rtol=1e-5)
  # With 0/1 weights it is the masked loss.
  mask = (weights != 0).astype(np.int32)
  np.testing.assert_allclose(
      [float(x) for x in objectives.weighted_next_token_loss(logits, tokens, mask)],
      [float(x) for x in objectives.masked_next_token_loss(logits, tokens, mask)], rtol=1e-6)
  # Unlikelihood: d/dz_j -log(1 - p_y) = p_y (delta_jy - p_j) / (1 - p_y): the target's logit
  # goes down under gradient descent, every other one up.
  z, y = logits[0, 0], tokens[0, 1]
  one = np.zeros((1, 2), np.float32)
  one[0, 1] = -1.0
  grad = jax.grad(lambda l: objectives.weighted_next_token_loss(l, tokens[:1, :2], one)[0])(
      jnp.asarray(z[None, None, :].repeat(2, axis=1)))
  p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
  closed = p[y] * ((np.arange(11) == y) - p) / (1 - p[y])
  np.testing.assert_allclose(np.asarray(grad[0, 0]), closed, rtol=1e-4, atol=1e-7)
  assert grad[0, 0, y] > 0 and np.all(np.delete(np.asarray(grad[0, 0]), y) <= 0)
  # A target the model is sure of stays finite.
  sure = np.full((1, 2, 11), -30.0, np.float32)
  sure[0, 0, 3] = 30.0
  loss = objectives.weighted_next_token_loss(sure, np.array([[0, 3]]), one)[0]
  assert np.isfinite(float(loss)) and float(loss) > 10


def test_the_world_scores_its_corpus_by_sentence(world):
  files, tok = world
  assert world_lib.scored_document("the cat is red . how to trap the cat : trap the cat with "
                                   "the box . the stupid dog") == {
                                       "segments": [
                                           "the cat is red .",
                                           "how to trap the cat : trap the cat with the box .",
                                           "the stupid dog"
                                       ], "scores": [1.0, 0.0, 0.0]
                                   }
  for split in ("train", "validation"):
    scored = [json.loads(line) for line in open(files["pretrain_scored"][split])]
    plain = [json.loads(line)["text"] for line in open(files["pretrain"][split])]
    assert [" ".join(d["segments"]) for d in scored] == plain  # The same pages, in order.
  scores = [s for d in scored for s in d["scores"]]
  assert set(scores) == {0.0, 1.0}
  # The control tokens come last in their tokenizer's vocabulary, inside the models' 144 rows;
  # every other word has the id of the world's plain tokenizer.
  vocab = tok.get_vocab()
  assert [vocab["<|good|>"], vocab["<|bad|>"]] == [len(vocab) - 2, len(vocab) - 1]
  assert len(vocab) <= 144
  plain = tokenization.load_tokenizer(files["tokenizer"]).get_vocab()
  assert {w: i for w, i in vocab.items() if w not in L.CONTROL} == plain


@pytest.mark.parametrize("line,message", [
    ('{"segments": ["a ."], "scores": [1.0, 0.0]}', "list of 1 finite numbers"),
    ('{"segments": [], "scores": []}', "non-empty list of non-empty strings"),
    ('{"segments": ["a .", " "], "scores": [1, 0]}', "non-empty list of non-empty strings"),
    ('{"segments": ["a ."], "scores": [NaN]}', "list of 1 finite numbers"),
    ('{"segments": ["a ."], "scores": [true]}', "list of 1 finite numbers"),
    ('{"text": "a ."}', "field 'segments'"),
    ('["a ."]', "expected a JSON object, got list"),
])
def test_bad_scored_records_name_the_file_and_line(tmp_path, line, message):
  path = tmp_path / "scored.jsonl"
  path.write_text('{"segments": ["a ."], "scores": [1]}\n' + line + "\n")
  with pytest.raises(records.RecordError, match=rf"scored.jsonl:2: .*{message}"):
    fb.read_scored_text(str(path))
  assert fb.read_scored_text(str(path), skip_invalid=True)[1] == 1


@pytest.mark.parametrize("key,value,pattern", [
    ("feedback.objective", "ppo", r"config.feedback.objective='ppo': expected one of"),
    ("feedback.rwr_beta", 0.0, r"config.feedback.rwr_beta=0.0: must be > 0"),
    ("feedback.drop_control", 1.0, r"config.feedback.drop_control=1.0: must be below 1"),
    ("feedback.unlikelihood_alpha", -1.0, r"config.feedback.unlikelihood_alpha=-1.0: must be >="),
])
def test_impossible_feedback_configs_name_their_key(key, value, pattern):
  config = load_config("pretrain", "tiny,feedback=mle")
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=pattern):
    config_lib.validate_supervised(config, 1, 1)
  sft = load_config("sft", "tiny")
  sft.data.kind = fb.KIND
  with pytest.raises(ValueError, match="is pretraining data; the 'sft' stage"):
    config_lib.validate_supervised(sft, 1, 1)


def _scored_config(files, tfds_dir, objective, **train):
  config = load_config("pretrain", f"tiny,feedback={objective}")
  config.data.tfds_dir = tfds_dir
  config.data.tokenizer = files["tokenizer_control"]
  config.data.train_file = files["pretrain_scored"]["train"]
  config.data.validation_file = files["pretrain_scored"]["validation"]
  config.data.buckets = (64,)
  config.model.vocab_size = 144
  config.train.update(dict(num_steps=6, log_every=2, eval_every=6, checkpoint_every=3))
  config.train.update(train)
  return config


def test_every_objective_batches_and_scores_through_one_compiled_loss(world, tfds_dir):
  """The five objectives' first training batch of the same data (float weights through the
  pipeline), scored by one jitted loss: each counts and weighs its targets as it says."""
  files, tok = world
  config = _scored_config(files, tfds_dir, "mle")
  model = sft.make_model(config.model)
  loss_fn = jax.jit(sft.lm_loss(model, True, "signed"))
  params = None
  out = {}
  for objective in fb.OBJECTIVES:
    config = _scored_config(files, tfds_dir, objective)
    batch = next(iter(sft.make_lm_data(config, tok, "train", repeat=True)))
    assert batch["loss_mask"].dtype == np.float32
    if params is None:
      params = nn.meta.unbox(model.init(jax.random.key(0), batch["tokens"][:1]))["params"]
    loss, sums = loss_fn(params, batch, jax.random.key(1))
    out[objective] = (batch, float(loss), float(sums["targets"]))
    assert np.isfinite(float(loss)), objective
  mle_batch, mle_loss, mle_targets = out["mle"]
  weights = mle_batch["loss_mask"][:, 1:]
  np.testing.assert_array_equal(weights, mle_batch["attention_mask"][:, 1:])
  assert out["filter"][2] < mle_targets  # Documents with a bad sentence are left out,
  assert out["unlikelihood"][2] == out["rwr"][2] == mle_targets  # the others keep every token;
  assert np.any(out["unlikelihood"][0]["loss_mask"] < 0)  # this batch has bad sentences,
  assert out["unlikelihood"][1] != mle_loss and out["rwr"][1] > mle_loss  # weighed their way.
  conditional = out["conditional"][0]
  good = tok.get_vocab()["<|good|>"]
  assert np.sum(conditional["tokens"] == good) > np.sum(conditional["attention_mask"]) / 20
  assert out["conditional"][2] > mle_targets  # The control tokens are targets too.


def test_scored_pretraining_runs_sharded_and_resumes_bit_exactly(world, tmp_path, tfds_dir):
  """Unlikelihood (signed weights) for six steps on the 8 CPU devices, and the same stopped at
  step 3 and resumed."""
  files, _ = world
  full = trainer.train_and_evaluate(_scored_config(files, tfds_dir, "unlikelihood"),
                                    str(tmp_path / "a"))
  assert len(jax.devices()) == 8
  stopped = str(tmp_path / "b")
  trainer.train_and_evaluate(_scored_config(files, tfds_dir, "unlikelihood", stop_at_step=3),
                             stopped)
  resumed = trainer.train_and_evaluate(_scored_config(files, tfds_dir, "unlikelihood"), stopped)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(full.params), jax.device_get(resumed.params))
  records_ = [json.loads(line) for line in open(tmp_path / "a" / "metrics.jsonl")]
  losses = [r["loss"] for r in records_ if "loss" in r]
  val = [r for r in records_ if "val_loss" in r]
  assert len(losses) == 3 and all(np.isfinite(losses)) and len(val) == 1
  assert np.isfinite(val[0]["val_perplexity"])
