"""The DPO stage: its losses against hand-computed values and numpy loops (ties, padding,
best-of-K, K=2 listwise = pairwise), the response-token masks of comparison batches, the
step's direction, learning from an SFT run, resume, meshes and config errors."""

import functools
import json
import math
import random
import re

import jax
import numpy as np
import pytest

from instruct import config_lib
from instruct import data as data_lib
from instruct import metrics as metrics_lib
from instruct import preference
from instruct import run as run_lib
from instruct import trainer
from tests.test_sharding import load_config

LOSSES = sorted(preference.PREFERENCE_LOSSES)

# ---------------------------------------------------------------- losses


def log_sigmoid(x: float) -> float:
  return -math.log1p(math.exp(-x)) if x > -30 else x


def padded(rows, garbage=np.nan):
  """[(policy, reference, ranks)] of different K -> [8, 5] arrays (one shape: one compilation
  per loss) and the response mask; padded slots and rows hold `garbage`."""
  shape = (8, 5)
  policy, reference = np.full(shape, garbage, np.float32), np.full(shape, -garbage, np.float32)
  ranks, mask = np.full(shape, shape[1], np.int32), np.zeros(shape, np.int32)
  for b, (p, r, k) in enumerate(rows):
    n = len(p)
    policy[b, :n], reference[b, :n], ranks[b, :n], mask[b, :n] = p, r, k, 1
  return policy, reference, ranks, mask


def numpy_pairwise(rows, beta, name, eps=0.0):
  """sum over prompts of the mean over ranked pairs (rank_i < rank_j) of the pair loss."""
  total = 0.0
  for p, r, k in rows:
    h = [a - b for a, b in zip(p, r)]
    terms = []
    for i in range(len(p)):
      for j in range(len(p)):
        if k[i] < k[j]:
          d = h[i] - h[j]
          if name == "dpo":
            terms.append(-(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d))
          else:
            terms.append((d - 1 / (2 * beta)) ** 2)
    total += sum(terms) / len(terms) if terms else 0.0
  return total


def numpy_plackett_luce(rows, beta):
  """Breslow ties: a response with a strictly worse one gets -log(e^r_i / sum_{rank_j >=
  rank_i} e^r_j); each prompt's terms are averaged."""
  total = 0.0
  for p, r, k in rows:
    rewards = [beta * (a - b) for a, b in zip(p, r)]
    terms = []
    for i in range(len(p)):
      if any(k[j] > k[i] for j in range(len(p))):
        denominator = sum(math.exp(rewards[j]) for j in range(len(p)) if k[j] >= k[i])
        terms.append(-(rewards[i] - math.log(denominator)))
    total += sum(terms) / len(terms) if terms else 0.0
  return total


# K=2 chosen/rejected; K=4 full ranking; K=3 with a tie in the middle group; K=4 best-of-K (one
# 0, the rest tied); K=5 full ranking; K=3 all tied (no pair: not counted); K=3 with a tie at
# the top.
ROWS = [
    ([-1.0, -2.0], [-1.5, -1.5], [0, 1]),
    ([-3.0, -1.0, -2.5, -4.0], [-2.0, -2.0, -3.0, -3.5], [2, 0, 3, 1]),
    ([-1.0, -2.0, -3.0], [-1.2, -1.0, -3.5], [0, 1, 1]),
    ([-5.0, -4.0, -6.0, -3.0], [-6.0, -3.0, -5.0, -2.0], [1, 1, 0, 1]),
    ([-1.0, -2.0, -3.0, -4.0, -5.0], [-3.0, -1.0, -2.0, -5.0, -4.0], [4, 2, 0, 3, 1]),
    ([-1.0, -2.0, -3.0], [-1.0, -2.0, -3.0], [0, 0, 0]),
    ([-2.0, -1.0, -3.0], [-2.5, -1.0, -2.0], [0, 0, 1]),
]


@functools.partial(jax.jit, static_argnames=("name", "label_smoothing"))
def loss_and_grad(name, policy, reference, ranks, mask, beta, label_smoothing=0.0):
  """(loss_sum, prompts, stats, d loss_sum / d policy) of loss `name`, jitted once per shape."""

  def loss_fn(p):
    loss, prompts, stats = preference.PREFERENCE_LOSSES[name](p, reference, ranks, mask, beta,
                                                              label_smoothing)
    return loss, (prompts, stats)

  (loss, (prompts, stats)), grad = jax.value_and_grad(loss_fn, has_aux=True)(policy)
  return loss, prompts, stats, grad


