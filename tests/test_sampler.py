"""The jitted KV-cache sampler against full forward passes and cache-free greedy decoding;
exact top-k / top-p sets, banned (special) tokens, and the evaluation entry points' guards."""

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.world import evaluate as ev
from instruct import sharding as shd
from instruct.model import ModelConfig, Transformer, preset
from instruct.data.tokenization import load_tokenizer
from instruct.rl.sampler import (SamplingConfig, banned_token_ids, choose_tokens, filter_logits,
                                 make_sampler)
from instruct.rl.scoring import sequence_logprobs
from tests.test_sharding import mesh_config

EOS, PAD = 0, 1


@functools.lru_cache(maxsize=None)
def build(name):
  """(model, params, left-padded prompts, prompt mask) for a preset, built once."""
  model = Transformer(ModelConfig(**preset(name)))
  rng = np.random.default_rng(0)
  lengths = np.array([7, 3, 5, 1])
  prompt_mask = (np.arange(7)[None] >= 7 - lengths[:, None]).astype(np.int32)  # Left-padded.
  prompts = np.where(prompt_mask > 0, rng.integers(2, 512, size=(4, 7)), PAD).astype(np.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(prompts)))["params"]
  return model, params, jnp.asarray(prompts), jnp.asarray(prompt_mask)


FAMILIES = ["tiny", "tiny_llama"]


@pytest.mark.parametrize("name,temperature,top_k,top_p", [("tiny", 1.0, 0, 1.0),
                                                          ("tiny_llama", 1.0, 0, 1.0),
                                                          ("tiny", 0.7, 20, 0.9)])
def test_sampler_logprobs_equal_a_full_forward_pass(name, temperature, top_k, top_p):
  model, params, prompts, prompt_mask = build(name)
  cfg = SamplingConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=temperature,
                       top_k=top_k, top_p=top_p)
  samples = jax.jit(make_sampler(model, cfg))(params, prompts, prompt_mask, jax.random.key(1))
  recomputed, _ = sequence_logprobs(model, params, prompts, prompt_mask, samples.response_tokens,
                                    samples.response_mask, temperature)
  mask = np.asarray(samples.response_mask) > 0
  assert mask.sum() > 0
  np.testing.assert_allclose(
      np.asarray(samples.response_logprobs)[mask],
      np.asarray(recomputed)[mask], atol=2e-5)
  assert np.all(np.asarray(samples.response_logprobs)[~mask] == 0)


def greedy_without_cache(model, params, prompts, prompt_mask, steps):
  """Recomputes the whole sequence every step (no cache); stops a row after EOS.

  The sequence lives in a fixed [b, p + steps] buffer whose future positions are masked, so
  one compiled forward serves every step (causality makes the future irrelevant).
  """
  b, p = prompts.shape
  tokens = np.concatenate([np.asarray(prompts), np.full((b, steps), PAD)], 1).astype(np.int32)
  mask = np.concatenate([np.asarray(prompt_mask), np.zeros((b, steps), np.int32)], 1)
  forward = jax.jit(lambda t, m: model.apply({"params": params}, t, m).logits)
  done = np.zeros(b, bool)
  for i in range(steps):
    logits = forward(jnp.asarray(tokens), jnp.asarray(mask))[:, p + i - 1]
    nxt = np.where(done, PAD, np.asarray(jnp.argmax(logits, axis=-1)))
    tokens[:, p + i], mask[:, p + i] = nxt, ~done
    done |= nxt == EOS
  return tokens[:, p:]


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_with_cache_equals_greedy_without(name):
  model, params, prompts, prompt_mask = build(name)
  cfg = SamplingConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.0)
  samples = jax.jit(make_sampler(model, cfg))(params, prompts, prompt_mask, jax.random.key(0))
  expected = greedy_without_cache(model, params, prompts, prompt_mask, 8)
  np.testing.assert_array_equal(np.asarray(samples.response_tokens), expected)
  top1 = SamplingConfig(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=1.0, top_k=1)
  sampled = jax.jit(make_sampler(model, top1))(params, prompts, prompt_mask, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(sampled.response_tokens), expected)


@pytest.mark.parametrize("name", FAMILIES)
def test_eos_masks_the_rest_and_stops_the_loop_early(name):
  model, params, prompts, prompt_mask = build(name)
  # A zero final norm makes every logit 0, so greedy picks token 0 = EOS at the first step.
  params = dict(params, final_norm=jax.tree.map(jnp.zeros_like, params["final_norm"]))
  cfg = SamplingConfig(max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.0)
  samples = jax.jit(make_sampler(model, cfg))(params, prompts, prompt_mask, jax.random.key(0))
  tokens = np.asarray(samples.response_tokens)
  assert np.all(tokens[:, 0] == EOS) and np.all(tokens[:, 1:] == PAD)
  np.testing.assert_array_equal(np.asarray(samples.response_mask)[:, 0], 1)
  assert np.all(np.asarray(samples.response_mask)[:, 1:] == 0)
  assert np.all(np.asarray(samples.ended_with_eos))
  assert int(samples.num_decode_steps) == 1


