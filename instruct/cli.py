"""Command-line helpers shared by the entry points (`instruct.train`, `instruct.export`, the
experiment pipelines and the benchmarks).

Every command fails the same way: one line `error: <what>` naming the file and line or the
config key, one `hint:` line, and exit status 1; the traceback only with `--debug`. A
preempted run (SIGTERM) exits with `loop.EXIT_PREEMPTED` (75) after saving what it could, so a
scheduler or an `a && b` chain does not take it for a finished one.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Callable

from absl import app, flags, logging

from instruct import distributed
from instruct import hostmem
from instruct import loop

_DEBUG = flags.DEFINE_bool("debug", False,
                           "On an error, show the Python traceback instead of one line.")
# Several processes as one program (instruct/distributed.py; `instruct.launch` sets these).
_COORDINATOR = flags.DEFINE_string("coordinator_address", "",
                                   "host:port of process 0, for an explicit multi-process start.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0,
                                      "Processes of the program (explicit start).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (explicit start).")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "auto: start jax.distributed with the flags above, or when SLURM, Open MPI or a Cloud TPU "
    "environment says there are several processes; on: always (JAX detects the cluster); off.")

# Exceptions that describe bad input or a state the user can act on; anything else is
# reported as unexpected (most likely a bug).
EXPECTED = (ValueError, OSError, FloatingPointError, LookupError, RuntimeError)
DEFAULT_HINT = "see 'When things go wrong' in README.md; --debug shows the traceback."
UNEXPECTED_HINT = "this looks like a bug: rerun with --debug and report the traceback."


class _OwnInfoOnly:
  """Keeps INFO lines of this project and WARNING+ of libraries (Orbax and TFDS are chatty)."""

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    own = ("/instruct/" in path or "/experiments/" in path
           or "/benchmarks/" in path) and "site-packages" not in path
    if not own and str(record.msg).startswith("Using custom data configuration"):
      return False  # TFDS, for every local-files dataset: expected, not a warning.
    return record.levelno >= std_logging.WARNING or own


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


MISSING_PACKAGE_HINT = ("an optional package is missing: install the extra that brings it "
                        "(gs:// paths: pip install -e \".[gcs]\"; see Requirements in README.md).")


def _missing_package(error: BaseException) -> bool:
  """An ImportError that asks for a package (fsspec's "Please install gcsfs ...")."""
  return isinstance(error, ImportError) and "install" in str(error).lower()


def one_line(error: BaseException) -> str:
  """The error's message on one line (whitespace collapsed), with its kind when unexpected."""
  message = " ".join(str(error).split()) or type(error).__name__
  if isinstance(error, KeyError) and error.args:
    message = f"missing key {error.args[0]!r}"
  if not isinstance(error, EXPECTED) and not _missing_package(error):
    message = f"unexpected {type(error).__name__}: {message}"
  return message


def fail(error: BaseException) -> None:
  """Prints `error: ...` and `hint: ...` and exits with status 1."""
  hint = getattr(error, "hint", None)
  if not hint and _missing_package(error):
    hint = MISSING_PACKAGE_HINT
  hint = hint or (DEFAULT_HINT if isinstance(error, EXPECTED) else UNEXPECTED_HINT)
  print(f"error: {one_line(error)}\nhint: {hint}", file=sys.stderr, flush=True)
  sys.exit(1)


def _debug(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with the one-line error convention (see the module docstring)."""

  def run(argv):
    if len(argv) > 1:
      fail(ValueError(f"unexpected arguments {argv[1:]}; every option is a --flag."))
    loop.install_preemption_handler()
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             _DISTRIBUTED.value)
      return main(argv)
    except loop.Preempted as e:
      print(f"preempted: {e.message}", file=sys.stderr, flush=True)
      sys.exit(loop.EXIT_PREEMPTED)
    except KeyboardInterrupt:
      print("interrupted: rerun the same command to resume from the last checkpoint.",
            file=sys.stderr, flush=True)
      sys.exit(130)
    except Exception as e:  # pylint: disable=broad-except  (one line for every failure)
      if _DEBUG.value:
        raise
      fail(e)

  return run


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors: an unknown `--config.a.b=...` key by its full
  name, a missing or unknown flag, and a config file that cannot be found or loaded."""
  for arg in argv[1:]:
    if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1].split(":")[0]):
      fail(
          FileNotFoundError(f"config file {arg.split('=', 1)[1].split(':')[0]} not found "
                            f"({arg})."))
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    found = re.search(r"'(\w+)", str(e))
    missing = found.group(1) if found else str(e)
    culprits = [
        a.split("=")[0].lstrip("-") for a in argv[1:]
        if a.startswith("--config.") and missing in a.split("=")[0].split(".")
    ]
    if _debug(argv):
      raise
    fail(
        ValueError(f"unknown config key {culprits[0] if culprits else missing!r} "
                   f"on the command line; the config file lists every field."))
  except Exception as e:  # pylint: disable=broad-except
    if _debug(argv):
      raise
    fail(ValueError(_flag_error(e, argv)))


def _flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a flag that cannot be parsed: the flag, then the innermost reason."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  found = re.match(r"flag (--\S+?): ", str(error))
  where = found.group(1) if found else None
  reason = " ".join(str(cause).split()) if cause is not error else " ".join(
      str(error).split())[len(found.group(0)) if found else 0:]
  return f"{where}: {reason}" if where else reason


def run(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` with the one-line error convention and preemption exit status."""
  hostmem.keep_freed_memory()
  app.run(guarded(main), flags_parser=parse_flags)


def run_plain(main: Callable[[], None]) -> None:
  """The same one-line errors for an argparse command (the benchmarks); `--debug` re-raises."""
  debug = "--debug" in sys.argv
  if debug:
    sys.argv.remove("--debug")
  hostmem.keep_freed_memory()
  try:
    main()
  except Exception as e:  # pylint: disable=broad-except  (one line for every failure)
    if debug:
      raise
    fail(e)
