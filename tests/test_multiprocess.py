"""Several processes as one program, on this machine: `instruct.launch --target=local` runs 2
processes of 4 CPU devices (gloo collectives) and they must train (SFT, a reward model) as 1
process of 8 devices does, write one checkpoint together, stop together on a SIGTERM to one of them (JAX's
preemption sync point) and resume exactly; and every launch target's `--dry_run` commands.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from instruct import distributed
from instruct import launch
from instruct import loop
from instruct import metrics as metrics_lib
from instruct import run as run_lib
from tests.conftest import wait_for_line
from tests.test_sharding import ROOT

STEPS = 12
FLAGS = [
    "--config=configs/sft.py:tiny", f"--config.train.num_steps={STEPS}",
    "--config.train.log_every=1", "--config.train.checkpoint_every=3",
    "--config.train.eval_every=0", "--config.train.keep_checkpoints=10"
]

PPO_STEPS = 2
# 2 epochs of 2 minibatches per iteration (the preset's 4 x 4 minibatch steps each all-reduce
# over gloo across the processes: ~20 s an iteration on 2 CPU cores, against ~6 s).
PPO_FLAGS = ["--config.ppo.epochs=2", "--config.ppo.num_minibatches=2"]
# Measured 2026-11-29 on a 2-core AMD EPYC with PPO_FLAGS: every logged metric within 4.8e-7
# (absolute) of the 1-process run (ptx_loss 4.8e-7 of 5.8; policy_loss 2.2e-8 of 2.4e-4; score
# exactly), the parameters within 3.7e-9 after 2 iterations; the bounds keep a margin of >= 20x.
PPO_RTOL, PPO_ATOL, PPO_PARAMS_ATOL = 1e-4, 1e-5, 1e-5


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  return env


def _launch(workdir, tfds_dir, *extra):
  return [
      sys.executable, "-m", "instruct.launch", "--target=local", "--processes=2",
      "--devices_per_process=4", *FLAGS, f"--workdir={workdir}",
      f"--config.data.tfds_dir={tfds_dir}", *extra
  ]


def _params(workdir):
  return jax.device_get(run_lib.load_run(str(workdir)).params)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same SFT run as 1 process x 8 devices and as 2 processes x 4 devices."""
  root = tmp_path_factory.mktemp("multiprocess")
  tfds_dir = str(root / "tfds")
  one = subprocess.run([
      sys.executable, "-m", "instruct.train", *FLAGS, f"--workdir={root / 'one'}",
      f"--config.data.tfds_dir={tfds_dir}"
  ], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run(_launch(root / "two", tfds_dir), cwd=ROOT, env=_env(), capture_output=True,
                       text=True, timeout=900)
  assert two.returncode == 0, two.stderr[-3000:]
  return {"root": root, "tfds": tfds_dir, "two_log": two.stderr}


def test_two_processes_train_as_one_and_write_one_checkpoint(runs):
  root = runs["root"]
  assert "Started as process 1 of 2 (4 local devices, 8 in all)" in runs["two_log"]
  # Measured 2026-11-28 on a 2-core AMD EPYC: parameters differ by at most 6.6e-7 after 4
  # steps (the all-reduce sums in another order), the losses not at all; the bounds keep a
  # margin of about 15x.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
               _params(root / "one"), _params(root / "two"))
  one, two = (metrics_lib.read_metrics(str(root / name)) for name in ("one", "two"))
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
  # One checkpoint per step, written by both processes together (no per-process copies).
  assert sorted(os.listdir(root / "two" / "checkpoints")) == ["12", "3", "6", "9"]
  assert not os.path.exists(root / "two" / "checkpoints_damaged")