def test_filter_logits_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
  neg = np.asarray(filter_logits(logits, top_k=2, top_p=1.0)) < -1e30
  np.testing.assert_array_equal(neg[0], [False, False, True, True, True])
  # Nucleus 0.6: keep the smallest set whose mass reaches 0.6 (0.5 + 0.2).
  neg = np.asarray(filter_logits(logits, top_k=0, top_p=0.6)) < -1e30
  np.testing.assert_array_equal(neg[0], [False, False, True, True, True])
  neg = np.asarray(filter_logits(logits, top_k=0, top_p=0.5)) < -1e30
  np.testing.assert_array_equal(neg[0], [False, True, True, True, True])


@pytest.mark.parametrize("name", FAMILIES)
def test_sampler_on_a_mesh_matches_one_device(name):
  model, params, prompts, prompt_mask = build(name)
  cfg = SamplingConfig(max_new_tokens=6, eos_id=EOS, pad_id=PAD, temperature=0.0)
  expected = jax.jit(make_sampler(model, cfg))(params, prompts, prompt_mask, jax.random.key(0))
  mesh = shd.make_mesh(mesh_config((2, 2, 2)))
  rules = shd.DEFAULT_RULES
  boxed = jax.eval_shape(model.init, jax.random.key(0), prompts)["params"]
  param_sh = shd.tree_shardings(mesh, rules, boxed)
  batch_sh = shd.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    sharded = jax.device_put(params, param_sh)
    sampler = jax.jit(make_sampler(model, cfg), in_shardings=(param_sh, batch_sh, batch_sh, None))
    got = sampler(sharded, prompts, prompt_mask, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got.response_tokens),
                                np.asarray(expected.response_tokens))
  np.testing.assert_allclose(np.asarray(got.response_logprobs),
                             np.asarray(expected.response_logprobs), atol=1e-5)


def test_filter_logits_keeps_exactly_k_and_the_exact_nucleus_under_ties():
  """Ties at the k-th logit used to keep every tied token (top_k=2 kept 4 of 5); now the
  ranking breaks ties by lower id and exactly k survive. Likewise top-p keeps the shortest
  ranked prefix reaching the mass, not every token tied with its last one."""
  logits = jnp.array([[3.0, 2.0, 2.0, 2.0, 1.0]])
  kept = np.asarray(filter_logits(logits, top_k=2, top_p=1.0)) > -1e30
  np.testing.assert_array_equal(kept[0], [True, True, False, False, False])
  uniform = jnp.zeros((1, 4))  # Ranks 0..3 carry mass 0.25 each: 0.5 needs exactly two.
  kept = np.asarray(filter_logits(uniform, top_k=0, top_p=0.5)) > -1e30
  np.testing.assert_array_equal(kept[0], [True, True, False, False])


def allowed_set(logits_v, temperature, top_k, top_p, banned=()):
  """The tokens the sampler may draw, computed independently in float64 numpy: ranked by
  logit with ties to the lower id; banned ones removed first; the top-k prefix; then the
  ranks whose better-ranked mass is below top_p. Also returns the smallest distance of a
  cumulative mass to top_p (a fixture whose mass sits on the boundary would test rounding)."""
  x = np.asarray(logits_v, np.float64) / (temperature or 1.0)
  x[list(banned)] = -np.inf
  order = np.argsort(-x, kind="stable")
  order = order[np.isfinite(x[order])]
  if top_k:
    order = order[:top_k]
  p = np.exp(x[order] - x[order].max())
  p /= p.sum()
  before = np.cumsum(p) - p
  margin = np.min(np.abs(before - top_p)) if top_p < 1 else np.inf
  return set(order[before < top_p].tolist()), margin


@pytest.mark.parametrize("temperature,top_k,top_p,banned", [(1.0, 3, 1.0, ()), (1.0, 0, 0.7, ()),
                                                            (0.7, 4, 0.8, ()),
                                                            (1.0, 3, 0.9, (1, 2)),
                                                            (1.0, 0, 1.0, (1, 2))])
