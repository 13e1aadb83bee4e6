"""Hugging Face checkpoints: import GPT-2, GPT-NeoX (Pythia) and Llama weights, export runs.

Import:

  cfg = model_config_from_hf(transformers.AutoConfig.from_pretrained(path))
  params = load_hf_params(path, cfg, shardings)   # each tensor placed straight into its shards

`path` is a local checkpoint directory (config.json with model.safetensors, or sharded
model-0000x-of-0000y.safetensors with model.safetensors.index.json) or a hub name already in
the Hugging Face cache. Every parameter is built by `jax.make_array_from_callback` with its
target sharding; the callback reads only the rows/columns of the source tensor that the shard
needs (`safetensors.safe_open(..., framework='numpy').get_slice`, or a memory map for dtypes
numpy lacks, e.g. bfloat16), so no full host copy of a sharded parameter is made. Pickled
`pytorch_model.bin` checkpoints are refused unless `allow_pickle=True`.

The name mapping is a table per family: each of our parameters is a view of one source tensor
(axes split, e.g. [heads * head_dim, d] -> [heads, head_dim, d]), possibly one slice of a
fused tensor (GPT-2's Conv1D `c_attn` is [d, (q|k|v) x heads x head_dim]; GPT-NeoX's
`query_key_value` is per-head interleaved, [heads x (q|k|v) x head_dim, d]), transposed into
our layout (kernels are [in..., out...]). Rotary embeddings need no permutation: ours use the
'rotate half' layout of HF Llama and GPT-NeoX (`instruct.model.layers.apply_rope`).

Export (`export(workdir, out_dir)`) writes a pretrain / sft / ppo run's policy as a
`...ForCausalLM` directory and an `rm` run as a `...ForSequenceClassification` with
`num_labels=1`, with config.json, model.safetensors and the run's tokenizer. HF's `score`
layer has no bias while our scalar head has one; the bias is a constant shift of every reward
(the ranking loss is blind to it), so the exported `score.weight` is our kernel and the bias is
recorded in config.json as `instruct_score_bias` (with the run's reward normalisation as
`instruct_reward_normalization`), and README.md gives the formula:
reward = gain * (logits + instruct_score_bias) + bias. Importing the directory back restores
the bias from config.json, so export -> import is the identity on parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import struct
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from instruct.model.config import ModelConfig
from instruct.model.transformer import Transformer

FAMILIES = ("gpt2", "gpt_neox", "llama")
CAUSAL_LM = {"gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM",
             "llama": "LlamaForCausalLM"}
SEQUENCE_CLASSIFICATION = {"gpt2": "GPT2ForSequenceClassification",
                           "gpt_neox": "GPTNeoXForSequenceClassification",
                           "llama": "LlamaForSequenceClassification"}
# Prefix of the backbone's tensors in the checkpoints of the task models (base-model
# checkpoints, e.g. the original `gpt2`, have none).
PREFIX = {"gpt2": "transformer.", "gpt_neox": "gpt_neox.", "llama": "model."}
SCORE_BIAS_KEY = "instruct_score_bias"
NORMALIZATION_KEY = "instruct_reward_normalization"
# Fields of config.model that say how to compute, not what the architecture is: an HF
# checkpoint's config.json sets every other field.
NUMERICS_KEYS = ("dtype", "scan_layers", "remat", "dropout_rate", "init_std")
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


# --------------------------------------------------------------------------- configs


def _get(hf_config, key: str, default: Any = None) -> Any:
  if isinstance(hf_config, Mapping):
    return hf_config.get(key, default)
  return getattr(hf_config, key, default)


def _check_model_type(model_type) -> str:
  if model_type not in FAMILIES:
    raise ValueError(f"Unsupported Hugging Face model_type {model_type!r}: instruct imports "
                     f"{', '.join(FAMILIES)} checkpoints.")
  return model_type


def _as_hf_config(hf_config):
  """A transformers config object from a config object or a config.json dict (legacy fields,
  e.g. GPT-NeoX's `rotary_pct`, are normalised by transformers)."""
  model_type = _check_model_type(_get(hf_config, "model_type"))
  if isinstance(hf_config, Mapping):
    import transformers
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
      return transformers.AutoConfig.for_model(model_type, **fields)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"Invalid {model_type} config.json: {e}") from e
  return hf_config


