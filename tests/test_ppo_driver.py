"""The RL stage with PPO end to end: SFT -> RM -> PPO(-ptx), metrics, resume, errors."""

import jax
import numpy as np
import pytest

from instruct import data as data_lib
from instruct import metrics as metrics_lib
from instruct import run as run_lib
from instruct import trainer
from instruct.rl import algo
from instruct.rl import driver
from instruct.rl import ppo as ppo_lib
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
  return jax.device_get({"policy": state["policy"], "value": state["value"], "kl": state["kl"]})


def test_ppo_writes_every_metric_and_resumes_exactly(sources, tfds_dir, tmp_path):
  full = driver.train(ppo_config(sources, tfds_dir), str(tmp_path / "a"))
  records = metrics_lib.read_metrics(str(tmp_path / "a"))
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for name in ("score", "score_raw", "score_normalised", "kl_k1", "kl_k3", "beta", "entropy",
               "clip_fraction", "approx_kl", "value_loss", "explained_variance", "response_length",
               "eos_fraction", "rollout_seconds", "scoring_seconds", "update_seconds",
               "policy_loss"):
    assert all(np.isfinite(r[name]) for r in records), name
  assert all(r["first_ratio_error"] <= 1e-6 for r in records)
  assert records[0]["kl_k1"] == 0.0  # The policy starts as the reference.
  # Adaptive KL controller: beta moves by the clipped error times n_steps / horizon.
  config = ppo_config(sources, tfds_dir)
  for before, after in zip(records, records[1:]):
    error = np.clip((before["kl_k1"] - config.ppo.kl.target) / config.ppo.kl.target, -0.2, 0.2)
    expected = before["beta"] * (1 + error * config.train.global_batch_size / config.ppo.kl.horizon)
    np.testing.assert_allclose(after["beta"], expected, rtol=1e-5)

  partial = driver.train(ppo_config(sources, tfds_dir, stop_at_step=2), str(tmp_path / "b"))
  assert int(partial["policy"].step) == 2 * 2 * 4  # iterations x epochs x minibatches
  resumed = driver.train(ppo_config(sources, tfds_dir), str(tmp_path / "b"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               params_of(full), params_of(resumed))


def test_ppo_ptx_loss_is_the_policys_pretraining_loss_on_fresh_rows(sources, tfds_dir, tmp_path):
  """PPO-ptx's ptx_loss is the policy's per-token LM loss on the pretraining text: at the
  first iteration it matches the SFT policy's loss on rows of that file (the policy moves
  little in 2 epochs), and every iteration reads epochs x ptx.batch_size fresh rows."""
  config = ppo_config(sources, tfds_dir, "tiny_ptx", num_steps=2)
  driver.train(config, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  sft_loss = _sft_lm_loss(sources, config, tfds_dir)
  # Measured: first-iteration ptx_loss within 2% of the SFT model's loss on other rows of
  # the same file (seed 0, this CPU and with --xla_cpu_max_isa=AVX2); 10% leaves margin for
  # the row sample, not for a wrong normaliser (x 2 per row count) or the wrong model.
  assert abs(records[0]["ptx_loss"] - sft_loss) < 0.1 * sft_loss, (records, sft_loss)
  for r in records:
    np.testing.assert_allclose(r["ptx_gamma_equivalent"],
                               config.ppo.ptx_coef * r["response_length"] * r["advantage_std"],
                               rtol=1e-5)
  # The iteration's pretraining batch: ptx.batch_size fresh rows for each of the epochs.
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  _, ptx = driver.make_data(config, tokenizer, driver.build(config, tokenizer)[1].ptx_rows)
  assert next(ptx)["tokens"].shape == (config.ppo.epochs * config.ptx.batch_size, config.ptx.length)


def _sft_lm_loss(sources, config, tfds_dir):
  """The SFT policy's per-token LM loss on 64 rows of the pretraining file."""
  from instruct import objectives
  sft = run_lib.load_run(str(sources / "sft"))
  model, params = sft.model, sft.params
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  batch = next(
      data_lib.make_batches("text", {"train": config.ptx.train_file}, "train", tokenizer,
                            global_batch_size=64, buckets=(config.ptx.length,), seed=123,
                            shuffle=True, repeat=True, data_dir=tfds_dir))
  logits = model.apply({"params": params}, batch["tokens"], batch["attention_mask"]).logits
  nll, targets, _ = objectives.masked_next_token_loss(logits, batch["tokens"], batch["loss_mask"])
  return float(nll / targets)


def test_k3_estimator_drives_the_adaptive_controller(sources, tfds_dir, tmp_path, monkeypatch):
  """kl_estimator='k3': the controller steps on the k3 estimate of each iteration, not k1's,
  and beta follows the controller's formula."""
  observed = []
  update = algo.update_kl_controller

  def spy(state, observed_kl, *args):
    observed.append(float(observed_kl))
    return update(state, observed_kl, *args)

  monkeypatch.setattr(algo, "update_kl_controller", spy)
  config = ppo_config(sources, tfds_dir, num_steps=4)
  config.ppo.kl_estimator = "k3"
  config.ppo.kl.horizon = 40  # A step the test can see: n_steps / horizon = 16 / 40.
  driver.train(config, str(tmp_path))
  records = metrics_lib.read_metrics(str(tmp_path))
  np.testing.assert_allclose(observed, [r["kl_k3"] for r in records], rtol=1e-6)
  # k1 differs from k3 after the first iteration, so feeding k1 would fail the check above.
  assert max(
      abs(r["kl_k1"] - r["kl_k3"]) for r in records[1:]) > 1e-4 * max(r["kl_k3"] for r in records)
  step = config.train.global_batch_size / config.ppo.kl.horizon
  for before, after in zip(records, records[1:]):
    error = np.clip((before["kl_k3"] - config.ppo.kl.target) / config.ppo.kl.target, -0.2, 0.2)
    np.testing.assert_allclose(after["beta"], before["beta"] * (1 + error * step), rtol=1e-5)


@pytest.fixture(scope="module")
def two_iterations(sources, tfds_dir, tmp_path_factory):
  """Two PPO iterations: (workdir, final state, the frozen models as loaded and after)."""
  seen = {}
  load_frozen = driver.load_frozen

  def spy(*args):
    seen["frozen"] = load_frozen(*args)
    seen["before"] = jax.device_get(seen["frozen"])
    return seen["frozen"]

  workdir = tmp_path_factory.mktemp("two_iterations")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(driver, "load_frozen", spy)
    state = driver.train(ppo_config(sources, tfds_dir, num_steps=2), str(workdir))
  seen["after"] = jax.device_get(seen["frozen"])
  return workdir, state, seen


def test_reference_and_reward_model_stay_frozen(sources, two_iterations):
  """After PPO iterations the frozen reference and reward model are the SFT and RM runs'
  parameters, bit for bit, and still alive (not donated to the update)."""
  _, state, seen = two_iterations
  seen = dict(seen, policy=jax.device_get(state["policy"].params))
  equal = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(equal, seen["before"], seen["after"])
  shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  for name, run in (("reference", "sft"), ("reward", "rm")):
    on_disk = run_lib.load_run(str(sources / run), abstract=shapes(seen["before"][name]))
    jax.tree.map(equal, seen["after"][name], jax.device_get(on_disk.params))
  # The policy did move, so the reference staying put is not the update doing nothing.
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), seen["policy"],
                       seen["after"]["reference"])
  assert max(jax.tree.leaves(moved)) > 0


