"""Tests of the architecture presets and the accelerator configs, without real memory.

Every model here is built with `jax.eval_shape`: parameter counts are checked against the
published Hugging Face figures (re-derived below from the Hugging Face module layouts), each
preset is checked against its published config.json, the `configs/*.py` presets are loaded
and traced, and the sharding of every weight on each preset's own mesh (the 8 test devices,
and 64 devices as an abstract mesh) is checked against the logical-to-mesh rules.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from flax.linen import meta
from jax.sharding import AbstractMesh, AxisType, NamedSharding

from instruct import config_lib
from instruct.rl import config as rl_config
from instruct import hf
from instruct import sharding
from instruct.model import PRESETS, ModelConfig, Transformer, count_params, preset
from tests.conftest import is_boxed

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# Hugging Face parameter counts (model.num_parameters(), tied embeddings counted once).
# Pythia: the "total params" of the Pythia model table (EleutherAI/pythia README and Biderman
# et al. 2023), which count the untied input and output embeddings.
# yapf: disable
PUBLISHED = {
    "gpt2": 124_439_808,            # openai-community/gpt2
    "gpt2_medium": 354_823_168,     # openai-community/gpt2-medium
    "gpt2_large": 774_030_080,      # openai-community/gpt2-large
    "gpt2_xl": 1_557_611_200,       # openai-community/gpt2-xl
    "pythia_1b": 1_011_781_632,     # EleutherAI/pythia-1b (untied)
    "pythia_2_8b": 2_775_208_960,   # EleutherAI/pythia-2.8b (untied)
    "pythia_6_9b": 6_857_302_016,   # EleutherAI/pythia-6.9b (untied)
    "llama_1b": 1_235_814_400,      # meta-llama/Llama-3.2-1B (tied)
    "llama_8b": 8_030_261_248,      # meta-llama/Llama-3.1-8B (untied)
}
# yapf: enable
ACCELERATOR = config_lib.ACCELERATOR_PRESETS

# The architecture fields of each checkpoint's published config.json (hub `config.json`).
_GPT2 = dict(model_type="gpt2", activation_function="gelu_new", layer_norm_epsilon=1e-5, n_ctx=1024,
             n_positions=1024, vocab_size=50257)
_PYTHIA = dict(model_type="gpt_neox", hidden_act="gelu", layer_norm_eps=1e-5,
               max_position_embeddings=2048, rotary_emb_base=10000, rotary_pct=0.25,
               tie_word_embeddings=False, use_parallel_residual=True, bos_token_id=0,
               eos_token_id=0)
_LLAMA3 = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, rope_theta=500000.0,
               vocab_size=128256, attention_bias=False, mlp_bias=False, num_key_value_heads=8,
               bos_token_id=128000, eos_token_id=128001)
HF_CONFIGS = {
    "gpt2": dict(_GPT2, n_embd=768, n_layer=12, n_head=12),
    "gpt2_medium": dict(_GPT2, n_embd=1024, n_layer=24, n_head=16),
    "gpt2_large": dict(_GPT2, n_embd=1280, n_layer=36, n_head=20),
    "gpt2_xl": dict(_GPT2, n_embd=1600, n_layer=48, n_head=25),
    "pythia_1b": dict(_PYTHIA, hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                      intermediate_size=8192, vocab_size=50304),
    "pythia_2_8b": dict(_PYTHIA, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=10240, vocab_size=50304),
    "pythia_6_9b": dict(_PYTHIA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=16384, vocab_size=50432),
    # meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B: 'llama3' RoPE frequency scaling.
    "llama_1b": dict(
        _LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
        intermediate_size=8192, max_position_embeddings=131072, head_dim=64,
        tie_word_embeddings=True,
        rope_scaling=dict(factor=32.0, high_freq_factor=4.0, low_freq_factor=1.0,
                          original_max_position_embeddings=8192, rope_type="llama3")),
    "llama_8b": dict(
        _LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        intermediate_size=14336, max_position_embeddings=131072, tie_word_embeddings=False,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192, rope_type="llama3")),
}
# meta-llama/Meta-Llama-3-8B: Llama-3.1-8B's weights layout with unscaled RoPE.
META_LLAMA_3_8B = dict(_LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       intermediate_size=14336, max_position_embeddings=8192,
                       tie_word_embeddings=False)


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


def hf_llama_count(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int,
                   tied: bool):
  """LlamaForCausalLM's parameters, module by module (no biases, RMSNorm weights only)."""
  head_dim = hidden // heads
  attn = (hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + heads * head_dim * hidden)
  mlp = 3 * hidden * inter  # gate_proj, up_proj, down_proj.
  layer = attn + mlp + 2 * hidden
  embed = vocab * hidden
  return embed + layers * layer + hidden + (0 if tied else embed)


