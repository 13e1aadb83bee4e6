"""Sweeps: the config argument grammar, every config's `sweep(add)` and `metrics()`, and
`instruct.sweep` running trials with two workers, one killed mid-trial and restarted, and a
failing trial retried and reported without stopping the others."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from instruct import config_lib
from instruct import sweeps as sweep_lib
from instruct import sweep_summary
from tests.test_paths import bucket  # noqa: F401  (the fake gs:// fixture)
from tests.test_sharding import ROOT

STAGE_CONFIGS = ("pretrain", "sft", "rm", "ppo")


def test_the_config_argument_takes_a_preset_keys_and_flags():
  arg = config_lib.parse_arg("tiny_llama,sweep=seeds,steps=7,lr=0.5,fast", preset="tiny", sweep="",
                             steps=1, lr=0.1, fast=False)
  assert (arg.preset, arg.sweep, arg.steps, arg.lr, arg.fast) == ("tiny_llama", "seeds", 7, 0.5,
                                                                  True)
  assert config_lib.parse_arg("", preset="tiny", sweep="").preset == "tiny"
  assert config_lib.parse_arg("fast=false", fast=True).fast is False
  with pytest.raises(ValueError, match="unknown key 'sweeep'"):
    config_lib.parse_arg("tiny,sweeep=lr", preset="tiny", sweep="")
  with pytest.raises(ValueError, match="unknown flag 'extra'"):
    config_lib.parse_arg("tiny,extra", preset="tiny", sweep="")
  with pytest.raises(ValueError, match="steps='x' is not a int"):
    config_lib.parse_arg("steps=x", steps=1)
  assert config_lib.grid({"a": (1, 2),
                          "b.c": ("x", "y")}) == [{"a": 1, "b.c": "x"}, {"a": 1, "b.c": "y"},
                                                  {"a": 2, "b.c": "x"}, {"a": 2, "b.c": "y"}]


@pytest.mark.parametrize("stage", STAGE_CONFIGS)
def test_every_stage_config_sweeps_keys_it_has_and_ranks_by_a_metric(stage):
  """Every named sweep of every stage config overrides keys of its config (with values of
  their types), and `metrics()` names the ranking metric and its direction."""
  file = os.path.join(ROOT, "configs", f"{stage}.py")
  module = config_lib.load_config_module(file)
  config = module.get_config("tiny")
  names = []
  module.sweep(lambda o: None, "tiny")  # The default sweep exists.
  for name in ("lr", "seeds"):
    trials = []
    module.sweep(trials.append, f"tiny,sweep={name}")
    assert len(trials) >= 3, (stage, name)
    for overrides in trials:
      for key, value in overrides.items():
        current = config
        for part in key.split("."):
          current = current[part]  # KeyError if the sweep names a missing key.
        assert isinstance(value, type(current)) or isinstance(current, float), (key, value)
      names.append(sweep_lib.trial_names(trials))
  with pytest.raises(ValueError, match=f"configs/{stage}.py: unknown sweep 'nope'"):
    module.sweep(lambda o: None, "tiny,sweep=nope")
  metric, direction = next(iter(module.metrics().items()))
  assert direction in ("min", "max") and metric
  assert config_lib.load_config_file(file, "tiny,sweep=seeds").to_dict() == config.to_dict()


def test_trial_names_commands_and_a_changed_sweep(tmp_path):
  names = sweep_lib.trial_names([{"optimizer.learning_rate": 0.001, "seed": 0}, {"seed": 1}] * 6)
  assert names[0] == "00-learning_rate=0.001,seed=0" and names[11] == "11-seed=1"
  assert sweep_lib.trial_names([{"a.x": 1, "b.x": 2}]) == ["0-a.x=1,b.x=2"]  # Collision.
  trial = sweep_lib.Trial("0-x", {"mesh.shape": (1, -1, 1), "rm.loss": "pairwise"})
  argv = sweep_lib.trial_command("python -m instruct.launch --processes=2", "c.py:tiny",
                                 str(tmp_path), trial, ["--config.seed=3"])
  assert argv == [
      sys.executable, "-m", "instruct.launch", "--processes=2", "--config=c.py:tiny",
      f"--workdir={tmp_path}/trials/0-x", "--config.seed=3", "--config.mesh.shape=(1,-1,1)",
      "--config.rm.loss=pairwise"
  ]
  trials = [sweep_lib.Trial("0-seed=0", {"seed": 0})]
  sweep_lib.write_trials(str(tmp_path), "c.py:tiny", trials, [])
  sweep_lib.write_trials(str(tmp_path), "c.py:tiny", trials, [])  # The same: fine.
  with pytest.raises(sweep_lib.SweepChangedError, match="holds another sweep"):
    sweep_lib.write_trials(str(tmp_path), "c.py:tiny", trials, ["--config.seed=1"])


STEPS = 24
SWEEP_CONFIG = """
from instruct import config_lib

