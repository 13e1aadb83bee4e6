"""Hugging Face checkpoints: import and export against transformers' PyTorch models.

For each family (GPT-2, GPT-NeoX/Pythia with partial rotary and parallel residual, Llama with
grouped-query attention) a small random model is built by transformers from its config, every
weight randomised (norm scales and biases too, so each one matters), and saved; the imported
parameters must give the same float32 logits (with left and right padding) and the same greedy
generations; an export must load in transformers and import back unchanged.

PyTorch is a test requirement (the `torch` extra): it is imported here unconditionally.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding

from instruct import checkpoint as ckpt_lib
from instruct import config_lib
from instruct import hf
from instruct import sharding as shd
from instruct import trainer
from instruct.data import DEFAULT_TOKENIZER
from instruct.hf import files as hf_files
from instruct.model import ModelConfig, Transformer, layers, stack_layers
from instruct.model.config import count_params
from instruct.rl.sampler import SamplingConfig, make_sampler

# The module export() looks its helpers up in, for monkeypatching.
hf_export = importlib.import_module("instruct.hf.exporting")

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("gpt2", "gpt_neox", "llama")
VOCAB = 512  # The embedded tokenizer's size, so exported runs carry a matching tokenizer.
# Measured 2026-11-28, AVX-512 and AVX2 (XLA_FLAGS=--xla_cpu_max_isa=AVX2 with
# ATEN_CPU_CAPABILITY=avx2): every logit comparison against transformers uses <= 13% of it
# (max error 1.3e-5 at |logits| up to 22).
TOLERANCE = 1e-4


def hf_config(family: str, **overrides):
  """A 2-layer, d=64 transformers config of `family`."""
  if family == "gpt2":
    c = transformers.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                                bos_token_id=0, eos_token_id=0)
  elif family == "gpt_neox":  # Pythia-like: a quarter of each head rotated, parallel residual.
    c = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
        rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25
        })
  else:  # Grouped-query attention, untied head, a non-default rope theta.
    c = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 intermediate_size=192, max_position_embeddings=128, bos_token_id=0,
                                 eos_token_id=0,
                                 rope_parameters={"rope_type": "default", "rope_theta": 5e5})
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def randomize(model, seed: int):
  """Every weight random: norm scales ~1, biases ~0.1, matrices ~1/sqrt(64), embeddings 0.5."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.1 * noise)
      elif any(e in name for e in ("wte", "wpe", "embed_in", "embed_tokens")):
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / 8.0)
  return model.eval()


def hf_model(family: str, cls=transformers.AutoModelForCausalLM, seed: int = 0, **overrides):
  torch.manual_seed(seed)
  return randomize(cls.from_config(hf_config(family, **overrides)), seed)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """family -> (torch model, single-file dir, sharded dir)."""
  out = {}
  for i, family in enumerate(FAMILIES):
    model = hf_model(family, seed=i)
    root = tmp_path_factory.mktemp(family)
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="100KB")
    out[family] = (model, str(root / "single"), str(root / "sharded"))
  return out


def inputs(seed: int = 0, batch: int = 3, length: int = 12):
  """Random tokens with a left-padded row and a right-padded row."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, VOCAB, (batch, length))
  mask = np.ones_like(tokens)
  mask[1, :4] = 0
  mask[2, 9:] = 0
  return tokens, mask


def torch_logits(model, tokens, mask):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)  # Ours: the cumulative sum of the mask.
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg: ModelConfig, head: str):
  model = Transformer(cfg, head)
  return jax.jit(lambda p, t, m: model.apply({"params": p}, t, m))


def our_logits(cfg, params, tokens, mask):
  return np.asarray(_forward(cfg, "lm")(params, tokens, mask).logits)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ---------------------------------------------------------------------------------- import


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_logits_match_transformers(saved, family):
  """Single-file and sharded (index) checkpoints give transformers' logits, padded rows too."""
  model, single, sharded = saved[family]
  assert os.path.exists(os.path.join(sharded, hf.SAFE_INDEX))
  assert len([f for f in os.listdir(sharded) if f.endswith(".safetensors")]) > 1
  cfg = hf.model_config_from_hf(model.config)
  assert hf.model_config_from_hf(hf.read_hf_config(single)) == cfg
  tokens, mask = inputs()
  expected = torch_logits(model, tokens, mask)
  params = hf.load_hf_params(single, cfg)
  assert_trees_equal(params, hf.load_hf_params(sharded, cfg))
  ours = our_logits(cfg, params, tokens, mask)
  real = mask > 0
  assert np.abs(expected[real]).max() > 1.0  # Not trivially small.
  np.testing.assert_allclose(ours[real], expected[real], atol=TOLERANCE, rtol=0)


