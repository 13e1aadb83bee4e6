"""The masked next-token loss against hand-computed values, and where gradients flow."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct import objectives


# yapf: disable
def test_masked_loss_equals_hand_computed_value():
  # One sequence of 4 tokens over a vocabulary of 3. Prompt = token 0; completion = tokens 1-2;
  # token 3 is padding. Targets counted: positions 1 and 2 (predicted from positions 0 and 1).
  logits = np.array([[[2.0, 0.0, 0.0],     # predicts token 1 (target 1)
                      [0.0, 1.0, 3.0],     # predicts token 2 (target 2)
                      [1.0, 1.0, 1.0],     # predicts token 3 (padding: not counted)
                      [5.0, 0.0, 0.0]]])   # last position: no target
  tokens = np.array([[0, 1, 2, 1]])
  loss_mask = np.array([[0, 1, 1, 0]])
  # Hand computation: -log softmax([2,0,0])[1] = log(e^2 + 2) - 0 = 2.2395447662
  #                   -log softmax([0,1,3])[2] = log(1 + e + e^3) - 3 = 0.1698460317
  expected_sum = np.log(np.e ** 2 + 2) + np.log(1 + np.e + np.e ** 3) - 3
  loss_sum, targets, correct = objectives.masked_next_token_loss(
      jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(loss_mask))
  np.testing.assert_allclose(float(loss_sum), expected_sum, rtol=1e-6)
  np.testing.assert_allclose(float(loss_sum), 2.2395447662 + 0.1698460317, rtol=1e-6)
  assert float(targets) == 2.0
  # argmax of row 0 is token 0 (wrong: target 1); of row 1 is token 2 (right).
  assert float(correct) == 1.0
# yapf: enable


def test_prompt_and_pad_positions_get_no_gradient():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 6, 5)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 5, size=(2, 6)))
  # Row 0: prompt of 2 tokens, completion of 3, one pad. Row 1: prompt 3, completion 1, 2 pads.
  loss_mask = jnp.array([[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 0, 0]])
  grad = jax.grad(lambda l: objectives.masked_next_token_loss(l, tokens, loss_mask)[0])(logits)
  grad_norm_per_position = np.abs(np.asarray(grad)).sum(-1)
  # Position t is scored against target t+1: only positions whose next token is in the mask.
  receives = np.zeros((2, 6), bool)
  receives[:, :-1] = np.asarray(loss_mask)[:, 1:] > 0
  assert np.all(grad_norm_per_position[~receives] == 0.0)
  assert np.all(grad_norm_per_position[receives] > 0.0)


# yapf: disable
def test_loss_ignores_prompt_and_pad_token_values():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(1, 6, 7)), jnp.float32)
  tokens = np.array([[3, 4, 5, 6, 1, 1]])
  mask = jnp.array([[0, 0, 1, 1, 0, 0]])
  base = objectives.masked_next_token_loss(logits, jnp.asarray(tokens), mask)[0]
  changed = tokens.copy()
  changed[0, 1] = 0      # a prompt token that is a target of position 0: not counted
  changed[0, 4:] = 2     # padding
  other = objectives.masked_next_token_loss(logits, jnp.asarray(changed), mask)[0]
  assert float(base) == float(other)
  changed[0, 3] = 0      # a completion token: counted, so the loss changes
  assert float(objectives.masked_next_token_loss(logits, jnp.asarray(changed), mask)[0]) != \
      float(base)
# yapf: enable


def test_numpy_reference_on_random_batch():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32)
  tokens = rng.integers(0, 11, size=(3, 7))
  mask = rng.integers(0, 2, size=(3, 7))
  expected = 0.0
  for b in range(3):
    for t in range(6):
      if mask[b, t + 1]:
        row = logits[b, t].astype(np.float64)
        expected -= row[tokens[b, t + 1]] - np.log(np.exp(row).sum())
  loss_sum, targets, _ = objectives.masked_next_token_loss(jnp.asarray(logits), jnp.asarray(tokens),
                                                           jnp.asarray(mask))
  np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-5)
  assert float(targets) == mask[:, 1:].sum()


def test_the_losses_take_logits_without_the_last_position():
  """`Transformer(logits_stop=-1)` logits ([b, t-1, v]) give the losses and gradients of full
  logits."""
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(3, 7, 11)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 11, (3, 7)), jnp.int32)
  mask = jnp.asarray(rng.integers(0, 2, (3, 7)), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  for loss, w in ((objectives.masked_next_token_loss, mask), (objectives.weighted_next_token_loss,
                                                              weights)):
    full, short = loss(logits, tokens, w), loss(logits[:, :-1], tokens, w)
    for a, b in zip(full, short):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Full logits: the vocabulary is reduced at every position and the last is dropped after,
    # so the last position gets exactly no gradient and the others the short logits' one.
    grad_full = np.asarray(jax.grad(lambda l: loss(l, tokens, w)[0])(logits))
    grad_short = np.asarray(jax.grad(lambda l: loss(l, tokens, w)[0])(logits[:, :-1]))
    assert np.all(grad_full[:, -1] == 0.0)
    np.testing.assert_allclose(grad_full[:, :-1], grad_short, rtol=1e-6, atol=1e-9)
  with pytest.raises(ValueError, match="logits of 5 positions for 7 tokens"):
    objectives.masked_next_token_loss(logits[:, :5], tokens, mask)