def hf_neox_count(hidden: int, layers: int, inter: int, vocab: int):
  """GPTNeoXForCausalLM's parameters, module by module (biases everywhere, untied embed_out).

  Per layer: input_layernorm and post_attention_layernorm (weight + bias, 2 x 2 hidden),
  attention.query_key_value (3 hidden x hidden + 3 hidden), attention.dense (hidden^2 +
  hidden), mlp.dense_h_to_4h (hidden x inter + inter), mlp.dense_4h_to_h (inter x hidden +
  hidden); then embed_in and embed_out (vocab x hidden each) and final_layer_norm (2 hidden).
  E.g. pythia-1b: 16 x 50,358,272 + 2 x 50304 x 2048 + 4096 = 1,011,781,632.
  """
  norms = 2 * 2 * hidden
  attn = (3 * hidden * hidden + 3 * hidden) + (hidden * hidden + hidden)
  mlp = (hidden * inter + inter) + (inter * hidden + hidden)
  return layers * (norms + attn + mlp) + 2 * vocab * hidden + 2 * hidden


def test_published_figures_rederived():
  """The published counts follow from the Hugging Face module layouts."""
  assert hf_gpt2_count(768, 12) == PUBLISHED["gpt2"]
  assert hf_gpt2_count(1024, 24) == PUBLISHED["gpt2_medium"]
  assert hf_gpt2_count(1280, 36) == PUBLISHED["gpt2_large"]
  assert hf_gpt2_count(1600, 48) == PUBLISHED["gpt2_xl"]
  assert hf_neox_count(2048, 16, 8192, 50304) == PUBLISHED["pythia_1b"]
  assert hf_neox_count(2560, 32, 10240, 50304) == PUBLISHED["pythia_2_8b"]
  assert hf_neox_count(4096, 32, 16384, 50432) == PUBLISHED["pythia_6_9b"]
  assert hf_llama_count(2048, 16, 32, 8, 8192, 128256, tied=True) == PUBLISHED["llama_1b"]
  assert hf_llama_count(4096, 32, 32, 8, 14336, 128256, tied=False) == PUBLISHED["llama_8b"]


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_has_published_parameter_count(name):
  """The model built from the preset has exactly the published number of parameters."""
  cfg = ModelConfig(**preset(name))
  assert num_params(abstract_params(cfg)) == PUBLISHED[name]
  assert count_params(cfg) == PUBLISHED[name]


def test_every_accelerator_preset_has_a_published_count():
  assert set(ACCELERATOR) == set(PUBLISHED)
  assert set(ACCELERATOR) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(HF_CONFIGS))
def test_preset_is_the_published_architecture(name):
  """Importing the checkpoint's config.json gives exactly the preset (so a run started from
  the checkpoint and a later stage started from that run with the preset agree)."""
  assert hf.model_config_from_hf(HF_CONFIGS[name]) == ModelConfig(**preset(name))


def test_meta_llama_3_8b_is_llama_8b_without_rope_scaling():
  """Meta-Llama-3-8B is llama_8b with unscaled RoPE and 8192 positions."""
  assert hf.model_config_from_hf(META_LLAMA_3_8B) == ModelConfig(
      **preset("llama_8b", rope_scaling="none", rope_factor=1.0, max_length=8192))


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
  config = module.get_config(arg)
  if file == "rm.py":
    config.rm.random_init = True  # No SFT run: shapes and validation only.
  return config