# Scaled rotary embeddings. The original context (32) is short and the model's long (128), so
# the frequency pairs of a 16-wide head fall in every regime of 'llama3' and the test reaches
# positions far past the original context.
SCALED_ROPE = {
    "llama-llama3": ("llama", {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32
    }),
    "llama-linear": ("llama", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "gpt_neox-linear": ("gpt_neox", {
        "rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5
    }),
}


@pytest.mark.parametrize("name", sorted(SCALED_ROPE))
def test_scaled_rope_matches_transformers(name, tmp_path):
  """Llama 3.1 'llama3' and 'linear' RoPE scaling: the frequencies equal transformers'
  `ROPE_INIT_FUNCTIONS`, and logits over 100 positions match; export keeps the scaling."""
  family, rope = SCALED_ROPE[name]
  model = hf_model(family, seed=7, rope_parameters=rope)
  model.save_pretrained(tmp_path / "hf")
  cfg = hf.model_config_from_hf(hf.read_hf_config(str(tmp_path / "hf")))
  assert cfg.rope_scaling == rope["rope_type"] and cfg.rope_factor == rope["factor"]
  theirs, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope["rope_type"]](model.config,
                                                                                      "cpu")
  unscaled = layers.rope_frequencies(dataclasses.replace(cfg, rope_scaling="none"))
  ours = layers.rope_frequencies(cfg)
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  assert not np.allclose(ours, unscaled)  # The scaling changes the frequencies.
  tokens, mask = inputs(seed=3, batch=3, length=100)
  mask[1, :30] = 0  # And row 2 is right-padded after 9 tokens.
  expected = torch_logits(model, tokens, mask)
  params = hf.load_hf_params(str(tmp_path / "hf"), cfg)
  real = mask > 0
  np.testing.assert_allclose(
      our_logits(cfg, params, tokens, mask)[real], expected[real], atol=TOLERANCE, rtol=0)
  # Without the scaling the same weights give different logits: the test can tell.
  wrong = our_logits(dataclasses.replace(cfg, rope_scaling="none", rope_factor=1.0), params, tokens,
                     mask)
  assert np.abs(wrong[real] - expected[real]).max() > 100 * TOLERANCE
  exported = hf.hf_config_from_model_config(cfg, family)
  assert hf.model_config_from_hf(exported) == cfg
  assert hf.model_config_from_hf(json.loads(exported.to_json_string())) == cfg


