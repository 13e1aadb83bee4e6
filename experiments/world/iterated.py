"""Iterated RLHF: comparisons on the current policy, a new reward model, and RL again.

InstructGPT's comparisons came from its current policies over time, PPO policies included
(Ouyang et al. 2022, section 3.2), and Bai et al. (2022) retrained their preference model on
the current policy's samples every round ("iterated online RLHF"). Round r = 1..R
(`rounds`: 2, or the job config's `iterated.rounds`), starting from the main pipeline's PPO-ptx policy (round 0):

  1. `comparisons`: K samples of the round's starting policy per RM prompt, ranked by a
     training labeler (train split) or a held-out one (validation), as the main
     `comparisons` stage ranks SFT's, with the round's seed;
  2. `rm`: a reward model trained from SFT as the main `rm` stage, for one epoch over every
     round's training comparisons so far (the main stage's and each round's), validated on
     the round's held-out comparisons (the current policy's answers);
  3. `ppo_ptx`: PPO-ptx from the round's starting policy against the round's reward model,
     with the main PPO-ptx's settings for `iterations` (half the main one's by default). The RL stage's
     frozen reference is its `policy_from`, so each round's KL penalty is to the policy it
     starts from (a trust region around the last round); the evaluation measures the final
     policy's KL to SFT like every method's.

Runs live in DIR/iterated/round_<r>/{new,comparisons,rm,ppo_ptx}; each finished piece is
skipped, so a rerun resumes in the round and piece where it stopped; `done.json` names the
final policy.
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging

from instruct import paths
from instruct import run as run_lib

STAGE = "iterated"
ROUNDS = 2  # The default; the job config's `iterated.rounds` sets it.


def _setting(preset, key: str, default: int) -> int:
  """`iterated.KEY` of the job config (`preset.iterated`) or `default`; ValueError naming a
  bad or unknown one."""
  settings = dict(getattr(preset, "iterated", ()))
  unknown = sorted(set(settings) - {"rounds", "iterations"})
  if unknown:
    raise ValueError(f"config.iterated.{unknown[0]}: unknown key; expected ['iterations', "
                     "'rounds'].")
  value = settings.get(key, default)
  if not (isinstance(value, int) and value >= 1):
    raise ValueError(f"config.iterated.{key}={value!r}: must be an integer >= 1.")
  return value


def rounds(preset) -> int:
  """R: the job config's `iterated.rounds`, default `ROUNDS`."""
  return _setting(preset, "rounds", ROUNDS)


def iterations(preset) -> int:
  """PPO-ptx iterations per round: the job config's `iterated.iterations`, default half the
  preset's PPO iterations."""
  return _setting(preset, "iterations", max(1, preset.ppo_iterations // 2))


def round_dir(root: str, r: int) -> str:
  return paths.join(root, STAGE, f"round_{r}")


def policy_dir(root: str, r: int) -> str:
  """The policy a round starts from: round 0 is the main pipeline's PPO-ptx."""
  return paths.join(root, "ppo_ptx") if r == 0 else paths.join(round_dir(root, r), "ppo_ptx")


def _union(root: str, r: int) -> str:
  """ROUND/comparisons: the training comparisons of the main stage and rounds 1..r, and
  round r's held-out ones; written once, atomically."""
  out = paths.join(round_dir(root, r), "comparisons")
  train = paths.join(out, "comparisons_train.jsonl")
  if paths.exists(train):
    return out
  paths.makedirs(out)
  sources = [paths.join(root, "comparisons")
            ] + [paths.join(round_dir(root, i), "new") for i in range(1, r + 1)]
  text = "".join(paths.read_text(paths.join(s, "comparisons_train.jsonl")) for s in sources)
  paths.write_text_atomic(
      paths.join(out, "comparisons_validation.jsonl"),
      paths.read_text(paths.join(round_dir(root, r), "new", "comparisons_validation.jsonl")))
  paths.write_text_atomic(train, text)
  return out


def iterated_stage(root: str, preset, *, comparisons: Callable[..., None],
                   stage_config: Callable[[str, Any, str], Any], rm_num_steps: Callable[..., int],
                   train: Callable[[Any, str], None]) -> str:
  """Runs (or resumes) the rounds of the module docstring with the main job's pieces:
  `comparisons(preset, root, policy_dir=, out=, seed=)` its comparisons stage,
  `stage_config(stage, preset, root)` its stage configs, `rm_num_steps(preset, root,
  comparisons_dir)` the RM's epoch, `train(config, workdir)` an `instruct.train` run. Returns
  the final policy's workdir."""
  total = rounds(preset)
  for r in range(1, total + 1):
    seed = preset.seed + 1000 * r
    comparisons(preset, root, policy_dir=policy_dir(root, r - 1),
                out=paths.join(round_dir(root, r), "new"), seed=seed)
    data = _union(root, r)
    rm = stage_config("rm", preset, root)
    rm.data.train_file = paths.join(data, "comparisons_train.jsonl")
    rm.data.validation_file = paths.join(data, "comparisons_validation.jsonl")
    rm.train.num_steps = rm_num_steps(preset, root, data)
    rm.seed = seed
    rm_dir = paths.join(round_dir(root, r), "rm")
    if not run_lib.finished(rm_dir, rm.train.num_steps):
      train(rm, rm_dir)
    ppo = stage_config("ppo_ptx", preset, root)
    ppo.policy_from, ppo.reward_from = policy_dir(root, r - 1), rm_dir
    ppo.seed = seed
    ppo.train.num_steps = iterations(preset)
    ppo.train.checkpoint_every = min(ppo.train.checkpoint_every, ppo.train.num_steps)
    ppo.train.keep_checkpoints = ppo.train.num_steps // ppo.train.checkpoint_every + 1
    if not run_lib.finished(policy_dir(root, r), ppo.train.num_steps):
      train(ppo, policy_dir(root, r))
    logging.info("[iterated] round %d of %d finished.", r, total)
  return policy_dir(root, total)