def test_dpo_and_ipo_by_hand():
  # One chosen/rejected pair: h = (-1 + 1.5) - (-2 + 1.5) = 1.
  batch = padded(ROWS[:1])
  loss, prompts, stats, _ = loss_and_grad("dpo", *batch, 0.1)
  np.testing.assert_allclose(float(loss), math.log1p(math.exp(-0.1)), rtol=1e-6)
  assert float(prompts) == 1 and float(stats["pairs"]) == 1
  loss = loss_and_grad("ipo", *batch, 0.1)[0]
  np.testing.assert_allclose(float(loss), (1.0 - 5.0) ** 2, rtol=1e-6)  # (h - 1/(2 beta))^2.
  loss = loss_and_grad("ipo", *batch, 0.5)[0]
  np.testing.assert_allclose(float(loss), 0.0, atol=1e-6)  # The margin sits at its target.
  # Conservative DPO: the label flipped with probability 0.1.
  loss = loss_and_grad("dpo", *batch, 0.1, 0.1)[0]
  expected = 0.9 * math.log1p(math.exp(-0.1)) + 0.1 * math.log1p(math.exp(0.1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_plackett_luce_by_hand():
  rewards = [1.0, 0.0, -1.0]
  z = math.log(math.e + 1.0 + math.exp(-1.0))  # log sum_j exp(r_j) over all three.
  cases = {
      # A full ranking, best first: two terms, averaged.
      (0, 1, 2): ((z - 1.0) + math.log(1.0 + math.exp(-1.0))) / 2,
      # Best-of-3: exactly one term, the best against all three.
      (0, 1, 1): z - 1.0,
      # Two tied at the top: each of them against all three (Breslow), averaged.
      (0, 0, 1): ((z - 1.0) + (z - 0.0)) / 2,
  }
  for ranks, expected in cases.items():
    batch = padded([(rewards, [0.0, 0.0, 0.0], list(ranks))])
    loss, prompts, _, _ = loss_and_grad("plackett_luce", *batch, 1.0)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6, err_msg=str(ranks))
    assert float(prompts) == 1


@pytest.mark.parametrize("name,eps", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0),
                                      ("plackett_luce", 0.0)])
def test_losses_match_numpy_loops_with_ties_and_garbage_in_padding(name, eps):
  beta = 0.3
  if name == "plackett_luce":
    expected = numpy_plackett_luce(ROWS, beta)
  else:
    expected = numpy_pairwise(ROWS, beta, name, eps)
  results = []
  for garbage in (np.nan, np.inf, 0.0):
    batch = padded(ROWS, garbage=garbage)
    loss, prompts, stats, grad = loss_and_grad(name, *batch, beta, eps)
    results.append(float(loss))
    assert float(prompts) == 6  # The all-tied prompt has no pair.
    assert float(stats["pairs"]) == 1 + 6 + 2 + 3 + 10 + 2
    # The gradient with respect to the log-probs is finite, and 0 in the padded slots.
    assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[batch[3] == 0] == 0)
  np.testing.assert_allclose(results, expected, rtol=2e-6)


def test_plackett_luce_with_two_responses_is_pairwise_dpo():
  """The same function (one term, -log sigmoid(r_w - r_l)); two XLA programs agree up to
  float32 rounding (measured: at most 1 ulp, in the loss and in the summed margins alike)."""
  for seed, beta in enumerate((0.1, 1.0, 5.0)):
    rng = np.random.default_rng(seed)
    rows = [(list(rng.normal(-5, 2, 2)), list(rng.normal(-5, 2, 2)), list(rng.permutation(2)))
            for _ in range(8)]
    batch = padded(rows)
    pl_loss, pl_prompts, pl_stats, pl_grad = loss_and_grad("plackett_luce", *batch, beta)
    dpo_loss, dpo_prompts, dpo_stats, dpo_grad = loss_and_grad("dpo", *batch, beta)
    np.testing.assert_allclose(float(pl_loss), float(dpo_loss), rtol=1e-6)
    np.testing.assert_allclose(float(pl_loss), numpy_pairwise(rows, beta, "dpo"), rtol=1e-6)
    assert float(pl_prompts) == float(dpo_prompts) == 8
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), pl_stats, dpo_stats)
    np.testing.assert_allclose(pl_grad, dpo_grad, rtol=1e-6, atol=1e-9)