def round_trip(family: str, tmp_path, seed: int, **overrides):
  """A random transformers model with `overrides` is saved, imported (logits must match) and
  exported from a run (transformers must load it with the same logits, and import it back
  unchanged). Returns (our config, our parameters, the exported model's config)."""
  model = hf_model(family, seed=seed, **overrides)
  model.save_pretrained(tmp_path / "hf")
  cfg = hf.model_config_from_hf(hf.read_hf_config(str(tmp_path / "hf")))
  params = hf.load_hf_params(str(tmp_path / "hf"), cfg)
  tokens, mask = inputs(seed=seed)
  real = mask > 0
  expected = torch_logits(model, tokens, mask)
  np.testing.assert_allclose(
      our_logits(cfg, params, tokens, mask)[real], expected[real], atol=TOLERANCE, rtol=0)
  out = hf.export(write_run(tmp_path / "run", "sft", cfg, params), str(tmp_path / "out"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(
      torch_logits(exported, tokens, mask)[real], expected[real], atol=1e-6, rtol=0)
  assert_trees_equal(hf.load_hf_params(out, cfg), jax.device_get(params))
  return cfg, params, exported.config


@pytest.mark.parametrize("family,overrides", [
    ("gpt_neox", dict(attention_bias=False)),
    ("llama", dict(attention_bias=True, mlp_bias=False)),
    ("llama", dict(attention_bias=False, mlp_bias=True)),
], ids=["neox-no-attention-bias", "llama-attention-bias", "llama-mlp-bias"])
def test_attention_and_mlp_biases_apart(family, overrides, tmp_path):
  """GPT-NeoX without attention biases and Llama with only attention or only MLP biases
  (`attention_bias` apart from `use_bias`): the biases that exist are loaded, logits match,
  and export writes the same layout back."""
  cfg, params, exported = round_trip(family, tmp_path, 13, **overrides)
  assert cfg.attn_bias == overrides["attention_bias"]
  assert cfg.use_bias == overrides.get("mlp_bias", True)
  assert ("bias" in params["layers_0"]["attn"]["q_proj"]) == cfg.attn_bias
  assert ("bias" in params["layers_0"]["mlp"]["down_proj"]) == cfg.use_bias
  for key, value in overrides.items():
    assert getattr(exported, key) == value, key


@pytest.mark.parametrize("family,tied", [("gpt2", False), ("gpt_neox", True), ("llama", True)])
def test_other_embedding_tying_imports_and_exports(family, tied, tmp_path):
  """The tying each family's fixture does not use (GPT-2 untied; Pythia-like and Llama tied, as
  Llama-3.2-1B is): logits match, and the export loads in transformers with the same logits
  and imports back unchanged."""
  cfg, params, exported = round_trip(family, tmp_path, 11, tie_word_embeddings=tied)
  assert cfg.tie_embeddings == tied and exported.tie_word_embeddings == tied
  assert ("lm_head" in params) != tied


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(saved, family):
  """Our jitted sampler at temperature 0 and `generate(do_sample=False)` agree token for token,
  on left-padded prompts."""
  model, single, _ = saved[family]
  cfg = hf.model_config_from_hf(model.config)
  params = hf.load_hf_params(single, cfg)
  eos, pad, new = 3, 1, 8
  tokens = np.random.default_rng(1).integers(4, VOCAB, (2, 6))
  mask = np.ones_like(tokens)
  tokens[0, :2], mask[0, :2] = pad, 0
  sample = jax.jit(
      make_sampler(Transformer(cfg),
                   SamplingConfig(max_new_tokens=new, eos_id=eos, pad_id=pad, temperature=0.0)))
  ours = np.asarray(sample(params, tokens, mask, jax.random.key(0)).response_tokens)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                            do_sample=False, max_new_tokens=new, eos_token_id=eos,
                            pad_token_id=pad).numpy()[:, tokens.shape[1]:]
  theirs = np.pad(theirs, ((0, 0), (0, new - theirs.shape[1])), constant_values=pad)
  # No near-ties: measured 2026-11-28, AVX-512 and AVX2, the smallest top-1 / top-2 logit gap
  # on these paths is 0.040 (0.165 / 0.071 / 0.040 for gpt2 / gpt_neox / llama; >= 8.7e-4
  # over model seeds 0-7), against logit errors <= 1.1e-5.
  np.testing.assert_array_equal(ours, theirs)


def test_sharded_loading_places_each_array_in_its_target_sharding(saved, monkeypatch):
  """On an 8-device mesh (fsdp=4, tensor=2) every parameter is created in the sharding the
  rule table gives it (scanned layers too), reading only each shard's block from disk."""
  mesh = shd.make_mesh(
      ml_collections.ConfigDict(dict(shape=(1, 4, 2), axis_names=("data", "fsdp", "tensor"))))
  reads = []
  original = hf_files._Tensors.read

  def spy(self, name, index):
    block = original(self, name, index)
    reads.append((name, block.size, math.prod(self.shape(name))))
    return block

  monkeypatch.setattr(hf_files._Tensors, "read", spy)
  for family, scan in (("gpt2", False), ("gpt_neox", True), ("llama", True)):
    model, single, sharded = saved[family]
    cfg = hf.model_config_from_hf(model.config, scan_layers=scan)
    boxed = jax.eval_shape(lambda r: Transformer(cfg).init(r, jnp.zeros((1, 8), jnp.int32)),
                           jax.random.key(0))["params"]
    shardings = shd.tree_shardings(mesh, shd.DEFAULT_RULES, boxed)
    reads.clear()
    params = hf.load_hf_params(sharded, cfg, shardings)
    for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree.leaves(shardings)):
      assert isinstance(x.sharding, NamedSharding) and x.sharding.is_equivalent_to(
          s, x.ndim), (family, jax.tree_util.keystr(path), x.sharding, s)
    kernel = params["layers"]["attn"]["q_proj"]["kernel"] if scan else (
        params["layers_0"]["attn"]["q_proj"]["kernel"])
    assert not kernel.is_fully_replicated
    # Sharded parameters are read block by block: q_proj reads are quarters of an eighth.
    assert any(size < full for _, size, full in reads)
    assert all(size <= full for _, size, full in reads)
    reference = hf.load_hf_params(single, hf.model_config_from_hf(model.config))
    if scan:
      reference = stack_layers(reference, cfg.num_layers)
    assert_trees_equal(jax.device_get(params), jax.device_get(reference))


