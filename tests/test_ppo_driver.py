"""The PPO stage end to end: SFT -> RM -> PPO(-ptx), metrics, resume, errors."""

import jax
import numpy as np
import pytest

from instruct import metrics as metrics_lib
from instruct import trainer
from instruct.rl import driver
from tests.test_sharding import load_config


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tfds_dir):
  """Short SFT and RM runs to start PPO from."""
  root = tmp_path_factory.mktemp("ppo_sources")
  sft = load_config("sft", "tiny")
  sft.data.tfds_dir = tfds_dir
  sft.train.update(num_steps=20, eval_every=0)
  trainer.train_and_evaluate(sft, str(root / "sft"))
  rm = load_config("rm", "tiny")
  rm.data.tfds_dir = tfds_dir
  rm.init_from = str(root / "sft")
  rm.train.update(num_steps=8, eval_every=0)
  trainer.train_and_evaluate(rm, str(root / "rm"))
  return root


def ppo_config(sources, tfds_dir, preset="tiny", **train):
  config = load_config("ppo", preset)
  config.policy_from = str(sources / "sft")
  config.reward_from = str(sources / "rm")
  config.data.tfds_dir = tfds_dir
  config.sampling.max_new_tokens = 8
  config.ppo.epochs = 2
  config.train.update(dict(num_steps=4, checkpoint_every=2), **train)
  return config


def params_of(state):
  return jax.device_get({"policy": state["policy"], "value": state["value"],
                         "kl": state["kl"]})


def test_ppo_writes_every_metric_and_resumes_exactly(sources, tfds_dir, tmp_path):
  full = driver.train_ppo(ppo_config(sources, tfds_dir), str(tmp_path / "a"))
  records = metrics_lib.read_metrics(str(tmp_path / "a"))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for name in ("score", "score_raw", "score_normalised", "kl_k1", "kl_k3", "beta", "entropy",
               "clip_fraction", "approx_kl", "value_loss", "explained_variance",
               "response_length", "eos_fraction", "rollout_seconds", "scoring_seconds",
               "update_seconds", "policy_loss"):
    assert all(np.isfinite(r[name]) for r in records), name
  assert all(r["first_ratio_error"] <= 1e-6 for r in records)
  assert records[0]["kl_k1"] == 0.0  # The policy starts as the reference.
  # Adaptive KL controller: beta moves by the clipped error times n_steps / horizon.
  config = ppo_config(sources, tfds_dir)
  for before, after in zip(records, records[1:]):
    error = np.clip((before["kl_k1"] - config.kl.target) / config.kl.target, -0.2, 0.2)
    expected = before["beta"] * (1 + error * config.train.global_batch_size / config.kl.horizon)
    np.testing.assert_allclose(after["beta"], expected, rtol=1e-5)

  partial = driver.train_ppo(ppo_config(sources, tfds_dir, stop_at_step=2), str(tmp_path / "b"))
  assert int(partial["policy"].step) == 2 * 2 * 4  # iterations x epochs x minibatches
  resumed = driver.train_ppo(ppo_config(sources, tfds_dir), str(tmp_path / "b"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params_of(full), params_of(resumed))


def test_ppo_ptx_reports_the_pretraining_loss(sources, tfds_dir, tmp_path):
  driver.train_ppo(ppo_config(sources, tfds_dir, "tiny_ptx", num_steps=2), str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  assert all(np.isfinite(r["ptx_loss"]) and r["ptx_loss"] > 0 for r in records)


def test_ppo_needs_its_source_runs(sources, tfds_dir, tmp_path):
  config = ppo_config(sources, tfds_dir)
  config.reward_from = ""
  with pytest.raises(ValueError, match="config.reward_from is empty"):
    driver.train_ppo(config, str(tmp_path))
  config.reward_from = str(sources / "sft")
  with pytest.raises(ValueError, match="not a reward-model run"):
    driver.train_ppo(config, str(tmp_path))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_ppo_iterations_on_a_mesh_match_one_device(sources, tfds_dir, tmp_path, mesh_shape):
  one = ppo_config(sources, tfds_dir, num_steps=2)
  one.mesh.shape = (1, 1, 1)
  expected = driver.train_ppo(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  many = ppo_config(sources, tfds_dir, num_steps=2)
  many.mesh.shape = mesh_shape
  got = driver.train_ppo(many, str(tmp_path / "many"))
  ref_records = metrics_lib.read_metrics(str(tmp_path / "one"))
  records = metrics_lib.read_metrics(str(tmp_path / "many"))
  for name in ("score", "kl_k1", "policy_loss", "value_loss", "response_length"):
    np.testing.assert_allclose([r[name] for r in records], [r[name] for r in ref_records],
                               rtol=1e-4, atol=1e-5, err_msg=name)
  got, expected = params_of(got), params_of(expected)
  for model in ("policy", "value"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
                 got[model].params, expected[model].params)


def test_no_eos_handling_maps_from_the_config():
  config = load_config("ppo", "tiny")
  assert driver._ppo_config(config).no_eos_score == -1.0
  config.ppo.penalize_no_eos = False
  assert driver._ppo_config(config).no_eos_score is None
  assert driver._ppo_config(config).temperature == config.sampling.temperature


def test_shared_value_head_trains_and_resumes(sources, tfds_dir, tmp_path):
  def config(**train):
    c = ppo_config(sources, tfds_dir, num_steps=2, **train)
    c.ppo.shared_value_head = True
    return c
  full = driver.train_ppo(config(), str(tmp_path / "a"))
  assert "value" not in full  # No separate critic.
  head = jax.device_get(full["policy"].params["value_head"]["kernel"])
  assert np.any(head != 0.0)  # Initialised at zero, trained through vf_coef * value loss.
  records = metrics_lib.read_metrics(str(tmp_path / "a"))
  assert records[0]["explained_variance"] == 0.0 and np.isfinite(records[1]["value_loss"])
  driver.train_ppo(config(stop_at_step=1), str(tmp_path / "b"))
  resumed = driver.train_ppo(config(), str(tmp_path / "b"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(full["policy"]), jax.device_get(resumed["policy"]))


def test_fsdp_ptx_preset_runs_with_every_model_sharded(sources, tfds_dir, tmp_path):
  """configs/ppo.py:fsdp_ptx, shrunk to CPU sizes: the four models FSDP-sharded over the 8
  devices, fixed beta 0.02, PPO-ptx; its empty pretraining file is a clear error."""
  config = ppo_config(sources, tfds_dir, "fsdp_ptx", num_steps=2)
  assert tuple(config.mesh.shape) == (1, -1, 1) and config.train.global_batch_size == 512
  config.ptx.length = 64
  with pytest.raises(ValueError, match="config.ptx.train_file is empty"):
    driver.train_ppo(config, str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
  config.ptx.train_file = load_config("ppo", "tiny_ptx").ptx.train_file
  config.data.prompt_length = 32
  config.train.global_batch_size = 16
  config.ptx.batch_size = 8
  state = driver.train_ppo(config, str(tmp_path / "run"))
  for model in ("policy", "value"):
    for leaf in jax.tree.leaves(state[model].params):
      if leaf.ndim >= 2 and leaf.size >= 64 * 64:  # Every matrix is split over 'fsdp'.
        assert not leaf.is_fully_replicated and "fsdp" in str(leaf.sharding.spec), model
  records = metrics_lib.read_metrics(str(tmp_path / "run"))
  np.testing.assert_allclose([r["beta"] for r in records], [0.02, 0.02], rtol=1e-6)
  assert all(np.isfinite(r["ptx_loss"]) and np.isfinite(r["policy_loss"]) for r in records)
