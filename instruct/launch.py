r"""Runs a command (by default `instruct.train`) as one program over several processes or hosts.

The launcher's own options come first; everything else is the command's flags, unchanged:

  # Two local processes of 4 CPU devices each (tests, debugging multi-host code on a laptop):
  python -m instruct.launch --target=local --processes=2 --devices_per_process=4 \
      --config=configs/sft.py:tiny --workdir=/tmp/sft_2x4

  # Every worker of a Cloud TPU VM pod slice (the code is copied and installed first):
  python -m instruct.launch --target=tpu --tpu=my-v5e-32 --zone=us-west4-a \
      --config=configs/sft.py:llama_1b --workdir=gs://BUCKET/sft_llama_1b

  # A GKE TPU cluster through xpk, here two v5e-256 slices:
  python -m instruct.launch --target=xpk --cluster=my-cluster --tpu_type=v5litepod-256 \
      --slices=2 --image=gcr.io/PROJECT/instruct --config=configs/sft.py:llama_8b \
      --workdir=gs://BUCKET/sft_llama_8b --config.mesh.dcn_shape='(2,1,1)'

  # A SLURM cluster: two nodes of 8 GPUs, one process per node:
  python -m instruct.launch --target=slurm --nodes=2 --gpus_per_node=8 \
      --config=configs/sft.py:llama_8b --workdir=/shared/runs/sft_llama_8b

`--dry_run` prints the exact commands (and the SLURM batch script) instead of running them.

Preemption: a preempted run exits with status 75 after its checkpoint (instruct/loop.py). The
local and TPU targets rerun the command up to `--restarts` times when that happens (the run
resumes from its workdir); xpk gets `--max-restarts`; the SLURM script requeues the job.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence

EXIT_PREEMPTED = 75  # instruct.loop.EXIT_PREEMPTED (not imported: the launcher needs no jax).
TARGETS = ("local", "tpu", "xpk", "slurm")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
  """(launcher options, the command's own flags)."""
  p = argparse.ArgumentParser(prog="python -m instruct.launch", allow_abbrev=False,
                              description=__doc__.split("\n")[0])
  p.add_argument("--target", choices=TARGETS, default="local")
  p.add_argument("--module", default="instruct.train", help="The command to run (python -m).")
  p.add_argument("--dry_run", action="store_true", help="Print the commands; run nothing.")
  p.add_argument("--restarts", type=int, default=0,
                 help="Reruns after a preemption (exit 75); the run resumes from its workdir.")
  local = p.add_argument_group("local")
  local.add_argument("--processes", type=int, default=2)
  local.add_argument("--devices_per_process", type=int, default=0,
                     help="CPU devices per process (0: the machine's own devices).")
  local.add_argument("--port", type=int, default=0, help="Coordinator port (0: a free one).")
  tpu = p.add_argument_group("tpu (Cloud TPU VM)")
  tpu.add_argument("--tpu", help="The TPU VM's name.")
  tpu.add_argument("--zone")
  tpu.add_argument("--project", default="")
  tpu.add_argument("--remote_dir", default="~/instruct")
  tpu.add_argument("--setup", default='pip install -q -e ".[gcs]" "jax[tpu]"',
                   help="Run in --remote_dir on every worker after copying the code.")
  xpk = p.add_argument_group("xpk (GKE)")
  xpk.add_argument("--cluster")
  xpk.add_argument("--workload", default="instruct")
  xpk.add_argument("--tpu_type")
  xpk.add_argument("--slices", type=int, default=1)
  xpk.add_argument("--image", help="Docker image with this repository installed.")
  slurm = p.add_argument_group("slurm")
  slurm.add_argument("--nodes", type=int, default=1)
  slurm.add_argument("--gpus_per_node", type=int, default=8)
  slurm.add_argument("--partition", default="")
  slurm.add_argument("--time", default="24:00:00")
  slurm.add_argument("--job_name", default="instruct")
  slurm.add_argument("--script", default="instruct_job.sbatch",
                     help="Where to write the batch script.")
  args, rest = p.parse_known_args(list(argv))
  needs = {"tpu": ("tpu", "zone"), "xpk": ("cluster", "tpu_type", "image"), "slurm": ()}
  missing = [f"--{k}" for k in needs.get(args.target, ()) if not getattr(args, k)]
  if missing:
    p.error(f"--target={args.target} needs {', '.join(missing)}")
  if args.target == "local" and args.processes < 1:
    p.error(f"--processes={args.processes}; expected at least 1")
  return args, rest


def _command(module: str, flags: Sequence[str], *extra: str) -> list[str]:
  return ["python", "-m", module, *flags, *extra]


def _quoted(command: Sequence[str]) -> str:
  return " ".join(shlex.quote(c) for c in command)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Local:
  """N processes of one program on this machine, process 0 the coordinator."""

  args: argparse.Namespace
  flags: list[str]

  def commands(self, port: int) -> list[list[str]]:
    n = self.args.processes
    return [
        [sys.executable] + _command(self.args.module, self.flags)[1:]
        + [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"]
        for i in range(n)
    ]

  def env(self) -> dict[str, str]:
    env = dict(os.environ)
    if self.args.devices_per_process:
      env["JAX_PLATFORMS"] = "cpu"
      env["XLA_FLAGS"] = " ".join(
          [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
          + [f"--xla_force_host_platform_device_count={self.args.devices_per_process}"])
    return env

  def describe(self) -> list[str]:
    prefix = (f"JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count="
              f"{self.args.devices_per_process} " if self.args.devices_per_process else "")
    return [prefix + _quoted(c) + " &" for c in self.commands(self.args.port or 0)]

  def run(self) -> int:
    """Runs the processes, their output prefixed `[p<i>]`; stops them all when one fails."""
    processes = [
        subprocess.Popen(c, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True) for c in self.commands(self.args.port or free_port())
    ]

    def forward(index, process):
      for line in process.stdout:
        sys.stderr.write(f"[p{index}] {line}")
      sys.stderr.flush()

    threads = [
        threading.Thread(target=forward, args=(i, p), daemon=True) for i, p in enumerate(processes)
    ]
    for t in threads:
      t.start()
    previous = signal.signal(signal.SIGTERM,
                             lambda *_: [p.send_signal(signal.SIGTERM) for p in processes])
    try:
      codes = _wait_all(processes)
    finally:
      signal.signal(signal.SIGTERM, previous)
      for t in threads:
        t.join(timeout=5)
    return combine(codes)


def _wait_all(processes: list[subprocess.Popen], grace_s: float = 20.0) -> list[int]:
  """Waits for every process; the first failure (not a preemption) stops the others.

  They get SIGTERM (a checkpoint if they can still take one), then SIGKILL after `grace_s`:
  a process blocked in a collective with a dead peer would never reach its next step.
  """
  pending = set(range(len(processes)))
  codes: list[Optional[int]] = [None] * len(processes)
  kill_at = None
  while pending:
    for i in sorted(pending):
      try:
        codes[i] = processes[i].wait(timeout=0.2)
      except subprocess.TimeoutExpired:
        continue
      pending.discard(i)
      if codes[i] not in (0, EXIT_PREEMPTED) and kill_at is None:
        kill_at = time.time() + grace_s
        for j in pending:
          processes[j].terminate()
    if kill_at is not None and time.time() > kill_at:
      for j in pending:
        processes[j].kill()
  return [int(c) for c in codes]


def combine(codes: Sequence[int]) -> int:
  """One exit status for several processes: a failure, else a preemption, else 0."""
  failures = [c for c in codes if c not in (0, EXIT_PREEMPTED)]
  if failures:
    return failures[0]
  return EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0


def tpu_commands(args: argparse.Namespace, flags: Sequence[str]) -> list[list[str]]:
  """Copy the code (a git archive of HEAD) to every worker, install it, run the command."""
  where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])
  archive = "/tmp/instruct.tar.gz"
  remote = args.remote_dir
  run = _command(args.module, flags, "--distributed=on")
  return [
      ["git", "archive", "--format=tar.gz", f"--output={archive}", "HEAD"],
      [
          "gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{args.tpu}:/tmp/", *where,
          "--worker=all"
      ],
      [
          "gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *where, "--worker=all",
          f"--command=mkdir -p {remote} && tar -xzf {archive} -C {remote} && cd {remote} && "
          f"{args.setup}"
      ],
      [
          "gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, *where, "--worker=all",
          f"--command=cd {remote} && {_quoted(run)}"
      ],
  ]


def xpk_command(args: argparse.Namespace, flags: Sequence[str]) -> list[str]:
  run = _command(args.module, flags, "--distributed=on")
  return [
      "xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}",
      f"--tpu-type={args.tpu_type}", f"--num-slices={args.slices}", f"--docker-image={args.image}",
      f"--max-restarts={args.restarts}", f"--command={_quoted(run)}"
  ]


def slurm_script(args: argparse.Namespace, flags: Sequence[str]) -> str:
  """A batch script: one task per node holding all its GPUs; a preempted run is requeued."""
  run = _command(args.module, flags)
  lines = [
      "#!/bin/bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
      "#SBATCH --ntasks-per-node=1", f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --time={args.time}", "#SBATCH --requeue",
      "#SBATCH --signal=TERM@120",  # SIGTERM two minutes before the time limit: a checkpoint.
  ] + ([f"#SBATCH --partition={args.partition}"] if args.partition else []) + [
      "",
      "# jax.distributed starts from SLURM's environment (instruct/distributed.py).",
      f"srun {_quoted(run)}",
      "status=$?",
      f"if [ $status -eq {EXIT_PREEMPTED} ]; then scontrol requeue \"$SLURM_JOB_ID\"; fi",
      "exit $status",
      "",
  ]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
  args, flags = parse_args(argv)
  if args.target == "local":
    local = Local(args, flags)
    if args.dry_run:
      print("\n".join(local.describe() + ["wait"]))
      return 0
    return _with_restarts(local.run, args.restarts)
  if args.target == "tpu":
    commands = tpu_commands(args, flags)
    if args.dry_run:
      print("\n".join(_quoted(c) for c in commands))
      return 0
    for command in commands[:-1]:
      subprocess.run(command, check=True)
    return _with_restarts(lambda: subprocess.run(commands[-1]).returncode, args.restarts)
  if args.target == "xpk":
    command = xpk_command(args, flags)
    if args.dry_run:
      print(_quoted(command))
      return 0
    return subprocess.run(command).returncode
  script = slurm_script(args, flags)
  if args.dry_run:
    print(f"# {args.script}\n{script}\nsbatch {args.script}")
    return 0
  with open(args.script, "w") as f:
    f.write(script)
  return subprocess.run(["sbatch", args.script]).returncode


def _with_restarts(run, restarts: int) -> int:
  code = run()
  for attempt in range(restarts):
    if code != EXIT_PREEMPTED:
      break
    print(f"launch: preempted; restart {attempt + 1} of {restarts} resumes from the workdir.",
          file=sys.stderr, flush=True)
    code = run()
  return code


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