def test_bfloat16_checkpoint_is_read_through_a_memory_map(saved, tmp_path):
  """numpy has no bfloat16: such tensors are read via ml_dtypes, converted to float32."""
  model, single, _ = saved["llama"]
  copy.deepcopy(model).to(torch.bfloat16).save_pretrained(tmp_path)
  cfg = hf.model_config_from_hf(model.config)
  params = hf.load_hf_params(str(tmp_path), cfg)
  reference = hf.load_hf_params(single, cfg)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-2),
               jax.device_get(params), jax.device_get(reference))
  assert jax.tree.leaves(params)[0].dtype == jnp.float32


def test_pickle_only_checkpoint_is_refused_without_opt_in(saved, tmp_path):
  model, single, _ = saved["gpt_neox"]
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  model.config.save_pretrained(tmp_path)
  cfg = hf.model_config_from_hf(model.config)
  with pytest.raises(ValueError, match="pickled PyTorch weights.*allow_pickle=True"):
    hf.load_hf_params(str(tmp_path), cfg)
  assert_trees_equal(hf.load_hf_params(str(tmp_path), cfg, allow_pickle=True),
                     hf.load_hf_params(single, cfg))
  # Sharded pickles: pytorch_model-0000k-of-00002.bin with pytorch_model.bin.index.json.
  sharded = tmp_path / "sharded"
  model.config.save_pretrained(sharded)
  state = model.state_dict()
  names = sorted(state)
  weight_map = {}
  for k, part in enumerate((names[::2], names[1::2])):
    file = f"pytorch_model-{k + 1:05d}-of-00002.bin"
    torch.save({n: state[n] for n in part}, sharded / file)
    weight_map.update({n: file for n in part})
  (sharded / hf.PICKLE_INDEX).write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(ValueError, match="pickled PyTorch weights"):
    hf.load_hf_params(str(sharded), cfg)
  assert_trees_equal(hf.load_hf_params(str(sharded), cfg, allow_pickle=True),
                     hf.load_hf_params(single, cfg))


