"""Command-line helpers shared by the entry points (`instruct.train`, `experiments.*`)."""

from __future__ import annotations

import logging as std_logging
import re

from absl import flags, logging


class _OwnInfoOnly:
  """Keeps INFO lines of this project and WARNING+ of libraries (Orbax and TFDS are chatty)."""

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    own = ("/instruct/" in path or "/experiments/" in path) and "site-packages" not in path
    if not own and str(record.msg).startswith("Using custom data configuration"):
      return False  # TFDS, for every local-files dataset: expected, not a warning.
    return record.levelno >= std_logging.WARNING or own


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with an unknown `--config.a.b=...` key reported by its full name."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    found = re.search(r"'(\w+)", str(e))
    missing = found.group(1) if found else str(e)
    culprits = [
        a.split("=")[0].lstrip("-") for a in argv[1:]
        if a.startswith("--config.") and missing in a.split("=")[0].split(".")
    ]
    raise SystemExit(f"error: unknown config key {culprits[0] if culprits else missing!r} "
                     f"on the command line; the config file lists every field.") from None