def _rope(hf_config) -> dict[str, Any]:
  """The rotary fields of ModelConfig from an HF config: theta, rotary fraction and the
  frequency scaling ('default', 'linear' or 'llama3'; others are refused).

  transformers v5 keeps them in `rope_parameters`; older config.json files have top-level
  `rope_theta` / `rotary_emb_base` / `rotary_pct` and a `rope_scaling` dict.
  """
  params = dict(_get(hf_config, "rope_parameters", None) or {})
  legacy = dict(_get(hf_config, "rope_scaling", None) or {})
  scaling = {**legacy, **params}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ("default", "linear", "llama3"):
    raise ValueError(f"Unsupported rotary embedding scaling rope_type={rope_type!r} "
                     f"({scaling}); instruct implements 'default', 'linear' and 'llama3'.")
  theta = scaling.get("rope_theta", _get(hf_config, "rope_theta",
                                         _get(hf_config, "rotary_emb_base", 10000.0)))
  fraction = scaling.get("partial_rotary_factor",
                         _get(hf_config, "partial_rotary_factor",
                              _get(hf_config, "rotary_pct", 1.0)))
  fields = dict(rope_theta=float(theta), rotary_fraction=float(fraction))
  if rope_type == "default":
    return fields
  def need(key):
    if scaling.get(key) is None:
      raise ValueError(f"rope_type={rope_type!r} needs {key!r} in the checkpoint's rope "
                       f"parameters; got {scaling}.")
    return scaling[key]
  fields.update(rope_scaling=rope_type, rope_factor=float(need("factor")))
  if rope_type == "llama3":
    fields.update(rope_low_freq_factor=float(need("low_freq_factor")),
                  rope_high_freq_factor=float(need("high_freq_factor")),
                  rope_original_max_length=int(need("original_max_position_embeddings")))
  return fields


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers `rope_parameters` of `cfg` (the inverse of `_rope`)."""
  rope = {"rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
          "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling != "none":
    rope["factor"] = cfg.rope_factor
  if cfg.rope_scaling == "llama3":
    rope.update(low_freq_factor=cfg.rope_low_freq_factor,
                high_freq_factor=cfg.rope_high_freq_factor,
                original_max_position_embeddings=cfg.rope_original_max_length)
  return rope


def model_config_from_hf(hf_config, **overrides: Any) -> ModelConfig:
  """The ModelConfig of a transformers `GPT2Config`, `GPTNeoXConfig` or `LlamaConfig` (or a
  config.json dict); `overrides` set numerics fields (dtype, scan_layers, remat, ...)."""
  c = _as_hf_config(hf_config)
  family = c.model_type
  unsupported = []
  if family == "gpt2":
    d, heads = c.n_embd, c.n_head
    act = c.activation_function
    if act not in ("gelu",) + _TANH_GELUS:
      unsupported.append(f"activation_function={act!r}")
    if not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx:
      unsupported.append("attention scaling other than 1/sqrt(head_dim)")
    if getattr(c, "add_cross_attention", False):
      unsupported.append("add_cross_attention=True")
    fields = dict(vocab_size=c.vocab_size, d_model=d, num_layers=c.n_layer, num_heads=heads,
                  num_kv_heads=heads, head_dim=d // heads, d_ff=c.n_inner or 4 * d,
                  max_length=c.n_positions, norm="layernorm", norm_eps=c.layer_norm_epsilon,
                  mlp="gelu" if act == "gelu" else "gelu_tanh", position="learned",
                  tie_embeddings=bool(c.tie_word_embeddings), use_bias=True,
                  parallel_residual=False)
  elif family == "gpt_neox":
    d, heads = c.hidden_size, c.num_attention_heads
    if c.hidden_act not in ("gelu",) + _TANH_GELUS:
      unsupported.append(f"hidden_act={c.hidden_act!r}")
    attention_bias = bool(getattr(c, "attention_bias", True))
    fields = dict(vocab_size=c.vocab_size, d_model=d, num_layers=c.num_hidden_layers,
                  num_heads=heads, num_kv_heads=heads, head_dim=d // heads,
                  d_ff=c.intermediate_size, max_length=c.max_position_embeddings,
                  norm="layernorm", norm_eps=c.layer_norm_eps,
                  mlp="gelu" if c.hidden_act == "gelu" else "gelu_tanh", position="rope",
                  **_rope(c), tie_embeddings=bool(c.tie_word_embeddings), use_bias=True,
                  attention_bias=None if attention_bias else False,
                  parallel_residual=bool(c.use_parallel_residual))
  else:  # llama
    d, heads = c.hidden_size, c.num_attention_heads
    if c.hidden_act != "silu":
      unsupported.append(f"hidden_act={c.hidden_act!r}")
    attention_bias, mlp_bias = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
    fields = dict(vocab_size=c.vocab_size, d_model=d, num_layers=c.num_hidden_layers,
                  num_heads=heads, num_kv_heads=c.num_key_value_heads or heads,
                  head_dim=getattr(c, "head_dim", None) or d // heads,
                  d_ff=c.intermediate_size, max_length=c.max_position_embeddings,
                  norm="rmsnorm", norm_eps=c.rms_norm_eps, mlp="swiglu", position="rope",
                  **_rope(c), tie_embeddings=bool(c.tie_word_embeddings),
                  use_bias=mlp_bias,
                  attention_bias=None if attention_bias == mlp_bias else attention_bias,
                  parallel_residual=False)
  if unsupported:
    raise ValueError(f"This {family} checkpoint uses {'; '.join(unsupported)}, which "
                     "instruct's Transformer does not implement.")
  fields.update(overrides)
  return ModelConfig(**fields)


def family_problems(cfg: ModelConfig, family: str) -> list[str]:
  """Why `cfg` cannot be written as an HF `family` model (empty when it can)."""
  if family not in FAMILIES:
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES}.")
  problems = []
  def need(ok, what):
    if not ok:
      problems.append(what)
  if family in ("gpt2", "gpt_neox"):
    need(cfg.norm == "layernorm", "norm='layernorm'")
    need(cfg.mlp in ("gelu", "gelu_tanh"), "mlp='gelu' or 'gelu_tanh'")
    need(cfg.use_bias, "use_bias=True")
    need(cfg.num_kv_heads == cfg.num_heads, "num_kv_heads == num_heads")
    need(cfg.num_heads * cfg.head_dim == cfg.d_model, "num_heads * head_dim == d_model")
  if family == "gpt2":
    need(cfg.attn_bias, "attention biases (attention_bias None or True)")
    need(cfg.position == "learned", "position='learned'")
    need(not cfg.parallel_residual, "parallel_residual=False")
  if family == "gpt_neox":
    need(cfg.position == "rope", "position='rope'")
  if family == "llama":
    need(cfg.position == "rope", "position='rope'")
    need(cfg.norm == "rmsnorm", "norm='rmsnorm'")
    need(cfg.mlp == "swiglu", "mlp='swiglu'")
    need(not cfg.parallel_residual, "parallel_residual=False")
    need(cfg.rotary_fraction == 1.0, "rotary_fraction=1.0")
  return problems


def infer_family(cfg: ModelConfig) -> str:
  """The HF family that represents `cfg` exactly; a ValueError says why none does."""
  reasons = {}
  for family in FAMILIES:
    reasons[family] = family_problems(cfg, family)
    if not reasons[family]:
      return family
  raise ValueError("This model has no Hugging Face equivalent: " + "; ".join(
      f"{family} needs {', '.join(r)}" for family, r in reasons.items()))


def hf_config_from_model_config(cfg: ModelConfig, family: Optional[str] = None, *,
                                head: str = "lm", **token_ids: Optional[int]):
  """The transformers config of `cfg` as an HF `family` model ('lm': causal LM; 'scalar':
  sequence classification with one label). `token_ids`: bos/eos/pad_token_id."""
  import transformers
  family = family or infer_family(cfg)
  problems = family_problems(cfg, family)
  if problems:
    raise ValueError(f"The model cannot be exported as {family}: it needs "
                     f"{', '.join(problems)}.")
  if head not in ("lm", "scalar"):
    raise ValueError(f"head={head!r}; expected 'lm' or 'scalar'.")
  unknown = set(token_ids) - {"bos_token_id", "eos_token_id", "pad_token_id"}
  if unknown:
    raise TypeError(f"Unexpected arguments {sorted(unknown)}.")
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                dtype="float32", **token_ids)
  if head == "scalar":
    common.update(num_labels=1, architectures=[SEQUENCE_CLASSIFICATION[family]])
  else:
    common.update(architectures=[CAUSAL_LM[family]])
  if family == "gpt2":
    return transformers.GPT2Config(
        n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads, n_inner=cfg.d_ff,
        n_positions=cfg.max_length, layer_norm_epsilon=cfg.norm_eps,
        activation_function="gelu" if cfg.mlp == "gelu" else "gelu_new",
        resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=0.0,
        summary_first_dropout=0.0, **common)
  rope = _rope_parameters(cfg)
  if family == "gpt_neox":
    return transformers.GPTNeoXConfig(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_length, layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu" if cfg.mlp == "gelu" else "gelu_new",
        rope_parameters=dict(rope, partial_rotary_factor=cfg.rotary_fraction),
        use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.attn_bias,
        hidden_dropout=cfg.dropout_rate, attention_dropout=0.0, classifier_dropout=0.0,
        **common)
  return transformers.LlamaConfig(
      hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, intermediate_size=cfg.d_ff, max_position_embeddings=cfg.max_length,
      rms_norm_eps=cfg.norm_eps, hidden_act="silu", rope_parameters=rope,
      attention_bias=cfg.attn_bias, mlp_bias=cfg.use_bias, **common)


def resolve_model_config(model_config: Mapping[str, Any], local_files_only: bool = True,
                         cache_dir: Optional[str] = None) -> dict[str, Any]:
  """`config.model` (as a dict) with the architecture of its `hf_checkpoint`, if it has one.

  Every architecture field comes from the checkpoint's config.json; the numerics fields
  (`NUMERICS_KEYS`: dtype, scan_layers, remat, dropout_rate, init_std) are kept.
  """
  fields = dict(model_config.items())
  source = fields.get("hf_checkpoint", "")
  if not source:
    return fields
  path = resolve_checkpoint(source, local_files_only=local_files_only, cache_dir=cache_dir)
  numerics = {k: fields[k] for k in NUMERICS_KEYS if k in fields}
  cfg = model_config_from_hf(read_hf_config(path), **numerics)
  fields.update(dataclasses.asdict(cfg))
  return fields


def resolve_config(config):
  """The experiment config with `config.model` resolved from `config.model.hf_checkpoint`
  (a copy; `config` itself when there is no HF checkpoint)."""
  if "model" not in config or not config.model.get("hf_checkpoint", ""):
    return config
  fields = resolve_model_config(config.model)
  config = copy.deepcopy(config)
  with config.unlocked():
    for key, value in fields.items():
      config.model[key] = value
  logging.info("config.model from %s: %s", fields["hf_checkpoint"], fields)
  return config


# --------------------------------------------------------------------------- files


def resolve_checkpoint(name_or_path: str, *, local_files_only: bool = True,
                       cache_dir: Optional[str] = None) -> str:
  """A local checkpoint directory: `name_or_path` itself, or a hub name's cached snapshot.

  Hub names are looked up in the Hugging Face cache first; they are downloaded only with
  `local_files_only=False` (instruct never downloads at run time by default).
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise FileNotFoundError(f"Hugging Face checkpoint {name_or_path!r} is a file; expected a "
                            "checkpoint directory (config.json and weights).")
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
    raise FileNotFoundError(f"Hugging Face checkpoint directory {name_or_path!r} does not "
                            "exist.")
  import huggingface_hub
  from huggingface_hub import errors as hub_errors
  patterns = ["config.json", "*.safetensors", SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX,
              "pytorch_model-*.bin"]
  try:
    return huggingface_hub.snapshot_download(name_or_path, local_files_only=True,
                                             cache_dir=cache_dir, allow_patterns=patterns)
  except (hub_errors.LocalEntryNotFoundError, FileNotFoundError, OSError,
          hub_errors.HFValidationError) as e:
    cached_error = e
  if local_files_only:
    raise FileNotFoundError(
        f"Hugging Face checkpoint {name_or_path!r} is not a local directory and not in the "
        "Hugging Face cache; instruct does not download at run time. Download it first (e.g. "
        f"`huggingface-cli download {name_or_path}`) or pass a local directory.") from (
            cached_error)
  try:
    return huggingface_hub.snapshot_download(name_or_path, cache_dir=cache_dir,
                                             allow_patterns=patterns)
  except Exception as e:  # Offline, unknown repository, gated...
    raise FileNotFoundError(
        f"Could not download Hugging Face checkpoint {name_or_path!r} (offline, or no such "
        f"repository?): {e}") from e


