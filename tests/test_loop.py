"""The shared loop (`instruct.loop`), the stage table and the layering they stand for."""

import ast
import glob
import os

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from instruct import config_lib
from instruct import loop as loop_lib
from instruct import metrics as metrics_lib
from instruct import workdir as workdir_lib
from instruct.model import config as model_config
from instruct.stages import table
from tests.test_sharding import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(**overrides):
  train = config_lib.train_config()
  train.update(dict(num_steps=6, log_every=2, checkpoint_every=3, eval_every=0), **overrides)
  return train


def _loop(tmp_path, step_fn, train, **kwargs):
  config = ConfigDict({"train": train, "seed": 0})
  checkpointer, writer = loop_lib.open_run(str(tmp_path), config)
  loop = loop_lib.Loop(step_fn, train, config, jax.random.key(0), checkpointer, writer,
                       data_state=lambda: {"data": {"position": 0}},
                       log_line=lambda s: f"loss {s['loss']:.3f}", **kwargs)
  return loop, checkpointer, writer


def _run_to_end(workdir, train, init):
  """Runs a counting loop in `workdir` from `init` to its end; returns its metrics records."""
  loop, checkpointer, writer = _loop(workdir, _counting_step(), train)
  loop.run(init, 0)
  checkpointer.close()
  writer.close()
  return metrics_lib.read_metrics(str(workdir))


def _counting_step(bad_at=None, bad_key="loss"):
  """A step whose state is a counter and whose metrics are (loss, extra, tokens)."""

  def step_fn(state, rng):
    del rng
    state = {"count": state["count"] + 1}
    count = int(state["count"])
    metrics = {"loss": 1.0 / count, "extra": 2.0, "tokens": 10.0}
    if bad_at is not None and count == bad_at:
      metrics[bad_key] = float("nan")
    return state, metrics

  return step_fn


def test_loop_writes_averages_saves_and_stops_at_stop_at_step(tmp_path):
  loop, checkpointer, writer = _loop(tmp_path, _counting_step(), _train(stop_at_step=4))
  state = loop.run({"count": np.zeros((), np.int32)}, 0)
  assert int(state["count"]) == 4
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records] == [2, 4]  # Every log_every (and at num_steps).
  assert records[0]["loss"] == pytest.approx((1.0 + 0.5) / 2)  # Mean over the two steps.
  assert "tokens" not in records[0] and records[0]["tokens_per_second"] > 0
  assert checkpointer.all_steps() == [3, 4]
  extras = checkpointer.restore_extras(4)
  assert extras["data"] == {"position": 0} and extras["config"]["seed"] == 0
  assert extras["rng"] == np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
  # The checkpoint between two writes carries the unwritten step's metrics.
  assert extras["pending_metrics"] == []
  assert checkpointer.restore_extras(3)["pending_metrics"] == [{
      "loss": pytest.approx(1 / 3), "extra": 2.0, "tokens": 10.0
  }]
  checkpointer.close()
  writer.close()


def test_loop_stops_on_any_non_finite_metric_without_saving(tmp_path):
  loop, checkpointer, writer = _loop(tmp_path, _counting_step(bad_at=5, bad_key="extra"), _train())
  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=r"Non-finite extra \(nan\) at step 5\b.*last good checkpoint \(3\)"):
    loop.run({"count": np.zeros((), np.int32)}, 0)
  assert checkpointer.all_steps() == [3]
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [2, 4]
  checkpointer.close()
  writer.close()
  loop, checkpointer, writer = _loop(tmp_path / "b", _counting_step(bad_at=2), _train())
  with pytest.raises(loop_lib.NonFiniteLossError, match="no checkpoint had been written yet"):
    loop.run({"count": np.zeros((), np.int32)}, 0)
  checkpointer.close()
  writer.close()


def _without_timing(records):
  return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


