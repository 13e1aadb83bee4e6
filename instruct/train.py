r"""Runs one training stage from an experiment config. Flags only; the work is in the library.

  python -m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/sft_tiny \
      [--config.train.num_steps=200 ...]

Running the same command again resumes from the last checkpoint in --workdir.
"""

import logging as std_logging
import re

from absl import app, flags, logging
from ml_collections import config_flags

from instruct import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file:preset.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])

# Stage name (config.stage) -> function(config, workdir). An explicit table, not name lookup.
STAGES = {
    "pretrain": trainer.train_and_evaluate,
    "sft": trainer.train_and_evaluate,
}


class _OwnInfoOnly:
  """Keeps INFO lines of this package and WARNING+ of libraries (Orbax and TFDS are chatty)."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or "/instruct/" in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage={config.stage!r}; known stages: {sorted(STAGES)}.")
  logging.info("Config:\n%s", config)
  try:
    STAGES[config.stage](config, _WORKDIR.value)
  except (trainer.NonFiniteLossError, ValueError, FileNotFoundError) as e:
    logging.error("%s", e)
    raise SystemExit(f"error: {e}") from None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with an unknown `--config.a.b=...` key reported by its full name."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    found = re.search(r"'(\w+)", str(e))
    missing = found.group(1) if found else str(e)
    culprits = [a.split("=")[0].lstrip("-") for a in argv[1:]
                if a.startswith("--config.") and missing in a.split("=")[0].split(".")]
    raise SystemExit(f"error: unknown config key {culprits[0] if culprits else missing!r} "
                     f"on the command line; the config file lists every field.") from None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
