"""`argmax` and `categorical` that equal jax's, bit for bit, as two plain reductions.

XLA lowers `jnp.argmax` to one variadic (value, index) reduction. XLA's CPU backend does not
vectorise variadic reductions: over a vocabulary it ran at about 30 ns per element on the
2-core AMD EPYC of `benchmarks/README.md` (4.3 ms of a 26 ms decode step at batch 16 and
vocabulary 8192, and 37 ms of an SFT step at B 8 x T 128), against well under 1 ns for a max
or min reduction. Here the index of the first maximum is

  argmax(x) = min { i : x_i == max(x) or x_i is NaN }

which is a max reduction and a min reduction. It returns what `jnp.argmax` returns on every
input: the first maximum under ties, the first NaN when there is one (jax's argmax treats NaN
as the largest value; `max` propagates it, so no x_i equals it and the NaN test picks it),
index 0 when every value is -inf. `tests/test_reductions.py` checks this against
`jnp.argmax` and `jax.random.categorical`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def argmax(x: Array, axis: int = -1) -> Array:
  """`jnp.argmax(x, axis)` (int32) for a float array, as a max and a min reduction."""
  axis = axis % x.ndim
  size = x.shape[axis]
  top = jnp.max(x, axis=axis, keepdims=True)
  hit = (x == top) | jnp.isnan(x)
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, axis)
  return jnp.min(jnp.where(hit, index, size), axis=axis)


def categorical(key: Array, logits: Array, axis: int = -1) -> Array:
  """`jax.random.categorical(key, logits, axis)`: the Gumbel-max draw with the same noise
  (`jax.random.gumbel(key, logits.shape, logits.dtype)`), reduced by `argmax` above."""
  return argmax(jax.random.gumbel(key, logits.shape, logits.dtype) + logits, axis)
