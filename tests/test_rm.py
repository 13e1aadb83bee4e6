"""The reward-model stage end to end: SFT handoff, learning, normalisation, meshes."""

import json
import random

import flax.linen as nn
import jax
import numpy as np
import pytest

from instruct import checkpoint as ckpt_lib
from instruct import data as data_lib
from instruct import metrics as metrics_lib
from instruct import sharding as shd
from instruct import trainer
from instruct.reward import RewardModel
from tests.test_rm_objectives import make_comparison_batch
from tests.test_sharding import load_config

NOUNS = "cat dog bird fish tree river stone cloud apple bread lamp door book chair".split()


def write_marker_word_comparisons(path, num, seed):
  """A preference a tiny model can learn: more occurrences of ' star' is better.

  K varies in {2, 3, 4}; responses are shuffled nouns plus 0-3 copies of the marker.
  """
  rng = random.Random(seed)
  with open(path, "w") as f:
    for _ in range(num):
      k = rng.choice([2, 3, 4])
      counts = rng.sample(range(4), k)
      responses = []
      for c in counts:
        words = [rng.choice(NOUNS) for _ in range(rng.randint(3, 6))] + ["star"] * c
        rng.shuffle(words)
        responses.append(" " + " ".join(words))
      ranking = sorted(range(k), key=lambda i: -counts[i])
      f.write(
          json.dumps({"prompt": "Say some words:", "responses": responses, "ranking": ranking})
          + "\n")


def rm_config(tfds_dir, sft_dir, data_dir=None, **train):
  config = load_config("rm", "tiny")
  config.data.tfds_dir = tfds_dir
  config.init_from = sft_dir
  if data_dir is not None:
    config.data.train_file = str(data_dir / "train.jsonl")
    config.data.validation_file = str(data_dir / "validation.jsonl")
  config.train.update(train)
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tfds_dir):
  """A short SFT run and a reward model trained from it on the marker-word preference."""
  root = tmp_path_factory.mktemp("rm_runs")
  write_marker_word_comparisons(root / "train.jsonl", 512, seed=0)
  write_marker_word_comparisons(root / "validation.jsonl", 128, seed=1)
  sft_config = load_config("sft", "tiny")
  sft_config.data.tfds_dir = tfds_dir
  sft_config.train.update(num_steps=30, eval_every=0)
  sft_state = trainer.train_and_evaluate(sft_config, str(root / "sft"))
  # Two epochs of the 512 comparisons (the config's default is one epoch): the second
  # evaluation shows the accuracy and margin still moving.
  rm_state = trainer.train_and_evaluate(
      rm_config(tfds_dir, str(root / "sft"), root, num_steps=64, eval_every=32), str(root / "rm"))
  return {
      "root": root, "sft_params": jax.device_get(sft_state.params),
      "rm_params": jax.device_get(rm_state.params)
  }


def test_reward_model_starts_from_the_sft_backbone_with_a_new_scalar_head(runs, tfds_dir, tmp_path):
  config = rm_config(tfds_dir, str(runs["root"] / "sft"), num_steps=1, eval_every=0)
  config.optimizer.learning_rate = 0.0
  state = trainer.train_and_evaluate(config, str(tmp_path))
  params = jax.device_get(state.params)
  sft = runs["sft_params"]
  assert set(params) == set(sft) | {"scalar_head"}
  for name in sft:
    jax.tree.map(np.testing.assert_array_equal, params[name], sft[name])
  kernel = params["scalar_head"]["kernel"]
  assert kernel.shape == (64, 1)
  assert np.all(params["scalar_head"]["bias"] == 0.0)
  # N(0, 1/sqrt(d+1)) over 64 draws: the sample std is within 35% of 1/sqrt(65) w.h.p.
  # Measured 2026-11-28, init seeds 0-4, AVX-512 and AVX2 (identical): 1.3%-20% (2.3% at 0).
  assert abs(np.std(kernel) * np.sqrt(65) - 1.0) < 0.35


def test_validation_accuracy_rises_well_above_chance(runs):
  records = metrics_lib.read_metrics(str(runs["root"] / "rm"))
  evals = [r for r in records if "val_accuracy" in r]
  assert [r["step"] for r in evals] == [32, 64]
  final = evals[-1]
  # Measured 2026-11-28, seeds 0-4 (config seed and data seeds), AVX-512 and AVX2: val_accuracy
  # 0.9975-1.0 at step 32 and 1.0 at step 64; val_margin 6.2-9.5 -> 7.4-9.8 (rise +0.25 to
  # +1.7); loss 0.50-0.66 -> 0.002-0.011. The two ISAs differ by < 1e-5 in each.
  assert evals[0]["val_accuracy"] > 0.8 and final["val_accuracy"] > 0.9, evals
  for k in (2, 3, 4):
    assert f"val_accuracy_k{k}" in final
  assert len(final["calibration_count"]) == 10
  assert sum(final["calibration_count"]) > 0
  assert final["val_margin"] > evals[0]["val_margin"] > 0
  train = [r for r in records if "loss" in r]
  assert train[-1]["loss"] < train[0]["loss"]


