r"""Runs a sweep: every trial of a config file's `sweep(add)`, each a run of its own.

  python -m instruct.sweep --config=configs/sft.py:tiny[,sweep=NAME] --workdir=DIR \
      [--config.train.num_steps=200 ...] [--workers=2] [--max_attempts=2] \
      [--command="python -m instruct.launch --processes=2 --devices_per_process=4"]

Rerun the same command to go on after a stop; see instruct/sweeps.py for the files under DIR,
the workers and their claims, and README.md ("Sweeps"). Exit status: 0 when every trial is
done, 1 when some failed (after --max_attempts runs each; their errors are in DIR/sweep.md),
75 when the sweep was stopped (SIGTERM) with its trials saved.
"""

import sys

from absl import flags
from ml_collections import config_flags

from instruct import cli
from instruct import paths
from instruct import sweeps

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and argument, FILE:PRESET[,sweep=NAME]; --config.* flags go "
    "to every trial.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (trials/ under it).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Trials run at a time by this command.")
_MAX_ATTEMPTS = flags.DEFINE_integer(
    "max_attempts", 2, "Runs of a failing trial before it is "
    "marked failed (a preempted run is not a failure).")
_COMMAND = flags.DEFINE_string(
    "command", None, "What runs a trial, before its --config / --workdir flags (default: the "
    "config file's SWEEP_COMMAND, else `python -m instruct.train`).")
_POLL = flags.DEFINE_float("poll_seconds", 5.0, "How often an idle worker looks for trials.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.quiet_library_logs()
  config = config_flags.get_config_filename(flags.FLAGS["config"])
  summary = sweeps.run(_WORKDIR.value, config, sweeps.base_flags(sys.argv), _WORKERS.value,
                       _MAX_ATTEMPTS.value, _COMMAND.value, _POLL.value)
  print(f"Sweep: {summary['progress']}\nTable: {paths.join(_WORKDIR.value, 'sweep.md')}")
  if summary["best"]:
    print(f"Best: {summary['best']}")
  if summary["counts"][sweeps.FAILED]:
    raise RuntimeError(f"{summary['counts'][sweeps.FAILED]} trials failed; their errors are in "
                       f"{paths.join(_WORKDIR.value, 'sweep.md')}.")


if __name__ == "__main__":
  cli.run(main)
