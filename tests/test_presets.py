"""Tests of the architecture presets and the accelerator configs, without real memory.

Every model here is built with `jax.eval_shape`: parameter counts are checked against the
published Hugging Face figures (re-derived below from the Hugging Face module layouts), the
`configs/*.py` presets are loaded and traced, and the sharding of every weight on an 8-device
mesh is checked against the logical-to-mesh rules.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax.linen import meta
from jax.sharding import NamedSharding

from instruct import config_lib
from instruct import sharding
from instruct.model import PRESETS, ModelConfig, Transformer, count_params, preset

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs")

# Hugging Face parameter counts (model.num_parameters(), tied embeddings counted once).
PUBLISHED = {
    "gpt2": 124_439_808,            # openai-community/gpt2
    "gpt2_medium": 354_823_168,     # openai-community/gpt2-medium
    "llama_1b": 1_235_814_400,      # meta-llama/Llama-3.2-1B (tied)
    "llama_8b": 8_030_261_248,      # meta-llama/Llama-3.1-8B (untied)
}


@functools.lru_cache(maxsize=None)
def abstract_params(cfg: ModelConfig, head: str = "lm"):
  """Boxed abstract parameters of `Transformer(cfg, head)` (shapes only)."""
  model = Transformer(cfg, head)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def num_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(meta.unbox(tree)))


def hf_gpt2_count(n_embd: int, n_layer: int, vocab: int = 50257, n_positions: int = 1024):
  """GPT2LMHeadModel's parameters, module by module (lm_head tied to wte)."""
  ln = 2 * n_embd
  c_attn = n_embd * 3 * n_embd + 3 * n_embd
  attn_c_proj = n_embd * n_embd + n_embd
  c_fc = n_embd * 4 * n_embd + 4 * n_embd
  mlp_c_proj = 4 * n_embd * n_embd + n_embd
  block = ln + c_attn + attn_c_proj + ln + c_fc + mlp_c_proj
  return vocab * n_embd + n_positions * n_embd + n_layer * block + ln


def hf_llama_count(hidden: int, layers: int, heads: int, kv_heads: int, inter: int,
                   vocab: int, tied: bool):
  """LlamaForCausalLM's parameters, module by module (no biases, RMSNorm weights only)."""
  head_dim = hidden // heads
  attn = (hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
          + heads * head_dim * hidden)
  mlp = 3 * hidden * inter  # gate_proj, up_proj, down_proj.
  layer = attn + mlp + 2 * hidden
  embed = vocab * hidden
  return embed + layers * layer + hidden + (0 if tied else embed)


def test_published_figures_rederived():
  """The published counts follow from the Hugging Face module layouts."""
  assert hf_gpt2_count(768, 12) == PUBLISHED["gpt2"]
  assert hf_gpt2_count(1024, 24) == PUBLISHED["gpt2_medium"]
  assert hf_llama_count(2048, 16, 32, 8, 8192, 128256, tied=True) == PUBLISHED["llama_1b"]
  assert hf_llama_count(4096, 32, 32, 8, 14336, 128256, tied=False) == PUBLISHED["llama_8b"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_has_published_parameter_count(name):
  """The model built from the preset has exactly the published number of parameters."""
  cfg = ModelConfig(**preset(name))
  assert num_params(abstract_params(cfg)) == PUBLISHED[name]
  assert count_params(cfg) == PUBLISHED[name]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_every_preset_builds_and_count_params_is_exact(name, head):
  """Each preset is a valid ModelConfig whose count_params equals the built model's count."""
  cfg = ModelConfig(**preset(name, scan_layers=True))
  params = abstract_params(cfg, head)
  assert num_params(params) == count_params(cfg, head)
  q = meta.unbox(params)["layers"]["attn"]["q_proj"]["kernel"]
  assert q.shape == (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.head_dim)
  assert cfg.num_heads * cfg.head_dim == cfg.d_model


# --------------------------------------------------------------------------- configs


def load_config(file: str, arg: str):
  path = os.path.join(CONFIGS_DIR, file)
  spec = importlib.util.spec_from_file_location(f"config_{file[:-3]}_{arg}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("file", ["sft.py", "pretrain.py"])
@pytest.mark.parametrize("arg", ["gpt2", "llama_1b"])
def test_accelerator_config_builds(file, arg):
  """configs/{sft,pretrain}.py:{gpt2,llama_1b} load, validate and trace (scan + remat)."""
  config = load_config(file, arg)
  cfg = ModelConfig.from_dict(config.model)
  assert (cfg.scan_layers, cfg.remat, cfg.dtype) == (True, "full", "bfloat16")
  assert ModelConfig(**preset(arg, dtype="bfloat16", scan_layers=True, remat="full")) == cfg
  mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, jax.device_count())
  data_parallel = mesh_shape[0] * mesh_shape[1]  # act_batch -> ('data', 'fsdp').
  config_lib.validate(config, data_parallel=data_parallel, process_count=1)

  boxed = abstract_params(cfg)
  params = meta.unbox(boxed)
  assert "layers" in params and not any(k.startswith("layers_") for k in params)
  for leaf in jax.tree.leaves(params["layers"]):
    assert leaf.shape[0] == cfg.num_layers
    assert leaf.dtype == jnp.float32
  assert num_params(params) == count_params(cfg) == PUBLISHED[arg]

  # Forward and backward trace through the scanned, rematerialised layers.
  model = Transformer(cfg)
  tokens = jnp.zeros((2, 16), jnp.int32)

  def loss(p):
    logits = model.apply({"params": p}, tokens).logits
    return jnp.mean(logits), logits
  (value, logits), grads = jax.eval_shape(jax.value_and_grad(loss, has_aux=True), params)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert value.shape == ()
  assert jax.tree.map(lambda g: (g.shape, g.dtype), grads) == jax.tree.map(
      lambda p: (p.shape, p.dtype), params)


# -------------------------------------------------------------------------- sharding


def _mesh_axes(entry) -> tuple:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _is_boxed(x):
  return isinstance(x, nn.Partitioned)


def _check_divisible(mesh, boxed, shardings):
  """Every sharded dimension of every weight divides by its mesh axes; returns the specs."""
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=_is_boxed)
  specs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  assert len(leaves) == len(specs)
  out = {}
  for (path, leaf), s in zip(leaves, specs):
    where = jax.tree_util.keystr(path)
    assert isinstance(s, NamedSharding) and s.mesh.shape == mesh.shape, where
    shape = leaf.value.shape
    assert len(s.spec) <= len(shape), where
    for dim, entry in zip(shape, s.spec):
      ways = math.prod(mesh.shape[a] for a in _mesh_axes(entry))
      assert dim % ways == 0, (where, shape, s.spec)
    out[where] = (leaf.names, tuple(s.spec) + (None,) * (len(shape) - len(s.spec)), shape)
  return out