@pytest.mark.parametrize("file", ["sft.py", "pretrain.py", "rm.py"])
@pytest.mark.parametrize("arg", ACCELERATOR)
def test_accelerator_config_loads(file, arg):
  """configs/{sft,pretrain,rm}.py:PRESET load and validate on the 8 test devices, with bf16,
  scanned and fully rematerialised layers, FSDP over all devices, the published size."""
  config = load_config(file, arg)
  cfg = ModelConfig.from_dict(config.model)
  assert (cfg.scan_layers, cfg.remat, cfg.dtype) == (True, "full", "bfloat16")
  assert ModelConfig(**preset(arg, dtype="bfloat16", scan_layers=True, remat="full")) == cfg
  assert config.model.hf_checkpoint == ""
  assert tuple(config.mesh.shape) == (1, -1, 1)
  mesh_shape = sharding.resolve_mesh_shape(config.mesh.shape, jax.device_count())
  data_parallel = mesh_shape[0] * mesh_shape[1]  # act_batch -> ('data', 'fsdp').
  config_lib.validate(config, data_parallel=data_parallel, process_count=1)
  # The global batch also splits over 64 devices (the memory table's pod size).
  config_lib.validate(config, data_parallel=64, process_count=1)
  head = "scalar" if file == "rm.py" else "lm"
  params = meta.unbox(abstract_params(cfg, head))
  assert "layers" in params and not any(k.startswith("layers_") for k in params)
  for leaf in jax.tree.leaves(params["layers"]):
    assert leaf.shape[0] == cfg.num_layers
    assert leaf.dtype == jnp.float32
  assert num_params(params) == count_params(cfg, head)
  if head == "lm":
    assert num_params(params) == PUBLISHED[arg]


@pytest.mark.parametrize("arg", ["gpt2", "pythia_1b", "llama_1b"])
def test_accelerator_config_traces(arg):
  """Forward and backward trace through the scanned, rematerialised layers (one per family;
  the layer code is shared by all sizes of a family)."""
  cfg = ModelConfig.from_dict(load_config("sft.py", arg).model)
  params = meta.unbox(abstract_params(cfg))
  model = Transformer(cfg)
  tokens = jnp.zeros((2, 16), jnp.int32)

  def loss(p):
    logits = model.apply({"params": p}, tokens).logits
    return jnp.mean(logits), logits

  (value, logits), grads = jax.eval_shape(jax.value_and_grad(loss, has_aux=True), params)
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert value.shape == ()
  assert jax.tree.map(lambda g: (g.shape, g.dtype),
                      grads) == jax.tree.map(lambda p: (p.shape, p.dtype), params)


# -------------------------------------------------------------------------- sharding


def _mesh_axes(entry) -> tuple:
  if entry is None:
    return ()
  return entry if isinstance(entry, tuple) else (entry,)


def _check_divisible(mesh, boxed, shardings):
  """Every sharded dimension of every weight divides by its mesh axes; returns the specs."""
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_boxed)
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


@pytest.mark.parametrize("name", ["pythia_1b", "pythia_2_8b", "pythia_6_9b", "llama_8b"])
def test_tensor_parallel_shardings_follow_rules(mesh_222, name):
  """On a (2, 2, 2) mesh (data, FSDP and tensor parallel) the Pythia and Llama-8B weights
  follow DEFAULT_RULES and divide evenly: heads, d_ff and the padded vocabularies split over
  'tensor'. (GPT-2's 50257-token vocabulary is odd: its presets cannot put 'vocab' on a
  'tensor' axis, hence their FSDP-only mesh.)"""
  cfg = ModelConfig(**preset(name, scan_layers=True))
  boxed = abstract_params(cfg)
  shardings = sharding.tree_shardings(mesh_222, sharding.DEFAULT_RULES, boxed)
  specs = _check_divisible(mesh_222, boxed, shardings)
  _follows_rules(specs, dict(sharding.DEFAULT_RULES))
  assert specs["['embed']['embedding']"][1] == ("tensor", "fsdp")
  assert specs["['lm_head']['kernel']"][1] == ("fsdp", "tensor")
  assert specs["['layers']['attn']['q_proj']['kernel']"][1] == (None, "fsdp", "tensor", None)
  assert specs["['layers']['attn']['o_proj']['kernel']"][1] == (None, "tensor", None, "fsdp")
  assert specs["['layers']['mlp']['up_proj']['kernel']"][1] == (None, "fsdp", "tensor")
  assert specs["['layers']['mlp']['down_proj']['kernel']"][1] == (None, "tensor", "fsdp")
  if cfg.use_bias:
    assert specs["['layers']['attn']['q_proj']['bias']"][1] == (None, "tensor", None)
    assert specs["['layers']['mlp']['up_proj']['bias']"][1] == (None, "tensor")
    assert specs["['layers']['mlp']['down_proj']['bias']"][1] == (None, "fsdp")