def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of a checkpoint directory."""
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint.")
  with open(file) as f:
    return json.load(f)


def _weight_files(path: str, allow_pickle: bool) -> tuple[str, list[str]]:
  """('safetensors' | 'pickle', files) of a checkpoint directory."""
  index = os.path.join(path, SAFE_INDEX)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    return "safetensors", [os.path.join(path, f) for f in files]
  if os.path.exists(os.path.join(path, SAFE_WEIGHTS)):
    return "safetensors", [os.path.join(path, SAFE_WEIGHTS)]
  pickles = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
  if pickles:
    if not allow_pickle:
      raise ValueError(
          f"{path} holds only pickled PyTorch weights ({os.path.basename(pickles[0])}); "
          "unpickling can run arbitrary code, so it is refused. Convert the checkpoint to "
          "safetensors, or pass allow_pickle=True if you trust its source.")
    index = os.path.join(path, PICKLE_INDEX)
    if os.path.exists(index):
      with open(index) as f:
        pickles = [os.path.join(path, f) for f in sorted(set(json.load(f)["weight_map"].values()))]
    return "pickle", pickles
  raise FileNotFoundError(f"{path} has no weights: expected {SAFE_WEIGHTS} or {SAFE_INDEX} "
                          "(or pickled pytorch_model.bin, with allow_pickle=True).")


# safetensors dtypes numpy has no type for, read through a memory map with ml_dtypes.
_MEMMAP_DTYPES = {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
                  "F8_E5M2": ml_dtypes.float8_e5m2}


class _Tensors:
  """Read-only, sliced access to the tensors of a checkpoint, by name."""

  def __init__(self, kind: str, files: list[str]):
    self._handles, self._where, self._arrays, self._headers = {}, {}, {}, {}
    if kind == "pickle":
      import torch  # Only for pickled checkpoints (allow_pickle=True).
      for file in files:
        for name, t in torch.load(file, map_location="cpu", weights_only=True).items():
          self._arrays[name] = t.detach().float().numpy()
      return
    from safetensors import safe_open
    for file in files:
      handle = safe_open(file, framework="numpy")
      self._handles[file] = handle
      for name in handle.keys():
        self._where[name] = file

  def names(self) -> set[str]:
    return set(self._where) | set(self._arrays)

  def shape(self, name: str) -> tuple[int, ...]:
    if name in self._arrays:
      return self._arrays[name].shape
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] as float32, reading only that block from disk."""
    if name in self._arrays:
      return self._arrays[name][index]
    file = self._where[name]
    tensor = self._handles[file].get_slice(name)
    if tensor.get_dtype() in _MEMMAP_DTYPES:
      return np.asarray(self._memmap(file, name)[index], np.float32)
    return np.asarray(tensor[index], np.float32)

  def _memmap(self, file: str, name: str) -> np.ndarray:
    if file not in self._headers:
      with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        self._headers[file] = (8 + size, json.loads(f.read(size)))
    offset, header = self._headers[file]
    info = header[name]
    start, _ = info["data_offsets"]
    return np.memmap(file, dtype=_MEMMAP_DTYPES[info["dtype"]], mode="r",
                     offset=offset + start, shape=tuple(info["shape"]))

  def close(self) -> None:
    self._handles.clear()
    self._arrays.clear()


