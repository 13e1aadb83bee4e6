r"""A miniature InstructGPT on the embedded data, one stage after another.

  python -m experiments.instructgpt_mini --workdir=/tmp/instructgpt_mini [--preset=quick]

Each stage is the normal `instruct.train` stage, with its own workdir `DIR/<stage>` and its
config saved there, so any stage can be rerun or swept alone:

  python -m instruct.train --config=configs/sft.py:tiny --workdir=DIR/sft \
      --config.init_from=DIR/pretrain

Running the pipeline again resumes: finished stages are skipped (their checkpoint is at the
final step) and an interrupted stage continues from its last checkpoint.

Stages so far: pretrain a base LM on the embedded corpus, SFT it on the embedded
demonstrations, train a reward model from the SFT model on the embedded ranked comparisons,
then PPO and PPO-ptx from the SFT policy against that reward model. The summary
(`DIR/summary.json`) lists each stage's final metrics (validation loss, perplexity and
accuracy for the supervised stages; reward-model score and KL for PPO).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging

from instruct import checkpoint as ckpt_lib
from instruct import cli
from instruct import config_lib
from instruct import metrics as metrics_lib
from instruct.runners import RUNNERS

_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory of the pipeline's runs.")
_PRESET = flags.DEFINE_enum("preset", "quick", ["quick", "full"], "Pipeline size.")
flags.mark_flag_as_required("workdir")

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  config_file: str              # File under configs/.
  config_arg: str               # Its preset.
  sources: tuple = ()           # (config key, stage name): e.g. ("init_from", "sft") hands
                                # the final checkpoint of stage "sft" to config.init_from.
  overrides: tuple = ()         # (dotted key, value) pairs.


def pipeline(preset: str) -> list[Stage]:
  """The stages of a preset, in order."""
  scale = 1 if preset == "quick" else 4
  ppo_sources = (("policy_from", "sft"), ("reward_from", "rm"))
  return [
      Stage("pretrain", "pretrain.py", "tiny",
            overrides=(("train.num_steps", 150 * scale), ("train.eval_every", 50 * scale))),
      Stage("sft", "sft.py", "tiny", sources=(("init_from", "pretrain"),),
            overrides=(("train.num_steps", 80 * scale), ("train.eval_every", 40 * scale))),
      Stage("rm", "rm.py", "tiny", sources=(("init_from", "sft"),),
            overrides=(("train.num_steps", 64 * scale), ("train.eval_every", 32 * scale))),
      Stage("ppo", "ppo.py", "tiny", sources=ppo_sources,
            overrides=(("train.num_steps", 20 * scale),)),
      Stage("ppo_ptx", "ppo.py", "tiny_ptx", sources=ppo_sources,
            overrides=(("train.num_steps", 20 * scale),)),
  ]


def load_config(stage: Stage, root: str):
  """The stage's config: its file and preset, the overrides, and the handoff directory."""
  config = config_lib.load_config_file(os.path.join(CONFIGS_DIR, stage.config_file),
                                        stage.config_arg)
  for key, value in stage.overrides:
    section, name = key.split(".")
    config[section][name] = value
  for key, source in stage.sources:
    config[key] = os.path.join(root, source)
  return config


def run_stage(stage: Stage, root: str) -> dict:
  """Trains one stage (or skips it when finished) and returns its last validation metrics."""
  config = load_config(stage, root)
  workdir = os.path.join(root, stage.name)
  latest = ckpt_lib.Checkpointer(workdir).latest_step() if os.path.isdir(workdir) else None
  if latest == config.train.num_steps:
    logging.info("[%s] already finished (step %d); skipping.", stage.name, latest)
  else:
    logging.info("[%s] training in %s", stage.name, workdir)
    start = time.time()
    RUNNERS[config.stage](config, workdir)
    logging.info("[%s] done in %.0f s", stage.name, time.time() - start)
  records = metrics_lib.read_metrics(workdir)
  evals = [r for r in records if "val_loss" in r] or records[-1:]
  return {"workdir": workdir, **evals[-1]} if evals else {"workdir": workdir}


def run(root: str, preset: str = "quick") -> dict:
  """Runs the whole pipeline under `root`; returns and writes the summary."""
  os.makedirs(root, exist_ok=True)
  stages = pipeline(preset)
  summary = {}
  for i, stage in enumerate(stages, 1):
    logging.info("=== stage %d/%d: %s ===", i, len(stages), stage.name)
    summary[stage.name] = run_stage(stage, root)
  with open(os.path.join(root, "summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary


def main(argv):
  del argv
  cli.quiet_library_logs()
  summary = run(_WORKDIR.value, _PRESET.value)
  nan = float("nan")
  print(f"\n{'stage':10s} {'step':>6s} {'val_loss':>9s} {'val_ppl':>8s} {'val_acc':>8s} "
        f"{'rm_score':>9s} {'kl':>7s}")
  for name, result in summary.items():
    print(f"{name:10s} {result.get('step', 0):6d} {result.get('val_loss', nan):9.4f} "
          f"{result.get('val_perplexity', nan):8.2f} {result.get('val_accuracy', nan):8.3f} "
          f"{result.get('score', nan):9.3f} {result.get('kl_k1', nan):7.3f}")
  print(f"\nSummary written to {os.path.join(_WORKDIR.value, 'summary.json')}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
