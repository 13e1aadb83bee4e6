"""The typed model configuration and the architecture presets.

One decoder-only Transformer covers the GPT-2/GPT-3 family (learned positions, LayerNorm,
GELU MLP, tied embeddings, biases), GPT-NeoX/Pythia (rotary on a fraction of each head,
parallel residual) and the Llama family (RoPE, RMSNorm, SwiGLU, grouped-query attention,
untied embeddings). Importing a Hugging Face checkpoint is then a name mapping.

`ModelConfig` is a frozen dataclass so it can be a Linen module attribute; experiment configs
hold the same fields in an ml_collections `ConfigDict` (`config.model`), converted with
`ModelConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_tanh", "swiglu")
POSITIONS = ("learned", "rope")
# Rotary frequency scaling for long context, as Hugging Face's `rope_type`: 'linear' divides
# every frequency by `rope_factor` (position interpolation); 'llama3' (Llama 3.1 / 3.2) divides
# only the low frequencies, keeps the high ones and interpolates smoothly in between.
ROPE_SCALINGS = ("none", "linear", "llama3")
REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")
# Keys of `config.model` that say where the initial weights come from, not the architecture:
# `hf_checkpoint` (a Hugging Face checkpoint directory or cached hub name, see instruct/hf.py).
SOURCE_KEYS = ("hf_checkpoint",)


# yapf: disable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture and numerics of a decoder-only Transformer."""

  vocab_size: int = 512
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 4            # < num_heads gives grouped-query attention.
  head_dim: int = 16
  d_ff: int = 256
  max_length: int = 256            # Size of the learned position table.
  norm: str = "layernorm"          # 'layernorm' | 'rmsnorm'.
  norm_eps: float = 1e-5
  mlp: str = "gelu_tanh"           # 'gelu' (exact) | 'gelu_tanh' (GPT-2) | 'swiglu' (Llama).
  position: str = "learned"        # 'learned' | 'rope'.
  rope_theta: float = 10000.0
  rotary_fraction: float = 1.0     # Fraction of head_dim that is rotated (Pythia: 0.25).
  rope_scaling: str = "none"       # 'none' | 'linear' | 'llama3' (see ROPE_SCALINGS).
  rope_factor: float = 1.0         # 'linear' and 'llama3': the context extension factor.
  rope_low_freq_factor: float = 1.0    # 'llama3' only: wavelengths above
  rope_high_freq_factor: float = 4.0   # original/low are divided, below original/high kept.
  rope_original_max_length: int = 8192  # 'llama3' only: the pretraining context length.
  tie_embeddings: bool = True      # LM head reuses the token embedding.
  use_bias: bool = True            # Biases in attention and MLP projections.
  attention_bias: Optional[bool] = None  # Attention projections only; None: as use_bias
  # (GPT-NeoX / Llama `attention_bias`).
  parallel_residual: bool = False  # x + attn(ln1(x)) + mlp(ln2(x)) (GPT-NeoX).
  dropout_rate: float = 0.0        # Residual and embedding dropout; off by default.
  dtype: str = "float32"           # Compute dtype; parameters are always float32.
  scan_layers: bool = False        # nn.scan over layers: one compiled layer, faster compiles.
  remat: str = "none"              # Rematerialisation: 'none' | 'full' | 'dots'.
  init_std: float = 0.02

  def __post_init__(self):
    for key in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                "d_ff", "max_length"):
      if not (isinstance(getattr(self, key), int) and getattr(self, key) > 0):
        raise ValueError(f"config.model.{key}={getattr(self, key)!r} is invalid: expected a "
                         "positive integer.")
    checks = [
        (self.norm in NORMS, "norm", f"one of {NORMS}"),
        (self.mlp in MLPS, "mlp", f"one of {MLPS}"),
        (self.position in POSITIONS, "position", f"one of {POSITIONS}"),
        (self.remat in REMAT_POLICIES, "remat", f"one of {REMAT_POLICIES}"),
        (self.dtype in DTYPES, "dtype", f"one of {DTYPES}"),
        (self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
         f"a divisor of num_heads={self.num_heads}"),
        (0.0 < self.rotary_fraction <= 1.0, "rotary_fraction", "in (0, 1]"),
        (int(self.head_dim * self.rotary_fraction) % 2 == 0, "rotary_fraction",
         "such that head_dim * rotary_fraction is even"),
        (0.0 <= self.dropout_rate < 1.0, "dropout_rate", "in [0, 1)"),
        (self.attention_bias is None or isinstance(self.attention_bias, bool),
         "attention_bias", "None (as use_bias), True or False"),
        (self.rope_scaling in ROPE_SCALINGS, "rope_scaling", f"one of {ROPE_SCALINGS}"),
        (self.rope_scaling == "none" or self.position == "rope", "rope_scaling",
         "'none' with position='learned'"),
        (self.rope_factor > 0, "rope_factor", "positive"),
        (self.rope_scaling != "llama3"
         or 0 < self.rope_low_freq_factor < self.rope_high_freq_factor,
         "rope_high_freq_factor",
         f"greater than rope_low_freq_factor={self.rope_low_freq_factor} (both positive)"),
        (isinstance(self.rope_original_max_length, int) and self.rope_original_max_length > 0,
         "rope_original_max_length", "a positive integer"),
    ]
    for ok, key, expected in checks:
      if not ok:
        raise ValueError(
            f"config.model.{key}={getattr(self, key)!r} is invalid: expected {expected}.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from `config.model` (a ConfigDict or dict); unknown keys are an error.

    `SOURCE_KEYS` (e.g. `hf_checkpoint`) are not architecture and are ignored here.
    """
    d = {k: v for k, v in d.items() if k not in SOURCE_KEYS}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"Unknown keys in config.model: {unknown}. Known: {sorted(names)}.")
    return cls(**d)

  @property
  def attn_bias(self) -> bool:
    """Whether q, k, v and o projections have biases."""
    return self.use_bias if self.attention_bias is None else bool(self.attention_bias)

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.rotary_fraction)
# yapf: enable


def count_params(cfg: ModelConfig, head: str = "lm") -> int:
  """Closed-form parameter count, used to check presets against published sizes."""
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  q, kv = cfg.num_heads * h, cfg.num_kv_heads * h
  norm = 2 * d if cfg.norm == "layernorm" else d
  attn = d * (q + 2 * kv) + q * d + (q + 2 * kv + d if cfg.attn_bias else 0)
  mlp_in = 2 * d * f if cfg.mlp == "swiglu" else d * f
  mlp = mlp_in + f * d + ((2 * f if cfg.mlp == "swiglu" else f) + d if cfg.use_bias else 0)
  total = cfg.num_layers * (attn + mlp + 2 * norm) + norm + cfg.vocab_size * d
  if cfg.position == "learned":
    total += cfg.max_length * d
  if head == "lm" and not cfg.tie_embeddings:
    total += cfg.vocab_size * d
  if head == "scalar":
    total += d + 1
  return total


def _gpt2(d: int, layers: int, heads: int) -> dict[str, Any]:
  return dict(vocab_size=50257, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
              head_dim=d // heads, d_ff=4 * d, max_length=1024, norm="layernorm", mlp="gelu_tanh",
              position="learned", tie_embeddings=True, use_bias=True)


def _pythia(d: int, layers: int, heads: int, vocab: int) -> dict[str, Any]:
  """EleutherAI's Pythia (GPT-NeoX): partial rotary (a quarter of each head), parallel
  residual, exact GELU, LayerNorm, biases everywhere, untied input and output embeddings."""
  return dict(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
              head_dim=d // heads, d_ff=4 * d, max_length=2048, norm="layernorm", norm_eps=1e-5,
              mlp="gelu", position="rope", rope_theta=10000.0, rotary_fraction=0.25,
              tie_embeddings=False, use_bias=True, parallel_residual=True)


def _llama(vocab: int, d: int, layers: int, heads: int, kv_heads: int, d_ff: int, tie: bool,
           rope_factor: float) -> dict[str, Any]:
  """Llama 3.1 / 3.2: RoPE theta 500000 with 'llama3' frequency scaling from 8192 to 131072
  positions, RMSNorm, SwiGLU, grouped-query attention, no biases."""
  return dict(vocab_size=vocab, d_model=d, num_layers=layers, num_heads=heads,
              num_kv_heads=kv_heads, head_dim=d // heads, d_ff=d_ff, max_length=131072,
              norm="rmsnorm", norm_eps=1e-5, mlp="swiglu", position="rope", rope_theta=500000.0,
              rope_scaling="llama3", rope_factor=rope_factor, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_length=8192, tie_embeddings=tie,
              use_bias=False)


# Architecture presets: name -> fields of ModelConfig. The vocabulary of the `tiny*` presets
# matches the embedded tokenizer (instruct/assets/tokenizer).
# yapf: disable
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                 head_dim=16, d_ff=256, max_length=256),
    "tiny_llama": dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                       head_dim=16, d_ff=192, max_length=256, norm="rmsnorm", mlp="swiglu",
                       position="rope", tie_embeddings=False, use_bias=False),
    # ~100M on the embedded vocabulary: used by benchmarks on one host.
    "small_100m": dict(vocab_size=512, d_model=768, num_layers=14, num_heads=12,
                       num_kv_heads=12, head_dim=64, d_ff=3072, max_length=1024),
    "gpt2": _gpt2(768, 12, 12),              # 124M
    "gpt2_medium": _gpt2(1024, 24, 16),      # 355M
    "gpt2_large": _gpt2(1280, 36, 20),       # 774M
    "gpt2_xl": _gpt2(1600, 48, 25),          # 1.5B
    # EleutherAI/pythia-*: the config.json of each (hidden_size, num_hidden_layers,
    # num_attention_heads, vocab_size; intermediate_size = 4 * hidden_size, rotary_pct 0.25,
    # rotary_emb_base 10000, max_position_embeddings 2048, use_parallel_residual, hidden_act
    # 'gelu', tie_word_embeddings false). The vocabulary is padded past the tokenizer's 50277
    # tokens (50304 = 128 * 393; 50432 = 256 * 197 for 6.9B).
    "pythia_1b": _pythia(2048, 16, 8, 50304),       # 1,011,781,632
    "pythia_2_8b": _pythia(2560, 32, 32, 50304),    # 2,775,208,960
    "pythia_6_9b": _pythia(4096, 32, 32, 50432),    # 6,857,302,016
    # meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B (their config.json). Meta-Llama-3-8B
    # is llama_8b without RoPE scaling: `rope_scaling='none'`, `max_length=8192`.
    "llama_1b": _llama(128256, 2048, 16, 32, 8, 8192, tie=True, rope_factor=32.0),
    "llama_8b": _llama(128256, 4096, 32, 32, 8, 14336, tie=False, rope_factor=8.0),
}
# yapf: enable


def preset(name: str, **overrides: Any) -> dict[str, Any]:
  """The fields of a preset, with overrides; an unknown name lists the known ones."""
  if name not in PRESETS:
    raise ValueError(f"Unknown model preset {name!r}; known: {sorted(PRESETS)}.")
  fields = dict(ModelConfig().__dict__)
  fields.update(PRESETS[name])
  fields.update(overrides)
  return fields


# Peak learning rates of the published architectures, per stage. Pretraining: the published
# runs (GPT-3, Brown et al. 2020, Table 2.1, at the GPT-2 sizes; Pythia, Biderman et al. 2023;
# for Llama, the Llama 1 and 2 papers' rate at 7B). SFT: 5e-5 up to 355M, 2e-5 at 774M, 1e-5
# from 1B (larger models fine-tune at lower rates); starting points for a sweep, not tuned
# values. A preset without an entry fails in `learning_rate`, naming this table.
LEARNING_RATES: dict[str, dict[str, float]] = {
    "gpt2": {"pretrain": 6e-4, "sft": 5e-5},
    "gpt2_medium": {"pretrain": 3e-4, "sft": 5e-5},
    "gpt2_large": {"pretrain": 2.5e-4, "sft": 2e-5},
    "gpt2_xl": {"pretrain": 2e-4, "sft": 1e-5},
    "pythia_1b": {"pretrain": 3e-4, "sft": 1e-5},
    "pythia_2_8b": {"pretrain": 1.6e-4, "sft": 1e-5},
    "pythia_6_9b": {"pretrain": 1.2e-4, "sft": 1e-5},
    "llama_1b": {"pretrain": 3e-4, "sft": 1e-5},
    "llama_8b": {"pretrain": 3e-4, "sft": 1e-5},
}


def learning_rate(name: str, stage: str) -> float:
  """The peak learning rate of preset `name` for `stage` ('pretrain' or 'sft')."""
  rate = LEARNING_RATES.get(name, {}).get(stage)
  if rate is None:
    raise ValueError(f"No {stage} learning rate for model preset {name!r}: add one to "
                     "instruct.model.config.LEARNING_RATES.")
  return rate