# --------------------------------------------------------------------------- name mapping


@dataclasses.dataclass(frozen=True)
class Source:
  """One of our parameters as a view of an HF tensor.

  The HF tensor (of `shape`) is reshaped to `view` (only splitting axes, e.g. [heads *
  head_dim, d] -> [heads, head_dim, d]), the view axes in `select` are fixed at an index (one
  part of a fused tensor), and the remaining view axes, in the order `perm`, are our
  parameter's axes.
  """

  names: tuple[str, ...]   # Candidate tensor names (aliases); the first one is written.
  shape: tuple[int, ...]
  view: tuple[int, ...]
  perm: tuple[int, ...]
  select: tuple[tuple[int, int], ...] = ()

  def groups(self) -> list[list[int]]:
    """The view axes of each axis of the HF tensor."""
    groups, axis = [], 0
    for size in self.shape:
      group, product = [], 1
      while axis < len(self.view) and (product < size or not group):
        product *= self.view[axis]
        group.append(axis)
        axis += 1
      assert product == size, (self.shape, self.view)
      groups.append(group)
    assert axis == len(self.view), (self.shape, self.view)
    return groups

  def read(self, tensors: _Tensors, name: str, target_index: tuple[tuple[int, int], ...]):
    """Our parameter's block `target_index` ([start, stop) per axis) from tensor `name`,
    reading only the rows/columns it covers."""
    selected = dict(self.select)
    ranges: list = [None] * len(self.view)
    for t_axis, v_axis in enumerate(self.perm):
      ranges[v_axis] = target_index[t_axis]
    for v_axis, k in selected.items():
      ranges[v_axis] = (k, k + 1)
    source_index, block_shape, post = [], [], []
    for group in self.groups():
      sizes = [self.view[a] for a in group]
      rs = [ranges[a] for a in group]
      # Axes before `p` are single indices; the block covers axis p's range, whole inner axes.
      p = next((j for j, (a, b) in enumerate(rs) if b - a != 1), len(group) - 1)
      strides = [math.prod(sizes[j + 1:]) for j in range(len(group))]
      base = sum(rs[j][0] * strides[j] for j in range(p))
      source_index.append(slice(base + rs[p][0] * strides[p], base + rs[p][1] * strides[p]))
      block_shape += [1] * p + [rs[p][1] - rs[p][0]] + sizes[p + 1:]
      post += [slice(None)] * (p + 1) + [slice(a, b) for a, b in rs[p + 1:]]
    x = tensors.read(name, tuple(source_index)).reshape(block_shape)[tuple(post)]
    x = x[tuple(0 if a in selected else slice(None) for a in range(len(self.view)))]
    remaining = [a for a in range(len(self.view)) if a not in selected]
    return np.ascontiguousarray(x.transpose([remaining.index(v) for v in self.perm]))

  def write(self, out: dict[str, np.ndarray], value: np.ndarray) -> None:
    """Writes our parameter `value` into HF tensor `names[0]` of `out` (zeros at first)."""
    name = self.names[0]
    if name not in out:
      out[name] = np.zeros(self.shape, np.float32)
    view = out[name].reshape(self.view)  # A view: writes go to out[name].
    selected = dict(self.select)
    remaining = [a for a in range(len(self.view)) if a not in selected]
    index = tuple(selected.get(a, slice(None)) for a in range(len(self.view)))
    view[index] = np.transpose(value, [self.perm.index(v) for v in remaining])


def _src(shape, view, perm, select=()) -> Source:
  return Source((), tuple(shape), tuple(view), tuple(perm), tuple(select))


