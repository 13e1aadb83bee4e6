"""`instruct.reductions` equals `jnp.argmax` and `jax.random.categorical` bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct import reductions


def _cases():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 37)).astype(np.float32)
  ties = np.round(rng.normal(size=(6, 37)), 0).astype(np.float32)  # Many equal maxima.
  ties[0] = 2.0  # All equal: index 0.
  specials = rng.normal(size=(6, 37)).astype(np.float32)
  specials[0, [3, 9]] = np.nan  # The first NaN wins, as in jnp.argmax.
  specials[1] = -np.inf  # All -inf: index 0.
  specials[2, 5] = np.inf
  specials[3, [4, 30]] = np.inf
  specials[4, :] = np.finfo(np.float32).min
  specials[4, 20] = -np.inf
  return {"normal": x, "ties": ties, "specials": specials}


@pytest.mark.parametrize("name", ["normal", "ties", "specials"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_argmax_is_jnp_argmax(name, axis):
  x = jnp.asarray(_cases()[name])
  got = jax.jit(reductions.argmax, static_argnums=1)(x, axis)
  want = jnp.argmax(x, axis=axis)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_argmax_of_a_three_dimensional_array_over_the_middle_axis():
  x = jnp.asarray(np.round(np.random.default_rng(1).normal(size=(3, 50, 4)), 1), jnp.float32)
  np.testing.assert_array_equal(np.asarray(reductions.argmax(x, 1)), np.asarray(jnp.argmax(x, 1)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_categorical_is_jax_random_categorical(dtype):
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(16, 300)) * 3, dtype)
  logits = logits.at[:, 7].set(jnp.finfo(dtype).min)  # A banned token is never drawn.
  keys = jax.random.split(jax.random.key(3), 64)
  ours = jax.jit(jax.vmap(reductions.categorical, (0, None)))(keys, logits)
  theirs = jax.jit(jax.vmap(jax.random.categorical, (0, None)))(keys, logits)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
  assert not np.any(np.asarray(ours) == 7)
