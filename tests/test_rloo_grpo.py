"""RLOO and GRPO: group baselines against numpy loops, the KL variants by hand, learning on a
toy reward, and the RL driver end to end (resume, mesh, config errors)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from instruct import loop as loop_lib
from instruct import metrics as metrics_lib
from instruct.model import ModelConfig, Transformer, preset
from instruct.rl import algo
from instruct.rl import algorithms
from instruct.rl import config as rl_config_lib
from instruct.rl import driver
from instruct.rl import group
from instruct.rl.sampler import SamplingConfig, make_sampler
from instruct.state import TrainState
from tests.test_ppo import EOS, PAD, CountReward, prompts, toy_scores
from tests.test_sharding import load_config

K = 4  # Samples per prompt in the toy.
NEW_TOKENS = 8
# One layer of the tiny preset's width: these tests' programs compile in about half the time.
ARCH = dict(preset("tiny"), num_layers=1)

POLICY = Transformer(ModelConfig(**ARCH))
OPTIMIZER = optax.adam(3e-3)


@functools.lru_cache(maxsize=None)
def sampler_at(temperature: float):
  """The toy policy's jitted sampler (one per temperature, shared by every setting)."""
  return jax.jit(make_sampler(POLICY, SamplingConfig(NEW_TOKENS, EOS, PAD,
                                                     temperature=temperature)))


@functools.lru_cache(maxsize=None)
def toy(temperature: float = 1.0, sample_temperature: float = None, **options):
  """The toy problem of tests/test_ppo.py (a tiny policy, the CountReward 'reward model')
  for a critic-free setting: (policy model, optimizer, jitted sampler / experience / update).
  `sample_temperature` (default: `temperature`) is the sampler's, `temperature` the scorer's."""
  settings = dict(samples_per_prompt=K, no_eos_score=None, temperature=temperature)
  gcfg = group.GroupConfig(**dict(settings, **options))
  experience = jax.jit(group.make_experience_fn(POLICY, CountReward(), gcfg))
  update = jax.jit(group.make_update_fn(POLICY, OPTIMIZER, gcfg))
  sampler = sampler_at(temperature if sample_temperature is None else sample_temperature)
  return POLICY, OPTIMIZER, sampler, experience, update


def random_params(model, seed):
  """Parameters of `model` drawn with numpy (norm scales 1, biases 0, other weights N(0, 0.1^2)):
  a random network like a fresh init's, without compiling one."""
  rng = np.random.default_rng(seed)
  shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), prompts(0)[0]))["params"]

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(x.shape, x.dtype)
    if name.endswith("['bias']"):
      return np.zeros(x.shape, x.dtype)
    return rng.normal(0.0, 0.1, x.shape).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.lru_cache(maxsize=None)
def start(seed=0):
  """The toy policy's TrainState with `random_params` of `seed` (never donated)."""
  params = jax.device_put(random_params(POLICY, seed))
  return TrainState(jnp.zeros((), jnp.int32), params, OPTIMIZER.init(params))


def frozen(policy, reference):
  return {
      "policy": policy.params, "reference": reference, "reward": {}, "reward_gain": 1.0,
      "reward_bias": 0.0
  }


def group_prompts(seed, num_prompts=8):
  """`num_prompts` toy prompts, each repeated K times in a row (as the driver does)."""
  pt, pm = prompts(seed, batch=num_prompts)
  return jnp.repeat(pt, K, axis=0), jnp.repeat(pm, K, axis=0)


def run(iterations, seed=0, beta=0.05, num_prompts=8, **setting):
  """Toy iterations from a random policy (its own reference); the metrics of each."""
  *_, sampler, experience, update = toy(**setting)
  policy = start(seed)
  reference = policy.params
  history = []
  for i in range(iterations):
    pt, pm = group_prompts(seed * 1000 + i, num_prompts)
    samples = sampler(policy.params, pt, pm, jax.random.key(seed * 1000 + 100 + i))
    exp, metrics = experience(frozen(policy, reference), samples, pt, pm, beta)
    policy, update_metrics = update(policy, exp, {}, jax.random.key(seed * 1000 + 500 + i), beta)
    history.append(jax.device_get(dict(metrics, **update_metrics)))
  return history, policy