def _layer_sources(cfg: ModelConfig, family: str) -> dict[tuple[str, ...], tuple[str, Source]]:
  """Our per-layer parameter path -> (HF tensor name within the layer, Source)."""
  d, f, h, kv, hd = cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  vec = lambda n: _src((n,), (n,), (0,))
  out = {}
  def norm(ours, theirs):
    out[(ours, "scale")] = (f"{theirs}.weight", vec(d))
    if cfg.norm == "layernorm":
      out[(ours, "bias")] = (f"{theirs}.bias", vec(d))
  if family == "gpt2":  # Conv1D weights are [in, out]; c_attn's out is (q|k|v, heads, hd).
    norm("attn_norm", "ln_1")
    norm("mlp_norm", "ln_2")
    for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
      out[("attn", p, "kernel")] = ("attn.c_attn.weight",
                                    _src((d, 3 * d), (d, 3, h, hd), (0, 2, 3), ((1, j),)))
      out[("attn", p, "bias")] = ("attn.c_attn.bias",
                                  _src((3 * d,), (3, h, hd), (1, 2), ((0, j),)))
    out[("attn", "o_proj", "kernel")] = ("attn.c_proj.weight",
                                         _src((d, d), (h, hd, d), (0, 1, 2)))
    out[("attn", "o_proj", "bias")] = ("attn.c_proj.bias", vec(d))
    out[("mlp", "up_proj", "kernel")] = ("mlp.c_fc.weight", _src((d, f), (d, f), (0, 1)))
    out[("mlp", "up_proj", "bias")] = ("mlp.c_fc.bias", vec(f))
    out[("mlp", "down_proj", "kernel")] = ("mlp.c_proj.weight", _src((f, d), (f, d), (0, 1)))
    out[("mlp", "down_proj", "bias")] = ("mlp.c_proj.bias", vec(d))
  elif family == "gpt_neox":  # Linear weights are [out, in]; qkv's out is (heads, q|k|v, hd).
    norm("attn_norm", "input_layernorm")
    norm("mlp_norm", "post_attention_layernorm")
    for j, p in enumerate(("q_proj", "k_proj", "v_proj")):
      out[("attn", p, "kernel")] = ("attention.query_key_value.weight",
                                    _src((3 * d, d), (h, 3, hd, d), (3, 0, 2), ((1, j),)))
      out[("attn", p, "bias")] = ("attention.query_key_value.bias",
                                  _src((3 * d,), (h, 3, hd), (0, 2), ((1, j),)))
    out[("attn", "o_proj", "kernel")] = ("attention.dense.weight",
                                         _src((d, d), (d, h, hd), (1, 2, 0)))
    out[("attn", "o_proj", "bias")] = ("attention.dense.bias", vec(d))
    out[("mlp", "up_proj", "kernel")] = ("mlp.dense_h_to_4h.weight",
                                         _src((f, d), (f, d), (1, 0)))
    out[("mlp", "up_proj", "bias")] = ("mlp.dense_h_to_4h.bias", vec(f))
    out[("mlp", "down_proj", "kernel")] = ("mlp.dense_4h_to_h.weight",
                                           _src((d, f), (d, f), (1, 0)))
    out[("mlp", "down_proj", "bias")] = ("mlp.dense_4h_to_h.bias", vec(d))
  else:  # llama: Linear weights [out, in], heads-major outputs.
    norm("attn_norm", "input_layernorm")
    norm("mlp_norm", "post_attention_layernorm")
    for p, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
      out[("attn", p, "kernel")] = (f"self_attn.{p}.weight",
                                    _src((heads * hd, d), (heads, hd, d), (2, 0, 1)))
      out[("attn", p, "bias")] = (f"self_attn.{p}.bias",
                                  _src((heads * hd,), (heads, hd), (0, 1)))
    out[("attn", "o_proj", "kernel")] = ("self_attn.o_proj.weight",
                                         _src((d, h * hd), (d, h, hd), (1, 2, 0)))
    out[("attn", "o_proj", "bias")] = ("self_attn.o_proj.bias", vec(d))
    for p in ("gate_proj", "up_proj"):
      out[("mlp", p, "kernel")] = (f"mlp.{p}.weight", _src((f, d), (f, d), (1, 0)))
      out[("mlp", p, "bias")] = (f"mlp.{p}.bias", vec(f))
    out[("mlp", "down_proj", "kernel")] = ("mlp.down_proj.weight", _src((d, f), (d, f), (1, 0)))
    out[("mlp", "down_proj", "bias")] = ("mlp.down_proj.bias", vec(d))
  def keep(key):
    if key[-1] != "bias" or key[0].endswith("norm"):
      return True
    return cfg.attn_bias if key[0] == "attn" else cfg.use_bias
  return {k: v for k, v in out.items() if keep(k)}


def param_sources(cfg: ModelConfig, family: str, head: str = "lm",
                  prefix: Optional[str] = None) -> dict[tuple[str, ...], Source]:
  """Our (unscanned) parameter path -> its Source in an HF `family` checkpoint.

  `prefix` is the backbone's name prefix (default: the task models', e.g. 'transformer.').
  """
  p = PREFIX[family] if prefix is None else prefix
  d, v = cfg.d_model, cfg.vocab_size
  embed, pos, final, layers = {
      "gpt2": ("wte", "wpe", "ln_f", "h"),
      "gpt_neox": ("embed_in", None, "final_layer_norm", "layers"),
      "llama": ("embed_tokens", None, "norm", "layers")}[family]
  named = lambda name, src: dataclasses.replace(src, names=(name,))
  sources = {("embed", "embedding"): named(f"{p}{embed}.weight", _src((v, d), (v, d), (0, 1)))}
  if cfg.position == "learned":
    sources[("pos_embed", "embedding")] = named(
        f"{p}{pos}.weight", _src((cfg.max_length, d), (cfg.max_length, d), (0, 1)))
  sources[("final_norm", "scale")] = named(f"{p}{final}.weight", _src((d,), (d,), (0,)))
  if cfg.norm == "layernorm":
    sources[("final_norm", "bias")] = named(f"{p}{final}.bias", _src((d,), (d,), (0,)))
  per_layer = _layer_sources(cfg, family)
  for i in range(cfg.num_layers):
    for path, (local, src) in per_layer.items():
      sources[(f"layers_{i}",) + path] = named(f"{p}{layers}.{i}.{local}", src)
  if head == "lm" and not cfg.tie_embeddings:
    # GPT-NeoX checkpoints name the LM head `embed_out` (transformers 5 renames it lm_head).
    names = ("embed_out.weight", "lm_head.weight") if family == "gpt_neox" else (
        "lm_head.weight",)
    sources[("lm_head", "kernel")] = dataclasses.replace(_src((v, d), (v, d), (1, 0)),
                                                         names=names)
  if head == "scalar":
    sources[("scalar_head", "kernel")] = named("score.weight", _src((1, d), (1, d), (1, 0)))
  return sources


