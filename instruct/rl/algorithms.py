"""The RL algorithms, by the name `config.algorithm` gives.

An algorithm is a module with:

- `default_config()`: its config section (`config.<name>`), its KL settings included;
- `validate(config, policy_model)`: its own checks, ValueError naming the key;
- `critic_kind(config)`: the critic role it needs ('separate', 'shared' or 'none';
  `instruct.rl.roles.build_roles`);
- a class, `ALGORITHM`, built as `ALGORITHM(config, roles, banned_ids)` from roles alone,
  with `init_state(frozen)`, `abstract_state()`, `iterations_done(state)`,
  `policy_params(state)`, `make_experience_fn()`, `make_update_fn()`, `ptx_rows`,
  `samples_per_prompt` (responses sampled per prompt: the driver repeats each prompt so
  often, row by row; 1 for PPO) and `log_line(summary)`. `instruct.rl.online` holds what the
  policy-gradient methods share (`PolicyAlgorithm`: the policy state and KL controller).

The driver (`instruct.rl.driver`) owns everything else: roles, sampling, data, the loop.
docs/design.md ("How to add an algorithm") walks through adding one.
"""

from __future__ import annotations

import types

from instruct.rl import grpo
from instruct.rl import ppo
from instruct.rl import rloo

ALGORITHMS: dict[str, types.ModuleType] = {"ppo": ppo, "rloo": rloo, "grpo": grpo}


def get(name: str, where: str = "config.algorithm") -> types.ModuleType:
  """The algorithm module `name`; a ValueError naming `where` for an unknown one."""
  if name not in ALGORITHMS:
    raise ValueError(f"{where}={name!r}; expected one of {tuple(ALGORITHMS)}.")
  return ALGORITHMS[name]