def test_unsupported_checkpoints_are_clear_errors(saved, tmp_path):
  with pytest.raises(ValueError, match="Unsupported Hugging Face model_type 'bert'.*gpt2, "
                     "gpt_neox, llama"):
    hf.model_config_from_hf(transformers.BertConfig())
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
  with pytest.raises(ValueError, match="model_type 'mistral'"):
    hf.load_hf_params(str(tmp_path))
  yarn = hf_config(
      "llama", rope_parameters={
          "rope_type": "yarn", "rope_theta": 5e5, "factor": 4.0,
          "original_max_position_embeddings": 64
      })
  with pytest.raises(ValueError, match="rope_type='yarn'.*'default', 'linear' and 'llama3'"):
    hf.model_config_from_hf(yarn)
  with pytest.raises(ValueError, match="Invalid llama config.*'llama3'.*low_freq_factor"):
    hf.model_config_from_hf({
        "model_type": "llama", "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64
        }
    })
  with pytest.raises(ValueError, match="activation_function='relu'"):
    hf.model_config_from_hf(hf_config("gpt2", activation_function="relu"))
  # A config that does not match the checkpoint names the differing fields.
  _, single, _ = saved["llama"]
  cfg = hf.model_config_from_hf(hf.read_hf_config(single), d_ff=128)
  with pytest.raises(ValueError,
                     match=r"does not match .*config.json: d_ff=128 \(checkpoint: 192\)"):
    hf.load_hf_params(single, cfg)
  # Weights that do not match their config.json: the tensor and both shapes are named.
  shutil.copytree(single, tmp_path / "edited")
  edited = dict(hf.read_hf_config(single), intermediate_size=128)
  (tmp_path / "edited" / "config.json").write_text(json.dumps(edited))
  with pytest.raises(
      ValueError, match=r"mlp\.\w+\.weight of .* has shape .* but the model "
      r"config needs \((128, 64|64, 128)\)"):
    hf.load_hf_params(str(tmp_path / "edited"))


def test_hub_names_resolve_through_the_cache_only(saved, tmp_path):
  """A cached hub name loads offline; an uncached one is a clear error (no download)."""
  _, single, _ = saved["gpt2"]
  commit = "0123456789abcdef0123456789abcdef01234567"
  repo = tmp_path / "models--someone--tiny-gpt2"
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text(commit)
  snapshot = repo / "snapshots" / commit
  snapshot.mkdir(parents=True)
  for name in os.listdir(single):
    os.symlink(os.path.join(single, name), snapshot / name)
  cached = hf.load_hf_params("someone/tiny-gpt2", cache_dir=str(tmp_path))
  assert_trees_equal(cached, hf.load_hf_params(single))
  with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
    hf.load_hf_params("someone/not-cached", cache_dir=str(tmp_path))


# ---------------------------------------------------------------------------------- export