def _detect_prefix(names: set[str], family: str) -> str:
  embed = {"gpt2": "wte.weight", "gpt_neox": "embed_in.weight",
           "llama": "embed_tokens.weight"}[family]
  for prefix in (PREFIX[family], ""):
    if prefix + embed in names:
      return prefix
  raise ValueError(f"No {family} token embedding ({PREFIX[family]}{embed}) in the checkpoint: "
                   "is it a different architecture?")


def _abstract_params(cfg: ModelConfig, head: str):
  model = Transformer(cfg, head=head)
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                         jax.random.key(0))
  return nn.meta.unbox(boxed)


def _flatten(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, prefix + (k,)))
    return out
  return {prefix: tree}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def _ranges(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  out = []
  for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
    start, stop, step = s.indices(n)
    assert step == 1, index
    out.append((start, stop))
  return tuple(out)


def load_hf_params(path: str, model_config: Optional[ModelConfig] = None, shardings=None,
                   allow_pickle: bool = False, *, head: Optional[str] = None,
                   local_files_only: bool = True, cache_dir: Optional[str] = None):
  """Our parameter tree from an HF checkpoint, each array created in its target sharding.

  Args:
    path: a checkpoint directory or a hub name (from the Hugging Face cache).
    model_config: the ModelConfig (default: `model_config_from_hf` of its config.json); its
      architecture must match the checkpoint, `scan_layers` picks the stacked layout.
    shardings: a tree of `jax.sharding.Sharding` for the parameters to load (a subset of the
      model's tree: parameters left out, e.g. a fresh head, are not read); default: the whole
      tree on the first local device.
    allow_pickle: read pickled `pytorch_model.bin` weights when there are no safetensors.
    head: 'lm' or 'scalar' (default: 'scalar' if `shardings` has a `scalar_head`). A scalar
      head reads `score.weight` and the bias recorded by `export` (0 if none).
  """
  path = resolve_checkpoint(path, local_files_only=local_files_only, cache_dir=cache_dir)
  hf_config = read_hf_config(path)
  family = _check_model_type(hf_config.get("model_type"))
  expected = model_config_from_hf(hf_config, **(
      {} if model_config is None else {k: getattr(model_config, k) for k in NUMERICS_KEYS}))
  if model_config is not None and model_config != expected:
    diff = [f"{f.name}={getattr(model_config, f.name)!r} (checkpoint: "
            f"{getattr(expected, f.name)!r})" for f in dataclasses.fields(ModelConfig)
            if getattr(model_config, f.name) != getattr(expected, f.name)]
    raise ValueError(f"The model config does not match {path}/config.json: {', '.join(diff)}.")
  cfg = expected
  if head is None:
    head = "scalar" if shardings is not None and "scalar_head" in shardings else "lm"
  if head not in ("lm", "scalar"):
    raise ValueError(f"head={head!r}; expected 'lm' or 'scalar'.")
  abstract = _flatten(_abstract_params(cfg, head))
  if cfg.scan_layers:  # Layers stacked under 'layers': read layer by layer.
    abstract = {k: v for k, v in abstract.items() if k[0] != "layers"}
    per_layer = _flatten(_abstract_params(dataclasses.replace(cfg, scan_layers=False), head))
    abstract.update({("layers",) + k[1:]: jax.ShapeDtypeStruct((cfg.num_layers,) + v.shape,
                                                               v.dtype)
                     for k, v in per_layer.items() if k[0] == "layers_0"})
  if shardings is None:
    device = jax.local_devices()[0]
    targets = {k: jax.sharding.SingleDeviceSharding(device) for k in abstract}
  else:
    targets = _flatten(shardings)
    unknown = sorted(".".join(k) for k in set(targets) - set(abstract))
    if unknown:
      raise ValueError(f"shardings name parameters the model does not have: {unknown}.")

  kind, files = _weight_files(path, allow_pickle)
  tensors = _Tensors(kind, files)
  try:
    names = tensors.names()
    sources = param_sources(cfg, family, head, _detect_prefix(names, family))
    used: set[str] = set()

    def find(src: Source, what: str) -> str:
      for name in src.names:
        if name in names:
          if tuple(tensors.shape(name)) != src.shape:
            raise ValueError(f"Tensor {name} of {path} has shape {tuple(tensors.shape(name))}, "
                             f"but the model config needs {src.shape}.")
          used.add(name)
          return name
      raise ValueError(f"{path} has no tensor {' or '.join(src.names)} (for {what}); is the "
                       "model config the checkpoint's?")

    loaded = {}
    for key, sharding in targets.items():
      shape = abstract[key].shape
      what = ".".join(key)
      if key == ("scalar_head", "bias"):
        value = np.full(shape, float(hf_config.get(SCORE_BIAS_KEY, 0.0)), np.float32)
        loaded[key] = jax.make_array_from_callback(shape, sharding, lambda i, v=value: v[i])
        continue
      if key[0] == "layers":
        layer_srcs = [sources[(f"layers_{i}",) + key[1:]] for i in range(cfg.num_layers)]
        plan = [(src, find(src, what)) for src in layer_srcs]
      else:
        if key not in sources:
          raise ValueError(f"{what} has no counterpart in a {family} checkpoint.")
        plan = [(sources[key], find(sources[key], what))]
      loaded[key] = jax.make_array_from_callback(
          shape, sharding, _callback(tensors, plan, shape, stacked=key[0] == "layers"))
    ignored = sorted(n for n in names - used if not _expected_extra(n))
    if ignored:
      logging.info("Tensors of %s not used: %s", path, ignored[:10])
  finally:
    tensors.close()
  logging.info("Loaded %d parameters (%s, %s) from %s.", len(loaded), family, kind, path)
  return _unflatten(loaded)


def _expected_extra(name: str) -> bool:
  """Tensors a checkpoint may hold that we never read (heads of other tasks, buffers)."""
  return (name.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))
          or name in ("lm_head.weight", "embed_out.weight", "score.weight"))


