r"""Runs one training stage from an experiment config. Flags only; the work is in the library.

  python -m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny \
      [--config.train.num_steps=200 ...]

Running the same command again resumes from the last checkpoint in --workdir. Exit status: 0
when the run reached its end (or `stop_at_step`), 1 on an error (one `error:` line; `--debug`
shows the traceback), 75 when it was preempted (SIGTERM) after saving a checkpoint.
"""

from absl import flags, logging
from ml_collections import config_flags

from instruct import cli
from instruct import distributed
from instruct.stages import table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file:preset.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  cli.quiet_library_logs()
  config = _CONFIG.value
  distributed.check_agreement(config)  # Several processes: the same config everywhere.
  stage = table.get(config.get("stage"))
  logging.info("Config:\n%s", config)
  stage.run(config, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
