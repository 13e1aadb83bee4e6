"""Best-of-N: the analytic KL and the order-statistic estimate, against direct computation."""

import itertools
import math

import numpy as np
import pytest

from instruct.rl import best_of_n as bon


@pytest.mark.parametrize("n", [1, 2, 4, 16])
def test_the_analytic_kl_is_the_limit_of_best_of_n_over_many_distinct_responses(n):
  """A uniform policy over M responses with distinct scores: best-of-n picks the i-th worst
  with probability (i/M)^n - ((i-1)/M)^n, and its KL from the policy tends to
  log n - (n-1)/n as M grows (the formula is exact for continuous scores)."""
  m = 200_000
  i = np.arange(1, m + 1, dtype=np.float64)
  p = (i / m) ** n - ((i - 1) / m) ** n
  kl = float(np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) * m), 0.0)))
  assert bon.analytic_kl(n) == pytest.approx(math.log(n) - (n - 1) / n)
  assert kl == pytest.approx(bon.analytic_kl(n), abs=1e-3)
  assert bon.analytic_kl(1) == 0.0
  with pytest.raises(ValueError, match="n >= 1"):
    bon.analytic_kl(0)


def test_sizes_are_the_powers_of_two_up_to_n_and_n():
  assert bon.sizes(1) == (1,)
  assert bon.sizes(16) == (1, 2, 4, 8, 16)
  assert bon.sizes(6) == (1, 2, 4, 6)


def _brute_force(proxy, values, k):
  """The mean over every k-subset of the values at the subset's argmax (first on ties)."""
  out = []
  for p, v in zip(proxy, values):
    picks = []
    for subset in itertools.combinations(range(len(p)), k):
      best = subset[int(np.argmax([p[j] for j in subset]))]
      picks.append(v[best])
    out.append(np.mean(picks))
  return np.asarray(out)


def test_the_expected_best_of_k_equals_the_mean_over_every_k_subset_ties_included():
  rng = np.random.default_rng(0)
  proxy = rng.normal(size=(5, 7))
  proxy[0, :3] = proxy[0, 3]  # Ties: argmax keeps the earliest.
  proxy[1] = 0.5  # All tied.
  values = rng.normal(size=(5, 7))
  for k in range(1, 8):
    np.testing.assert_allclose(bon.expected_at_best(proxy, k, values),
                               _brute_force(proxy, values, k), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bon.expected_at_best(proxy, k), _brute_force(proxy, proxy, k),
                               rtol=1e-12, atol=1e-12)
  # Hand-computed: scores 3, 1, 2, 0; best of 2 over the six pairs: (1+2+3+2+3+3) / 6.
  assert bon.expected_at_best([[3., 1., 2., 0.]], 2)[0] == pytest.approx(14 / 6)
  assert bon.expected_at_best([[3., 1., 2., 0.]], 1)[0] == pytest.approx(1.5)
  assert bon.expected_at_best([[3., 1., 2., 0.]], 4)[0] == pytest.approx(3.0)
  np.testing.assert_allclose(bon.order_weights(7, 3).sum(), 1.0)
  with pytest.raises(ValueError, match="1 <= N <= n"):
    bon.order_weights(4, 5)
  np.testing.assert_array_equal(bon.best_of(proxy, 3), np.argmax(proxy[:, :3], axis=1))
