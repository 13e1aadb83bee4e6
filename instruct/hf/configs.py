"""Hugging Face config <-> ModelConfig: the families, their architecture fields, and
`resolve_config` (config.model from its `hf_checkpoint`'s config.json)."""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Mapping, Optional

import transformers
from absl import logging

from instruct.hf.files import read_hf_config, resolve_checkpoint
from instruct.model.config import ModelConfig

FAMILIES = ("gpt2", "gpt_neox", "llama")
CAUSAL_LM = {
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM"
}
SEQUENCE_CLASSIFICATION = {
    "gpt2": "GPT2ForSequenceClassification", "gpt_neox": "GPTNeoXForSequenceClassification",
    "llama": "LlamaForSequenceClassification"
}
SCORE_BIAS_KEY = "instruct_score_bias"
NORMALIZATION_KEY = "instruct_reward_normalization"
# Fields of config.model that say how to compute, not what the architecture is: an HF
# checkpoint's config.json sets every other field.
NUMERICS_KEYS = ("dtype", "scan_layers", "remat", "dropout_rate", "init_std")
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# The sizes a checkpoint's config.json must give: transformers would fill a missing one with
# its class default (e.g. Llama's hidden_size 4096), which only fails later on the weights.
REQUIRED_FIELDS = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
    "gpt_neox": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings"),
    "llama": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings"),
}


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
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    try:
      return transformers.AutoConfig.for_model(model_type, **fields)
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"Invalid {model_type} config: {e}") from e
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
  theta = scaling.get("rope_theta",
                      _get(hf_config, "rope_theta", _get(hf_config, "rotary_emb_base", 10000.0)))
  fraction = scaling.get(
      "partial_rotary_factor",
      _get(hf_config, "partial_rotary_factor", _get(hf_config, "rotary_pct", 1.0)))
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
  rope = {
      "rope_type": "default" if cfg.rope_scaling == "none" else cfg.rope_scaling,
      "rope_theta": cfg.rope_theta
  }
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
                  d_ff=c.intermediate_size, max_length=c.max_position_embeddings, norm="layernorm",
                  norm_eps=c.layer_norm_eps, mlp="gelu" if c.hidden_act == "gelu" else "gelu_tanh",
                  position="rope", **_rope(c), tie_embeddings=bool(c.tie_word_embeddings),
                  use_bias=True, attention_bias=None if attention_bias else False,
                  parallel_residual=bool(c.use_parallel_residual))
  else:  # llama
    d, heads = c.hidden_size, c.num_attention_heads
    if c.hidden_act != "silu":
      unsupported.append(f"hidden_act={c.hidden_act!r}")
    attention_bias, mlp_bias = bool(c.attention_bias), bool(getattr(c, "mlp_bias", False))
    fields = dict(vocab_size=c.vocab_size, d_model=d, num_layers=c.num_hidden_layers,
                  num_heads=heads, num_kv_heads=c.num_key_value_heads or heads,
                  head_dim=getattr(c, "head_dim", None) or d // heads, d_ff=c.intermediate_size,
                  max_length=c.max_position_embeddings, norm="rmsnorm", norm_eps=c.rms_norm_eps,
                  mlp="swiglu", position="rope", **_rope(c),
                  tie_embeddings=bool(c.tie_word_embeddings), use_bias=mlp_bias,
                  attention_bias=None if attention_bias == mlp_bias else attention_bias,
                  parallel_residual=False)
  if unsupported:
    raise ValueError(f"This {family} checkpoint uses {'; '.join(unsupported)}, which "
                     "instruct's Transformer does not implement.")
  fields.update(overrides)
  return ModelConfig(**fields)


def model_config_from_checkpoint(path: str, hf_config: Optional[Mapping[str, Any]] = None,
                                 **overrides: Any) -> ModelConfig:
  """The ModelConfig of checkpoint directory `path` (`hf_config`: its config.json, if already
  read), `overrides` as in `model_config_from_hf`.

  Stricter than `model_config_from_hf` on a dict: `model_type` and the family's sizes
  (`REQUIRED_FIELDS`) must be present, as positive integers. Every problem of config.json is
  a ValueError naming the file.
  """
  file = os.path.join(path, "config.json")
  if hf_config is None:
    hf_config = read_hf_config(path)
  try:
    if "model_type" not in hf_config:
      raise ValueError("missing 'model_type' (one of " + ", ".join(FAMILIES) + ").")
    family = _check_model_type(hf_config["model_type"])
    for key in REQUIRED_FIELDS[family]:
      value = hf_config.get(key)
      if value is None:
        raise ValueError(f"missing {key!r} (a {family} config.json gives it).")
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r}; expected a positive integer.")
    cfg = model_config_from_hf(hf_config)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{file}: {e}") from e
  return dataclasses.replace(cfg, **overrides)


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
  raise ValueError("This model has no Hugging Face equivalent: "
                   + "; ".join(f"{family} needs {', '.join(r)}" for family, r in reasons.items()))


def hf_config_from_model_config(cfg: ModelConfig, family: Optional[str] = None, *, head: str = "lm",
                                **token_ids: Optional[int]):
  """The transformers config of `cfg` as an HF `family` model ('lm': causal LM; 'scalar':
  sequence classification with one label). `token_ids`: bos/eos/pad_token_id."""
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
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings, dtype="float32",
                **token_ids)
  if head == "scalar":
    common.update(num_labels=1, architectures=[SEQUENCE_CLASSIFICATION[family]])
  else:
    common.update(architectures=[CAUSAL_LM[family]])
  if family == "gpt2":
    return transformers.GPT2Config(n_embd=cfg.d_model, n_layer=cfg.num_layers, n_head=cfg.num_heads,
                                   n_inner=cfg.d_ff, n_positions=cfg.max_length,
                                   layer_norm_epsilon=cfg.norm_eps,
                                   activation_function="gelu" if cfg.mlp == "gelu" else "gelu_new",
                                   resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate,
                                   attn_pdrop=0.0, summary_first_dropout=0.0, **common)
  rope = _rope_parameters(cfg)
  if family == "gpt_neox":
    return transformers.GPTNeoXConfig(
        hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, intermediate_size=cfg.d_ff,
        max_position_embeddings=cfg.max_length, layer_norm_eps=cfg.norm_eps,
        hidden_act="gelu" if cfg.mlp == "gelu" else "gelu_new",
        rope_parameters=dict(rope, partial_rotary_factor=cfg.rotary_fraction),
        use_parallel_residual=cfg.parallel_residual, attention_bias=cfg.attn_bias,
        hidden_dropout=cfg.dropout_rate, attention_dropout=0.0, classifier_dropout=0.0, **common)
  return transformers.LlamaConfig(
      hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
      max_position_embeddings=cfg.max_length, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
      rope_parameters=rope, attention_bias=cfg.attn_bias, mlp_bias=cfg.use_bias, **common)


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
  cfg = model_config_from_checkpoint(path, **numerics)
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
