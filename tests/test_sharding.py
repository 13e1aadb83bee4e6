"""Meshes from config, the rule table, and the SFT step on several meshes against 1 device."""

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from instruct import config_lib
from instruct import sharding as shd
from instruct import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str):
  """A config of `configs/NAME.py:ARG`; reward models may start from random weights (tests
  that need an SFT run set `init_from`)."""
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", name + ".py"), arg)
  if name == "rm":
    config.rm.random_init = True
  return config


def mesh_config(shape):
  return ml_collections.ConfigDict(
      dict(shape=shape, axis_names=("data", "fsdp", "tensor"), rules=shd.DEFAULT_RULES))


def test_minus_one_fills_the_remaining_devices():
  assert shd.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
  assert dict(shd.make_mesh(mesh_config((2, -1, 2))).shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("shape", [(3, 1, 1), (-1, 3, 1), (2, 2, 1), (-1, -1, 1), (0, 8, 1)])
def test_mesh_that_does_not_fit_the_devices_is_a_clear_error(shape):
  with pytest.raises(ValueError, match=r"config\.mesh\.shape"):
    shd.make_mesh(mesh_config(shape))


def test_rule_naming_an_unknown_mesh_axis_is_an_error():
  config = mesh_config((8, 1, 1))
  config.rules = (("embed", "model"),)
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    shd.rules_from_config(config)


def synthetic_batches(num, batch=16, length=32, vocab=512, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num):
    tokens = rng.integers(2, vocab, size=(batch, length)).astype(np.int32)
    lengths = rng.integers(length // 2, length + 1, size=batch)
    attention = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    loss_mask = attention * (np.arange(length)[None] >= length // 4)
    tokens = np.where(attention > 0, tokens, 1)
    out.append(
        {"tokens": tokens, "loss_mask": loss_mask.astype(np.int32), "attention_mask": attention})
  return out


def run_sft_steps(preset, mesh_shape, devices, num_steps=3, grad_accum=1):
  """Runs `num_steps` SFT steps; returns (losses, final params on host, final state)."""
  config = load_config("sft", preset)
  config.mesh.shape = mesh_shape
  config.train.grad_accum_steps = grad_accum
  built = trainer.build(config, None, devices)
  with jax.set_mesh(built.mesh):
    state = built.factory.init(jax.random.key(0))
  losses = []
  with jax.set_mesh(built.mesh), nn.logical_axis_rules(built.rules):
    for i, batch in enumerate(synthetic_batches(num_steps)):
      batch = shd.host_batch_to_global(batch, built.batch_sharding)
      state, metrics = built.train_step(state, batch, jax.random.key(i))
      losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params), state


@pytest.fixture(scope="module")
def single_device_run():
  return {p: run_sft_steps(p, (1, 1, 1), jax.devices()[:1]) for p in ("tiny", "tiny_llama")}


@pytest.mark.parametrize("preset", ["tiny", "tiny_llama"])
@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sft_step_on_mesh_matches_one_device(single_device_run, preset, mesh_shape):
  ref_losses, ref_params, _ = single_device_run[preset]
  losses, params, _ = run_sft_steps(preset, mesh_shape, jax.devices())
  # Measured 2026-11-28, init/data seeds 0-4, AVX-512 and AVX2: the losses use <= 2.3% of
  # rtol; the parameters <= 43% of the tolerance for tiny (always the attention key biases:
  # their exact gradient is zero, softmax ignores a shift shared by all keys, so they hold
  # rounding noise scaled by Adam; the same under both ISAs) and <= 14% for tiny_llama.
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params,
               ref_params)


def test_gradient_accumulation_matches_one_shot_step(single_device_run):
  ref_losses, ref_params, _ = single_device_run["tiny"]
  losses, params, _ = run_sft_steps("tiny", (1, 1, 1), jax.devices()[:1], grad_accum=4)
  # Measured 2026-11-28, seeds 0-4, AVX-512 and AVX2: losses <= 4.6% of rtol, parameters
  # <= 17% of the tolerance (the attention key biases, as above).
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), params,
               ref_params)


def test_parameters_are_sharded_as_the_rules_say():
  _, _, state = run_sft_steps("tiny", (2, 2, 2), jax.devices(), num_steps=1)
  params = state.params
  expected = {
      ("embed", "embedding"): P("tensor", "fsdp"),
      ("layers_0", "attn", "q_proj", "kernel"): P("fsdp", "tensor", None),
      ("layers_0", "attn", "k_proj", "kernel"): P("fsdp", "tensor", None),
      ("layers_0", "attn", "o_proj", "kernel"): P("tensor", None, "fsdp"),
      ("layers_0", "mlp", "up_proj", "kernel"): P("fsdp", "tensor"),
      ("layers_0", "mlp", "down_proj", "kernel"): P("tensor", "fsdp"),
      ("layers_0", "attn_norm", "scale"): P(None),
  }
  for path, spec in expected.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert leaf.sharding.spec == spec, path
    # Really split: each device holds 1/|axes| of every sharded dimension.
    shard_shape = leaf.addressable_shards[0].data.shape
    for dim, axes in enumerate(spec):
      size = 1 if axes is None else 2
      assert shard_shape[dim] == leaf.shape[dim] // size, (path, shard_shape)
  # Adam moments follow the parameters.
  mu = state.opt_state[1][0].mu
  assert mu["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_batch_is_split_over_data_and_fsdp():
  mesh = shd.make_mesh(mesh_config((2, 2, 2)))
  sharding = shd.batch_sharding(mesh, shd.DEFAULT_RULES)
  assert sharding.spec == P(("data", "fsdp"))
  assert shd.data_parallel_size(mesh, shd.DEFAULT_RULES) == 4
  batch = shd.host_batch_to_global(synthetic_batches(1)[0], sharding)
  assert batch["tokens"].addressable_shards[0].data.shape == (4, 32)


def test_a_multi_slice_mesh_needs_as_many_slices_as_dcn_shape_says():
  config = mesh_config((-1, 1, 1))
  config.dcn_shape = (1, 1, 1)  # One slice: the plain mesh.
  assert shd.make_mesh(config).devices.shape == (8, 1, 1)
  config.dcn_shape = (2, 1, 1)  # These 8 CPU devices are one process: one slice.
  with pytest.raises(
      ValueError, match=r"config\.mesh\.dcn_shape=\(2, 1, 1\) spans 2 slices, "
      r"but the 8 devices are in 1 processes"):
    shd.make_mesh(config)
  config.dcn_shape = (2, 1)
  with pytest.raises(ValueError, match=r"config\.mesh\.dcn_shape=\(2, 1\): expected 3"):
    shd.make_mesh(config)