def test_statistics_are_over_ranked_pairs_and_best_and_worst_responses():
  beta = 0.5
  _, _, stats, _ = loss_and_grad("dpo", *padded(ROWS), beta)
  correct = margins = 0.0
  chosen, rejected = [], []
  for p, r, k in ROWS:
    rewards = [beta * (a - b) for a, b in zip(p, r)]
    for i in range(len(p)):
      for j in range(len(p)):
        if k[i] < k[j]:
          correct += rewards[i] > rewards[j]
          margins += rewards[i] - rewards[j]
    if min(k) < max(k):
      chosen += [rewards[i] for i in range(len(p)) if k[i] == min(k)]
      rejected += [rewards[i] for i in range(len(p)) if k[i] == max(k)]
  assert float(stats["correct_pairs"]) == correct
  np.testing.assert_allclose(float(stats["margin_sum"]), margins, rtol=1e-5)
  assert float(stats["chosen_count"]) == len(chosen) == 7  # The tie at the top counts both.
  assert float(stats["rejected_count"]) == len(rejected) == 1 + 1 + 2 + 3 + 1 + 1
  np.testing.assert_allclose(float(stats["chosen_reward_sum"]), sum(chosen), rtol=1e-5)
  np.testing.assert_allclose(float(stats["rejected_reward_sum"]), sum(rejected), rtol=1e-5)
  np.testing.assert_allclose(float(stats["chosen_logratio_sum"]), sum(chosen) / beta, rtol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_a_gradient_step_on_the_log_probs_raises_the_margin(name):
  policy, reference, ranks, mask = padded(ROWS, garbage=0.0)
  _, _, stats, grad = loss_and_grad(name, policy, reference, ranks, mask, 0.1)
  stepped = loss_and_grad(name, policy - 0.01 * np.asarray(grad), reference, ranks, mask, 0.1)
  assert float(stepped[2]["margin_sum"]) > float(stats["margin_sum"])
  # The best response of the chosen/rejected prompt goes up, the other one down.
  assert grad[0, 0] < 0 < grad[0, 1]


# ------------------------------------------------------------------- data

NOUNS = "cat dog bird fish tree river stone cloud apple bread lamp door book chair".split()


def write_marker_comparisons(path, num, seed):
  """A learnable preference in all three record shapes: more ' star' is better.

  A third each: full rankings of K in {3, 4}, chosen/rejected pairs, best-of-K (K in {3, 4}).
  """
  rng = random.Random(seed)
  lines = []
  for n in range(num):
    shape = ("ranking", "pair", "best")[n % 3]
    k = 2 if shape == "pair" else rng.choice([3, 4])
    counts = rng.sample(range(4), k)
    responses = []
    for c in counts:
      words = [rng.choice(NOUNS) for _ in range(rng.randint(3, 6))] + ["star"] * c
      rng.shuffle(words)
      responses.append(" " + " ".join(words))
    order = sorted(range(k), key=lambda i: -counts[i])
    record = {"prompt": "Say some words:"}
    if shape == "pair":
      record.update(chosen=responses[order[0]], rejected=responses[order[1]])
    elif shape == "best":
      record.update(responses=responses, best=order[0])
    else:
      record.update(responses=responses, ranking=order)
    lines.append(json.dumps(record))
  path.write_text("".join(line + "\n" for line in lines))


def test_comparison_batches_carry_response_token_masks(tmp_path, tfds_dir, tokenizer):
  write_marker_comparisons(tmp_path / "c.jsonl", 24, seed=5)
  args = dict(global_batch_size=24, max_responses=4, buckets=(32,), seed=0, shuffle=False,
              repeat=False, data_dir=tfds_dir)
  files = {"train": str(tmp_path / "c.jsonl")}
  batch = next(
      data_lib.make_comparison_batches(files, "train", tokenizer, response_masks=True, **args))
  plain = next(data_lib.make_comparison_batches(files, "train", tokenizer, **args))
  assert sorted(plain) == ["attention_mask", "ranks", "response_mask", "tokens"]  # RM: as was.
  for key in plain:
    np.testing.assert_array_equal(batch[key], plain[key])
  # Every response of the file, as SFT would encode it after the prompt (the prepared split is
  # not in file order, so rows are matched by their tokens).
  records, _ = data_lib.read_comparisons(files["train"])
  expected = {}
  for record in records:
    for response in record["responses"]:
      tokens, mask, _ = data_lib.encode_demonstration(tokenizer, record["prompt"], response, 32)
      expected[tuple(tokens)] = mask
  seen = set()
  for row, slot in zip(*np.nonzero(batch["response_mask"])):
    n = int(batch["attention_mask"][row, slot].sum())
    tokens = tuple(batch["tokens"][row, slot, :n])
    np.testing.assert_array_equal(batch["loss_mask"][row, slot, :n], expected[tokens])
    assert not batch["loss_mask"][row, slot, n:].any()
    seen.add(tokens)
  assert seen == set(expected)
  assert not batch["loss_mask"][batch["response_mask"] == 0].any()
  assert {len(r["responses"]) for r in records} == {2, 3, 4}


# ------------------------------------------------------------- the stage


def dpo_config(tfds_dir, root, **train):
  config = load_config("dpo", "tiny")
  config.data.tfds_dir = tfds_dir
  config.init_from = str(root / "sft")
  config.data.train_file = str(root / "train.jsonl")
  config.data.validation_file = str(root / "validation.jsonl")
  config.data.buckets = (32,)  # Prompt and response take at most 19 tokens.
  config.optimizer.warmup_steps = 0  # The first step already moves the policy.
  config.train.update(num_steps=12, log_every=1, checkpoint_every=6, eval_every=0)
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tfds_dir):
  """A short SFT run; from it, on the marker-word preference: a DPO run on one device ('a'),
  the same run stopped halfway and resumed ('b'), and its first half on an 8-device
  data x FSDP mesh ('mesh')."""
  root = tmp_path_factory.mktemp("dpo_runs")
  write_marker_comparisons(root / "train.jsonl", 384, seed=0)
  write_marker_comparisons(root / "validation.jsonl", 64, seed=1)
  sft_config = load_config("sft", "tiny")
  sft_config.data.tfds_dir = tfds_dir
  sft_config.train.update(num_steps=4, eval_every=0)
  one = jax.devices()[:1]
  trainer.train_and_evaluate(sft_config, str(root / "sft"), one)
  straight = trainer.train_and_evaluate(dpo_config(tfds_dir, root, eval_every=6), str(root / "a"),
                                        one)
  trainer.train_and_evaluate(dpo_config(tfds_dir, root, stop_at_step=6), str(root / "b"), one)
  resumed = trainer.train_and_evaluate(dpo_config(tfds_dir, root), str(root / "b"), one)
  mesh_config = dpo_config(tfds_dir, root, stop_at_step=6)
  mesh_config.mesh.shape = (2, 4, 1)
  trainer.train_and_evaluate(mesh_config, str(root / "mesh"))
  return {"root": root, "straight": jax.device_get(straight), "resumed": jax.device_get(resumed)}