def _follows_rules(specs, rules):
  for where, (names, spec, _) in specs.items():
    assert spec == tuple(rules[n] if n is not None else None for n in names), where


@pytest.mark.parametrize("num_devices", [None, 64])
@pytest.mark.parametrize("file", ["sft.py", "rm.py"])
@pytest.mark.parametrize("arg", ACCELERATOR)
def test_config_shardings_follow_rules_and_divide(arg, file, num_devices):
  """On the config's own mesh (all devices on 'fsdp'), for the 8 test devices (None) and for
  64 devices (an abstract mesh), every weight's spec follows the rules and divides evenly."""
  config = load_config(file, arg)
  if num_devices is None:
    mesh = sharding.make_mesh(config.mesh)
    num_devices = jax.device_count()
  else:
    shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
    mesh = AbstractMesh(shape, tuple(config.mesh.axis_names), axis_types=(AxisType.Auto,) * 3)
  assert dict(mesh.shape) == {"data": 1, "fsdp": num_devices, "tensor": 1}
  head = "scalar" if file == "rm.py" else "lm"
  boxed = abstract_params(ModelConfig.from_dict(config.model), head)
  rules = sharding.rules_from_config(config.mesh)
  shardings = sharding.tree_shardings(mesh, rules, boxed)
  specs = _check_divisible(mesh, boxed, shardings)
  _follows_rules(specs, dict(rules))
  # FSDP shards (almost) all of the parameters: everything but norms and small biases.
  assert "fsdp" in specs["['embed']['embedding']"][1]
  total = sum(math.prod(shape) for _, _, shape in specs.values())
  sharded = sum(math.prod(shape) for _, spec, shape in specs.values() if "fsdp" in spec)
  assert sharded / total > 0.99
  # Each device holds 1/num_devices of every FSDP-sharded weight.
  flat = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (where, (_, spec, shape)), s in zip(specs.items(), flat):
    if "fsdp" in spec:
      assert math.prod(s.shard_shape(shape)) * num_devices == math.prod(shape), where


# ---------------------------------------------------------------- benchmarks/memory.py


def _memory_benchmark():
  bench = os.path.join(os.path.dirname(CONFIGS_DIR), "benchmarks")
  spec = importlib.util.spec_from_file_location("benchmarks_memory",
                                                os.path.join(bench, "memory.py"))
  module = importlib.util.module_from_spec(spec)
  sys.path.insert(0, bench)  # memory.py imports benchmarks/machine.py as `machine`.
  try:
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(bench)
  return module