def write_run(workdir, stage: str, cfg: ModelConfig, params, extras=None, step: int = 3):
  """A run directory as the trainer leaves it: config.json and a checkpoint of params."""
  config = config_lib.base_config()
  config.stage = stage
  config.model = ml_collections.ConfigDict(dict(cfg.__dict__, hf_checkpoint=""))
  config.data.tokenizer = DEFAULT_TOKENIZER
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.write_config(str(workdir), config)
  checkpointer = ckpt_lib.Checkpointer(str(workdir))
  checkpointer.save(step, {"step": jnp.int32(step), "params": params}, extras or {})
  checkpointer.close()
  return str(workdir)


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_policy_loads_in_transformers_and_imports_back(saved, tmp_path, family):
  model, single, _ = saved[family]
  cfg = hf.model_config_from_hf(model.config)
  params = hf.load_hf_params(single, cfg)
  run = write_run(tmp_path / "run", "sft", cfg, params)
  out = hf.export(run, str(tmp_path / "hf"))
  assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(os.listdir(out))
  assert hf.infer_family(cfg) == family
  # export -> import is the identity on parameters.
  assert_trees_equal(hf.load_hf_params(out, cfg), jax.device_get(params))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(exported).__name__ == hf.CAUSAL_LM[family]
  assert (exported.config.eos_token_id, exported.config.pad_token_id) == (0, 1)
  tokens, mask = inputs(seed=2)
  real = mask > 0
  np.testing.assert_allclose(
      our_logits(cfg, params, tokens, mask)[real],
      torch_logits(exported, tokens, mask)[real], atol=TOLERANCE, rtol=0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert len(tokenizer) == VOCAB and tokenizer.pad_token_id == 1
  with pytest.raises(FileExistsError, match="not empty"):
    hf.export(run, out)


def test_sharded_bfloat16_export_of_an_fsdp_run(saved, tmp_path, monkeypatch):
  """A scanned-layer run restored over an 8-device FSDP x tensor mesh exports as several
  safetensors files with an index, gathering one layer's tensor at a time; transformers loads
  it, and import gives the parameters back (float32 exactly, bfloat16 rounded)."""
  model, single, _ = saved["llama"]
  cfg = hf.model_config_from_hf(model.config, scan_layers=True)
  params = stack_layers(hf.load_hf_params(single, hf.model_config_from_hf(model.config)),
                        cfg.num_layers)
  run = write_run(tmp_path / "run", "sft", cfg, params)
  restored, gathered = [], []
  load_run, param = hf_export._load_run, hf_export._param
  monkeypatch.setattr(hf_export, "_load_run",
                      lambda *a: restored.append(load_run(*a)) or restored[-1])
  monkeypatch.setattr(hf_export, "_param", lambda *a: gathered.append(param(*a)) or gathered[-1])
  out = hf.export(run, str(tmp_path / "hf"), max_shard_size="60KB", mesh_shape=(1, 4, 2))
  q = restored[0].params["layers"]["attn"]["q_proj"]["kernel"]
  assert q.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
  assert not q.is_fully_replicated
  # One layer's parameter at a time, each once: as many arrays as the unscanned model has,
  # adding up to its parameter count.
  unscanned_leaves = jax.tree.leaves(
      hf.load_hf_params(single, hf.model_config_from_hf(model.config)))
  assert len(gathered) == len(unscanned_leaves)
  assert sum(g.size for g in gathered) == count_params(cfg)
  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  index = json.load(open(os.path.join(out, hf.SAFE_INDEX)))
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert set(index["weight_map"].values()) == set(files)
  # A file holds at most 60 KB of tensors, unless it is one tensor larger than that.
  for f in files:
    held = [t for t, file in index["weight_map"].items() if file == f]
    assert len(held) == 1 or os.path.getsize(os.path.join(out, f)) < 60_000 + 4_096, (f, held)
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # No staging left.
  unscanned = hf.model_config_from_hf(model.config)
  assert_trees_equal(hf.load_hf_params(out, unscanned), hf.load_hf_params(single, unscanned))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens, mask = inputs(seed=5)
  real = mask > 0
  np.testing.assert_allclose(
      torch_logits(exported, tokens, mask)[real],
      torch_logits(model, tokens, mask)[real], atol=1e-6, rtol=0)
  # bfloat16: half the bytes, and every weight is the float32 one rounded to bfloat16.
  bf16 = hf.export(run, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_size="60KB")
  assert hf.read_hf_config(bf16)["dtype"] == "bfloat16"
  size = lambda d: sum(
      os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)  # noqa: E731
      if f.endswith(".safetensors"))
  assert size(bf16) < 0.55 * size(out)
  jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(
          a,
          np.asarray(b).astype(ml_dtypes.bfloat16).astype(np.float32)),
      jax.device_get(hf.load_hf_params(bf16, unscanned)), hf.load_hf_params(single, unscanned))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16)
  assert next(loaded.parameters()).dtype == torch.bfloat16