def truncated(samples, seed):
  """`samples` with each row's response cut after a random 1..r tokens, as if it had emitted
  EOS there (the tokens after stay, masked out: they must not count anywhere), and
  `ended_with_eos` on alternate rows, so masked tokens and rows without EOS both occur."""
  rng = np.random.default_rng(seed)
  b, r = samples.response_mask.shape
  lengths = rng.integers(1, r + 1, size=b)
  mask = (np.arange(r)[None] < lengths[:, None]).astype(np.int32)
  return samples.replace(response_mask=jnp.asarray(mask),
                         ended_with_eos=jnp.asarray(np.arange(b) % 2 == 0))


# ----------------------------------------------------------------------------- numpy loops


def loop_advantages(rewards, k, kind, eps=1e-4):
  """Each row's advantage from its group, one row at a time."""
  out = np.zeros(len(rewards))
  for i in range(len(rewards)):
    group_rows = [float(rewards[j]) for j in range(i // k * k, i // k * k + k)]
    own = float(rewards[i])
    if kind == "rloo":
      others = list(group_rows)
      others.remove(own)
      out[i] = own - sum(others) / len(others)
    else:
      mean = sum(group_rows) / k
      std = np.sqrt(sum((x - mean) ** 2 for x in group_rows) / (k - 1))
      out[i] = (own - mean) / (std + eps)
  return out


@pytest.mark.parametrize("kind", ["rloo", "grpo"])
@pytest.mark.parametrize("k", [2, 3, 4])
def test_group_advantages_match_numpy_loops_also_across_devices(kind, k):
  """Random rewards with one group of equal rewards (zero advantage for both methods); on 8
  devices with each group's rows spread over several devices the result is the same."""
  rng = np.random.default_rng(k)
  rewards = rng.normal(size=8 * k).astype(np.float32)
  rewards[k:2 * k] = 0.7
  expected = loop_advantages(rewards, k, kind)
  got = np.asarray(algo.group_advantages(jnp.asarray(rewards), k, kind))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  assert np.all(got[k:2 * k] == 0.0) and np.abs(got).max() > 0.5
  mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  fn = jax.jit(lambda r: algo.group_advantages(r, k, kind), out_shardings=sharding)
  np.testing.assert_allclose(fn(jax.device_put(jnp.asarray(rewards), sharding)), expected,
                             rtol=1e-5, atol=1e-5)


def test_loss_aggregations_hand_computed():
  loss = jnp.array([[1.0, 2.0, 3.0], [4.0, 100.0, 100.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  agg = lambda how: float(algo.aggregate_token_loss(loss, mask, how))
  assert agg("sequence_sum") == pytest.approx((6.0 + 4.0) / 2)
  assert agg("sequence_mean") == pytest.approx((2.0 + 4.0) / 2)
  assert agg("token_mean") == pytest.approx(10.0 / 4)
  with pytest.raises(ValueError, match="loss aggregation"):
    agg("mean")


# ----------------------------------------------------------------------------- KL variants


def test_kl_in_the_reward_moves_the_advantages_by_hand():
  """RLOO, k = 2: scores (1, 0 | 2, 1), summed KL (0.6, 1.0 | 1.0, 0.2), beta 0.5:
  R = (0.7, -0.5 | 1.5, 0.9), A = R_i - R_other = (1.2, -1.2 | 0.6, -0.6); without the KL,
  (1, -1 | 1, -1). GRPO, k = 3: scores (1, 0, 2), summed KL (2, 0, 0): R = (0, 0, 2), mean
  2/3, std sqrt(4/3), so A = (-2/3, -2/3, 4/3) / (sqrt(4/3) + eps); without it (0, -1, 1) /
  (1 + eps). Tokens past the mask (9, 7) hold KL that must not count."""
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]])
  kl = jnp.array([[0.1, 0.2, 0.3], [0.5, 0.5, 9.0], [1.0, 7.0, 7.0], [0.0, 0.0, 0.2]])
  scores = jnp.array([1.0, 0.0, 2.0, 1.0])
  rewards = group.sequence_rewards(scores, kl, mask, 0.5)
  np.testing.assert_allclose(rewards, [0.7, -0.5, 1.5, 0.9], rtol=1e-6)
  np.testing.assert_allclose(algo.group_advantages(rewards, 2, "rloo"), [1.2, -1.2, 0.6, -0.6],
                             rtol=1e-5)
  np.testing.assert_allclose(algo.group_advantages(scores, 2, "rloo"), [1, -1, 1, -1])
  kl3 = jnp.array([[2.0, 0.0], [0.0, 0.0], [0.0, 5.0]])
  mask3 = jnp.array([[1, 1], [1, 1], [1, 0]])
  scores3 = jnp.array([1.0, 0.0, 2.0])
  eps = 1e-4
  np.testing.assert_allclose(
      algo.group_advantages(group.sequence_rewards(scores3, kl3, mask3, 0.5), 3, "grpo", eps),
      np.array([-2 / 3, -2 / 3, 4 / 3]) / (np.sqrt(4 / 3) + eps), rtol=1e-5)
  np.testing.assert_allclose(algo.group_advantages(scores3, 3, "grpo", eps),
                             np.array([0.0, -1.0, 1.0]) / (1 + eps), rtol=1e-5, atol=1e-7)


def test_kl_in_the_loss_by_hand():
  """GRPO's loss term: rows (A = 1, tokens 2) and (A = -2, token 1), logp = old (ratio 1),
  the reference 0.5 nats below on row 0's first token; sequence_mean, beta 0.1:
    surrogate = mean(-1, 2) = 0.5
    k3 = (e^-0.5 - 1 + 0.5) on one token: row means (0.1065306 / 2, 0), mean 0.0266327
    loss = 0.5 + 0.1 * 0.0266327
  and the gradient wrt logp: -A_i / (n_i b) + beta (1 - e^(ref - logp)) / (n_i b). With the KL
  in the reward instead, the loss is the surrogate alone."""
  logp = jnp.array([[-1.0, -2.0], [-0.5, -9.0]])
  ref = jnp.array([[-1.5, -2.0], [-0.5, 3.0]])
  mask = jnp.array([[1, 1], [1, 0]])
  adv = jnp.array([1.0, -2.0])
  k3 = np.exp(-0.5) - 1 + 0.5
  for kl_in, expected in (("loss", 0.5 + 0.1 * k3 / 4), ("reward", 0.5)):
    cfg = group.GroupConfig(kl_in=kl_in, kl_estimator="k3", loss_aggregation="sequence_mean")
    objective = lambda lp: group.policy_objective(lp, jax.lax.stop_gradient(lp), ref, adv, mask,
                                                  0.1, cfg)
    (loss, stats), grad = jax.jit(jax.value_and_grad(objective, has_aux=True))(logp)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    assert ("kl_loss" in stats) == (kl_in == "loss")
    kl_grad = 0.1 * (1 - np.exp(-0.5)) / 4 if kl_in == "loss" else 0.0
    np.testing.assert_allclose(grad, [[-0.25 + kl_grad, -0.25], [1.0, 0.0]], rtol=1e-5, atol=1e-7)


def test_one_epoch_of_one_minibatch_is_reinforce():
  """At ratio 1 with `sequence_sum`, the clipped objective's value is -mean_i A_i n_i and its
  gradient that of REINFORCE's -mean_i A_i sum_t log pi_t: -A_i / b on every real token,
  whatever the clip range; RLOO's config by default."""
  rng = np.random.default_rng(0)
  logp = jnp.asarray(-rng.uniform(0.1, 3.0, size=(6, 5)), jnp.float32)
  mask = jnp.asarray(np.arange(5)[None] < rng.integers(1, 6, size=6)[:, None], jnp.int32)
  adv = jnp.asarray(rng.normal(size=6), jnp.float32)
  cfg = group.GroupConfig(clip_eps=0.01)
  objective = lambda lp: group.policy_objective(lp, jax.lax.stop_gradient(lp), logp, adv, mask, 0.5,
                                                cfg)[0]
  reinforce = lambda lp: -jnp.mean(adv * jnp.sum(lp * mask, axis=1))
  value, grad = jax.jit(jax.value_and_grad(objective))(logp)
  np.testing.assert_allclose(value, -np.mean(adv * np.sum(mask, 1)), rtol=1e-5)
  np.testing.assert_allclose(grad, jax.jit(jax.grad(reinforce))(logp), rtol=1e-6, atol=1e-7)
  defaults = group.default_section("rloo")
  assert (defaults.epochs, defaults.num_minibatches, defaults.loss_aggregation) == (1, 1,
                                                                                    "sequence_sum")


# ----------------------------------------------------------------------------- the experience


def test_rloo_experience_matches_numpy_loops_with_masked_tokens():
  """RLOO's advantages from the experience equal a numpy computation: the toy score of the
  real tokens minus beta times the summed per-token k1 KL (policy vs a different reference;
  the log-probs themselves are checked against numpy in tests/test_ppo.py), then the
  leave-one-out baseline; rows cut short keep tokens past their mask that must not count."""
  _, _, sampler, experience, _ = toy(advantage="rloo")
  policy, other = start(0), start(5)
  pt, pm = group_prompts(1)
  samples = truncated(sampler(policy.params, pt, pm, jax.random.key(7)), seed=1)
  beta = 0.1
  exp, metrics = experience(frozen(policy, other.params), samples, pt, pm, beta)
  mask = np.asarray(samples.response_mask)
  kl = (np.asarray(exp.old_logprobs, np.float64) - np.asarray(exp.ref_logprobs)) * mask
  rewards = toy_scores(pt, pm, samples) - beta * kl.sum(1)
  assert abs(kl.sum(1)).max() > 0.1  # A KL far from 0, so leaving it out would fail.
  np.testing.assert_allclose(exp.advantages, loop_advantages(rewards, K, "rloo"), atol=2e-5)
  np.testing.assert_allclose(metrics["reward"], rewards.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["kl_k1"], kl.sum(1).mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics["group_reward_std"],
                             rewards.reshape(-1, K).std(axis=1, ddof=1).mean(), rtol=1e-4)


def test_grpo_experience_matches_numpy_loops_with_rows_without_eos():
  """GRPO with the KL in the reward and no_eos_score -3: rows without EOS are scored -3 (not by
  the reward model) before the group normalisation."""
  _, _, sampler, experience, _ = toy(advantage="grpo", kl_in="reward", no_eos_score=-3.0)
  policy, other = start(0), start(5)
  pt, pm = group_prompts(2)
  samples = truncated(sampler(policy.params, pt, pm, jax.random.key(8)), seed=2)
  beta = 0.1
  exp, metrics = experience(frozen(policy, other.params), samples, pt, pm, beta)
  mask = np.asarray(samples.response_mask)
  kl = (np.asarray(exp.old_logprobs, np.float64) - np.asarray(exp.ref_logprobs)) * mask
  ended = np.asarray(samples.ended_with_eos)
  scores = np.where(ended, toy_scores(pt, pm, samples), -3.0)
  rewards = scores - beta * kl.sum(1)
  np.testing.assert_allclose(exp.advantages, loop_advantages(rewards, K, "grpo"), atol=1e-4)
  np.testing.assert_allclose(metrics["score"], scores.mean(), rtol=1e-5)


# ----------------------------------------------------------------------------- learning

SETTINGS = {
    "rloo": dict(advantage="rloo"),  # REINFORCE with the leave-one-out baseline, KL in R.
    "grpo": dict(advantage="grpo", kl_in="loss", kl_estimator="k3",
                 loss_aggregation="sequence_mean", epochs=2, num_minibatches=2),
}
BETAS = {"rloo": 0.05, "grpo": 0.04}  # The configs' defaults.


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_reward_rises_and_the_kl_penalty_holds_the_policy_near_the_reference(name):
  """30 toy iterations of 8 prompts x 4 samples from a random policy, at the default beta and
  at 10x it. Margins measured on a 2-core AMD EPYC (AVX-512) and with
  XLA_FLAGS=--xla_cpu_max_isa=AVX2 (the same to 1e-6), seeds 0-4 (this test runs seed 0):
    rise of the score, last 5 minus first 5 iterations: RLOO 5.56-6.65, GRPO 5.78-6.31
      (10x beta: 1.50-2.06 and 1.26-1.76);
    final k1 KL (last 5): RLOO 22.8-39.3 nats, GRPO 22.2-29.5 (10x beta: 3.42-4.38 and
      3.84-4.65, 0.09-0.17 and 0.14-0.19 of the default beta's); any iteration's KL at 10x
      beta: at most 4.91 and 5.37.
  The sampler / scorer consistency of every iteration: log-probs <= 2.9e-6 apart, the first
  ratio <= 9.6e-7 from 1 (the bound 1e-5 leaves 3x)."""
  weak, _ = run(30, beta=BETAS[name], **SETTINGS[name])
  strong, _ = run(30, beta=10 * BETAS[name], **SETTINGS[name])
  rise = lambda h: np.mean([r["score"] for r in h[-5:]]) - np.mean([r["score"] for r in h[:5]])
  final_kl = lambda h: np.mean([r["kl_k1"] for r in h[-5:]])
  assert rise(weak) > 2.5 and rise(strong) > 0.5, (rise(weak), rise(strong))
  # The KL penalty (in the reward for RLOO, in the loss for GRPO) holds the policy back.
  assert final_kl(strong) < 0.5 * final_kl(weak), (final_kl(strong), final_kl(weak))
  assert max(r["kl_k1"] for r in strong) < 8.0 and final_kl(weak) < 60.0
  for r in weak + strong:
    assert r["consistency/logprob_abs_diff_max"] <= 1e-5, r
    assert r["consistency/first_ratio_max_dev"] <= 1e-5, r


# ----------------------------------------------------------------------------- the RL driver


def write_run(workdir, config, params, extras=None):
  """A finished run of `config` holding `params` at step `num_steps`, written through the run
  layer's own checkpointer (what a training run leaves), without training."""
  checkpointer, writer = loop_lib.open_run(workdir, config)
  try:
    checkpointer.save(config.train.num_steps, {"params": params}, extras or {})
  finally:
    checkpointer.close()
    writer.close()


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """An SFT run and a reward-model run (stored normalisation gain 0.8, bias -0.3) of `ARCH`
  with random parameters: the driver tests check the RL mechanics (the random
  reward model's scores differ between responses, so advantages are not 0), which need no
  trained sources; learning is tested on the toy above."""
  root = tmp_path_factory.mktemp("group_sources")
  for name, seed, extras in (("sft", 0, None),
                             ("rm", 1, {"reward_normalization": {"gain": 0.8, "bias": -0.3}})):
    config = load_config(name, "tiny")
    config.train.num_steps = 1
    config.model.update(ARCH)
    head = "lm" if name == "sft" else "scalar"
    params = random_params(Transformer(ModelConfig.from_dict(config.model), head=head), seed)
    write_run(str(root / name), config, params, extras)
  return root


def grpo_config(sources, tfds_dir, **train):
  """GRPO-ptx (`configs/grpo.py:tiny_ptx`) with the KL in the loss, 4 prompts x 4 responses
  in 2 minibatches: on 8 devices, 2 rows per device, so every group spans 2 devices."""
  config = load_config("grpo", "tiny_ptx")
  config.policy_from, config.reward_from = str(sources / "sft"), str(sources / "rm")
  config.data.tfds_dir = tfds_dir
  config.sampling.max_new_tokens = 8
  config.grpo.update(num_minibatches=2, penalize_no_eos=False)  # Random sources rarely end.
  config.train.update(dict(num_steps=2, checkpoint_every=2, global_batch_size=4), **train)
  return config


def tree_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def grpo_run(sources, tfds_dir, tmp_path_factory):
  """Two GRPO-ptx iterations on the 8 devices: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("grpo_run")
  return workdir, driver.train(grpo_config(sources, tfds_dir), str(workdir))


def test_grpo_writes_every_metric_in_every_record(grpo_run):
  workdir, state = grpo_run
  assert set(state) == {"policy", "kl"}  # No critic.
  assert int(state["policy"].step) == 2 * 2  # iterations x minibatches
  records = metrics_lib.read_metrics(str(workdir))
  assert [r["step"] for r in records] == [1, 2]
  for name in ("score", "score_raw", "score_normalised", "kl_k1", "kl_k3", "beta", "reward",
               "entropy", "advantage_std", "group_reward_std", "zero_std_group_fraction",
               "policy_loss", "kl_loss", "ptx_loss", "clip_fraction", "policy_grad_norm",
               "response_length", "eos_fraction", "rollout_seconds", "update_seconds"):
    assert all(np.isfinite(r[name]) for r in records), name
  for r in records:  # Measured: at most 1e-6 (log-probs) and 5e-7 (ratio) here.
    assert r["consistency/logprob_abs_diff_max"] <= 1e-5, r
    assert r["consistency/logprob_abs_diff_mean"] <= r["consistency/logprob_abs_diff_max"]
    assert r["consistency/first_ratio_max_dev"] <= 1e-5, r
    assert r["consistency/first_ratio_std"] <= 1e-5, r
  assert records[0]["kl_k1"] == 0.0  # The first rollout is the reference's.
  assert records[1]["kl_k1"] != 0.0 and records[0]["advantage_std"] > 0.5  # It learned.
  np.testing.assert_allclose([r["beta"] for r in records], [0.04, 0.04], rtol=1e-6)


def test_grpo_resumes_exactly(sources, tfds_dir, tmp_path, grpo_run):
  workdir, full = grpo_run
  driver.train(grpo_config(sources, tfds_dir, stop_at_step=1), str(tmp_path))
  resumed = driver.train(grpo_config(sources, tfds_dir), str(tmp_path))
  tree_equal(jax.device_get(full), jax.device_get(resumed))
  loss = lambda w: [r["policy_loss"] for r in metrics_lib.read_metrics(str(w))]
  assert loss(tmp_path) == loss(workdir)


def test_grpo_on_8_devices_matches_one_device(sources, tfds_dir, tmp_path, grpo_run):
  """Groups spanning devices: the [prompts, k] statistics are those of one device."""
  workdir, got = grpo_run
  one = grpo_config(sources, tfds_dir)
  one.mesh.shape = (1, 1, 1)
  expected = driver.train(one, str(tmp_path), devices=jax.devices()[:1])
  ref_records = metrics_lib.read_metrics(str(tmp_path))
  records = metrics_lib.read_metrics(str(workdir))
  for name in ("score", "kl_k1", "policy_loss", "advantage_std", "response_length", "ptx_loss"):
    np.testing.assert_allclose([r[name] for r in records], [r[name] for r in ref_records],
                               rtol=1e-4, atol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               jax.device_get(got["policy"].params), jax.device_get(expected["policy"].params))


def test_rloo_resumes_exactly_and_on_8_devices_matches_one_device(sources, tfds_dir, tmp_path):
  """RLOO-ptx (`configs/rloo.py:tiny_ptx`, REINFORCE with the leave-one-out baseline and the KL
  in the reward) through the driver: a stopped and resumed run is the straight run bit for
  bit, and the 8-device run is the one-device run."""

  def config(**train):
    c = load_config("rloo", "tiny_ptx")
    c.policy_from, c.reward_from = str(sources / "sft"), str(sources / "rm")
    c.data.tfds_dir = tfds_dir
    c.sampling.max_new_tokens = 8
    c.rloo.penalize_no_eos = False  # Random sources rarely end.
    c.train.update(dict(num_steps=2, checkpoint_every=2, global_batch_size=4), **train)
    return c

  full = driver.train(config(), str(tmp_path / "full"))
  records = metrics_lib.read_metrics(str(tmp_path / "full"))
  assert records[0]["kl_k1"] == 0.0 and records[1]["kl_k1"] != 0.0  # It moved.
  driver.train(config(stop_at_step=1), str(tmp_path / "resumed"))
  tree_equal(jax.device_get(full), jax.device_get(driver.train(config(),
                                                               str(tmp_path / "resumed"))))
  one = config()
  one.mesh.shape = (1, 1, 1)
  expected = driver.train(one, str(tmp_path / "one"), devices=jax.devices()[:1])
  for name in ("score", "kl_k1", "policy_loss", "ptx_loss"):
    np.testing.assert_allclose([r[name] for r in records],
                               [r[name] for r in metrics_lib.read_metrics(str(tmp_path / "one"))],
                               rtol=1e-4, atol=1e-5, err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5),
               jax.device_get(full["policy"].params), jax.device_get(expected["policy"].params))


def test_rloo_is_built_from_its_config_by_the_driver(sources, tokenizer):
  """configs/rloo.py through the driver's build: no critic role, k = 4 rows per prompt laid
  out as groups of contiguous rows, the static settings from `config.rloo` (a full run would
  be GRPO's above but for the advantage and the defaults)."""
  config = load_config("rloo", "tiny")
  config.policy_from, config.reward_from = str(sources / "sft"), str(sources / "rm")
  roles, algorithm, _ = driver.build(config, tokenizer)
  assert roles.critic is None and roles.policy.model.head == "lm"
  assert set(algorithm.abstract_state()) == {"policy", "kl"}
  cfg = algorithm.cfg
  assert (algorithm.samples_per_prompt, cfg.advantage, cfg.kl_in,
          cfg.kl_estimator) == (4, "rloo", "reward", "k1")
  assert cfg.no_eos_score == -1.0 and algorithm.updates_per_iteration == 1
  batch = driver.repeat_prompts({"prompt_tokens": np.arange(6).reshape(3, 2)}, 4)
  np.testing.assert_array_equal(batch["prompt_tokens"][:, 0], np.repeat([0, 2, 4], 4))


# ----------------------------------------------------------------------------- config errors


def checked(name, **changes):
  """`configs/<name>.py:tiny` with `changes` (dotted keys) through the RL stage's validation
  on 8 data-parallel devices."""
  config = load_config(name, "tiny")
  config.policy_from, config.reward_from = "/runs/sft", "/runs/rm"
  for key, value in changes.items():
    *path, leaf = key.split(".")
    section = config
    for part in path:
      section = section[part]
    section[leaf] = value
  rl_config_lib.validate_rl(config, 8, process_count=1)
  return config


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_config_errors_name_the_key(name):
  checked(name)
  # 4 prompts x 4 responses = 16 rows split over 8 devices though 4 prompts would not be.
  checked(name, **{"train.global_batch_size": 4})
  errors = {
      f"{name}.samples_per_prompt": (1, rf"config\.{name}\.samples_per_prompt=1 must be an "
                                     r"integer >= 2"),
      "train.global_batch_size": (3, rf"config\.train\.global_batch_size=3 x "
                                  rf"config\.{name}\.samples_per_prompt=4 = 12 rollout rows is "
                                  r"not divisible by the data-parallel size 8"),
      f"{name}.num_minibatches": (3, rf"= 64 rollout rows is not divisible by "
                                  rf"config\.{name}\.num_minibatches=3"),
      f"{name}.epochs": (0, rf"config\.{name}\.epochs=0 must be an integer >= 1"),
      f"{name}.loss_aggregation": ("mean", rf"config\.{name}\.loss_aggregation='mean'"),
      f"{name}.kl_estimator": ("k2", rf"config\.{name}\.kl_estimator='k2'"),
      f"{name}.kl.controller": ("pid", rf"config\.{name}\.kl\.controller='pid'"),
      f"{name}.clip_eps": (0.0, rf"config\.{name}\.clip_eps=0\.0 must be > 0"),
      f"{name}.ptx_coef": (1.0, r"config\.ptx\.batch_size=16 is not divisible by "
                           rf"config\.{name}\.num_minibatches=3"),
  }
  for key, (value, message) in errors.items():
    changes = {key: value}
    if key.endswith("ptx_coef"):
      changes.update({f"{name}.num_minibatches": 3, "train.global_batch_size": 48})
    with pytest.raises(ValueError, match=message):
      checked(name, **changes)
  if name == "grpo":
    with pytest.raises(ValueError, match=r"config\.grpo\.kl_in='both'"):
      checked(name, **{"grpo.kl_in": "both"})
    with pytest.raises(ValueError, match=r"config\.grpo\.kl_estimator='k1' with "
                       r"config\.grpo\.kl_in='loss'"):
      checked(name, **{"grpo.kl_estimator": "k1"})
    checked(name, **{"grpo.kl_estimator": "k1", "grpo.kl_in": "reward"})
    with pytest.raises(ValueError, match=r"config\.grpo\.std_eps=0\.0 must be > 0"):
      checked(name, **{"grpo.std_eps": 0.0})


def test_presets_and_the_algorithm_table():
  for name in ("rloo", "grpo"):
    config = load_config(name, "fsdp_ptx")
    assert tuple(config.mesh.shape) == (1, -1, 1) and config[name].ptx_coef == 0.45
    assert config.train.global_batch_size * config[name].samples_per_prompt == 512
    assert algorithms.get(name).critic_kind(config) == "none"
  assert algorithms.get("ppo").ALGORITHM.samples_per_prompt == 1
  with pytest.raises(ValueError, match=r"config\.algorithm='reinforce'"):
    algorithms.get("reinforce")