@pytest.mark.parametrize("arg,file", [("pythia_1b", "sft"), ("gpt2_xl", "rm")])
def test_memory_benchmark_state_bytes(arg, file):
  """benchmarks/memory.py's state per device equals a count from the logical names: weights
  with an 'embed' axis are split over the 8 FSDP devices, the rest (norms, biases of other
  axes) is replicated; AdamW keeps two float32 moments (+ two int32 counts: Adam's and the
  learning-rate schedule's), gradients one float32 copy."""
  memory = _memory_benchmark()
  row = memory.measure(arg, file, 8)
  head = "scalar" if file == "rm" else "lm"
  cfg = ModelConfig.from_dict(load_config(f"{file}.py", arg).model)
  leaves = jax.tree.leaves(abstract_params(cfg, head), is_leaf=is_boxed)
  split = sum(math.prod(x.value.shape) for x in leaves if "embed" in x.names)
  whole = sum(math.prod(x.value.shape) for x in leaves if "embed" not in x.names)
  assert split + whole == count_params(cfg, head)
  assert row["params"] == row["grads"] == 4 * (split // 8 + whole)
  assert row["opt_state"] == 2 * row["params"] + 8
  assert row["state"] == 4 * row["params"] + 8
  assert row["mesh"] == (1, 8, 1)
  # Full remat keeps far less than no remat for the same batch.
  full = memory.activation_bytes(cfg, head, row["rows_per_device"], row["length"])
  none = memory.activation_bytes(dataclasses.replace(cfg, remat="none"), head,
                                 row["rows_per_device"], row["length"])
  assert full == row["activations"] and none > 2 * full


@pytest.mark.parametrize("arg", ["fsdp", "fsdp_ptx"])
def test_ppo_accelerator_config_validates(arg):
  """configs/ppo.py:fsdp and fsdp_ptx: FSDP mesh, and the batch sizes split over 8 and 64
  data-parallel devices once the source runs (and, for PPO-ptx, the pretraining text) are
  named; fsdp_ptx without a pretraining file is refused."""
  config = load_config("ppo.py", arg)
  assert tuple(config.mesh.shape) == (1, -1, 1)
  assert (config.ppo.ptx_coef > 0) == (arg == "fsdp_ptx")
  config.policy_from, config.reward_from = "/runs/sft", "/runs/rm"
  if arg == "fsdp_ptx":
    with pytest.raises(ValueError, match="ptx.train_file"):
      rl_config.validate_rl(config, 8, process_count=1)
    config.ptx.train_file = "/data/pretrain.jsonl"
  for data_parallel in (8, 64):
    shape = sharding.resolve_mesh_shape(config.mesh.shape, data_parallel)
    assert shape[0] * shape[1] == data_parallel  # act_batch -> ('data', 'fsdp').
    rl_config.validate_rl(config, data_parallel, process_count=1)


def test_memory_benchmark_ppo():
  """benchmarks/memory.py's PPO estimate for pythia_1b on 8 devices: the state is the SFT and
  RM stages' (the same FSDP mesh and AdamW) for the trained policy and critic plus the frozen
  models' parameters; the KV cache is 2 x layers x rows x (prompt + new tokens) x KV heads x
  head_dim in bf16; the total is the state plus the largest phase."""
  memory = _memory_benchmark()
  row = memory.ppo_memory("pythia_1b", 8, "fsdp_ptx")
  config = load_config("ppo.py", "fsdp_ptx")
  cfg = ModelConfig.from_dict(load_config("sft.py", "pythia_1b").model)
  sft, rm = memory.measure("pythia_1b", "sft", 8), memory.measure("pythia_1b", "rm", 8)
  # PPO's Adam (TensorFlow's epsilon, injected per step) keeps a few scalar hyperparameters
  # in its state beside the same moments: bytes, not parameters.
  assert 0 <= row["trained"] - (sft["state"] + rm["state"]) < 1024
  assert row["frozen"] == sft["params"] + rm["params"]
  assert row["state"] == row["trained"] + row["frozen"]
  assert row["mesh"] == (1, 8, 1)
  rows = config.train.global_batch_size // 8
  cache_length = config.data.prompt_length + config.sampling.max_new_tokens
  assert cfg.dtype == "bfloat16"  # The cache's dtype: 2 bytes.
  assert (row["rows_per_device"], row["minibatch_rows_per_device"],
          row["ptx_rows_per_device"]) == (64, 8, 1)
  assert row["kv_cache"] == (2 * cfg.num_layers * rows * cache_length * cfg.num_kv_heads
                             * cfg.head_dim * 2)
  assert row["sampling"] > 2 * row["kv_cache"]
  # The prefill's LM head runs on the last prompt position only (`logits_from=-1`).
  assert row["sampling"] == 2 * row["kv_cache"] + memory.forward_bytes(
      cfg, "lm", rows, config.data.prompt_length, keys=cache_length, logit_positions=1)
  assert row["total"] == row["state"] + max(row["sampling"], row["scoring"], row["update"])
  # Without PPO-ptx the update has no pretraining rows; the rollout is the same.
  plain = memory.ppo_memory("pythia_1b", 8, "fsdp")
  assert plain["ptx_rows_per_device"] == 0 and plain["update"] < row["update"]
  assert (plain["state"], plain["kv_cache"], plain["sampling"]) == (row["state"], row["kv_cache"],
                                                                    row["sampling"])