def test_failed_export_leaves_the_previous_export(saved, tmp_path, monkeypatch):
  """With --overwrite, an export that fails part-way changes nothing already in --out."""
  model, single, _ = saved["gpt2"]
  cfg = hf.model_config_from_hf(model.config)
  run = write_run(tmp_path / "run", "sft", cfg, hf.load_hf_params(single, cfg))
  out = hf.export(run, str(tmp_path / "hf"))
  before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
  tensors = hf.iter_hf_tensors

  def failing(*args):
    for i, item in enumerate(tensors(*args)):
      if i == 3:
        raise OSError("disk full")
      yield item

  monkeypatch.setattr(hf_export, "iter_hf_tensors", failing)
  with pytest.raises(OSError, match="disk full"):
    hf.export(run, out, overwrite=True, max_shard_size="10KB")
  assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
  assert sorted(os.listdir(tmp_path)) == ["hf", "run"]
  with pytest.raises(ValueError, match="max_shard_size='5 parsecs'"):
    hf.export(run, out, overwrite=True, max_shard_size="5 parsecs")
  with pytest.raises(ValueError, match="dtype='float16'"):
    hf.export(run, out, overwrite=True, dtype="float16")
  assert [hf.parse_size(x) for x in ("5GB", "500MB", "2GiB", "100KB", 7)
         ] == [5 * 10 ** 9, 5 * 10 ** 8, 2 * 2 ** 30, 10 ** 5, 7]


def test_ppo_run_exports_its_policy(saved, tmp_path):
  """A ppo run's checkpoint holds the policy under `policy`; its architecture is the SFT
  run's (`policy_from`)."""
  model, single, _ = saved["gpt_neox"]
  cfg = hf.model_config_from_hf(model.config)
  params = hf.load_hf_params(single, cfg)
  sft = write_run(tmp_path / "sft", "sft", cfg, params)
  config = config_lib.base_config()
  config.stage, config.policy_from = "ppo", sft
  del config.model
  config.data.tokenizer = DEFAULT_TOKENIZER
  os.makedirs(tmp_path / "ppo")
  ckpt_lib.write_config(str(tmp_path / "ppo"), config)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ppo"))
  checkpointer.save(5, {"policy": {"params": params}}, {})
  checkpointer.close()
  out = hf.export(str(tmp_path / "ppo"), str(tmp_path / "hf"))
  assert "step 5" in open(os.path.join(out, "README.md")).read()
  assert_trees_equal(hf.load_hf_params(out, cfg), jax.device_get(params))


def test_exported_reward_model_is_a_sequence_classifier_with_its_bias_recorded(saved, tmp_path):
  """An rm run exports as LlamaForSequenceClassification (num_labels=1): HF's logits plus the
  recorded `instruct_score_bias` are our raw rewards at the last real token."""
  model, single, _ = saved["llama"]
  cfg = hf.model_config_from_hf(model.config)
  params = {k: v for k, v in hf.load_hf_params(single, cfg).items() if k != "lm_head"}
  rng = np.random.default_rng(0)
  params["scalar_head"] = {
      "kernel": jnp.asarray(rng.standard_normal((64, 1)), jnp.float32),
      "bias": jnp.asarray([0.75], jnp.float32)
  }
  norm = {"gain": 2.0, "bias": -0.5, "mode": "policy_samples", "num_scored": 10}
  run = write_run(tmp_path / "rm", "rm", cfg, params, {"reward_normalization": norm})
  out = hf.export(run, str(tmp_path / "hf"))
  saved_config = hf.read_hf_config(out)
  assert saved_config["architectures"] == ["LlamaForSequenceClassification"]
  assert saved_config[hf.SCORE_BIAS_KEY] == 0.75
  assert saved_config[hf.NORMALIZATION_KEY]["gain"] == 2.0
  assert "reward = 2.0 * (logits + 0.75) + -0.5" in open(os.path.join(out, "README.md")).read()
  exported = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
  assert exported.config.num_labels == 1
  tokens, mask = inputs(seed=3)
  tokens, mask = tokens[[0, 2]], mask[[0, 2]]  # Right padding with the pad token.
  tokens[mask == 0] = exported.config.pad_token_id
  with torch.no_grad():
    theirs = exported(input_ids=torch.tensor(tokens),
                      attention_mask=torch.tensor(mask)).logits.numpy()[:, 0]
  values = np.asarray(_forward(cfg, "scalar")(params, tokens, mask).values)
  last = mask.sum(1) - 1
  ours = values[np.arange(len(last)), last]
  np.testing.assert_allclose(theirs + 0.75, ours, atol=TOLERANCE, rtol=0)
  # Import restores the bias from config.json: the identity on parameters.
  assert_trees_equal(hf.load_hf_params(out, cfg, head="scalar"), jax.device_get(params))