def test_critic_starts_at_the_normalised_reward_model(sources, tfds_dir, tmp_path):
  """The critic's first values are the RM's normalised scores (folded gain and bias)."""
  config = ppo_config(sources, tfds_dir, num_steps=1)
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  roles, algorithm, _ = driver.build(config, tokenizer)
  frozen = driver.load_frozen(roles, config.policy_from, config.reward_from)
  with jax.set_mesh(roles.mesh):
    state = algorithm.init_state(frozen)
  tokens = np.tile(np.arange(2, 18, dtype=np.int32), (8, 1))
  mask = np.ones_like(tokens)
  critic = roles.critic.model.apply({"params": state["value"].params}, tokens, mask).values
  raw = roles.reward.model.apply({"params": frozen["reward"]}, tokens, mask).values
  gain, bias = float(frozen["reward_gain"]), float(frozen["reward_bias"])
  assert bias != 0.0
  np.testing.assert_allclose(critic, gain * raw + bias, rtol=1e-5, atol=1e-5)


def test_ppo_needs_its_source_runs(sources, tfds_dir, tmp_path):
  config = ppo_config(sources, tfds_dir)
  config.reward_from = ""
  with pytest.raises(ValueError, match="config.reward_from is empty"):
    driver.train(config, str(tmp_path))
  config.reward_from = str(sources / "sft")
  with pytest.raises(ValueError, match="not a reward-model run"):
    driver.train(config, str(tmp_path))


