"""The train state pytree and its sharded creation.

State is initialised abstractly (`jax.eval_shape`), its shardings are derived from the logical
axis names on the parameters, and it is then created already sharded by one jitted init (or
restored into those shardings), so no device ever holds a full unsharded copy.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass
class StateFactory:
  """How to make a TrainState in its sharded layout.

  Attributes:
    shardings: TrainState of NamedShardings.
    abstract: TrainState of ShapeDtypeStructs carrying those shardings (a restore target).
    init: rng -> freshly initialised sharded TrainState.
    from_params: params -> sharded TrainState at step 0 with a fresh optimiser state.
  """

  shardings: Any
  abstract: Any
  init: Callable[[jax.Array], TrainState]
  from_params: Callable[[Any], TrainState]


def init_params_fn(model) -> Callable[[jax.Array], Any]:
  """rng -> boxed parameters of `model` (shapes do not depend on the dummy input length)."""
  return lambda rng: model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]


def state_factory(init_params: Callable[[jax.Array], Any], optimizer: optax.GradientTransformation,
                  mesh, rules) -> StateFactory:
  """Builds the abstract state and sharded initialisers.

  Args:
    init_params: rng -> boxed params (leaves carry `nn.Partitioned` logical names).
  """

  def with_optimizer(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  init_boxed = lambda rng: with_optimizer(init_params(rng))
  abstract_boxed = jax.eval_shape(init_boxed, jax.random.key(0))
  shardings = shd.tree_shardings(mesh, rules, abstract_boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(abstract_boxed), shardings)
  init = jax.jit(lambda rng: nn.meta.unbox(init_boxed(rng)), out_shardings=shardings)
  from_params = jax.jit(with_optimizer, in_shardings=(shardings.params,), out_shardings=shardings)
  return StateFactory(shardings, abstract, init, from_params)


def param_count(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