def test_sampled_tokens_lie_in_the_top_k_top_p_set(temperature, top_k, top_p, banned):
  """choose_tokens over 2048 keys on fixed logits with ties at the boundaries: every draw is in
  the set computed from those logits, and the draws are not degenerate (a set of several
  tokens is sampled from more than one of them)."""
  rng = np.random.default_rng(3)
  logits = np.round(rng.normal(size=(3, 24)) * 2) / 2  # Half-integers: plenty of ties.
  logits[:, 1] = logits.max(axis=1)  # Token 1 (banned in some cases) ties every row's best.
  cfg = SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=temperature,
                       top_k=top_k, top_p=top_p, **({"banned_ids": banned} if banned else {}))
  keys = jax.random.split(jax.random.key(0), 2048)
  tokens, _ = jax.jit(
      jax.vmap(lambda k: choose_tokens(jnp.asarray(logits, jnp.float32), k, cfg)))(keys)
  tokens = np.asarray(tokens)  # [draws, rows]
  for row in range(logits.shape[0]):
    allowed, margin = allowed_set(logits[row], temperature, top_k, top_p, banned)
    assert margin > 1e-4
    drawn = set(tokens[:, row].tolist())
    assert drawn <= allowed, (row, sorted(drawn - allowed))
    assert len(allowed) > 1 and len(drawn) > 1


def test_banned_tokens_are_never_chosen_and_get_renormalised_logprobs():
  """Pad and unk hold almost all the mass; neither is drawn (sampling or greedy), and the
  returned log-prob is log softmax over the remaining tokens."""
  logits = jnp.array([[0.0, 9.0, 8.0, 1.0, 0.5, -1.0]])  # EOS, PAD, unk=2, then words.
  banned = (PAD, 2)
  keys = jax.random.split(jax.random.key(1), 4096)
  for temperature in (1.0, 0.7, 0.0):
    cfg = SamplingConfig(max_new_tokens=1, eos_id=EOS, pad_id=PAD, temperature=temperature,
                         banned_ids=banned)
    tokens, logprobs = jax.vmap(lambda k: choose_tokens(logits, k, cfg))(keys)
    tokens, logprobs = np.asarray(tokens)[:, 0], np.asarray(logprobs)[:, 0]
    assert not np.isin(tokens, banned).any()
    if temperature == 0:
      assert np.all(tokens == 3)
    t = temperature or 1.0
    kept = np.log(np.exp(np.array([0.0, 1.0, 0.5, -1.0]) / t).sum())
    expected = np.asarray(logits[0])[tokens] / t - kept
    np.testing.assert_allclose(logprobs, expected, rtol=1e-5, atol=1e-5)


def pad_loving(name="tiny"):
  """The tiny model with its final-norm bias pushed along pad's embedding: pad becomes the
  argmax at every position while the logits still depend on the input."""
  model, params, prompts, prompt_mask = build(name)
  e_pad = params["embed"]["embedding"][PAD]
  bias = params["final_norm"]["bias"] + 400.0 * e_pad
  params = dict(params, final_norm=dict(params["final_norm"], bias=bias))
  return model, params, prompts, prompt_mask


def test_pad_is_never_sampled_and_logprobs_match_sequence_logprobs():
  """A model whose favourite token is pad never samples it once pad is banned, and the
  sampler's log-probs are `sequence_logprobs` with the same banned_ids (renormalised), not the
  unmasked model's. (Greedy decoding is covered by the test above.)"""
  model, params, prompts, prompt_mask = pad_loving()
  cfg = SamplingConfig(max_new_tokens=16, eos_id=EOS, pad_id=PAD, temperature=1.0,
                       banned_ids=(PAD,))
  sample = jax.jit(make_sampler(model, cfg))
  score = jax.jit(lambda *a, banned: sequence_logprobs(model, *a, banned_ids=banned),
                  static_argnames="banned")
  for seed in range(3):
    samples = sample(params, prompts, prompt_mask, jax.random.key(seed))
    mask = np.asarray(samples.response_mask) > 0
    assert mask.sum() > 8
    assert not np.any(np.asarray(samples.response_tokens)[mask] == PAD)
    args = (params, prompts, prompt_mask, samples.response_tokens, samples.response_mask)
    full, full_logits = score(*args, banned=())
    assert np.all(np.argmax(np.asarray(full_logits), -1)[mask] == PAD)  # The test has teeth.
    same, logits = score(*args, banned=(PAD,))
    np.testing.assert_allclose(
        np.asarray(samples.response_logprobs)[mask],
        np.asarray(same)[mask], atol=2e-5)
    assert np.all(np.asarray(logits)[..., PAD] == np.finfo(np.float32).min)
    # Pad held most of the mass, so renormalising raises every other token's log-prob a lot.
    assert np.all(np.asarray(same)[mask] > np.asarray(full)[mask] + 1.0)