def _callback(tensors: _Tensors, plan: list[tuple[Source, str]], shape, stacked: bool):
  """index -> the block of the parameter (one read per distinct block, shared by replicas)."""
  blocks: dict = {}

  def callback(index):
    ranges = _ranges(index, shape)
    if ranges not in blocks:
      if stacked:
        (l0, l1), inner = ranges[0], ranges[1:]
        blocks[ranges] = np.stack([src.read(tensors, name, inner)
                                   for src, name in plan[l0:l1]])
      else:
        src, name = plan[0]
        blocks[ranges] = src.read(tensors, name, ranges)
    return blocks[ranges]

  return callback


# --------------------------------------------------------------------------- export


def _param_keys(params, cfg: ModelConfig) -> list[tuple[str, ...]]:
  """Unscanned parameter paths of `params` (scanned layers listed as layers_0, layers_1...)."""
  keys = []
  for key in _flatten(params):
    if cfg.scan_layers and key[0] == "layers":
      keys += [(f"layers_{i}",) + key[1:] for i in range(cfg.num_layers)]
    else:
      keys.append(key)
  return keys


def _param(params, cfg: ModelConfig, key: tuple[str, ...]) -> np.ndarray:
  """One unscanned parameter as float32 on the host. A layer of scanned parameters is sliced
  on the devices first, so only that layer is gathered."""
  node, layer = params, None
  if cfg.scan_layers and key[0].startswith("layers_"):
    node, layer, key = params["layers"], int(key[0][len("layers_"):]), key[1:]
  for k in key:
    node = node[k]
  if layer is not None:
    node = node[layer]
  return np.asarray(jax.device_get(node), np.float32)


def iter_hf_tensors(params, cfg: ModelConfig, family: Optional[str] = None,
                    head: str = "lm") -> Iterator[tuple[str, np.ndarray]]:
  """Our parameters as HF tensors (float32 numpy, named as in the task model's checkpoint),
  one tensor at a time: each is assembled on the host from the parameters it holds (GPT-2's
  fused `c_attn` from q, k and v), so host memory holds one tensor, not the model.

  A scalar head's bias is not written (HF's `score` has none; `export` records it)."""
  family = family or infer_family(cfg)
  sources = param_sources(cfg, family, head)
  by_name: dict[str, list[tuple[str, ...]]] = {}
  for key in _param_keys(params, cfg):
    if key == ("scalar_head", "bias"):
      continue
    if key not in sources:
      raise ValueError(f"Parameter {'.'.join(key)} has no counterpart in a {family} "
                       f"{'sequence-classification' if head == 'scalar' else 'causal-LM'} "
                       "model.")
    by_name.setdefault(sources[key].names[0], []).append(key)
  for name, keys in by_name.items():
    out: dict[str, np.ndarray] = {}
    for key in keys:
      sources[key].write(out, _param(params, cfg, key))
    yield name, out[name]


def hf_state_dict(params, cfg: ModelConfig, family: Optional[str] = None,
                  head: str = "lm") -> dict[str, np.ndarray]:
  """All of `iter_hf_tensors` in one dict (small models and tests)."""
  return dict(iter_hf_tensors(params, cfg, family, head))


EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10,
               "MIB": 2**20, "GIB": 2**30}


def parse_size(size: "int | str") -> int:
  """Bytes of '5GB', '500MB', '2GiB', '100KB' or an int (decimal units, as transformers)."""
  if isinstance(size, int):
    value = size
  else:
    text = str(size).strip().upper()
    number = text.rstrip("KMGIB")
    unit = text[len(number):]
    if unit not in _SIZE_UNITS or not number.replace(".", "", 1).isdigit():
      raise ValueError(f"max_shard_size={size!r}: expected bytes or a size like '5GB', "
                       "'500MB', '2GiB'.")
    value = int(float(number) * _SIZE_UNITS[unit])
  if value <= 0:
    raise ValueError(f"max_shard_size={size!r} must be positive.")
  return value


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str,
                      max_shard_size: "int | str" = "5GB") -> list[str]:
  """Writes (name, array) pairs as Hugging Face safetensors: `model.safetensors` when they
  fit in one file of at most `max_shard_size` bytes, else `model-0000k-of-0000n.safetensors`
  files with `model.safetensors.index.json`. Arrays are consumed as they come, so host memory
  holds at most one file's worth. Returns the files written."""
  import safetensors.numpy

  limit = parse_size(max_shard_size)
  shards: list[list[str]] = []
  current: dict[str, np.ndarray] = {}
  total = 0

  def flush():
    if current:
      safetensors.numpy.save_file(current, os.path.join(out_dir, f".shard-{len(shards)}"),
                                  metadata={"format": "pt"})
      shards.append(list(current))
      current.clear()

  for name, array in tensors:
    size = array.nbytes
    if current and sum(a.nbytes for a in current.values()) + size > limit:
      flush()
    current[name] = array
    total += size
  flush()
  if len(shards) == 1:
    names = [SAFE_WEIGHTS]
  else:
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for i, name in enumerate(names):
    os.replace(os.path.join(out_dir, f".shard-{i}"), os.path.join(out_dir, name))
  if len(shards) > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {t: names[i] for i, shard in enumerate(shards) for t in shard}}
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
    names.append(SAFE_INDEX)
  return names


