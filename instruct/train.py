r"""Runs one training stage from an experiment config. Flags only; the work is in the library.

  python -m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny \
      [--config.train.num_steps=200 ...]

Running the same command again resumes from the last checkpoint in --workdir.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from instruct import cli
from instruct import loop
from instruct.stages import table

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file:preset.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  cli.quiet_library_logs()
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  try:
    stage = table.get(config.get("stage"))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  logging.info("Config:\n%s", config)
  try:
    stage.run(config, _WORKDIR.value)
  except (loop.NonFiniteLossError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
