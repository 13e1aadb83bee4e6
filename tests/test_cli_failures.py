"""Failures as a user meets them on the command line: one `error:` line naming the file or key
and a `hint:` (exit 1), a preemption's own exit status (75), busy and reused workdirs, resume
that logs each step once, and the pipeline stopping at a preempted stage.

Every test runs the real command in a subprocess, as a user would.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from experiments import instructgpt_mini as mini
from instruct import cli
from instruct import loop
from instruct import metrics as metrics_lib
from instruct import workdir as workdir_lib
from tests.conftest import wait_for_line
from tests.test_sharding import ROOT

ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def command(module, *flags, debug=False):
  return [sys.executable, "-m", module, *flags] + (["--debug"] if debug else [])


def run(cmd, timeout=600):
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=timeout)


def assert_one_line_error(result, *needles):
  """Exit 1, exactly one `error:` line holding every needle, a `hint:` line, no traceback."""
  assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, result.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  assert any(line.startswith("hint: ") for line in result.stderr.splitlines())
  return errors[0]


def sft(workdir, tfds_dir, *flags):
  return command("instruct.train", "--config=configs/sft.py:tiny", f"--workdir={workdir}",
                 f"--config.data.tfds_dir={tfds_dir}", "--config.train.eval_every=0", *flags)


def start(cmd):
  return subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                          text=True, env=ENV)


def finish(process, seen):
  rest = process.stderr.read()
  process.wait(timeout=300)
  return "".join(seen) + rest


# --- Item 15: flags and config files. ------------------------------------------------------


@pytest.mark.parametrize("flags,needles", [
    (["--config=configs/sft.py:nosuch", "--workdir=/tmp/x"
     ], ["--config=configs/sft.py:nosuch", "Unknown preset 'nosuch'"]),
    (["--config=configs/sft.py:tiny"], ["--workdir"]),
    (["--config=configs/sfx.py:tiny", "--workdir=/tmp/x"], ["config file configs/sfx.py"]),
    (["--config=configs/sft.py:tiny", "--workdir=/tmp/x", "--config.train.bogus=1"
     ], ["config.train.bogus"]),
    (["--config=configs/sft.py:tiny", "--workdir=/tmp/x", "--config.train.num_steps=abc"
     ], ["--config.train.num_steps=abc"]),
], ids=["preset", "no-workdir", "config-path", "unknown-key", "bad-value"])
def test_flag_errors_are_one_line(flags, needles):
  assert_one_line_error(run(command("instruct.train", *flags)), *needles)


def test_every_command_fails_the_same_way_and_debug_shows_the_traceback(tmp_path):
  assert_one_line_error(
      run(command("instruct.export", f"--workdir={tmp_path / 'none'}", f"--out={tmp_path}/o")),
      str(tmp_path / "none"))
  assert_one_line_error(run(command("experiments.instructgpt_mini", "--preset=nope")),
                        "--preset=nope")
  assert_one_line_error(run(command("experiments.instructgpt_mini")), "--workdir")
  assert_one_line_error(run(command("experiments.instructgpt_mini", "--workdir=gs://b/mini")),
                        "--workdir=gs://b/mini: the main job's root must be a local directory")
  assert_one_line_error(run([sys.executable, "benchmarks/sft_step.py", "--presets=nosuch"]),
                        "Unknown model preset 'nosuch'")
  debug = run(
      command("instruct.train", "--config=configs/sft.py:tiny", "--workdir=/tmp/x",
              "--config.init_from=/no/such/run", debug=True))
  assert debug.returncode != 0 and "Traceback" in debug.stderr


# --- Item 14: a reward model needs a starting point. ------------------------------------


def test_reward_model_without_init_from_is_refused(tmp_path):
  result = run(command("instruct.train", "--config=configs/rm.py:tiny", f"--workdir={tmp_path}"))
  assert_one_line_error(result, "config.init_from", "config.rm.random_init=True")
  assert not os.path.exists(tmp_path / "checkpoints")


# --- Items 2, 3, 4, 12: workdirs, resume, non-finite state, preemption. ------------------


def test_a_busy_workdir_is_refused_and_a_dead_holder_leaves_no_lock(tmp_path, tfds_dir):
  holder = subprocess.Popen([
      sys.executable, "-c", "import sys, time; from instruct import workdir; "
      f"lock = workdir.WorkdirLock({str(tmp_path)!r}); print('locked', flush=True); "
      "time.sleep(600)"
  ], cwd=ROOT, stdout=subprocess.PIPE, text=True, env=ENV)
  try:
    assert holder.stdout.readline().strip() == "locked"
    busy = run(sft(tmp_path, tfds_dir, "--config.train.num_steps=2"))
    assert_one_line_error(busy, str(tmp_path), "in use by another run", f"pid {holder.pid}")
    assert not os.path.exists(tmp_path / "checkpoints")
  finally:
    holder.kill()  # SIGKILL: the holder cannot clean up; the kernel releases its lock.
    holder.wait()
  workdir_lib.WorkdirLock(str(tmp_path)).release()


def test_a_damaged_newest_checkpoint_is_one_warning_and_the_run_goes_on(tmp_path, tfds_dir):
  cmd = sft(tmp_path, tfds_dir, "--config.train.num_steps=4", "--config.train.checkpoint_every=2")
  assert run(cmd).returncode == 0
  os.remove(tmp_path / "checkpoints" / "4" / "state" / "manifest.ocdbt")
  again = run(cmd)
  assert again.returncode == 0, again.stderr[-3000:]
  # One line names the step and what was wrong; none of Orbax's follow-on tracebacks.
  assert "Traceback" not in again.stderr and "Event loop is closed" not in again.stderr
  warned = [line for line in again.stderr.splitlines() if "Checkpoint 4 in" in line]
  assert len(warned) == 1 and "checkpoints_damaged/4" in warned[0], again.stderr[-3000:]
  assert "Resuming from" in again.stderr and "step 4/4" in again.stderr
  assert os.path.isdir(tmp_path / "checkpoints_damaged" / "4" / "state")


def test_resume_with_another_config_is_refused_unless_asked(tmp_path, tfds_dir):
  first = run(sft(tmp_path, tfds_dir, "--config.train.num_steps=2"))
  assert first.returncode == 0, first.stderr[-3000:]
  saved = open(tmp_path / "config.json").read()
  changed = run(
      sft(tmp_path, tfds_dir, "--config.train.num_steps=4", "--config.optimizer.learning_rate=0.1",
          "--config.seed=3"))
  line = assert_one_line_error(changed, str(tmp_path), "config.optimizer.learning_rate",
                               "config.seed", "allow_config_change")
  assert "num_steps" not in line  # Resumable: a longer run is a resume.
  assert open(tmp_path / "config.json").read() == saved  # Nothing of the first run replaced.
  asked = run(
      sft(tmp_path, tfds_dir, "--config.train.num_steps=4", "--config.optimizer.learning_rate=0.1",
          "--config.seed=3", "--config.train.allow_config_change=True"))
  assert asked.returncode == 0 and "Resuming from" in asked.stderr, asked.stderr[-3000:]


def test_a_non_finite_run_is_one_line_and_saves_nothing(tmp_path, tfds_dir):
  result = run(
      sft(tmp_path, tfds_dir, "--config.train.num_steps=2", "--config.optimizer.learning_rate=inf"))
  # The schedule's first value (0 x inf) is NaN: caught in the step's metrics, before the
  # state (which `Checkpointer.save` checks too, see tests/test_train.py) is saved.
  line = assert_one_line_error(result, "Non-finite", "at step 1",
                               "no checkpoint had been written yet")
  assert "None" not in line
  assert not os.listdir(tmp_path / "checkpoints")


def test_sigterm_during_setup_is_a_preemption(tmp_path, tfds_dir):
  process = start(sft(tmp_path, tfds_dir, "--config.train.num_steps=50"))
  seen = wait_for_line(process, "Config:")  # Logged before data preparation and compilation.
  process.send_signal(signal.SIGTERM)
  stderr = finish(process, seen)
  assert process.returncode == loop.EXIT_PREEMPTED, stderr[-3000:]
  assert "preempted: " in stderr and "Traceback" not in stderr, stderr[-3000:]


def test_sigterm_in_training_saves_exits_75_and_the_rerun_logs_each_step_once(tmp_path, tfds_dir):
  cmd = sft(tmp_path, tfds_dir, "--config.train.num_steps=60", "--config.train.log_every=4",
            "--config.train.checkpoint_every=1000")
  process = start(cmd)
  seen = wait_for_line(process, "step 8/60")
  process.send_signal(signal.SIGTERM)
  stderr = finish(process, seen)
  assert process.returncode == loop.EXIT_PREEMPTED, stderr[-3000:]
  assert "Preempted (SIGTERM): saved step" in stderr and "Traceback" not in stderr
  assert os.listdir(tmp_path / "checkpoints")
  again = run(cmd)
  assert again.returncode == 0 and "Resuming from" in again.stderr, again.stderr[-3000:]
  steps = [r["step"] for r in metrics_lib.read_metrics(str(tmp_path)) if "loss" in r]
  assert steps == list(range(4, 61, 4))  # Each step once, on the uninterrupted cadence.


# --- Items 11 and 13: the main job. ------------------------------------------------------


def test_pipeline_stops_at_a_preempted_stage_and_refuses_stale_or_foreign_work(tmp_path, tfds_dir):
  root = tmp_path / "run"
  cmd = command("experiments.instructgpt_mini", "--preset=test", f"--workdir={root}")
  env = dict(ENV, TFDS_DATA_DIR=tfds_dir)
  process = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, env=env)
  seen = wait_for_line(process, "pretrain ...")
  process.send_signal(signal.SIGTERM)
  stderr = finish(process, seen)
  assert process.returncode == loop.EXIT_PREEMPTED, stderr[-3000:]
  assert "pretrain done" not in stderr and "[3/" not in stderr
  # An SFT recorded as built on an earlier pretraining step than the one now there.
  os.makedirs(root / "sft")
  with open(root / "sft" / "built_from.json", "w") as f:
    json.dump({"world": mini._fingerprint(str(root), "world"), "pretrain": {"step": 3}}, f)
  stale = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert_one_line_error(stale, f"{root / 'sft'} was built from inputs that have changed",
                        "pretrain (step 3 -> step 6)")
  foreign = run(
      command("experiments.instructgpt_mini", "--preset=quick", "--seed=1", f"--workdir={root}"))
  assert_one_line_error(foreign, "--preset=test --seed=0, not --preset=quick --seed=1")


def test_a_missing_optional_package_names_its_extra(capsys):
  """fsspec's error for a gs:// path without gcsfs is the user's to fix (install the `gcs`
  extra), not a bug; other import errors still are."""
  with pytest.raises(SystemExit) as exit_info:
    cli.fail(ImportError("Please install gcsfs to access Google Storage"))
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.splitlines() == [
      "error: Please install gcsfs to access Google Storage", f"hint: {cli.MISSING_PACKAGE_HINT}"
  ]
  assert cli.one_line(ImportError("cannot import name 'x'")).startswith("unexpected ImportError")
