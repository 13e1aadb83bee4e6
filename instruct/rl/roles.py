"""The models of an RL run and where they live: policy, reference, reward model, critic.

A role is a model (a Linen module with its head) and the shardings of its parameters on the
run's mesh. `build_roles` makes them from architectures alone (no files are read), so tests
and benchmarks build the exact programs of a run from random parameters; `load_frozen` then
reads the frozen roles' parameters from the source runs through the run layer
(`instruct.run`), directly into those shardings:

  roles = build_roles(policy_cfg, reward_cfg, mesh, rules, critic="separate")
  frozen = load_frozen(roles, config.policy_from, config.reward_from)

- policy: the model being trained (head 'lm', or 'policy_value' with a value head on its
  trunk when the algorithm's critic is `shared`);
- reference: the frozen policy at its start (the SFT run), for the KL penalty;
- reward: the frozen reward model (head 'scalar') with its stored normalisation;
- critic: a separate value model with the reward model's architecture (None when the
  algorithm has no separate critic).

Each role carries its own shardings; they share the run's mesh today, and a role can later
get its own mesh without changing the algorithms, which only see `Role.model` and the
parameter pytrees.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp

from instruct import run as run_lib
from instruct import sharding as shd
from instruct.model import ModelConfig, Transformer
from instruct.rl.sampler import Samples, SamplingConfig, make_sampler

CRITICS = ("separate", "shared", "none")


@dataclasses.dataclass(frozen=True)
class Role:
  """A model and the ShapeDtypeStructs (with shardings) of its parameters."""

  model: Transformer
  abstract: Any

  @property
  def shardings(self) -> Any:
    return jax.tree.map(lambda x: x.sharding, self.abstract)


@dataclasses.dataclass(frozen=True)
class Roles:
  """The models of one RL run on one mesh (see the module docstring)."""

  mesh: Any
  rules: Any
  policy: Role
  reference: Role
  reward: Role
  critic: Optional[Role]

  @property
  def batch_sharding(self):
    """Rows over the data-parallel mesh axes: prompts, samples, experience."""
    return shd.batch_sharding(self.mesh, self.rules)

  @property
  def replicated(self):
    return shd.replicated(self.mesh)

  @property
  def samples_sharding(self) -> Samples:
    batch = self.batch_sharding
    return Samples(batch, batch, batch, batch, self.replicated)

  def sampler(self, sampling: SamplingConfig):
    """The jitted rollout: `(policy params, prompt tokens, prompt mask, rng) -> Samples`."""
    batch = self.batch_sharding
    return jax.jit(make_sampler(self.policy.model, sampling),
                   in_shardings=(self.policy.shardings, batch, batch, self.replicated),
                   out_shardings=self.samples_sharding)


def _role(model: Transformer, mesh, rules) -> Role:
  with jax.set_mesh(mesh):
    return Role(model, run_lib.abstract_params(model, mesh, rules))


def build_roles(policy: ModelConfig, reward: ModelConfig, mesh, rules,
                critic: str = "separate") -> Roles:
  """The roles for a policy and a reward model of these architectures.

  critic: 'separate' (a value model with the reward model's architecture, initialised from
  it), 'shared' (a value head on the policy's trunk: the policy role's head is
  'policy_value') or 'none'.
  """
  if critic not in CRITICS:
    raise ValueError(f"critic={critic!r}; expected one of {CRITICS}.")
  policy_model = Transformer(policy, head="policy_value" if critic == "shared" else "lm")
  reward_role = _role(Transformer(reward, head="scalar"), mesh, rules)
  policy_role = _role(policy_model, mesh, rules)
  return Roles(mesh, rules, policy=policy_role, reference=policy_role, reward=reward_role,
               critic=reward_role if critic == "separate" else None)


def load_frozen(roles: Roles, policy_from: str, reward_from: str) -> dict:
  """The frozen roles' parameters from the source runs, in the roles' shardings.

  Returns `{"reference": params, "reward": params, "reward_gain": f32, "reward_bias": f32}`:
  the SFT run's policy (with a zero value head when the policy role has one; its values are
  never used for the reference) and the reward model with its stored normalisation.
  """
  abstract = roles.reference.abstract
  with jax.set_mesh(roles.mesh):
    source = run_lib.load_run(policy_from,
                              abstract={k: v for k, v in abstract.items() if k != "value_head"},
                              what="config.policy_from")
    reference = dict(source.params)
    if "value_head" in abstract:
      reference["value_head"] = jax.tree.map(
          lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), abstract["value_head"])
    if run_lib.describe(reward_from, "config.reward_from").stage.head != "scalar":
      raise ValueError(f"config.reward_from={reward_from!r} is not a reward-model run.")
    rm = run_lib.load_run(reward_from, abstract=roles.reward.abstract, what="config.reward_from")
  gain, bias = run_lib.reward_normalization(rm, "config.reward_from")
  return {
      "reference": reference, "reward": rm.params, "reward_gain": jnp.float32(gain),
      "reward_bias": jnp.float32(bias)
  }


def source_architectures(policy_from: str, reward_from: str) -> tuple[ModelConfig, ModelConfig]:
  """The policy's and the reward model's architectures, from their source runs."""
  return (run_lib.describe(policy_from, "config.policy_from").model_config,
          run_lib.describe(reward_from, "config.reward_from").model_config)