_SFT = config_lib.load_config_module({sft!r})
get_config = _SFT.get_config
metrics = _SFT.metrics


def sweep(add, arg=""):
  {body}
"""


def _config_file(tmp_path, body):
  path = tmp_path / "sweep_config.py"
  path.write_text(SWEEP_CONFIG.format(sft=os.path.join(ROOT, "configs", "sft.py"), body=body))
  return f"{path}:tiny"


def _worker(config, sweep_dir, tfds_dir, *extra):
  return subprocess.Popen([
      sys.executable, "-m", "instruct.sweep", f"--config={config}", f"--workdir={sweep_dir}",
      f"--config.train.num_steps={STEPS}", "--config.train.log_every=1",
      "--config.train.checkpoint_every=4", "--config.train.eval_every=12",
      f"--config.data.tfds_dir={tfds_dir}", "--poll_seconds=0.5", *extra
  ], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _claimed_by(sweep_dir, pid):
  """The trial whose claim `pid` holds and that has written a checkpoint, or None."""
  claims = os.path.join(sweep_dir, "claims")
  for name in os.listdir(claims) if os.path.isdir(claims) else []:
    try:
      with open(os.path.join(claims, name, ".lock")) as f:
        holder = json.load(f)
    except (OSError, ValueError):
      continue
    checkpoints = os.path.join(sweep_dir, "trials", name, "checkpoints")
    if holder.get("pid") == pid and os.path.isdir(checkpoints) and os.listdir(checkpoints):
      return name
  return None


def test_two_workers_one_killed_mid_trial_run_every_trial_once(tmp_path, tfds_dir):
  config = _config_file(
      tmp_path, 'for o in ({"optimizer.learning_rate": 1e-3, "seed": 0}, '
      '{"optimizer.learning_rate": 1e-2, "seed": 0}, {"optimizer.learning_rate": 1e-3, '
      '"seed": 1}):\n    add(o)')
  sweep_dir = str(tmp_path / "sweep")
  first = _worker(config, sweep_dir, tfds_dir)
  second = _worker(config, sweep_dir, tfds_dir)
  deadline, killed = time.time() + 600, None
  while killed is None and time.time() < deadline and first.poll() is None:
    killed = _claimed_by(sweep_dir, first.pid)
    time.sleep(0.1)
  assert killed, "the first worker never got into a trial"
  first.send_signal(signal.SIGKILL)  # Its trial gets SIGTERM (and saves) as it dies.
  first.communicate()
  again = _worker(config, sweep_dir, tfds_dir)
  for worker in (second, again):
    stdout, stderr = worker.communicate(timeout=900)
    assert worker.returncode == 0, stderr[-3000:]
  summary = sweep_summary.load(sweep_dir)
  assert summary["progress"].startswith("3/3 done") and summary["counts"]["failed"] == 0
  assert [r["rank"] for r in summary["trials"]] == [1, 2, 3]
  best = [r["metrics"]["val_loss"]["best"] for r in summary["trials"]]
  assert best == sorted(best)  # Ranked by the lowest val_loss.
  assert summary["best"] == summary["trials"][0]["workdir"]
  for row in summary["trials"]:
    with open(os.path.join(row["workdir"], "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    # Every step once (and the evaluations at 12 and 24 once each).
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1)), row["name"]
    assert [r["step"] for r in records if "val_loss" in r] == [12, 24], row["name"]
    assert row["status"] == "done" and row["steps"] == STEPS
  assert os.listdir(os.path.join(sweep_dir, "claims")) == []  # No claim left behind.
  with open(os.path.join(sweep_dir, "logs", f"{killed}.log")) as f:
    assert "Resuming from" in f.read()  # The killed trial went on from its checkpoint.
  with open(os.path.join(sweep_dir, "sweep.md")) as f:
    table = f.read()
  assert table.count("| done |") == 3
  assert os.path.isfile(os.path.join(sweep_dir, "sweep_optimizer.learning_rate.png"))
  assert os.path.isfile(os.path.join(sweep_dir, "sweep_seed.png"))


def test_a_failing_trial_is_retried_then_reported_and_the_others_run(tmp_path, tfds_dir):
  config = _config_file(tmp_path, 'add({"train.log_every": 0})\n  add({"seed": 1})')
  sweep_dir = str(tmp_path / "sweep")
  worker = _worker(config, sweep_dir, tfds_dir, "--max_attempts=3")
  _, stderr = worker.communicate(timeout=900)
  assert worker.returncode == 1, stderr[-3000:]
  assert stderr.strip().splitlines()[-2].startswith("error: 1 trials failed"), stderr[-3000:]
  summary = sweep_summary.load(sweep_dir)
  rows = {r["name"]: r for r in summary["trials"]}
  bad, good = rows["0-log_every=0"], rows["1-seed=1"]
  assert bad["status"] == "failed" and bad["runs"] == bad["failures"] == 3
  assert bad["error"] == "error: config.train.log_every=0 must be positive."
  assert good["status"] == "done" and good["rank"] == 1 and bad["rank"] is None
  with open(os.path.join(sweep_dir, "sweep.md")) as f:
    assert "- `0-log_every=0` (failed): error: config.train.log_every=0 must be positive." in f.read(
    )
  # A rerun leaves both alone: the failed trial has used its attempts.
  rerun = _worker(config, sweep_dir, tfds_dir, "--max_attempts=3")
  _, stderr = rerun.communicate(timeout=600)
  assert rerun.returncode == 1 and "starting" not in stderr


def test_a_sweep_on_a_bucket_claims_runs_retries_and_summarises(bucket, tmp_path):
  """The sweep's own files (trials, claims, status, logs, summary) on the fake `gs://` bucket
  of tests/test_paths.py, with stand-in trial commands: one succeeds, one always fails."""
  config = tmp_path / "c.py"
  config.write_text("def sweep(add, arg=''):\n  add({'seed': 0})\n  add({'seed': 1})\n\n"
                    "def metrics():\n  return {'loss': 'min'}\n")
  command = ("python -c \"import sys; sys.exit(0 if '--config.seed=0' in sys.argv else "
             "print('error: seed 1 fails') or 3)\"")
  summary = sweep_lib.run("gs://bucket/sweep", f"{config}:tiny", ["--config.train.num_steps=2"],
                          workers=2, max_attempts=2, command=command, poll_seconds=0.1)
  assert summary["counts"]["done"] == 1 and summary["counts"]["failed"] == 1
  rows = {r["name"]: r for r in summary["trials"]}
  assert rows["1-seed=1"]["runs"] == 2 and rows["1-seed=1"]["error"] == "error: seed 1 fails"
  objects = bucket.local("gs://bucket/sweep")
  assert sorted(os.listdir(objects)) == [
      "claims", "logs", "status", "sweep.json", "sweep.md", "trials", "trials.json"
  ]
  assert os.listdir(os.path.join(objects, "claims")) == []  # Both claims released and removed.
  log = open(os.path.join(objects, "logs", "0-seed=0.log")).read()
  assert "--workdir=gs://bucket/sweep/trials/0-seed=0 --config.train.num_steps=2 " \
      "--config.seed=0" in log


def test_a_worker_that_breaks_stops_the_sweep_with_its_error(tmp_path):
  """An error of the sweep's own (here `DIR/status` is a file) is raised by `run`, not lost
  in a worker thread."""
  config = tmp_path / "c.py"
  config.write_text("def sweep(add, arg=''):\n  add({'seed': 0})\n  add({'seed': 1})\n")
  (tmp_path / "sweep").mkdir()
  (tmp_path / "sweep" / "status").write_text("not a directory")
  with pytest.raises(FileExistsError):
    sweep_lib.run(str(tmp_path / "sweep"), f"{config}:tiny", [], workers=2,
                  command="python -c pass", poll_seconds=0.1)