@pytest.fixture(scope="module")
def mesh_222():
  mesh_config = types.SimpleNamespace(shape=(2, 2, 2), axis_names=("data", "fsdp", "tensor"))
  mesh = sharding.make_mesh(mesh_config)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  return mesh


@pytest.mark.parametrize("scan", [True, False])
def test_llama_1b_shardings_follow_rules(mesh_222, scan):
  """llama_1b weights on a (2, 2, 2) mesh: specs follow DEFAULT_RULES and divide evenly."""
  cfg = ModelConfig(**preset("llama_1b", scan_layers=scan))
  boxed = abstract_params(cfg)
  shardings = sharding.tree_shardings(mesh_222, sharding.DEFAULT_RULES, boxed)
  specs = _check_divisible(mesh_222, boxed, shardings)

  rules = dict(sharding.DEFAULT_RULES)
  for where, (names, spec, _) in specs.items():
    assert spec == tuple(rules[n] if n is not None else None for n in names), where

  layer = "['layers']" if scan else "['layers_0']"
  lead = (None,) if scan else ()
  assert specs["['embed']['embedding']"][1] == ("tensor", "fsdp")
  assert specs[layer + "['attn']['q_proj']['kernel']"][1] == lead + ("fsdp", "tensor", None)
  assert specs[layer + "['attn']['k_proj']['kernel']"][1] == lead + ("fsdp", "tensor", None)
  assert specs[layer + "['attn']['o_proj']['kernel']"][1] == lead + ("tensor", None, "fsdp")
  assert specs[layer + "['mlp']['gate_proj']['kernel']"][1] == lead + ("fsdp", "tensor")
  assert specs[layer + "['mlp']['down_proj']['kernel']"][1] == lead + ("tensor", "fsdp")
  flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  by_name = dict(zip(specs, flat))
  for norm in ("['final_norm']['scale']", layer + "['attn_norm']['scale']",
               layer + "['mlp_norm']['scale']"):
    assert by_name[norm].is_fully_replicated, norm
  assert not by_name["['embed']['embedding']"].is_fully_replicated
  # The embedding shard is [vocab / 2, d_model / 2].
  assert by_name["['embed']['embedding']"].shard_shape((128256, 2048)) == (64128, 1024)


@pytest.mark.parametrize("arg", ["gpt2", "llama_1b"])
def test_sft_config_shardings_divide(arg):
  """On the sft config's own mesh (all devices on 'fsdp') every weight divides evenly."""
  config = load_config("sft.py", arg)
  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
  boxed = abstract_params(ModelConfig.from_dict(config.model))
  rules = sharding.rules_from_config(config.mesh)
  specs = _check_divisible(mesh, boxed, sharding.tree_shardings(mesh, rules, boxed))
  # FSDP shards (almost) all of the parameters: everything but norms and small biases.
  assert "fsdp" in specs["['embed']['embedding']"][1]
  total = sum(math.prod(shape) for _, _, shape in specs.values())
  sharded = sum(math.prod(shape) for _, spec, shape in specs.values() if "fsdp" in spec)
  assert sharded / total > 0.99
