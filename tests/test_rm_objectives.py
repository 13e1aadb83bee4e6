"""The reward-model losses against hand-computed values and a naive pair-by-pair reference."""

import itertools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct import objectives
from instruct.model import ModelConfig, Transformer, preset
from instruct.stages import rm

K_MAX = 9


def log_sigmoid(x: float) -> float:
  return -math.log1p(math.exp(-x))


def padded(rows):
  """[(rewards, ranks)] of different K -> padded [B, K_MAX] arrays and the response mask."""
  rewards = np.zeros((len(rows), K_MAX), np.float32)
  ranks = np.full((len(rows), K_MAX), K_MAX, np.int32)
  mask = np.zeros((len(rows), K_MAX), np.int32)
  for b, (r, k) in enumerate(rows):
    rewards[b, :len(r)], ranks[b, :len(k)], mask[b, :len(r)] = r, k, 1
  return jnp.asarray(rewards), jnp.asarray(ranks), jnp.asarray(mask)


def naive_prompt_loss(r, ranks):
  """-1/C(K,2) sum over ranked pairs of log sigmoid(r_w - r_l), by a Python loop."""
  pairs = [(w, l) for w in range(len(r)) for l in range(len(r)) if ranks[w] < ranks[l]]
  return -sum(log_sigmoid(r[w] - r[l]) for w, l in pairs) / len(pairs)


K9_REWARDS = [0.3, -1.2, 0.8, 2.0, -0.5, 0.0, 1.1, -0.9, 0.4]
K9_RANKS = [4, 8, 2, 0, 6, 5, 1, 7, 3]
BATCH = [([1.0, 0.0], [0, 1]), ([0.5, -0.2, 1.0, 0.3], [1, 3, 0, 2]), (K9_REWARDS, K9_RANKS)]


def test_pairwise_loss_equals_hand_computed_values_for_k_2_4_9():
  # K=2: one pair, -log sigmoid(1 - 0).
  k2 = math.log1p(math.exp(-1.0))
  assert k2 == pytest.approx(0.3132616875)
  # K=4: best is response 2, then 0, then 3, then 1: six pairs with these reward margins.
  margins = [1.0 - 0.5, 1.0 - 0.3, 1.0 - (-0.2), 0.5 - 0.3, 0.5 - (-0.2), 0.3 - (-0.2)]
  k4 = -sum(log_sigmoid(m) for m in margins) / 6
  # K=9: the 36 pairs by a loop.
  k9 = naive_prompt_loss(K9_REWARDS, K9_RANKS)
  loss_sum, prompts, stats = objectives.pairwise_ranking_loss(*padded(BATCH))
  assert float(prompts) == 3
  assert float(stats["pairs"]) == 1 + 6 + 36
  np.testing.assert_allclose(float(loss_sum), k2 + k4 + k9, rtol=1e-6)
  # Each prompt weighs the same (1/C(K,2) on its pairs), unlike a mean over all 43 pairs.
  for r, k in BATCH:
    single, _, _ = objectives.pairwise_ranking_loss(*padded([(r, k)]))
    np.testing.assert_allclose(float(single), naive_prompt_loss(r, k), rtol=1e-6)


def test_loss_is_invariant_to_the_order_responses_are_stored_in():
  rng = np.random.default_rng(0)
  base = objectives.pairwise_ranking_loss(*padded(BATCH))[0]
  for _ in range(3):
    shuffled = []
    for r, k in BATCH:
      perm = rng.permutation(len(r))
      shuffled.append(([r[i] for i in perm], [k[i] for i in perm]))
    np.testing.assert_allclose(float(objectives.pairwise_ranking_loss(*padded(shuffled))[0]),
                               float(base), rtol=1e-6)


def test_padded_responses_get_no_gradient_and_do_not_change_the_loss():
  rewards, ranks, mask = padded(BATCH)
  loss = lambda r: objectives.pairwise_ranking_loss(r, ranks, mask)[0]
  grad = np.asarray(jax.grad(loss)(rewards))
  assert np.all(grad[np.asarray(mask) == 0] == 0.0)
  assert np.all(grad[np.asarray(mask) == 1] != 0.0)
  noisy = jnp.where(mask > 0, rewards, 1e3)
  assert float(loss(noisy)) == float(loss(rewards))


@pytest.mark.parametrize("name", sorted(objectives.RANKING_LOSSES))
def test_nan_in_padded_slots_and_dummy_rows_give_finite_loss_and_gradients(name):
  """A padded response slot may hold anything (here NaN, as a reward read from an all-padding
  sequence can be); an evaluation batch's dummy row has no real response at all."""
  loss = objectives.RANKING_LOSSES[name]
  rewards, ranks, mask = padded(BATCH + [([], [])])
  poisoned = jnp.where(mask > 0, rewards, jnp.nan)
  value, prompts, stats = loss(poisoned, ranks, mask)
  expected, expected_prompts, expected_stats = loss(rewards, ranks, mask)
  assert np.isfinite(float(value)) and float(prompts) == float(expected_prompts) == 3
  np.testing.assert_allclose(float(value), float(expected), rtol=1e-6)
  for key, stat in stats.items():
    np.testing.assert_allclose(float(stat), float(expected_stats[key]), rtol=1e-6, err_msg=key)
  grad = np.asarray(jax.grad(lambda r: loss(r, ranks, mask)[0])(poisoned))
  assert np.all(np.isfinite(grad)), grad
  assert np.all(grad[np.asarray(mask) == 0] == 0.0)
  np.testing.assert_allclose(grad, np.asarray(jax.grad(lambda r: loss(r, ranks, mask)[0])(rewards)),
                             rtol=1e-6)