@pytest.fixture(scope="module")
def one_device_run(sources, tfds_dir, tmp_path_factory):
  """Two PPO iterations on one device: (workdir, final state)."""
  one = ppo_config(sources, tfds_dir, num_steps=2)
  one.mesh.shape = (1, 1, 1)
  workdir = tmp_path_factory.mktemp("one_device")
  return workdir, driver.train(one, str(workdir), devices=jax.devices()[:1])


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2)])  # Data, FSDP and tensor parallel at once.
def test_ppo_iterations_on_a_mesh_match_one_device(sources, tfds_dir, tmp_path, mesh_shape,
                                                   one_device_run):
  one_dir, expected = one_device_run
  many = ppo_config(sources, tfds_dir, num_steps=2)
  many.mesh.shape = mesh_shape
  got = driver.train(many, str(tmp_path / "many"))
  ref_records = metrics_lib.read_metrics(str(one_dir))
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
  assert ppo_lib.ppo_config(config).no_eos_score == -1.0
  config.ppo.penalize_no_eos = False
  assert ppo_lib.ppo_config(config).no_eos_score is None
  assert ppo_lib.ppo_config(config).temperature == config.sampling.temperature


def test_shared_value_head_trains_and_resumes(sources, tfds_dir, tmp_path):

  def config(**train):
    c = ppo_config(sources, tfds_dir, num_steps=2, **train)
    c.ppo.shared_value_head = True
    return c

  full = driver.train(config(), str(tmp_path / "a"))
  assert "value" not in full  # No separate critic.
  head = jax.device_get(full["policy"].params["value_head"]["kernel"])
  assert np.any(head != 0.0)  # Initialised at zero, trained through vf_coef * value loss.
  records = metrics_lib.read_metrics(str(tmp_path / "a"))
  assert records[0]["explained_variance"] == 0.0 and np.isfinite(records[1]["value_loss"])
  driver.train(config(stop_at_step=1), str(tmp_path / "b"))
  resumed = driver.train(config(), str(tmp_path / "b"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               jax.device_get(full["policy"]), jax.device_get(resumed["policy"]))


def test_fsdp_ptx_preset_runs_with_every_model_sharded(sources, tfds_dir, tmp_path):
  """configs/ppo.py:fsdp_ptx, shrunk to CPU sizes: the four models FSDP-sharded over the 8
  devices, fixed beta 0.02, PPO-ptx; its empty pretraining file is a clear error."""
  config = ppo_config(sources, tfds_dir, "fsdp_ptx", num_steps=2)
  assert tuple(config.mesh.shape) == (1, -1, 1) and config.train.global_batch_size == 512
  config.ptx.length = 64
  config.data.prompt_length = 32  # The preset's 512 exceeds the tiny policy's positions.
  with pytest.raises(ValueError, match="config.ptx.train_file is empty"):
    driver.train(config, str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
  config.ptx.train_file = load_config("ppo", "tiny_ptx").ptx.train_file
  config.train.global_batch_size = 16
  config.ptx.batch_size = 8
  state = driver.train(config, str(tmp_path / "run"))
  for model in ("policy", "value"):
    for leaf in jax.tree.leaves(state[model].params):
      if leaf.ndim >= 2 and leaf.size >= 64 * 64:  # Every matrix is split over 'fsdp'.
        assert not leaf.is_fully_replicated and "fsdp" in str(leaf.sharding.spec), model
  records = metrics_lib.read_metrics(str(tmp_path / "run"))
  np.testing.assert_allclose([r["beta"] for r in records], [0.02, 0.02], rtol=1e-6)
  assert all(np.isfinite(r["ptx_loss"]) and np.isfinite(r["policy_loss"]) for r in records)


def test_the_run_layer_reads_every_stage_the_same_way(sources, two_iterations, tmp_path):
  """`load_run` of an RL run is its policy (the SFT run's architecture, parameters under
  `policy`), of an RM run its scalar-head model with the stored normalisation; a reward model
  loaded by `RewardModel` and by the RL roles agree."""
  from instruct.reward import RewardModel
  workdir, state, _ = two_iterations
  rl = run_lib.load_run(str(workdir))
  sft = run_lib.describe(str(sources / "sft"))
  assert rl.stage.name == "rl" and rl.model.head == "lm" and rl.step == 2
  assert rl.model_config == sft.model_config
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), rl.params,
               jax.device_get(state["policy"].params))
  rm = run_lib.load_run(str(sources / "rm"))
  assert rm.model.head == "scalar" and "scalar_head" in rm.params
  gain, bias = run_lib.reward_normalization(rm)
  loaded = RewardModel.load(str(sources / "rm"))
  assert (loaded.gain, loaded.bias) == (gain, bias) and bias != 0.0
  with pytest.raises(ValueError, match="not a reward model"):
    run_lib.reward_normalization(rl, "config.reward_from")
  with pytest.raises(FileNotFoundError, match=r"config\.init_from='.*nowhere' is not a run"):
    run_lib.load_run(str(tmp_path / "nowhere"), what="config.init_from")