def test_normalisation_makes_demonstrations_score_mean_zero(runs, tfds_dir):
  reward_model = RewardModel.load(str(runs["root"] / "rm"))
  assert reward_model.step == 64 and reward_model.gain == 1.0 and reward_model.bias != 0.0
  config = load_config("rm", "tiny")
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  batches = data_lib.make_batches("demonstrations", {"train": config.rm.normalization_file},
                                  "train", tokenizer, global_batch_size=64, buckets=(64,), seed=0,
                                  shuffle=False, repeat=False, data_dir=tfds_dir)
  scores, raw = [], []
  for batch in batches:
    real = batch["attention_mask"].sum(axis=1) > 0
    scores.append(np.asarray(reward_model.score(batch["tokens"], batch["attention_mask"]))[real])
    raw.append(np.asarray(reward_model.raw_score(batch["tokens"], batch["attention_mask"]))[real])
  assert len(np.concatenate(scores)) == 512
  np.testing.assert_allclose(np.mean(np.concatenate(scores)), 0.0, atol=1e-3)
  # The bias did something. Measured 2026-11-28, seeds 0-4, AVX-512 and AVX2: |bias| 0.056-5.3
  # (1.75 at seed 0); the ISAs differ by <= 3.2e-3 (likely the shift-only biases: rounding noise
  # amplified by Adam, see test_rm_step_on_mesh_matches_one_device).
  assert abs(np.mean(np.concatenate(raw))) > 1e-3
  extras = ckpt_lib.Checkpointer(str(runs["root"] / "rm")).restore_extras(64)
  assert extras["reward_normalization"]["mode"] == "demonstrations"
  assert extras["reward_normalization"]["num_scored"] == 512


def test_loading_a_non_rm_run_as_reward_model_is_an_error(runs):
  with pytest.raises(ValueError, match="not a reward model"):
    RewardModel.load(str(runs["root"] / "sft"))


def run_rm_steps(mesh_shape, devices, num_steps=2):
  config = load_config("rm", "tiny")
  config.mesh.shape = mesh_shape
  built = trainer.build(config, None, devices)
  with jax.set_mesh(built.mesh):
    state = built.factory.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  losses = []
  with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
    for i in range(num_steps):
      batch = make_comparison_batch(rng, [2, 3, 4, 4] * 4)
      batch = {k: np.asarray(v)[:, :4] for k, v in batch.items()}
      batch = shd.host_batch_to_global(batch, built.batch_sharding)
      state, metrics = built.train_step(state, batch, jax.random.key(i))
      losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params)


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 2, 2)])
def test_rm_step_on_mesh_matches_one_device(mesh_shape):
  ref_losses, ref_params = run_rm_steps((1, 1, 1), jax.devices()[:1])
  losses, params = run_rm_steps(mesh_shape, jax.devices())
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  # The pairwise loss is invariant to adding a constant to every reward, so the parameters
  # that only shift all rewards (the scalar head's bias, and the final norm's bias, which adds
  # w . b) have an exactly zero gradient; Adam turns float rounding noise into an update that
  # differs between meshes. They must stay negligible; everything else must match.
  # Measured 2026-11-28, init/data seeds 0-4, AVX-512 and AVX2: shift-only biases at most
  # 2.2e-5 (seed 1 under AVX2; <= 8e-6 under AVX-512), far from the 2.5e-4 a real gradient
  # would move them in these two warmup steps; the losses use <= 1% of rtol, the other
  # parameters <= 28% of the tolerance below.
  for tree in (params, ref_params):
    for shift_only in (tree["scalar_head"].pop("bias"), tree["final_norm"].pop("bias")):
      assert np.all(np.abs(shift_only) < 1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params,
               ref_params)


def test_policy_samples_normalisation_end_to_end(runs, tfds_dir, tmp_path):
  """normalization='policy_samples': the RM run scores a file of policy samples after training
  and stores gain and bias so that, through `RewardModel.score`, those samples score mean 0
  and standard deviation 1 (Ziegler et al. 2019)."""
  rng = random.Random(3)
  samples = tmp_path / "samples.jsonl"
  with open(samples, "w") as f:
    for _ in range(96):
      words = [rng.choice(NOUNS) for _ in range(rng.randint(3, 6))] + ["star"] * rng.randint(0, 3)
      rng.shuffle(words)
      f.write(json.dumps({"prompt": "Say some words:", "completion": " " + " ".join(words)}) + "\n")
  config = rm_config(tfds_dir, str(runs["root"] / "sft"), runs["root"], num_steps=8, eval_every=0)
  config.rm.normalization = "policy_samples"
  config.rm.normalization_file = str(samples)
  trainer.train_and_evaluate(config, str(tmp_path / "rm"))
  reward_model = RewardModel.load(str(tmp_path / "rm"))
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  batches = data_lib.make_batches("demonstrations", {"train": str(samples)}, "train", tokenizer,
                                  global_batch_size=32, buckets=(64,), seed=0, shuffle=False,
                                  repeat=False, data_dir=tfds_dir)
  scores, raw = [], []
  for batch in batches:
    real = batch["attention_mask"].sum(axis=1) > 0
    scores.append(np.asarray(reward_model.score(batch["tokens"], batch["attention_mask"]))[real])
    raw.append(np.asarray(reward_model.raw_score(batch["tokens"], batch["attention_mask"]))[real])
  scores, raw = np.concatenate(scores), np.concatenate(raw)
  assert scores.size == 96
  np.testing.assert_allclose([scores.mean(), scores.std()], [0.0, 1.0], atol=1e-3)
  assert abs(raw.std() - 1.0) > 0.05 and reward_model.gain != 1.0  # Not true by accident.
  extras = ckpt_lib.Checkpointer(str(tmp_path / "rm")).restore_extras(8)
  assert extras["reward_normalization"]["mode"] == "policy_samples"
  assert extras["reward_normalization"]["num_scored"] == 96
