"""Host memory: keep freed memory in the process for the next step instead of unmapping it.

XLA's CPU runtime allocates each program's temporary buffer when the program starts and frees
it when it ends (236 MB for the SFT step of the 5.4M-parameter GPT-2 of `benchmarks/`, B 8 x
T 128). glibc serves an allocation that large with a fresh `mmap` and returns it with
`munmap`, so every step faulted in every page again: 58,000 minor page faults and 0.12 s of
kernel time per step, a fifth of the step's CPU time on the 2-core AMD EPYC of
`benchmarks/README.md`. `keep_freed_memory` tells glibc (`mallopt`) to serve large blocks from
its heap in one arena and to keep up to 1 GiB of freed memory at the top of the heap: the
same step then takes no page fault (`tests/test_hostmem.py` counts them). The cost is
resident memory: the process keeps its high-water mark (+0.2 GiB peak RSS in that step).

Called by every command (`instruct.cli.run`, `run_plain`) before JAX starts its threads;
`INSTRUCT_HOST_MALLOC=system` leaves glibc's defaults. A no-op where the C library is not
glibc (`mallopt` missing). It changes where buffers live, never what is computed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's malloc.h parameter numbers.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
KEEP_BYTES = 1 << 30
ENV = "INSTRUCT_HOST_MALLOC"

_applied = False


def keep_freed_memory() -> bool:
  """Applies the settings once per process; True if glibc accepted them."""
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV, "") == "system":
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  ok = all(
      mallopt(param, value) == 1
      for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_BYTES)))
  _applied = ok
  return ok
