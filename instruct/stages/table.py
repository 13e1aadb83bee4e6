"""The stage table: every kind of run, as one record each.

A run's `config.stage` names its record. Whatever needs to know how a stage behaves reads the
record, never the name: the command line and the pipelines (`runner`), the run layer
(`instruct.run`: which head, where the model sits in a checkpoint, which run holds the
architecture), export (`head`) and evaluation.

The table sits below every module that reads runs, so it names the code above it (runners,
tasks, validations) by import path, `"package.module:function"`, resolved on first use; a
record is plain data and importing the table imports nothing else of the library.

Adding a stage is one record here plus its code (see docs/design.md, "How to add a stage").
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional


def resolve(path: str) -> Callable[..., Any]:
  """`"package.module:function"` -> that function."""
  module, _, name = path.partition(":")
  return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One kind of run.

  Attributes:
    name: the value of `config.stage`.
    runner: `fn(config, workdir, devices=None)` that trains the stage (import path).
    validate: `fn(config, data_parallel, process_count)` raising ValueError naming the key
      (import path). The runner calls it once the mesh is known.
    head: the head of the model the run produces: 'lm' (a policy) or 'scalar' (a reward
      model); export writes `...ForCausalLM` or `...ForSequenceClassification` from it.
    params_at: where that model's parameters sit in a checkpoint's state.
    model_from: the config key naming the run whose `config.model` is this run's
      architecture (a PPO policy is its SFT run's model), or None for `config.model`.
    task: for supervised stages, `fn(config, tokenizer, optimizer, schedule) -> Task`
      (import path), driven by `instruct.trainer`.
    description: one line for `--help`-style listings.
  """

  name: str
  runner: str
  validate: str
  head: str = "lm"
  params_at: tuple[str, ...] = ("params",)
  model_from: Optional[str] = None
  task: Optional[str] = None
  description: str = ""

  def run(self, config, workdir: str, devices=None):
    return resolve(self.runner)(config, workdir, devices)

  def check(self, config, data_parallel: int, process_count: int) -> None:
    resolve(self.validate)(config, data_parallel, process_count)

  def make_task(self, *args):
    if self.task is None:
      raise ValueError(f"Stage {self.name!r} is not a supervised stage (it has no task).")
    return resolve(self.task)(*args)


_SUPERVISED = dict(runner="instruct.trainer:train_and_evaluate",
                   validate="instruct.config_lib:validate_supervised")

STAGES: dict[str, Stage] = {
    s.name: s for s in (
        Stage("pretrain", task="instruct.stages.sft:make_task", **_SUPERVISED,
              description="LM loss on every token of plain text"),
        Stage("sft", task="instruct.stages.sft:make_task", **_SUPERVISED,
              description="LM loss on the completion tokens of demonstrations"),
        Stage("rm", task="instruct.stages.rm:make_task", head="scalar",
              runner=_SUPERVISED["runner"], validate="instruct.config_lib:validate_rm",
              description="reward model on K-wise ranked comparisons"),
        Stage(
            "dpo", task="instruct.stages.dpo:make_task", runner=_SUPERVISED["runner"],
            validate="instruct.stages.dpo:validate",
            description="direct preference optimisation of an SFT policy on ranked "
            "comparisons"),
        Stage(
            "rl", runner="instruct.rl.driver:train", validate="instruct.rl.config:validate",
            params_at=("policy", "params"), model_from="policy_from",
            description="online RL (config.algorithm, e.g. PPO / PPO-ptx) against a reward model"),
        Stage(
            "best_of_n", runner="instruct.rl.best_of_n:run",
            validate="instruct.rl.best_of_n:validate", model_from="policy_from",
            description="best-of-N samples of an SFT policy against a reward model (no "
            "training; no checkpoints)"),
    )
}
# Runs saved before the RL stage took its algorithm from `config.algorithm` say 'ppo'.
ALIASES = {"ppo": "rl"}


def get(name: str, where: str = "config.stage") -> Stage:
  """The record of stage `name`; a ValueError naming `where` for an unknown one."""
  found = STAGES.get(ALIASES.get(name, name))
  if found is None:
    raise ValueError(f"{where}={name!r}; expected one of {tuple(STAGES)}.")
  return found
