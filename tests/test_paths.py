"""Workdirs on buckets (`instruct.paths`): every read and write of a run through a fake `gs://`.

`FakeBucket` is an `etils.epath` backend for `gs://` that keeps objects in a local directory
but behaves as a bucket where it matters: no rename or replace, no append. Code that took a
local-only shortcut (`os.replace`, `open(..., "a")`, `os.path.abspath` on a URL) fails here or
leaves a `gs:` directory in the working directory, which every test checks for.

Orbax cannot be pointed at the fake: for `gs://` it asks Google Cloud Storage about the bucket
(`google.cloud.storage`) and TensorStore reads and writes the arrays itself, outside epath.
Where a test needs checkpoints, `checkpoint.orbax_directory` is patched to give Orbax the
fake bucket's local directory, so the Checkpointer's own handling of the URL (its directories,
the damaged-checkpoint move) still runs through the fake.
"""

import copy
import glob as glob_lib
import hashlib
import io
import json
import os
import shutil
import time

import jax
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from etils.epath import stat_utils
from ml_collections import ConfigDict

from instruct import checkpoint as ckpt_lib
from instruct import metrics as metrics_lib
from instruct import paths
from instruct import run as run_lib
from instruct import workdir as workdir_lib
from instruct.hf import exporting
from tests import test_report
from tests import test_results_table
from tests.test_loop import _counting_step, _loop, _run_to_end, _train, _without_timing
from tests.test_world import SMALL

RUN = "gs://bucket/run"