def _load_run(workdir: str, step: Optional[int], mesh_shape: Optional[Sequence[int]] = None):
  """(config, ModelConfig, params, step, reward normalisation or None) of a run directory.

  Parameters are restored sharded over the run's mesh (`config.mesh`, its -1 entry taking the
  devices present; `mesh_shape` overrides the shape), so no device or host holds a full copy.
  """
  import ml_collections
  from instruct import checkpoint as ckpt_lib
  from instruct import sharding as shd
  if not os.path.exists(os.path.join(workdir, "config.json")):
    raise FileNotFoundError(f"{workdir} is not a run directory (no config.json).")
  config = ckpt_lib.read_config(workdir)
  stage = config.get("stage")
  if stage not in ("pretrain", "sft", "ppo", "rm"):
    raise ValueError(f"{workdir} is a {stage!r} run; export handles pretrain, sft, ppo and rm.")
  if stage == "ppo":  # The policy's architecture is the SFT run's.
    model_dict = ckpt_lib.read_config(config["policy_from"])["model"]
  else:
    model_dict = config["model"]
  cfg = ModelConfig.from_dict(model_dict)
  head = "scalar" if stage == "rm" else "lm"
  mesh_config = ml_collections.ConfigDict(config["mesh"])
  if mesh_shape is not None:
    mesh_config.shape = tuple(mesh_shape)
  try:
    mesh = shd.make_mesh(mesh_config)
  except ValueError as e:
    source = "mesh_shape (--mesh_shape)" if mesh_shape is not None else (
        f"the run's config.mesh ({workdir}/config.json; pass mesh_shape to override it)")
    raise ValueError(f"Cannot restore {workdir} over {source}: {e}") from e
  model = Transformer(cfg, head=head)
  boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
                         jax.random.key(0))
  shardings = shd.tree_shardings(mesh, shd.rules_from_config(mesh_config), boxed)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  checkpointer = ckpt_lib.Checkpointer(workdir)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {checkpointer.directory}.")
    if stage == "ppo":
      params = checkpointer.restore_partial(step, {"policy": {"params": abstract}})
      params = params["policy"]["params"]
    else:
      params = checkpointer.restore_params(step, abstract)
    norm = checkpointer.restore_extras(step).get("reward_normalization") if head == "scalar" \
        else None
  finally:
    checkpointer.close()
  return config, cfg, params, step, norm


def export(workdir: str, out_dir: str, step: Optional[int] = None, *,
           family: Optional[str] = None, overwrite: bool = False, dtype: str = "float32",
           max_shard_size: "int | str" = "5GB",
           mesh_shape: Optional[Sequence[int]] = None) -> str:
  """Writes a run's model as a Hugging Face directory; returns `out_dir`.

  pretrain / sft / ppo runs give the policy as `...ForCausalLM`; an rm run gives
  `...ForSequenceClassification` (num_labels=1; see the module docstring for the bias).
  The family (gpt2, gpt_neox, llama) is inferred from the model config unless given.
  Weights are `dtype` ('float32' or 'bfloat16'), in safetensors files of at most
  `max_shard_size` with an index when there is more than one. The parameters stay sharded on
  the devices and are gathered one tensor at a time. Everything is written to a temporary
  directory beside `out_dir` and moved in at the end, so a failed export leaves `out_dir` as
  it was.
  """
  from instruct.data import load_tokenizer
  import shutil
  import tempfile
  import transformers

  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(EXPORT_DTYPES)}.")
  parse_size(max_shard_size)
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
    raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True "
                          "(--overwrite) to replace its files.")
  config, cfg, params, step, norm = _load_run(workdir, step, mesh_shape)
  head = "scalar" if config["stage"] == "rm" else "lm"
  family = family or infer_family(cfg)
  tokenizer = load_tokenizer(config["data"]["tokenizer"],
                             pad_token=config["data"].get("pad_token", ""))
  hf_config = hf_config_from_model_config(
      cfg, family, head=head, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  hf_config.dtype = dtype
  if head == "scalar":
    bias = float(np.asarray(jax.device_get(params["scalar_head"]["bias"])).reshape(-1)[0])
    setattr(hf_config, SCORE_BIAS_KEY, bias)
    if norm is not None:
      setattr(hf_config, NORMALIZATION_KEY, dict(norm))
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}-", dir=parent)
  try:
    cast = EXPORT_DTYPES[dtype]
    tensors = ((n, a.astype(cast)) for n, a in iter_hf_tensors(params, cfg, family, head))
    write_safetensors(tensors, staging, max_shard_size)
    hf_config.save_pretrained(staging)
    if head == "lm":
      transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "README.md"), "w") as f:
      f.write(_readme(workdir, config["stage"], step, family, hf_config, norm))
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, "model*.safetensors*")):
      os.remove(stale)
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("Exported %s (step %d) as %s to %s.", workdir, step,
               hf_config.architectures[0], out_dir)
  return out_dir


def _readme(workdir, stage, step, family, hf_config, norm) -> str:
  lines = [f"# {hf_config.architectures[0]} exported by instruct", "",
           f"- source run: `{os.path.abspath(workdir)}` (stage `{stage}`, step {step})",
           f"- family: `{family}`; {hf_config.dtype} safetensors weights; the run's tokenizer.",
           ""]
  if stage == "rm":
    bias = getattr(hf_config, SCORE_BIAS_KEY)
    gain, offset = (norm["gain"], norm["bias"]) if norm else (1.0, 0.0)
    lines += [
        "A reward model: load it with `AutoModelForSequenceClassification` (`num_labels=1`); "
        "`logits[:, 0]` is read at the last non-pad token (so keep `pad_token_id` distinct "
        "from EOS, as the tokenizer here does).", "",
        "Hugging Face's `score` layer has no bias; instruct's scalar head does. The bias "
        "shifts every reward by the same constant (the ranking loss does not see it), so "
        f"`score.weight` is the head's kernel and the bias is recorded in config.json as "
        f"`{SCORE_BIAS_KEY}` = {bias!r}. instruct's raw reward is `logits + {SCORE_BIAS_KEY}`"
        f", and its normalised reward (what PPO optimised) is", "",
        f"    reward = {gain!r} * (logits + {bias!r}) + {offset!r}", "",
        f"(`{NORMALIZATION_KEY}` in config.json: gain and bias; "
        f"{'absent: the run did not reach its final step' if norm is None else 'from the run'})."]
  return "\n".join(lines) + "\n"
