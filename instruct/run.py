"""The run layer: the one place that reads a finished (or running) run's directory.

A run directory holds `config.json` (the run's full config) and `checkpoints/<step>/` (the
state and JSON extras: data position, rng, and for a reward model its normalisation). How a
stage stores its model (which head, where its parameters sit, which run holds the
architecture) is in its record in `instruct.stages.table`; this module applies it, so every
reader (later stages, the RL roles, the reward model, evaluation, export, notebooks) gets the
same answer:

  run = load_run(RM_WORKDIR)                     # latest step, parameters on the default device
  run.model, run.params, run.step, run.extras["reward_normalization"]
  run = load_run(SFT_WORKDIR, mesh=mesh, rules=rules)   # restored directly into shardings
  info = describe(PPO_WORKDIR)                   # config, stage, architecture; no parameters
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections

from instruct import checkpoint as ckpt_lib
from instruct import paths
from instruct import sharding as shd
from instruct.model import ModelConfig, Transformer
from instruct.stages import table
from instruct.state import init_params_fn


@dataclasses.dataclass
class Run:
  """A run directory and (after `load_run`) one checkpoint's model parameters and extras.

  Attributes:
    workdir: the run directory (a local path or a bucket URL, see `instruct.paths`).
    config: its saved config.
    stage: its record in the stage table.
    model_config: the architecture of the model it trains (its own `config.model`, or that of
      the run named by `stage.model_from`).
    step: the checkpoint step read (the latest when none was asked for); None if it has none.
    params: that checkpoint's model parameters (None from `describe`).
    extras: that checkpoint's JSON extras (empty from `describe`).
  """

  workdir: str
  config: ml_collections.ConfigDict
  stage: table.Stage
  model_config: ModelConfig
  step: Optional[int] = None
  params: Any = None
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> Transformer:
    """The module of the run's model, with its stage's head."""
    return Transformer(self.model_config, head=self.stage.head)

  @property
  def reward_normalization(self) -> Optional[dict]:
    """A reward model's stored `{gain, bias, ...}`; None before its final step."""
    return self.extras.get("reward_normalization")


def read_config(workdir: str, what: str = "run") -> ml_collections.ConfigDict:
  """The saved config of a run; FileNotFoundError naming `what` when there is none."""
  path = paths.join(workdir, "config.json") if workdir else "config.json"
  if not workdir or not paths.isfile(path):
    raise FileNotFoundError(f"{what}={workdir!r} is not a run directory (no {path}).")
  return ml_collections.ConfigDict(ckpt_lib.read_config(workdir))


def describe(workdir: str, what: str = "run") -> Run:
  """The run's config, stage record, architecture and latest step; no parameters."""
  config = read_config(workdir, what)
  stage = table.get(config.get("stage"), f"the stage of {workdir}/config.json")
  if stage.model_from is None:
    model_config = ModelConfig.from_dict(config.model)
  else:
    model_config = describe(config[stage.model_from], f"{workdir}: {stage.model_from}").model_config
  return Run(workdir, config, stage, model_config, step=latest_step(workdir))


def model_config_or_none(workdir: str) -> Optional[ModelConfig]:
  """The architecture of a run, or None when `workdir` is not a run (validation then names
  the empty or wrong key)."""
  try:
    return describe(workdir).model_config
  except (FileNotFoundError, ValueError):
    return None


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of a run's checkpoints, oldest first."""
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    return sorted(checkpointer.all_steps())
  finally:
    checkpointer.close()


def latest_step(workdir: str) -> Optional[int]:
  return max(checkpoint_steps(workdir), default=None)


def finished(workdir: str, num_steps: int) -> bool:
  """Whether the run in `workdir` has its checkpoint of step `num_steps` as its latest."""
  return (paths.isdir(paths.join(workdir, "checkpoints")) and latest_step(workdir) == num_steps)


def abstract_params(model: nn.Module, mesh=None, rules=None) -> Any:
  """ShapeDtypeStructs of `model`'s parameters, sharded by the rules on `mesh` when given."""
  boxed = jax.eval_shape(init_params_fn(model), jax.random.key(0))
  if mesh is None:
    return nn.meta.unbox(boxed)
  shardings = shd.tree_shardings(mesh, rules, boxed)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


def load_run(workdir: str, step: Optional[int] = None, *, mesh=None, rules=None,
             abstract: Any = None, what: str = "run") -> Run:
  """The run with the parameters and extras of checkpoint `step` (default: the latest).

  Parameters are restored directly into the shardings of `abstract` when given (a sub-tree of
  the model's parameters may be asked for, e.g. a reward model's backbone without its head),
  else into the rule table's shardings on `mesh`, else onto the default device. `what` names
  the run in errors (e.g. 'config.init_from').
  """
  run = describe(workdir, what)
  step = run.step if step is None else step
  if step is None:
    raise FileNotFoundError(f"{what}={workdir!r} has no checkpoint in "
                            f"{paths.join(workdir, 'checkpoints')}.")
  if abstract is None:
    abstract = abstract_params(run.model, mesh, rules)
  for key in reversed(run.stage.params_at):
    abstract = {key: abstract}
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    state = checkpointer.restore_partial(step, abstract)
    extras = checkpointer.restore_extras(step)
  finally:
    checkpointer.close()
  for key in run.stage.params_at:
    state = state[key]
  return dataclasses.replace(run, step=step, params=state, extras=extras)


def reward_normalization(run: Run, what: str = "run") -> tuple[float, float]:
  """(gain, bias) of a loaded reward-model run; ValueError naming `what` if it has none."""
  if run.stage.head != "scalar":
    raise ValueError(f"{what}={run.workdir!r} is a {run.stage.name!r} run, not a reward model.")
  norm = run.reward_normalization
  if norm is None:
    raise ValueError(f"{what}={run.workdir!r}: checkpoint {run.step} has no reward "
                     "normalisation (the rm run did not reach its final step, "
                     "config.train.num_steps).")
  return float(norm["gain"]), float(norm["bias"])
