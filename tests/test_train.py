"""The training driver end to end on the tiny preset: learning, resume, NaN stop, metrics."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from instruct import checkpoint as ckpt_lib
from instruct import loop
from instruct import metrics as metrics_lib
from instruct import trainer
from instruct.stages import sft
from tests.test_sharding import ROOT, load_config


def tiny_config(tfds_dir, stage="sft", **train):
  config = load_config(stage, "tiny")
  config.data.tfds_dir = tfds_dir
  config.train.update(dict(log_every=2, eval_every=0, checkpoint_every=4))
  config.train.update(train)
  return config


def test_a_few_steps_reduce_the_loss_and_write_metrics(tmp_path, tfds_dir):
  config = tiny_config(tfds_dir, num_steps=30, log_every=5, eval_every=15)
  trainer.train_and_evaluate(config, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  losses = [r["loss"] for r in records if "loss" in r]
  # Measured 2026-11-28, config seeds 0-4, AVX-512 and AVX2: last / first logged loss
  # 0.593-0.620; val_loss falls by 0.41-0.52 from step 15 to 30. The ISAs differ by < 1e-6.
  assert losses[-1] < 0.75 * losses[0], losses
  val = [r for r in records if "val_loss" in r]
  assert [r["step"] for r in val] == [15, 30]
  assert val[1]["val_loss"] < val[0]["val_loss"]
  assert np.isclose(val[1]["val_perplexity"], np.exp(val[1]["val_loss"]), rtol=1e-5)
  for name in ("accuracy", "grad_norm", "learning_rate", "tokens_per_second"):
    assert all(np.isfinite(r[name]) for r in records if "loss" in r), name
  assert os.listdir(tmp_path / "tensorboard")
  assert json.load(open(tmp_path / "config.json"))["stage"] == "sft"
  steps = ckpt_lib.Checkpointer(str(tmp_path)).all_steps()
  assert steps == [24, 28, 30]  # The last keep_checkpoints=3 of 4, 8, ..., 28, 30.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tfds_dir):
  """The 10-step run the resumed runs below must equal: (params, opt_state) on the host."""
  full = trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=10),
                                    str(tmp_path_factory.mktemp("uninterrupted")))
  return jax.device_get(full.params), jax.device_get(full.opt_state)


def test_resume_after_stop_equals_uninterrupted_run(tmp_path, tfds_dir, uninterrupted):
  params, opt_state = uninterrupted
  resumed_dir = str(tmp_path / "b")
  partial = trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=10, stop_at_step=6),
                                       resumed_dir)
  assert int(partial.step) == 6
  resumed = trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=10), resumed_dir)
  assert int(resumed.step) == 10
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params,
               jax.device_get(resumed.params))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), opt_state,
               jax.device_get(resumed.opt_state))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tfds_dir):
  config = tiny_config(tfds_dir, num_steps=10, log_every=1, checkpoint_every=1)
  config.optimizer.learning_rate = 1e30  # The first update blows the weights up.
  config.optimizer.warmup_steps = 0
  config.optimizer.grad_clip_norm = 0.0
  with pytest.raises(loop.NonFiniteLossError, match=r"at step 2\b.*last good checkpoint \(1\)"):
    trainer.train_and_evaluate(config, str(tmp_path))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  assert checkpointer.all_steps() == [1]


def test_checkpointer_refuses_a_non_finite_state(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path))
  good = {"w": np.ones((2, 2), np.float32), "step": np.int32(3)}
  checkpointer.save(1, good, {"note": "ok"})
  bad = {"w": np.array([[1.0, np.nan], [0.0, 1.0]], np.float32), "step": np.int32(4)}
  with pytest.raises(ckpt_lib.NonFiniteStateError, match="latest good checkpoint is 1"):
    checkpointer.save(2, bad, {})
  assert checkpointer.all_steps() == [1]
  restored, extras = checkpointer.restore(
      1, jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x),
                                                     np.asarray(x).dtype), good))
  np.testing.assert_array_equal(restored["w"], good["w"])
  assert extras == {"note": "ok"}


def test_metrics_are_written_by_process_zero_only(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = metrics_lib.MetricWriter(str(tmp_path / "other"))
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "other").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer = metrics_lib.MetricWriter(str(tmp_path / "main"))
  writer.write(3, {"loss": np.float32(2.5), "nan_metric": float("nan")})
  writer.close()
  assert metrics_lib.read_metrics(str(tmp_path
                                      / "main")) == [{"step": 3, "loss": 2.5, "nan_metric": "nan"}]


def test_pretraining_then_sft_initialised_from_it(tmp_path, tfds_dir):
  pre = trainer.train_and_evaluate(tiny_config(tfds_dir, "pretrain", num_steps=4),
                                   str(tmp_path / "pre"))
  losses = [r["loss"] for r in metrics_lib.read_metrics(str(tmp_path / "pre"))]
  assert all(np.isfinite(losses))
  config = tiny_config(tfds_dir, num_steps=1)
  config.init_from = str(tmp_path / "pre")
  config.optimizer.learning_rate = 0.0  # No update: the SFT params must be the pretrained ones.
  sft = trainer.train_and_evaluate(config, str(tmp_path / "sft"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(pre.params), jax.device_get(sft.params))


def test_init_from_a_directory_without_checkpoints_is_an_error(tmp_path, tfds_dir):
  config = tiny_config(tfds_dir, num_steps=1)
  config.init_from = str(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="config.init_from"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.parametrize("key,value,pattern", [
    ("train.global_batch_size", 12, r"config\.train\.global_batch_size=12.*data-parallel size 8"),
    ("train.grad_accum_steps", 3, r"config\.train\.grad_accum_steps=3"),
    ("mesh.shape", (3, 1, 1), r"config\.mesh\.shape=\(3, 1, 1\)"),
    ("optimizer.schedule", "exp", r"config\.optimizer\.schedule='exp'"),
])
def test_impossible_configs_are_clear_errors(tmp_path, tfds_dir, key, value, pattern):
  config = tiny_config(tfds_dir, num_steps=1)
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ValueError, match=pattern):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists() or not os.listdir(tmp_path / "checkpoints")


def _damage(step_dir, kind: str) -> None:
  """Damages a checkpoint directory the ways a crash or a full disk does."""
  if kind == "manifest_deleted":
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
  elif kind == "arrays_truncated":
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
      for name in files:
        if os.path.basename(root) == "d":
          with open(os.path.join(root, name), "r+b") as f:
            f.truncate(max(1, os.path.getsize(os.path.join(root, name)) // 2))
  elif kind == "extras_truncated":
    path = os.path.join(step_dir, "extras", "metadata")
    with open(path, "r+b") as f:
      f.truncate(10)
  else:
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["manifest_deleted", "arrays_truncated", "extras_truncated"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_one_resumes(
    tmp_path, tfds_dir, kind, uninterrupted):
  run = str(tmp_path / "b")
  trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=10, stop_at_step=9), run)
  _damage(os.path.join(run, "checkpoints", "9"), kind)
  resumed = trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=10), run)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               uninterrupted[0], jax.device_get(resumed.params))
  assert os.path.isdir(os.path.join(run, "checkpoints_damaged", "9", "state"))  # Kept.
  assert ckpt_lib.Checkpointer(run).all_steps() == [4, 8, 10]


def test_no_readable_checkpoint_is_an_error_that_keeps_them(tmp_path, tfds_dir):
  run = str(tmp_path)
  trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=8, stop_at_step=8), run)
  for step in (4, 8):
    _damage(os.path.join(run, "checkpoints", str(step)), "manifest_deleted")
  with pytest.raises(ckpt_lib.NoReadableCheckpointError, match="checkpoints_damaged"):
    trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=8), run)
  assert sorted(os.listdir(os.path.join(run, "checkpoints_damaged"))) == ["4", "8"]


def test_command_line_trains_and_resumes(tmp_path, tfds_dir):
  command = [
      sys.executable, "-m", "instruct.train", "--config=configs/sft.py:tiny",
      f"--workdir={tmp_path}", "--config.train.num_steps=4", "--config.train.log_every=2",
      f"--config.data.tfds_dir={tfds_dir}", "--config.train.eval_every=4"
  ]
  env = dict(os.environ, XLA_FLAGS="")
  first = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "step 4/4" in first.stderr and "tok/s" in first.stderr and "ETA" in first.stderr
  again = subprocess.run(command[:-3] + ["--config.train.num_steps=6"] + command[-2:], cwd=ROOT,
                         capture_output=True, text=True, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resuming from" in again.stderr and "step 6/6" in again.stderr
  bad = subprocess.run(command + ["--config.train.bogus=1"], cwd=ROOT, capture_output=True,
                       text=True, env=env)
  assert bad.returncode != 0 and "config.train.bogus" in bad.stderr, bad.stderr[-2000:]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, tfds_dir, monkeypatch):
  real_make_data = sft.make_lm_data

  def make_data_that_gets_preempted(config, tokenizer, split, repeat):
    data = real_make_data(config, tokenizer, split, repeat)
    if split != "train":
      return data
    real_next, calls = data.__next__, []

    class Preempted(type(data)):

      def __next__(self):
        calls.append(1)
        if len(calls) == 3:  # While step 3 runs, the scheduler sends SIGTERM.
          os.kill(os.getpid(), signal.SIGTERM)
        return real_next()

    data.__class__ = Preempted
    return data

  monkeypatch.setattr(sft, "make_lm_data", make_data_that_gets_preempted)
  with pytest.raises(loop.Preempted, match="saved step 3"):
    trainer.train_and_evaluate(tiny_config(tfds_dir, num_steps=10), str(tmp_path))
  assert ckpt_lib.Checkpointer(str(tmp_path)).latest_step() == 3
  assert signal.getsignal(signal.SIGTERM) is not None  # The previous handler is restored.


def test_malformed_training_file_is_an_error_naming_file_and_line(tmp_path, tfds_dir):
  bad = tmp_path / "demos.jsonl"
  bad.write_text('{"prompt": "a", "completion": " b"}\n{"prompt": "c", "completion": ""}\n')
  config = tiny_config(tfds_dir, num_steps=1)
  config.data.train_file = str(bad)
  with pytest.raises(ValueError, match=rf"{bad}:2: .*completion"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))