def test_a_resumed_run_logs_each_step_once_as_an_uninterrupted_run_does(tmp_path):
  """A stop between two writes (stop_at_step=5, log_every=2), records a killed process wrote
  past the checkpoint, then a resume: metrics.jsonl equals the uninterrupted run's."""
  init = {"count": np.zeros((), np.int32)}
  expected = _run_to_end(tmp_path / "a", _train(num_steps=8), init)
  run = tmp_path / "b"
  loop, checkpointer, writer = _loop(run, _counting_step(), _train(num_steps=8, stop_at_step=5))
  loop.run(init, 0)
  writer.write(6, {"loss": 123.0})  # Written after the checkpoint by a process then killed.
  checkpointer.close()
  writer.close()
  loop, checkpointer, writer = _loop(run, _counting_step(), _train(num_steps=8))
  step, state, extras = checkpointer.restore_latest(jax.eval_shape(lambda: init))
  assert step == 5 and len(extras["pending_metrics"]) == 1
  loop.extras = extras
  loop.run(state, step)
  checkpointer.close()
  writer.close()
  resumed = metrics_lib.read_metrics(str(run))
  assert [r["step"] for r in resumed] == [2, 4, 6, 8]
  assert _without_timing(resumed) == _without_timing(expected)


@pytest.mark.parametrize("key,value", [("stop_at_step", 0), ("stop_at_step", -2), ("log_every", 0),
                                       ("checkpoint_every", 0), ("num_steps", 0)])
def test_loop_settings_are_validated_by_name(key, value):
  train = _train(**{key: value})
  with pytest.raises(ValueError, match=rf"config\.train\.{key}={value}"):
    config_lib.validate_train(train, 1, 1)


@pytest.mark.parametrize("name,preset", [("pretrain", "tiny"), ("sft", "tiny"), ("rm", "tiny"),
                                         ("ppo", "tiny"), ("ppo", "tiny_ptx")])
def test_every_config_names_a_stage_of_the_table(name, preset):
  config = load_config(name, preset)
  stage = table.get(config.stage)
  assert stage.name == config.stage
  if stage.task is not None:  # Supervised: the task builder resolves.
    assert callable(table.resolve(stage.task))
  assert callable(table.resolve(stage.runner)) and callable(table.resolve(stage.validate))


def test_stage_table_rejects_unknown_stages_and_reads_legacy_names():
  with pytest.raises(ValueError, match=r"config\.stage='kto'; expected one of"):
    table.get("kto")
  assert table.get("ppo") is table.get("rl")  # Runs saved before the RL stage's rename.


def test_every_accelerator_preset_has_its_learning_rates():
  for name in config_lib.ACCELERATOR_PRESETS:
    for stage in ("pretrain", "sft"):
      assert 0 < model_config.learning_rate(name, stage) < 1e-2
  with pytest.raises(ValueError, match="LEARNING_RATES"):
    model_config.learning_rate("tiny", "sft")


def _imports(path: str) -> set[str]:
  tree = ast.parse(open(path).read())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def test_layering():
  """rl/ does not reach into the supervised driver, the library never imports the
  experiments, and no library module grows past 600 lines."""
  for path in glob.glob(os.path.join(ROOT, "instruct", "rl", "*.py")):
    assert not {"instruct.trainer", "instruct.stages.sft"} & _imports(path), path
  for path in glob.glob(os.path.join(ROOT, "instruct", "**", "*.py"), recursive=True):
    assert not any(n.startswith("experiments") for n in _imports(path)), path
    with open(path) as f:
      assert sum(1 for _ in f) <= 600, path


def test_config_differences_skip_resumable_added_and_moved_keys():
  saved = {
      "train": {"num_steps": 10, "log_every": 5}, "optimizer": {"learning_rate": 0.1},
      "data": {"train_file": "/a/run/world/x.jsonl", "tokenizer": "/data/tok_a"}
  }
  new = {
      "train": {"num_steps": 20, "log_every": 1}, "optimizer": {"learning_rate": 0.2},
      "data": {"train_file": "/b/copy/world/x.jsonl", "tokenizer": "/data/tok_b", "added": 1}
  }
  # The world moved with the workdir's root (/a/run -> /b/copy); the tokenizer did not.
  assert workdir_lib.config_differences(
      saved, new, "/b/copy/sft") == ["data.tokenizer", "optimizer.learning_rate"]
  assert "data.train_file" in workdir_lib.config_differences(saved, new, "/elsewhere/sft")


def test_a_workdir_lock_is_exclusive_until_released(tmp_path):
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {os.getpid()}"):
    workdir_lib.WorkdirLock(str(tmp_path))
  lock.release()
  workdir_lib.WorkdirLock(str(tmp_path)).release()