def test_banned_token_ids_are_the_special_tokens_but_eos():
  tokenizer = load_tokenizer()
  assert banned_token_ids(tokenizer) == (PAD,)
  fake = types.SimpleNamespace(all_special_ids=[0, 5, 7, 3], eos_token_id=3, pad_token_id=9,
                               unk_token_id=5, bos_token_id=None)
  assert banned_token_ids(fake) == (0, 5, 7, 9)
  assert SamplingConfig(4, EOS, PAD, banned_ids=[7, 2, 7]).banned_ids == (2, 7)
  with pytest.raises(ValueError, match="eos_id"):
    SamplingConfig(4, EOS, PAD, banned_ids=(EOS, PAD))


def test_config_banned_tokens_join_the_special_ones(tmp_path):
  """`config.sampling.banned_tokens` (e.g. control tokens): their ids are banned besides the
  special tokens; a token outside the vocabulary is one error naming the key."""
  from experiments.world import generate as world_lib
  from instruct.rl import config as rl_config
  from instruct.rl import driver
  world_lib.write_tokenizer(str(tmp_path), control=True)
  tokenizer = load_tokenizer(str(tmp_path))
  config = rl_config.base_config()
  assert driver.sampling_config(config, tokenizer).banned_ids == banned_token_ids(tokenizer)
  config.sampling.banned_tokens = ("<|good|>", "<|bad|>")
  vocab = tokenizer.get_vocab()
  assert driver.sampling_config(config, tokenizer).banned_ids == tuple(
      sorted({*banned_token_ids(tokenizer), vocab["<|good|>"], vocab["<|bad|>"]}))
  config.sampling.banned_tokens = ("<|good|>", "<|nope|>")
  with pytest.raises(ValueError, match=r"config.sampling.banned_tokens\[1\]='<\|nope\|>' is "
                     "not a token"):
    driver.sampling_config(config, tokenizer)


def test_top_k_samples_lie_in_the_top_k_of_a_full_forward_pass():
  """End to end: every sampled token is among the 3 best logits of the full forward pass at
  its position (or within float noise of the 3rd best, cache vs no cache)."""
  model, params, prompts, prompt_mask = build("tiny")
  cfg = SamplingConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=0.8, top_k=3)
  samples = jax.jit(make_sampler(model, cfg))(params, prompts, prompt_mask, jax.random.key(2))
  _, logits = sequence_logprobs(model, params, prompts, prompt_mask, samples.response_tokens,
                                samples.response_mask, 0.8)
  logits, tokens = np.asarray(logits), np.asarray(samples.response_tokens)
  third = np.sort(logits, axis=-1)[..., -3]
  chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  mask = np.asarray(samples.response_mask) > 0
  assert np.all(chosen[mask] >= third[mask] - 1e-4)


def tiny_policy(max_length):
  model = Transformer(ModelConfig(**dict(preset("tiny"), max_length=max_length)))
  params = nn.meta.unbox(model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))["params"]
  return ev.Policy(model, params, workdir="", step=0)


def test_evaluation_refuses_sequences_past_the_position_table():
  """A 24-token rollout on a 16-position model used to run, its last positions clamped onto
  the table's last row; generate and sequence_logprob now refuse it. 16 tokens still run."""
  policy, tokenizer = tiny_policy(16), load_tokenizer()
  with pytest.raises(ValueError, match=r"max_length=16"):
    ev.generate(policy, tokenizer, ["a b"], seed=0, prompt_length=8, max_new_tokens=16,
                batch_size=2)
  arrays = (np.ones((2, 8), np.int32),) * 2 + (np.ones((2, 16), np.int32),) * 2
  with pytest.raises(ValueError, match=r"max_length=16"):
    ev.sequence_logprob(policy, arrays)
  with pytest.raises(ValueError, match=r"perplexity's length = 32 tokens .*max_length=16"):
    ev.perplexity(policy, tokenizer, ["a b"], length=32)
  with pytest.raises(ValueError, match=r"generate\.temperature"):
    ev.generate(policy, tokenizer, ["a b"], seed=0, temperature=-1.0, prompt_length=8,
                max_new_tokens=8, batch_size=2)
  answers = ev.generate(policy, tokenizer, ["a b"], seed=0, prompt_length=8, max_new_tokens=8,
                        batch_size=2)
  assert len(answers) == 1 and PAD not in answers[0].ids
  arrays = ev.response_arrays(tokenizer, ["a b"], answers, prompt_length=8, response_length=8)
  banned = banned_token_ids(tokenizer)
  np.testing.assert_allclose(ev.sequence_logprob(policy, arrays, banned_ids=banned, batch_size=2),
                             [answers[0].logprob], atol=1e-4)