def test_ties_form_no_pairs_and_best_of_k_loss_is_the_softmax_on_the_best():
  r = [0.2, 1.5, -0.3, 0.7]
  ranks = [1, 0, 1, 1]  # Best-of-4: response 1 chosen, the others tied.
  loss_sum, prompts, stats = objectives.pairwise_ranking_loss(*padded([(r, ranks)]))
  assert float(stats["pairs"]) == 3
  expected_pairwise = -sum(log_sigmoid(1.5 - x) for x in (0.2, -0.3, 0.7)) / 3
  np.testing.assert_allclose(float(loss_sum), expected_pairwise, rtol=1e-6)
  best_sum, best_prompts, _ = objectives.best_of_k_loss(*padded([(r, ranks)]))
  expected_softmax = -(1.5 - math.log(sum(math.exp(x) for x in r)))
  np.testing.assert_allclose(float(best_sum), expected_softmax, rtol=1e-6)
  assert float(best_prompts) == 1


def test_last_token_values_with_left_and_right_padding():
  values = jnp.arange(12, dtype=jnp.float32).reshape(2, 6)
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(objectives.last_token_values(values, mask), [2.0, 11.0])
  empty = jnp.zeros((1, 6), jnp.int32)
  assert float(objectives.last_token_values(values[:1], empty)[0]) == 0.0


def make_comparison_batch(rng, k_per_prompt, length=12, vocab=512):
  b = len(k_per_prompt)
  tokens = rng.integers(2, vocab, size=(b, K_MAX, length)).astype(np.int32)
  lengths = rng.integers(4, length + 1, size=(b, K_MAX))
  attention = (np.arange(length)[None, None] < lengths[..., None]).astype(np.int32)
  ranks = np.full((b, K_MAX), K_MAX, np.int32)
  mask = np.zeros((b, K_MAX), np.int32)
  for i, k in enumerate(k_per_prompt):
    ranks[i, :k] = rng.permutation(k)
    mask[i, :k] = 1
  attention *= mask[..., None]
  tokens = np.where(attention > 0, tokens, 1)
  return {
      "tokens": jnp.asarray(tokens), "attention_mask": jnp.asarray(attention),
      "ranks": jnp.asarray(ranks), "response_mask": jnp.asarray(mask)
  }


# yapf: disable
def test_k_forward_passes_equal_naive_pairs_as_separate_examples():
  model = Transformer(ModelConfig(**preset("tiny")), head="scalar")
  batch = make_comparison_batch(np.random.default_rng(3), [2, 4, 9])
  params = nn.meta.unbox(model.init(jax.random.key(0), batch["tokens"][0]))["params"]
  k_wise = rm.ranking_loss(model, "pairwise", deterministic=True)

  # Every ranked pair as its own 2-sequence example, weighted 1/C(K,2) of its prompt.
  examples, weights = [], []
  for b in range(3):
    k = int(batch["response_mask"][b].sum())
    ranks = np.asarray(batch["ranks"][b])
    pairs = [(w, l) for w, l in itertools.permutations(range(k), 2) if ranks[w] < ranks[l]]
    assert len(pairs) == k * (k - 1) // 2
    examples += [(b, w, l) for w, l in pairs]
    weights += [1.0 / len(pairs)] * len(pairs)
  index = np.array(examples)
  pair_tokens = batch["tokens"][index[:, :1], index[:, 1:]]          # [P, 2, L]
  pair_mask = batch["attention_mask"][index[:, :1], index[:, 1:]]

  def naive(params):
    rewards = rm.sequence_rewards(model, params, pair_tokens, pair_mask)  # [P, 2]
    return -jnp.sum(jnp.asarray(weights) * jax.nn.log_sigmoid(rewards[:, 0] - rewards[:, 1]))

  k_wise_loss, k_wise_grad = jax.jit(jax.value_and_grad(lambda p: k_wise(p, batch, None)[0]))(
      params)
  naive_loss, naive_grad = jax.jit(jax.value_and_grad(naive))(params)
  np.testing.assert_allclose(float(k_wise_loss), float(naive_loss), rtol=1e-5)
  # float32: the two sum the same terms in different orders.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               k_wise_grad, naive_grad)
# yapf: enable


def test_calibration_table_on_hand_made_pairs():
  rewards = np.array([[2.0, 0.0, -2.0]])
  ranks = np.array([[0, 2, 1]])
  mask = np.ones((1, 3), np.int32)
  table = rm.calibration_table(rewards, ranks, mask, bins=2)
  # Pairs by position: (0,1): p=sigmoid(2)=0.881, observed 1; (0,2): p=sigmoid(4)=0.982,
  # observed 1; (1,2): p=sigmoid(2)=0.881, observed 0 (2 is ranked above 1).
  assert table["calibration_count"] == [0, 3]
  np.testing.assert_allclose(table["calibration_observed"][1], 2 / 3)
  expected_predicted = (2 / (1 + math.exp(-2)) + 1 / (1 + math.exp(-4))) / 3
  np.testing.assert_allclose(table["calibration_predicted"][1], expected_predicted)
  assert table["calibration_predicted"][0] is None


def test_normalization_modes():
  scores = np.random.default_rng(0).normal(3.0, 2.0, size=1000)
  demo = rm.normalization(scores, "demonstrations")
  assert demo["gain"] == 1.0
  np.testing.assert_allclose(np.mean(scores + demo["bias"]), 0.0, atol=1e-9)
  policy = rm.normalization(scores, "policy_samples")
  normalized = policy["gain"] * scores + policy["bias"]
  np.testing.assert_allclose([np.mean(normalized), np.std(normalized)], [0.0, 1.0], atol=1e-9)
  assert rm.normalization(scores, "none") == {"gain": 1.0, "bias": 0.0}