def read_metrics(runs, name):
  records = metrics_lib.read_metrics(str(runs["root"] / name))
  return ([r for r in records if "loss" in r], [r for r in records if "val_accuracy" in r])


def test_dpo_learns_the_preference_and_stays_near_the_reference(runs):
  train, evals = read_metrics(runs, "a")
  assert [r["step"] for r in train] == list(range(1, 13)) and [r["step"] for r in evals] == [6, 12]
  # Step 1 sees the policy equal to its reference: every margin 0 (up to rounding: the two
  # forward passes are different programs), the loss log 2. One update later the implicit
  # reward already prefers the better response of new prompts.
  assert abs(train[0]["margin"]) < 1e-6 and train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
  assert train[1]["margin"] > 1e-3 and train[1]["accuracy"] > 0.75
  first, last = evals
  # Measured on seeds 0-3 (config and data seeds; 2-core CPU): the step-2 margin 0.011-0.014 at
  # accuracy 0.94-1.0; val_accuracy 0.98-1.0 at steps 6 and 12; val_margin 0.062-0.074 ->
  # 0.108-0.136; val_chosen_logratio 1.05-1.16 -> 1.47-1.86; val_token_kl 0.0014-0.0020 ->
  # 0.0063-0.0079.
  assert last["val_margin"] > first["val_margin"] > 0
  assert last["val_loss"] < first["val_loss"] < math.log(2)
  assert first["val_accuracy"] > 0.75 and last["val_accuracy"] > 0.75
  # The chosen responses became likelier than under the reference (at step 0 the log-ratio is
  # 0), and more so over training, while the per-token KL on the responses stays small.
  assert last["val_chosen_logratio"] > first["val_chosen_logratio"] > 0
  assert last["val_chosen_reward"] > last["val_rejected_reward"]
  assert 0 < first["val_token_kl"] < last["val_token_kl"] < 0.05
  assert all(r["train_truncated"] == 0 for r in train)