def test_two_processes_export_the_files_one_process_exports(runs):
  """`instruct.export` of the 2-process SFT run, launched as 2 x 4 devices (the parameters
  gathered across the processes, process 0 writing) and as 1 x 8: the same bytes."""
  root = runs["root"]
  one = subprocess.run([
      sys.executable, "-m", "instruct.export", f"--workdir={root / 'two'}",
      f"--out={root / 'hf_one'}"
  ], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run([
      sys.executable, "-m", "instruct.launch", "--processes=2", "--devices_per_process=4",
      "--module=instruct.export", f"--workdir={root / 'two'}", f"--out={root / 'hf_two'}"
  ], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert two.returncode == 0, two.stderr[-3000:]
  assert sorted(os.listdir(root / "hf_two")) == sorted(os.listdir(root / "hf_one"))
  for name in ("model.safetensors", "config.json"):
    assert (root / "hf_two" / name).read_bytes() == (root / "hf_one" / name).read_bytes(), name


@pytest.fixture(scope="module")
def rm_runs(runs):
  """RM from the SFT run, 4 steps with evaluation, as 1 x 8 and as 2 x 4 devices; the 2-process
  run prepares its datasets in a fresh data directory, both processes at once (one prepares,
  the other waits)."""
  root = runs["root"]
  rm = [
      "--config=configs/rm.py:tiny", f"--config.init_from={root / 'one'}",
      "--config.train.num_steps=4", "--config.train.eval_every=2"
  ]
  one = subprocess.run([
      sys.executable, "-m", "instruct.train", *rm, f"--workdir={root / 'rm_one'}",
      f"--config.data.tfds_dir={runs['tfds']}"
  ], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run([
      sys.executable, "-m", "instruct.launch", "--processes=2", "--devices_per_process=4", *rm,
      f"--workdir={root / 'rm_two'}", f"--config.data.tfds_dir={root / 'fresh_tfds'}"
  ], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert two.returncode == 0, two.stderr[-3000:]
  return root


def test_a_reward_model_trains_as_one_on_two_processes_preparing_its_data_once(rm_runs):
  root = rm_runs
  # Measured 2026-11-28 on a 2-core AMD EPYC: parameters within 7.0e-5, the demonstrations'
  # bias within 1.8e-4 (of 0.82), the losses within 1e-7; bounds with a margin of >= 10x.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-3, rtol=0),
               _params(root / "rm_one"), _params(root / "rm_two"))
  norms = [
      run_lib.load_run(str(root / n)).extras["reward_normalization"] for n in ("rm_one", "rm_two")
  ]
  assert norms[0]["bias"] == pytest.approx(norms[1]["bias"], rel=2e-3)
  one, two = (metrics_lib.read_metrics(str(root / n)) for n in ("rm_one", "rm_two"))
  for key in ("loss", "val_loss", "val_accuracy"):
    np.testing.assert_allclose([r[key] for r in two if key in r], [r[key] for r in one if key in r],
                               rtol=1e-5)


def test_ppo_with_the_pretraining_mix_trains_as_one_on_two_processes(rm_runs):
  """PPO-ptx (policy from the SFT run, reward model and critic from the RM run), 2 iterations
  of 2 epochs over 2 minibatches: the rollouts (sampled on the global batch, split over both
  processes), the scores, the KL penalty and the updates of policy and critic match one
  process of 8 devices."""
  root = rm_runs
  ppo = [
      "--config=configs/ppo.py:tiny_ptx", f"--config.policy_from={root / 'one'}",
      f"--config.reward_from={root / 'rm_one'}", f"--config.train.num_steps={PPO_STEPS}",
      "--config.train.log_every=1", *PPO_FLAGS
  ]
  one = subprocess.run(
      [sys.executable, "-m", "instruct.train", *ppo, f"--workdir={root / 'ppo_one'}"], cwd=ROOT,
      env=_env(), capture_output=True, text=True, timeout=900)
  assert one.returncode == 0, one.stderr[-3000:]
  two = subprocess.run([
      sys.executable, "-m", "instruct.launch", "--processes=2", "--devices_per_process=4", *ppo,
      f"--workdir={root / 'ppo_two'}"
  ], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert two.returncode == 0, two.stderr[-3000:]
  one, two = (metrics_lib.read_metrics(str(root / n)) for n in ("ppo_one", "ppo_two"))
  assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, PPO_STEPS + 1))
  keys = {k for k in one[0] if not any(t in k for t in ("per_second", "seconds", "time"))}
  assert {"score", "policy_loss", "ptx_loss"} <= keys and set(two[0]) >= keys, sorted(keys)
  for key in sorted(keys):
    np.testing.assert_allclose([r[key] for r in two], [r[key] for r in one], rtol=PPO_RTOL,
                               atol=PPO_ATOL, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=PPO_PARAMS_ATOL, rtol=0),
               _params(root / "ppo_one"), _params(root / "ppo_two"))


def test_a_mesh_across_two_slices_trains_as_one_slice(runs):
  """`config.mesh.dcn_shape=(2,1,1)`: the data axis spans the two processes (the slices, on
  CPU), each holding a (4, 1, 1) mesh."""
  root = runs["root"]
  result = subprocess.run(_launch(root / "dcn", runs["tfds"], "--config.mesh.dcn_shape=(2,1,1)"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  # The same bound as above, measured on the same machine (the all-reduce order again).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=0),
               _params(root / "one"), _params(root / "dcn"))


def test_processes_that_disagree_on_the_config_stop_with_one_line(tmp_path):
  port = launch.free_port()
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  processes = [
      subprocess.Popen([
          sys.executable, "-m", "instruct.train", "--config=configs/sft.py:tiny",
          f"--workdir={tmp_path}", f"--config.seed={i}", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={i}"
      ], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for i in range(2)
  ]
  errors = [p.communicate(timeout=600)[1] for p in processes]
  for process, stderr in zip(processes, errors):
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "error: processes [1] run another config than process 0" in stderr, stderr[-3000:]
  assert not os.path.exists(tmp_path / "checkpoints")


def test_processes_with_other_copies_of_the_data_stop_with_one_line(tmp_path):
  """The same command on two hosts whose local copies of the training file differ (host 1's
  lost its last records): both stop before training, naming the split and the file."""
  port = launch.free_port()
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  with open(os.path.join(ROOT, "instruct", "assets", "data", "demos_train.jsonl")) as f:
    lines = f.readlines()
  processes = []
  for i in range(2):
    host = tmp_path / f"host{i}"  # Each process's working directory: its own disk.
    host.mkdir()
    (host / "demos.jsonl").write_text("".join(lines if i == 0 else lines[:-10]))
    processes.append(
        subprocess.Popen([
            sys.executable, "-m", "instruct.train", f"--config={ROOT}/configs/sft.py:tiny",
            f"--workdir={tmp_path / 'run'}", "--config.data.train_file=demos.jsonl",
            "--config.data.tfds_dir=tfds", f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2", f"--process_id={i}"
        ], cwd=host, env=env, stderr=subprocess.PIPE, text=True))
  errors = [p.communicate(timeout=600)[1] for p in processes]
  for process, stderr in zip(processes, errors):
    assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert ("error: processes [1] read other data than process 0 for split 'train' "
            "(demos.jsonl)") in stderr, stderr[-3000:]
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _child_pid(workdir, process_id):
  """The pid of the launcher's process `process_id` for `workdir`."""
  pattern = f"instruct.train .*--workdir={workdir} .*--process_id={process_id}"
  found = subprocess.run(["pgrep", "-f", "--", pattern], capture_output=True,
                         text=True).stdout.split()
  assert found, "no child process"
  return int(found[0])


@pytest.mark.parametrize("how", ["sigterm_one", "sigkill_one"])
def test_stopping_one_process_stops_both_and_the_rerun_resumes_exactly(runs, tmp_path, how):
  workdir = tmp_path / "run"
  command = _launch(workdir, runs["tfds"])
  process = subprocess.Popen(command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, text=True)
  seen = wait_for_line(process, "step 4/12")
  os.kill(_child_pid(workdir, 1), signal.SIGTERM if how == "sigterm_one" else signal.SIGKILL)
  stderr = "".join(seen) + process.stderr.read()
  process.wait(timeout=600)
  if how == "sigterm_one":
    # JAX's preemption sync point: both processes stop, and save, at the same step.
    assert process.returncode == loop.EXIT_PREEMPTED, stderr[-3000:]
    saved = {
        line.split("]")[0] + "]": line.split("saved step ")[1].split()[0]
        for line in stderr.splitlines() if "saved step" in line
    }
    assert set(saved) == {"[p0]", "[p1]"} and len(set(saved.values())) == 1, saved
  else:
    # A lost process stops the other (the launcher), with the failure's status.
    assert process.returncode not in (0, loop.EXIT_PREEMPTED), stderr[-3000:]
  again = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert again.returncode == 0 and "Resuming from" in again.stderr, again.stderr[-3000:]
  jax.tree.map(np.testing.assert_array_equal, _params(runs["root"] / "two"), _params(workdir))
  steps = [r["step"] for r in metrics_lib.read_metrics(str(workdir))]
  assert steps == list(range(1, STEPS + 1))  # Each step once.


# --- Dry runs of every target. ----------------------------------------------------------


def _dry(*argv):
  args, flags = launch.parse_args(list(argv) + ["--dry_run"])
  return args, flags


def test_local_dry_run_gives_each_process_its_index(capsys):
  assert launch.main([
      "--processes=3", "--devices_per_process=2", "--port=1234", "--dry_run",
      "--config=configs/sft.py:tiny", "--workdir=/tmp/w"
  ]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[-1] == "wait" and len(lines) == 4
  for i, line in enumerate(lines[:3]):
    assert line.startswith("JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=2 ")
    assert ("-m instruct.train --config=configs/sft.py:tiny --workdir=/tmp/w "
            f"--coordinator_address=127.0.0.1:1234 --num_processes=3 --process_id={i} &") in line


def test_tpu_dry_run_copies_installs_and_runs_on_every_worker():
  args, flags = _dry("--target=tpu", "--tpu=pod", "--zone=us-west4-a", "--project=p",
                     "--config=configs/sft.py:llama_1b", "--workdir=gs://b/run")
  archive, scp, setup, run = launch.tpu_commands(args, flags)
  assert archive[:2] == ["git", "archive"] and archive[-1] == "HEAD"
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  for command in (scp, setup, run):
    assert "--zone=us-west4-a" in command and "--project=p" in command
    assert "--worker=all" in command
  assert setup[5] == "pod" and 'pip install -q -e ".[gcs]" "jax[tpu]"' in setup[-1]
  assert run[-1] == ("--command=cd ~/instruct && python -m instruct.train "
                     "--config=configs/sft.py:llama_1b --workdir=gs://b/run --distributed=on")


def test_xpk_dry_run_names_the_cluster_slices_and_restarts():
  args, flags = _dry("--target=xpk", "--cluster=c", "--tpu_type=v5litepod-256", "--slices=2",
                     "--image=gcr.io/p/instruct", "--restarts=3",
                     "--config=configs/sft.py:llama_8b", "--workdir=gs://b/run")
  command = launch.xpk_command(args, flags)
  assert command[:3] == ["xpk", "workload", "create"]
  for field in ("--cluster=c", "--workload=instruct", "--tpu-type=v5litepod-256", "--num-slices=2",
                "--docker-image=gcr.io/p/instruct", "--max-restarts=3"):
    assert field in command
  assert command[-1] == ("--command=python -m instruct.train --config=configs/sft.py:llama_8b "
                         "--workdir=gs://b/run --distributed=on")


def test_slurm_dry_run_script_runs_one_task_per_node_and_requeues_on_preemption():
  args, flags = _dry("--target=slurm", "--nodes=2", "--gpus_per_node=8", "--partition=gpu",
                     "--config=configs/sft.py:llama_8b", "--workdir=/shared/run")
  script = launch.slurm_script(args, flags).splitlines()
  assert script[0] == "#!/bin/bash"
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=gpu", "#SBATCH --requeue", "#SBATCH --signal=TERM@120"):
    assert line in script
  assert ("srun python -m instruct.train --config=configs/sft.py:llama_8b "
          "--workdir=/shared/run") in script
  assert f"if [ $status -eq {loop.EXIT_PREEMPTED} ]; then scontrol requeue \"$SLURM_JOB_ID\"; fi" \
      in script


def test_launch_options_are_checked():
  with pytest.raises(SystemExit):
    launch.parse_args(["--target=tpu", "--config=x"])  # --tpu and --zone missing.
  assert launch.combine([0, 0]) == 0 and launch.combine([75, 0]) == 75
  assert launch.combine([75, -9]) == -9 and launch.combine([1, 75]) == 1


def test_the_environment_says_when_a_process_is_one_of_several():
  assert distributed.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}) == "SLURM"
  assert distributed.cluster_from_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
  assert distributed.cluster_from_env({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
  assert distributed.cluster_from_env({"MEGASCALE_COORDINATOR_ADDRESS": "h:8080"
                                      }) == ("multi-slice TPU")
  assert distributed.cluster_from_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == "Cloud TPU (GKE)"
  assert distributed.cluster_from_env({"TPU_WORKER_HOSTNAMES": "a"}) is None
  assert distributed.cluster_from_env({}) is None
  assert distributed.initialize(env={}) is False  # A lone process starts nothing.
  with pytest.raises(ValueError, match="needs all three"):
    distributed.initialize(num_processes=2, env={})
  with pytest.raises(ValueError, match="--distributed=off"):
    distributed.initialize("h:1", 2, 0, mode="off", env={})