def test_export_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    hf.export(str(tmp_path / "nothing"), str(tmp_path / "out"))
  cfg = ModelConfig(num_kv_heads=2, position="rope", use_bias=True)  # GQA with LayerNorm.
  with pytest.raises(ValueError, match="no Hugging Face equivalent.*num_kv_heads == num_heads"):
    hf.infer_family(cfg)


def test_export_command_line(saved, tmp_path):
  model, single, _ = saved["gpt2"]
  cfg = hf.model_config_from_hf(model.config)
  run = write_run(tmp_path / "run", "pretrain", cfg, hf.load_hf_params(single, cfg))
  command = [
      sys.executable, "-m", "instruct.export", f"--workdir={run}", f"--out={tmp_path / 'hf'}",
      "--max_shard_size=100KB", "--mesh_shape=1,-1,1"
  ]
  env = dict(os.environ, JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert os.path.exists(tmp_path / "hf" / hf.SAFE_INDEX)
  assert_trees_equal(hf.load_hf_params(str(tmp_path / "hf"), cfg), hf.load_hf_params(single, cfg))
  bad = subprocess.run(command[:-2] + ["--overwrite", "--mesh_shape=3,-1,1"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "over mesh_shape (--mesh_shape)" in bad.stderr
  assert "(3, -1, 1) does not divide the 4 available devices" in bad.stderr
  assert_trees_equal(hf.load_hf_params(str(tmp_path / "hf"), cfg), hf.load_hf_params(single, cfg))


# ---------------------------------------------------------------------------------- training


def test_training_starts_from_config_model_hf_checkpoint(saved, tmp_path, tfds_dir):
  """config.model.hf_checkpoint sets the architecture (numerics kept) and the initial
  parameters, loaded into the state's shardings."""
  model, single, _ = saved["gpt2"]
  config = config_lib.load_config_file(os.path.join(ROOT, "configs", "sft.py"), "tiny")
  config.data.tfds_dir = tfds_dir
  config.model.hf_checkpoint = single
  config.model.d_model = 32  # Overridden by the checkpoint's architecture.
  # A checkpoint tokenizer that declares no pad token, and the pad token given in the config.
  no_pad = transformers.AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
  pad = no_pad.pad_token
  no_pad.pad_token = None
  no_pad.save_pretrained(tmp_path / "tokenizer")
  config.data.tokenizer, config.data.pad_token = str(tmp_path / "tokenizer"), pad
  config.train.update(dict(num_steps=1, log_every=1, eval_every=0, checkpoint_every=1))
  config.optimizer.learning_rate = 0.0  # No update: the params stay the imported ones.
  state = trainer.train_and_evaluate(config, str(tmp_path / "run"))
  cfg = hf.model_config_from_hf(model.config)
  written = ckpt_lib.read_config(str(tmp_path / "run"))["model"]
  assert ModelConfig.from_dict(written) == cfg and written["hf_checkpoint"] == single
  assert_trees_equal(jax.device_get(state.params), hf.load_hf_params(single, cfg))
  # HF -> training -> HF: the exported run is the model it started from.
  out = hf.export(str(tmp_path / "run"), str(tmp_path / "hf"))
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert transformers.AutoTokenizer.from_pretrained(out).pad_token == pad
  tokens, mask = inputs(seed=4)
  np.testing.assert_allclose(torch_logits(exported, tokens, mask),
                             torch_logits(model, tokens, mask), atol=1e-6, rtol=0)
  config.init_from = str(tmp_path / "run")
  with pytest.raises(ValueError, match="init_from.*hf_checkpoint.*both set"):
    trainer.train_and_evaluate(config, str(tmp_path / "other"))
