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
  assert [r["step"] for r in records] == [2, 3, 4]  # Every log_every, and at each save.
  assert records[0]["loss"] == pytest.approx((1.0 + 0.5) / 2)  # Mean over the two steps.
  assert "tokens" not in records[0] and records[0]["tokens_per_second"] > 0
  assert checkpointer.all_steps() == [3, 4]
  extras = checkpointer.restore_extras(4)
  assert extras["data"] == {"position": 0} and extras["config"]["seed"] == 0
  assert extras["rng"] == np.asarray(jax.random.key_data(jax.random.key(0))).tolist()
  checkpointer.close()
  writer.close()


def test_loop_stops_on_any_non_finite_metric_without_saving(tmp_path):
  loop, checkpointer, writer = _loop(tmp_path, _counting_step(bad_at=5, bad_key="extra"), _train())
  with pytest.raises(loop_lib.NonFiniteLossError,
                     match=r"Non-finite extra \(nan\) at step 5\b.*last good checkpoint \(3\)"):
    loop.run({"count": np.zeros((), np.int32)}, 0)
  assert checkpointer.all_steps() == [3]
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [2, 3, 4]
  checkpointer.close()
  writer.close()


def test_loop_writes_every_step_when_asked_and_finalizes_at_the_last(tmp_path):
  loop, checkpointer, writer = _loop(tmp_path, _counting_step(), _train(), write_every=1,
                                     finalize=lambda state: {"final": float(state["count"])})
  loop.run({"count": np.zeros((), np.int32)}, 0)
  records = metrics_lib.read_metrics(str(tmp_path))
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
  assert {"step": 6, "final": 6.0} in records
  assert checkpointer.restore_extras(6)["final"] == 6.0
  assert "final" not in checkpointer.restore_extras(3)
  checkpointer.close()
  writer.close()


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
  with pytest.raises(ValueError, match=r"config\.stage='dpo'; expected one of"):
    table.get("dpo")
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