def test_best_of_n_scores_every_sample_and_reports_each_n(sources, tfds_dir, tmp_path):
  """The `best_of_n` stage: n samples per validation prompt from the SFT run, each scored by the
  reward model with its normalisation (checked against `RewardModel.score` of the written
  token ids), and per N the order-statistic estimate and the analytic KL."""
  import json
  from instruct import reward as reward_lib
  from instruct.rl import best_of_n as bon
  from instruct.stages import table
  config = load_config("best_of_n", "tiny")
  config.policy_from, config.reward_from = str(sources / "sft"), str(sources / "rm")
  config.data.tfds_dir = tfds_dir
  config.sampling.max_new_tokens = 8
  config.train.global_batch_size = 4
  config.best_of_n.update(n=4, max_prompts=6)
  results = table.get("best_of_n").run(config, str(tmp_path / "bon"))
  rows = [json.loads(l) for l in open(tmp_path / "bon" / bon.SAMPLES)]
  assert len(rows) == results["prompts"] == 6 and results["sizes"] == [1, 2, 4]
  assert all(len(r["scores"]) == len(r["responses"]) == 4 for r in rows)
  scores = np.asarray([r["scores"] for r in rows])
  assert results["score"][0] == pytest.approx(scores.mean())
  assert results["score"][-1] == pytest.approx(scores.max(axis=1).mean())
  assert np.all(np.diff(results["score"]) >= 0) and results["score"][-1] > results["score"][0]
  assert results["kl"] == [bon.analytic_kl(k) for k in (1, 2, 4)]
  # The scores are the reward model's, normalised, on the prompt and the sampled ids.
  tokenizer = data_lib.load_tokenizer(config.data.tokenizer)
  rm = reward_lib.RewardModel.load(str(sources / "rm"))
  for r in rows[:2]:
    prompt = tokenizer.encode(r["prompt"], add_special_tokens=False)
    for ids, ended, score in zip(r["response_ids"], r["ended"], r["scores"]):
      tokens = np.asarray([prompt + ids], np.int32)
      expected = float(rm.score(tokens, np.ones_like(tokens))[0]) if ended else -1.0
      assert score == pytest.approx(expected, abs=1e-4)
  records = metrics_lib.read_metrics(str(tmp_path / "bon"))
  assert [r["step"] for r in records] == [1, 2, 4]
  config.best_of_n.n = 0
  with pytest.raises(ValueError, match="config.best_of_n.n=0"):
    table.get("best_of_n").run(config, str(tmp_path / "bad"))
