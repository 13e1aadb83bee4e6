"""Several processes as one JAX program: TPU pod slices, GPU clusters, and N local processes.

Every command calls `initialize()` (through `instruct.cli`) before anything touches a device:

- with `--coordinator_address`, `--num_processes` and `--process_id` (what `instruct.launch`
  passes to local processes) it starts `jax.distributed` with them;
- otherwise it starts it when the environment says this process is one of several: SLURM
  (`srun` with more than one task), Open MPI (`mpirun`), Cloud TPU on GKE (`TPU_WORKER_HOSTNAMES`
  with more than one worker) or a multi-slice job (`MEGASCALE_COORDINATOR_ADDRESS`); JAX reads
  the rest from that environment. `--distributed=on` forces the auto-detected start (e.g. on a
  Cloud TPU VM pod slice, which JAX finds through the VM's metadata), `off` never starts it;
- on CPU the collectives go through gloo, so the several-process tests run on one machine.

`check_agreement(config)` then refuses to run when the processes disagree on what they run:
devices per process or the config (a host with a stale checkout or other flags), and
`check_same_data` when their copies of a dataset differ (a host with other input files).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping, Optional

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class DistributedError(RuntimeError):
  """The processes of one run cannot start together, or disagree."""


def cluster_from_env(env: Mapping[str, str]) -> Optional[str]:
  """The cluster this process is one process of, by its environment; None for a lone process."""
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
    return "SLURM"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return "Open MPI"
  if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "multi-slice TPU"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "Cloud TPU (GKE)"
  return None


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               mode: str = "auto", env: Optional[Mapping[str, str]] = None) -> bool:
  """Starts `jax.distributed` when asked or when the environment says so; True if started.

  Args:
    coordinator_address: "host:port" of process 0 (explicit start; with the next two).
    num_processes: How many processes the program has (explicit start).
    process_id: This process's index, 0 .. num_processes - 1 (explicit start).
    mode: "auto" (explicit flags, else the environment), "on" (start, JAX auto-detecting the
      cluster), or "off".
    env: The environment (default os.environ).
  """
  env = os.environ if env is None else env
  explicit = bool(coordinator_address) or num_processes > 0 or process_id >= 0
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed={mode!r}; expected auto, on or off.")
  if mode == "off":
    if explicit:
      raise ValueError("--distributed=off with --coordinator_address / --num_processes / "
                       "--process_id; drop one or the other.")
    return False
  if explicit:
    if not coordinator_address or num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(
          f"--coordinator_address={coordinator_address!r} --num_processes={num_processes} "
          f"--process_id={process_id}: an explicit start needs all three, with "
          "0 <= process_id < num_processes.")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    where = f"process {process_id} of {num_processes} (coordinator {coordinator_address})"
  else:
    cluster = cluster_from_env(env)
    if cluster is None and mode != "on":
      return False
    kwargs, where = {}, f"the {cluster or 'auto-detected'} cluster"
  # CPU collectives across processes (the local tests); accelerators use their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except  (JAX raises several kinds)
    raise DistributedError(f"could not start as {where}: {' '.join(str(e).split())}") from e
  logging.info("Started as process %d of %d (%d local devices, %d in all) in %s.",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), where)
  return True


def _fingerprint(text: str) -> np.ndarray:
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:16], np.uint32).copy()


def check_agreement(config) -> None:
  """Raises DistributedError when the processes differ in devices per process or config."""
  if jax.process_count() == 1:
    return
  counts = np.asarray(multihost_utils.process_allgather(np.int32(jax.local_device_count())))
  if len(set(counts.reshape(-1).tolist())) > 1:
    raise DistributedError(f"the processes have different numbers of devices "
                           f"({counts.reshape(-1).tolist()}, by process index); every process of "
                           "a run needs the same.")
  differing = _differing(config.to_json_best_effort(sort_keys=True))
  if differing:
    raise DistributedError(
        f"processes {differing} run another config than process 0 (e.g. other flags or "
        "another checkout on those hosts); start every process with the same command.")


def check_same_data(what: str, source) -> None:
  """Raises DistributedError when the processes' copies of a dataset differ.

  Each host prepares its own copy of a dataset from its own input files; a host with other
  files (a stale copy, another version) would train on other examples, silently. The copies
  are compared by size and by three records (first, middle, last of TFDS's deterministic
  order, which moves with any change of the content): cheap, and enough to catch a stale
  or partial copy.
  """
  if jax.process_count() == 1:
    return
  n = len(source)
  sample = [source[i] for i in sorted({0, n // 2, n - 1})] if n else []
  differing = _differing(json.dumps([n, sample], sort_keys=True, default=repr))
  if differing:
    raise DistributedError(
        f"processes {differing} read other data than process 0 for {what} (the input files "
        "differ between hosts); give every host the same files.")


def _differing(text: str) -> list[int]:
  """The indices of the processes whose `text` differs from process 0's."""
  mine = _fingerprint(text)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  return [i for i in range(len(every)) if not np.array_equal(every[i], every[0])]