class FakeBucket(epath_backend.Backend):
  """`gs://NAME/KEY` kept in `root/NAME/KEY`; no rename, no replace, no append."""

  def __init__(self, root: str):
    self.root = root

  def local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    return os.path.join(self.root, path[len("gs://"):])

  def url(self, local) -> str:
    return "gs://" + os.path.relpath(os.fspath(local), self.root).replace(os.sep, "/")

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise io.UnsupportedOperation(f"{path}: a bucket's objects cannot be appended to")
    local = self.local(path)
    if "w" in mode:  # An object needs no parent directory.
      os.makedirs(os.path.dirname(local), exist_ok=True)
    return open(local, mode, encoding=None if "b" in mode else "utf-8")

  def exists(self, path):
    return os.path.exists(self.local(path))

  def isdir(self, path):
    return os.path.isdir(self.local(path))

  def listdir(self, path):
    return os.listdir(self.local(path))

  def glob(self, path):
    return [self.url(p) for p in glob_lib.glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, files in os.walk(self.local(top), topdown=top_down, onerror=on_error):
      yield self.url(root), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    os.makedirs(self.local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    os.makedirs(self.local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    shutil.rmtree(self.local(path))

  def remove(self, path):
    local = self.local(path)
    if os.path.isdir(local):
      os.rmdir(local)
    else:
      os.remove(local)

  def rename(self, path, dst):
    raise NotImplementedError(f"{path}: a bucket has no rename")

  def replace(self, path, dst):
    raise NotImplementedError(f"{path}: a bucket has no rename")

  def copy(self, path, dst, overwrite):
    shutil.copyfile(self.local(path), self.local(dst))

  def stat(self, path):
    st = os.stat(self.local(path))
    return stat_utils.StatResult(is_directory=os.path.isdir(self.local(path)), length=st.st_size,
                                 mtime=int(st.st_mtime), owner=None, group=None, mode=st.st_mode)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The fake `gs://` backend, with the working directory an empty one that must stay empty
  (a URL treated as a local path would create `gs:/...` there)."""
  fake = FakeBucket(str(tmp_path / "objects"))
  os.makedirs(fake.root)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", fake)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  yield fake
  assert os.listdir(cwd) == []


@pytest.fixture
def orbax_in_bucket(bucket, monkeypatch):
  """Orbax given the fake bucket's local directory (see the module docstring)."""
  monkeypatch.setattr(ckpt_lib, "orbax_directory", lambda d: bucket.local(d)
                      if paths.is_url(d) else d)
  return bucket


def test_helpers_leave_urls_alone_and_keep_local_paths(tmp_path, bucket):
  assert paths.is_url(RUN) and not paths.is_url(str(tmp_path))
  assert paths.absolute(RUN) == RUN
  assert paths.absolute("rel") == os.path.join(str(tmp_path / "cwd"), "rel")
  assert paths.join(RUN, "a", "b") == "gs://bucket/run/a/b"
  paths.write_text_atomic(paths.join(RUN, "x", "f.txt"), "one")
  paths.write_text_atomic(paths.join(RUN, "x", "f.txt"), "two")
  assert paths.read_text(paths.join(RUN, "x", "f.txt")) == "two"
  assert paths.isfile(paths.join(RUN, "x", "f.txt")) and paths.isdir(paths.join(RUN, "x"))
  paths.write_text_atomic(paths.join(RUN, "x", "sub", "g.txt"), "g")
  paths.move(paths.join(RUN, "x"), paths.join(RUN, "y"))  # Copy, then delete.
  assert not paths.exists(paths.join(RUN, "x"))
  assert paths.listdir(paths.join(RUN, "y")) == ["f.txt", "sub"]
  assert paths.read_text(paths.join(RUN, "y", "sub", "g.txt")) == "g"
  local = str(tmp_path / "local.txt")
  paths.write_text_atomic(local, "here")
  assert paths.read_text(local) == "here" and not glob_lib.glob(local + "*.tmp")


def test_read_bytes_and_mtime_on_either_kind_of_path(tmp_path, bucket):
  local = str(tmp_path / "f.bin")
  with open(local, "wb") as f:
    f.write(b"a\r\nb")
  assert paths.read_bytes(local) == b"a\r\nb"  # As stored: no newline translation.
  assert paths.mtime(local) == os.path.getmtime(local)
  url = paths.join(RUN, "f.txt")
  paths.write_text_atomic(url, "a\nb")
  assert paths.read_bytes(url) == b"a\nb"
  assert abs(paths.mtime(url) - time.time()) < 60


def test_config_json_on_a_bucket(bucket):
  config = ConfigDict({"stage": "sft", "train": {"num_steps": 3, "log_every": 1}, "seed": 0})
  path = ckpt_lib.write_config(RUN, config)
  assert path == f"{RUN}/config.json"
  assert os.path.isfile(bucket.local(path))
  assert ckpt_lib.read_config(RUN) == json.loads(config.to_json_best_effort())
  assert run_lib.read_config(RUN).train.num_steps == 3
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    run_lib.read_config("gs://bucket/none")
  # A resume compares with the saved config on the bucket.
  changed = ConfigDict(config.to_dict())
  changed.seed = 1
  with pytest.raises(workdir_lib.ConfigChangedError, match=r"config\.seed: 0 -> 1"):
    workdir_lib.check_resume(RUN, changed)
  workdir_lib.check_resume(RUN, config)


def test_moved_inputs_on_a_bucket_count_as_unchanged():
  saved = {"data": {"train_file": "gs://old/root/world/x.jsonl", "tokenizer": "gs://t/a"}}
  new = {"data": {"train_file": "gs://new/copy/world/x.jsonl", "tokenizer": "gs://t/b"}}
  assert workdir_lib.config_differences(saved, new, "gs://new/copy/sft") == ["data.tokenizer"]
  assert "data.train_file" in workdir_lib.config_differences(saved, new, "gs://other/sft")


def test_metrics_on_a_bucket_are_rewritten_rolled_back_and_read(bucket):
  writer = metrics_lib.MetricWriter(RUN, process_index=0)
  for step in range(1, 6):
    writer.write(step, {"loss": float(step)})
  assert [r["step"] for r in metrics_lib.read_metrics(RUN)] == [1, 2, 3, 4, 5]
  events = os.listdir(bucket.local(f"{RUN}/tensorboard"))
  assert len(events) == 1 and os.path.getsize(bucket.local(f"{RUN}/tensorboard/{events[0]}"))
  local_events = writer._tb_local
  writer.close()
  assert not os.path.exists(local_events)  # The local copy is temporary.
  # A resume from step 3: the records past it go, the object is read back and rewritten.
  writer = metrics_lib.MetricWriter(RUN, process_index=0)
  writer.rollback(3)
  assert [r["step"] for r in metrics_lib.read_metrics(RUN)] == [1, 2, 3]
  writer.write(4, {"loss": 40.0})
  writer.close()
  records = metrics_lib.read_metrics(RUN)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  # The purge marker and the new records are in a second event file on the bucket.
  assert len(os.listdir(bucket.local(f"{RUN}/tensorboard"))) == 2
  assert metrics_lib.MetricWriter(RUN, process_index=1).active is False


def test_a_bucket_lock_is_an_owner_record_with_a_heartbeat(bucket):
  lock = workdir_lib.lock(RUN)
  assert isinstance(lock, workdir_lib.BucketLock)
  record = json.loads(paths.read_text(f"{RUN}/.lock"))
  assert record["pid"] == os.getpid() and record["host"] and record["started"]
  assert time.time() - record["heartbeat"] < 60
  with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()}"):
    workdir_lib.lock(RUN)
  before = record["heartbeat"]
  time.sleep(0.01)
  lock.heartbeat()
  assert json.loads(paths.read_text(f"{RUN}/.lock"))["heartbeat"] > before
  lock.release()
  assert not paths.exists(f"{RUN}/.lock")
  workdir_lib.lock(RUN).release()


def test_a_bucket_lock_renews_itself_and_a_stale_one_is_taken_over(bucket):
  lock = workdir_lib.BucketLock(RUN, heartbeat_every=0.05)
  first = json.loads(paths.read_text(f"{RUN}/.lock"))["heartbeat"]
  deadline = time.time() + 10
  while json.loads(paths.read_text(f"{RUN}/.lock"))["heartbeat"] == first:
    assert time.time() < deadline, "the heartbeat thread did not renew the lock"
    time.sleep(0.02)
  lock.release()
  # A run that died an hour ago left its record: the lock is free.
  stale = {
      "pid": 1, "host": "gone", "started": "then", "command": "x", "token": "t",
      "heartbeat": time.time() - 3600
  }
  paths.write_text_atomic(f"{RUN}/.lock", json.dumps(stale))
  taken = workdir_lib.BucketLock(RUN)
  assert json.loads(paths.read_text(f"{RUN}/.lock"))["pid"] == os.getpid()
  taken.release()
  # A recent one is not.
  paths.write_text_atomic(f"{RUN}/.lock", json.dumps(dict(stale, heartbeat=time.time())))
  with pytest.raises(workdir_lib.WorkdirBusyError, match="pid 1 on gone"):
    workdir_lib.BucketLock(RUN)
  assert json.loads(paths.read_text(f"{RUN}/.lock"))["pid"] == 1  # Left as it was.
  # A record that cannot be read is taken over too (nothing alive renews it).
  paths.write_text_atomic(f"{RUN}/.lock", "not json")
  workdir_lib.BucketLock(RUN).release()


def test_a_bucket_lock_taken_by_another_run_is_left_to_it(bucket):
  """The race of two runs starting together (see BucketLock): the one whose record was
  overwritten stops renewing it and does not delete the other's."""
  lock = workdir_lib.BucketLock(RUN)
  other = {
      "pid": 2, "host": "h", "started": "now", "command": "y", "token": "other",
      "heartbeat": time.time()
  }
  paths.write_text_atomic(f"{RUN}/.lock", json.dumps(other))
  lock.heartbeat()
  lock.release()
  assert json.loads(paths.read_text(f"{RUN}/.lock")) == other


def test_the_checkpointer_keeps_bucket_urls(orbax_in_bucket):
  checkpointer = ckpt_lib.Checkpointer(RUN)
  assert checkpointer.directory == f"{RUN}/checkpoints"
  assert checkpointer.damaged_directory == f"{RUN}/checkpoints_damaged"
  checkpointer.close()


def test_orbax_gets_an_epath_for_a_url_and_the_string_for_a_local_path():
  directory = ckpt_lib.orbax_directory(f"{RUN}/checkpoints")
  assert isinstance(directory, epath.Path) and str(directory) == f"{RUN}/checkpoints"
  assert ckpt_lib.orbax_directory("/runs/a/checkpoints") == "/runs/a/checkpoints"


def test_a_damaged_checkpoint_on_a_bucket_is_copied_aside(orbax_in_bucket):
  init = {"count": np.zeros((), np.int32)}
  loop, checkpointer, writer = _loop(RUN, _counting_step(), _train(num_steps=6))
  loop.run(init, 0)
  checkpointer.close()
  writer.close()
  os.remove(os.path.join(orbax_in_bucket.local(f"{RUN}/checkpoints/6"), "state", "manifest.ocdbt"))
  checkpointer = ckpt_lib.Checkpointer(RUN)
  step, state, _ = checkpointer.restore_latest(jax.eval_shape(lambda: init))
  assert step == 3 and int(state["count"]) == 3
  assert paths.listdir(f"{RUN}/checkpoints_damaged") == ["6"]
  assert paths.isdir(f"{RUN}/checkpoints_damaged/6/state")
  assert checkpointer.all_steps() == [3]
  checkpointer.close()


def test_a_loop_runs_and_resumes_with_its_workdir_on_a_bucket(tmp_path, orbax_in_bucket):
  """An uninterrupted local run and a bucket run stopped at step 5 and resumed log the same."""
  init = {"count": np.zeros((), np.int32)}
  expected = _run_to_end(tmp_path / "local", _train(num_steps=8), init)

  loop, checkpointer, writer = _loop(RUN, _counting_step(), _train(num_steps=8, stop_at_step=5))
  assert paths.exists(f"{RUN}/.lock") and paths.exists(f"{RUN}/config.json")
  with pytest.raises(workdir_lib.WorkdirBusyError):
    _loop(RUN, _counting_step(), _train(num_steps=8))
  loop.run(init, 0)
  writer.write(6, {"loss": 123.0})  # Written after the checkpoint by a process then killed.
  checkpointer.close()
  writer.close()
  assert not paths.exists(f"{RUN}/.lock")

  loop, checkpointer, writer = _loop(RUN, _counting_step(), _train(num_steps=8))
  step, state, extras = checkpointer.restore_latest(jax.eval_shape(lambda: init))
  assert step == 5
  loop.extras = extras
  loop.run(state, step)
  checkpointer.close()
  writer.close()
  resumed = metrics_lib.read_metrics(RUN)
  assert _without_timing(resumed) == _without_timing(expected)
  assert paths.listdir(f"{RUN}/tensorboard")
  assert run_lib.latest_step(RUN) == 8


def test_an_export_is_copied_into_a_bucket_directory(tmp_path, bucket):
  out = "gs://bucket/export"
  exporting._check_out_dir(out, overwrite=False)  # New: fine.
  paths.write_text_atomic(f"{out}/model-00001-of-00002.safetensors", "old shard")
  with pytest.raises(FileExistsError, match="not empty"):
    exporting._check_out_dir(out, overwrite=False)
  exporting._check_out_dir(out, overwrite=True)
  staging = tmp_path / "staging"
  staging.mkdir()
  (staging / "model.safetensors").write_text("weights")
  (staging / "config.json").write_text("{}")
  exporting._move_into(str(staging), out)
  assert paths.listdir(out) == ["config.json", "model.safetensors"]  # The stale shard is gone.
  assert paths.read_text(f"{out}/model.safetensors") == "weights"
  with pytest.raises(FileExistsError, match="is an object"):
    exporting._check_out_dir(f"{out}/config.json", overwrite=True)


# --- The main job's pipeline (experiments/) with its root on a bucket. ----------------------


def _tree(root: str) -> dict[str, bytes]:
  """{relative path: bytes} of every file under the local directory `root`."""
  out = {}
  for directory, _, names in os.walk(root):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def test_the_world_is_written_to_a_bucket_and_read_back_by_the_pipeline(tmp_path, bucket):
  """The world stage into `gs://.../world`: the same bytes as a local world, read back by the
  pipeline's readers; the stage fingerprints, run.json and the pipeline lock on the bucket."""
  from experiments import instructgpt_mini as mini
  from experiments.world import generate as world_lib
  world = f"{RUN}/world"
  written = world_lib.write_world(world, SMALL)
  assert written == world_lib.files(world) and written["tokenizer"] == f"{world}/tokenizer"
  local = str(tmp_path / "local_world")
  world_lib.write_world(local, SMALL)
  assert _tree(bucket.local(world)) == _tree(local)
  assert world_lib.load_facts(world) == world_lib.load_facts(local)
  assert (paths.read_jsonl(written["eval_prompts"]) == paths.read_jsonl(
      world_lib.files(local)["eval_prompts"]))
  assert len(paths.read_jsonl(written["sft"]["train"])) == SMALL.sft
  config = mini.stage_config("pretrain", mini.PRESETS["test"], RUN)
  assert config.data.train_file == f"{world}/pretrain_train.jsonl"
  assert config.data.tokenizer == f"{world}/tokenizer"
  # What a stage is built from, recorded and checked on the bucket.
  with open(os.path.join(local, "world.json"), "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  assert mini._fingerprint(RUN, "world") == {"sha256": digest}
  mini.check_inputs(RUN, "pretrain")
  assert json.loads(
      paths.read_text(f"{RUN}/pretrain/built_from.json")) == {"world": {"sha256": digest}}
  mini.check_inputs(RUN, "pretrain")  # Unchanged: fine.
  paths.write_text_atomic(f"{world}/world.json", "{}")
  with pytest.raises(mini.StageInputsChangedError, match="world"):
    mini.check_inputs(RUN, "pretrain")
  # The RM's length from the comparisons on the bucket.
  paths.write_text_atomic(f"{RUN}/comparisons/comparisons_train.jsonl", "{}\n" * 65)
  assert mini.rm_num_steps(mini.PRESETS["test"], RUN) == 3
  # run.json, and the pipeline's lock (a bucket lock, released when the run stops).
  preset = mini.with_seed(mini.PRESETS["test"], 1)
  mini._claim_workdir(RUN, preset)
  assert json.loads(paths.read_text(f"{RUN}/run.json"))["seed"] == 1
  with pytest.raises(mini.WorkdirError, match="--seed=1, not --preset=test --seed=2"):
    mini.run(RUN, "test", seed=2)
  assert not paths.exists(f"{RUN}/.lock")


def test_the_report_is_written_to_a_bucket_as_it_is_locally(tmp_path, bucket):
  """report.md and its plots under a `gs://` root: the same bytes as under a local root; a
  stale plot is deleted from the bucket."""
  from experiments.world import report
  results = test_report.make_results(preset="quick", size_ratio=4.0)
  local = test_report.make_run(str(tmp_path / "local"))
  test_report.make_run(bucket.local(RUN))  # The stages' metrics and configs, on the bucket.
  report.write_report(local, copy.deepcopy(results), test_report.TIMINGS)
  path = report.write_report(RUN, copy.deepcopy(results), test_report.TIMINGS)
  assert path == f"{RUN}/report.md"
  assert "PPO and PPO-ptx: fixed KL coefficient beta=0.05" in paths.read_text(path)
  tree = _tree(bucket.local(RUN))
  expected = _tree(local)
  assert {k: v for k, v in tree.items() if k.startswith("plots")
         } == {k: v for k, v in expected.items() if k.startswith("plots")}
  assert tree["report.md"] == expected["report.md"]
  assert paths.exists(f"{RUN}/plots/rm_calibration.png")
  test_report.make_run(bucket.local(RUN), calibration=False)
  del results["rm"]["calibration"]
  report.write_report(RUN, results, {})
  assert not paths.exists(f"{RUN}/plots/rm_calibration.png")
  assert "rm_calibration.png" not in paths.read_text(path)


def test_the_results_table_pools_runs_on_a_bucket(tmp_path, bucket, capsys):
  from experiments import results_table as rt
  local = [test_results_table.make_run(tmp_path / "local", s) for s in (0, 1)]
  assert rt.main(local) == 0
  expected = capsys.readouterr().out
  for s in (0, 1):
    test_results_table.make_run(bucket.local("gs://bucket/runs"), s)
  assert rt.main([f"gs://bucket/runs/quick_{s}" for s in (0, 1)]) == 0
  assert capsys.readouterr().out == expected
  assert rt.main(["gs://bucket/runs/none"]) == 1
  assert "gs://bucket/runs/none/evaluate/results.json is missing" in capsys.readouterr().err
