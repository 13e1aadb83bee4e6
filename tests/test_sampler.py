"""The jitted KV-cache sampler against full forward passes and cache-free greedy decoding."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instruct import sharding as shd
from instruct.model import ModelConfig, Transformer, preset
from instruct.rl.sampler import SamplingConfig, filter_logits, make_sampler, sequence_logprobs
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


@pytest.mark.parametrize("name,temperature,top_k,top_p", [
    ("tiny", 1.0, 0, 1.0), ("tiny_llama", 1.0, 0, 1.0), ("tiny", 0.7, 20, 0.9)])
def test_sampler_logprobs_equal_a_full_forward_pass(name, temperature, top_k, top_p):
  model, params, prompts, prompt_mask = build(name)
  cfg = SamplingConfig(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=temperature,
                       top_k=top_k, top_p=top_p)
  samples = jax.jit(make_sampler(model, cfg))(params, prompts, prompt_mask, jax.random.key(1))
  recomputed, _ = sequence_logprobs(model, params, prompts, prompt_mask,
                                    samples.response_tokens, samples.response_mask,
                                    temperature)
  mask = np.asarray(samples.response_mask) > 0
  assert mask.sum() > 0
  np.testing.assert_allclose(np.asarray(samples.response_logprobs)[mask],
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