def test_resume_after_stop_equals_the_straight_run(runs):
  straight, resumed = runs["straight"], runs["resumed"]
  assert int(resumed.step) == int(straight.step) == 12
  jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
  jax.tree.map(np.testing.assert_array_equal, straight.opt_state, resumed.opt_state)
  timeless = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_second"}
                              for r in records]
  assert timeless(read_metrics(runs, "b")[0]) == timeless(read_metrics(runs, "a")[0])


def test_mesh_run_matches_one_device(runs):
  """Eight devices as data 2 x FSDP 4 (policy and reference sharded) against one device."""
  one_train, _ = read_metrics(runs, "a")
  mesh_train, _ = read_metrics(runs, "mesh")
  assert [r["step"] for r in mesh_train] == list(range(1, 7))
  for key in ("loss", "accuracy", "margin", "chosen_logratio", "rejected_logratio", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in mesh_train], [r[key] for r in one_train[:6]],
                               rtol=1e-4, atol=1e-6, err_msg=key)
  one, mesh = (jax.device_get(run_lib.load_run(str(runs["root"] / name), 6).params)
               for name in ("a", "mesh"))
  # The key projections' biases only add q . b_k to every score of a query, which the softmax
  # ignores: their gradient is exactly 0 and Adam turns rounding noise into updates that differ
  # between meshes (as the reward model's shift-only biases, tests/test_rm.py). They stay
  # negligible (measured <= 1.4e-6 against the 6e-4 that six real steps would move them);
  # everything else must match (measured, seeds 0-3: the parameters use <= 1.1% of the
  # tolerance, the metrics <= 8.2%).
  for tree in (one, mesh):
    for name in ("layers_0", "layers_1"):
      assert np.all(np.abs(tree[name]["attn"]["k_proj"].pop("bias")) < 1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), mesh, one)


@pytest.mark.parametrize("key,value,message", [
    ("dpo.loss", "kto", "config.dpo.loss='kto'"),
    ("dpo.beta", 0.0, "config.dpo.beta=0.0"),
    ("dpo.beta", -1.0, "config.dpo.beta=-1.0"),
    ("dpo.label_smoothing", 0.5, "config.dpo.label_smoothing=0.5"),
    ("init_from", "", "config.init_from is empty"),
    ("rm.max_responses", 12, "config.rm.max_responses=12"),
    ("data.kind", "demonstrations", "config.data.kind='demonstrations'"),
])
def test_bad_config_errors_name_the_key(key, value, message, tmp_path):
  config = load_config("dpo", "tiny")
  config.init_from = str(tmp_path)
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match="^" + re.escape(message)):
    config_lib.validate(config, 1, 1)


def test_label_smoothing_is_for_dpo_and_init_from_must_be_a_policy(tmp_path):
  config = load_config("dpo", "tiny")
  config.init_from = str(tmp_path)
  config.dpo.update(loss="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match=r"^config\.dpo\.label_smoothing=0\.1 .*not 'ipo'"):
    config_lib.validate(config, 1, 1)
  (tmp_path / "config.json").write_text(load_config("rm", "tiny").to_json())
  config.dpo.update(loss="dpo", label_smoothing=0.0)
  with pytest.raises(ValueError, match=r"^config\.init_from=.* is a 'rm' run"):
    config_lib.validate(config, 1, 1)
