"""The train state pytree and its sharded creation.

State is initialised abstractly (`jax.eval_shape`), its shardings are derived from the logical
axis names on the parameters, and it is then created already sharded by one jitted init, so
no device ever holds a full unsharded copy.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from instruct import sharding as shd


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar; params: parameter pytree; opt_state: optax state."""

  step: jax.Array
  params: Any
  opt_state: Any


def create_sharded_state(init_params: Callable[[jax.Array], Any],
                         optimizer: optax.GradientTransformation, rng: jax.Array, mesh,
                         rules) -> tuple[TrainState, Any]:
  """Creates the TrainState directly in its sharded layout.

  Args:
    init_params: rng -> boxed params (with `nn.Partitioned` logical names).
  Returns:
    (state, state_shardings).
  """
  def init_boxed(key):
    params = init_params(key)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  abstract = jax.eval_shape(init_boxed, rng)
  shardings = shd.tree_shardings(mesh, rules, abstract)
  state = jax.jit(lambda k: nn.meta.unbox(init_boxed(k)), out_shardings=shardings)(rng)
  return state, shardings


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
