"""Transformer layers in Flax Linen, with logical axis names on every weight and activation.

Logical names used for parameters:
  'vocab', 'embed', 'heads', 'kv_heads', 'kv' (head_dim), 'mlp', 'norm', 'layers'.
and for activations (prefixed so the rule table can shard them differently from weights):
  'act_batch', 'act_length', 'act_embed', 'act_heads', 'act_kv_heads', 'act_kv', 'act_mlp',
  'act_vocab'.
The logical-to-mesh rule table lives in the experiment config; nothing here names a mesh axis.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from instruct.model.config import ModelConfig

Array = jax.Array
constrain = nn.with_logical_constraint


def _dtype(cfg: ModelConfig):
  return jnp.dtype(cfg.dtype)


def _kernel_init_std(std: float, axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _residual_std(cfg: ModelConfig) -> float:
  """GPT-2's scaled init of the projections that write into the residual stream."""
  return cfg.init_std / (2 * cfg.num_layers) ** 0.5


def _zeros(axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


class Projection(nn.Module):
  """`x @ W (+ b)` contracting the trailing `len(in_shape)` axes of x, with W created in its
  true shape `in_shape + out_shape` (so every kernel axis carries its logical name).
  flax's DenseGeneral initialises a flattened kernel, which would drop the names' alignment.

  x and W are cast to `dtype` (the compute dtype); the product is accumulated and returned in
  `out_dtype` (default `dtype`). `out_dtype=float32` with bfloat16 inputs keeps the bf16
  matrix units but returns unrounded sums: what the LM head needs (see `Transformer`).
  """

  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  use_bias: bool
  dtype: jnp.dtype
  init_std: float
  out_dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _kernel_init_std(self.init_std, self.kernel_axes),
                        self.in_shape + self.out_shape, jnp.float32)
    n_in = len(self.in_shape)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())),
                            preferred_element_type=self.out_dtype)
    if self.use_bias:
      bias = self.param("bias", _zeros(self.kernel_axes[n_in:]), self.out_shape, jnp.float32)
      y = y + bias.astype(y.dtype)
    return y


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (GPT-2, NeoX) or RMSNorm (Llama); statistics in float32."""
  ones = nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",))
  if cfg.norm == "rmsnorm":
    return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=_dtype(cfg), scale_init=ones, name=name)
  return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=_dtype(cfg), scale_init=ones, bias_init=_zeros(
      ("norm",)), name=name)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
  """The rotary inverse frequencies [rotary_dim // 2] of `cfg`, float32, with its scaling.

  The same arithmetic as Hugging Face's `ROPE_INIT_FUNCTIONS` ('default', 'linear',
  'llama3'), so imported checkpoints see the positions they were trained with.
  """
  dim = cfg.rotary_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
  if cfg.rope_scaling == "linear":
    inv_freq = inv_freq / cfg.rope_factor
  elif cfg.rope_scaling == "llama3":
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_context = cfg.rope_original_max_length
    wavelength = 2 * np.pi / inv_freq
    # Short wavelengths (< old_context / high) are kept, long ones (> old_context / low)
    # divided by `factor`, and those in between interpolated by how many periods fit.
    smooth = (old_context / wavelength - low) / (high - low)
    medium = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelength > old_context / low, inv_freq / factor,
                        np.where(wavelength < old_context / high, inv_freq, medium))
  return inv_freq.astype(np.float32)


def apply_rope(x_bthd: Array, positions_bt: Array, inv_freq: np.ndarray) -> Array:
  """Rotary position embedding (Su et al. 2021), in the 'rotate half' layout of HF Llama/NeoX.

  Only the first `2 * len(inv_freq)` features of each head are rotated (GPT-NeoX partial
  rotary). x_bthd: [batch, length, heads, head_dim]; positions_bt: [batch, length] int;
  inv_freq: the frequencies of each rotated pair (`rope_frequencies`).
  """
  half = len(inv_freq)
  rotary_dim = 2 * half
  angles_btf = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles_btf)[:, :, None, :]
  sin = jnp.sin(angles_btf)[:, :, None, :]
  rot, rest = x_bthd[..., :rotary_dim], x_bthd[..., rotary_dim:]
  x1, x2 = rot[..., :half].astype(jnp.float32), rot[..., half:].astype(jnp.float32)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.concatenate([rotated.astype(x_bthd.dtype), rest], axis=-1)


class Attention(nn.Module):
  """Multi-head / grouped-query causal self-attention with an optional key/value cache.

  The cache for this layer is a pair (k, v) of [batch, cache_length, kv_heads, head_dim] (a
  scanned layer's slice), or the triple (k, v, layer) of every layer's stacked
  [layers, batch, cache_length, kv_heads, head_dim] buffers and this layer's index (layers in
  a Python loop); new keys and values are written at `cache_index` and attention runs over the whole cache
  under `allowed_bqk`, so prefill (many tokens) and decode (one token) are the same code.
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, allowed_bqk: Array, positions_bt: Array,
               layer_cache: Optional[tuple[Array, Array]], cache_index: Optional[Array],
               deterministic: bool) -> tuple[Array, Optional[tuple[Array, Array]]]:
    cfg = self.cfg

    def dense(heads, axes, name):
      return Projection((cfg.d_model,), (heads, cfg.head_dim), ("embed",) + axes, cfg.attn_bias,
                        _dtype(cfg), cfg.init_std, name=name)(x_btd)

    q = dense(cfg.num_heads, ("heads", "kv"), "q_proj")
    k = dense(cfg.num_kv_heads, ("kv_heads", "kv"), "k_proj")
    v = dense(cfg.num_kv_heads, ("kv_heads", "kv"), "v_proj")
    q = constrain(q, ("act_batch", "act_length", "act_heads", "act_kv"))
    k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_kv"))
    v = constrain(v, ("act_batch", "act_length", "act_kv_heads", "act_kv"))
    if cfg.position == "rope":
      inv_freq = rope_frequencies(cfg)
      q = apply_rope(q, positions_bt, inv_freq)
      k = apply_rope(k, positions_bt, inv_freq)

    new_cache = None
    if layer_cache is not None and len(layer_cache) == 3:
      # Every layer's cache [layers, batch, cache_length, ...] and this layer's index: the new
      # keys and values are written into the stacked buffers in place, so a decode step moves
      # only its own tokens (slicing this layer out and stacking the layers again copied the
      # whole cache every step).
      all_k, all_v, layer = layer_cache
      start = (layer, 0, cache_index, 0, 0)
      all_k = jax.lax.dynamic_update_slice(all_k, k[None].astype(all_k.dtype), start)
      all_v = jax.lax.dynamic_update_slice(all_v, v[None].astype(all_v.dtype), start)
      k, v, new_cache = all_k[layer].astype(q.dtype), all_v[layer].astype(q.dtype), (all_k, all_v,
                                                                                     layer)
    elif layer_cache is not None:
      cache_k, cache_v = layer_cache
      start = (0, cache_index, 0, 0)
      cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
      cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
      k, v, new_cache = cache_k.astype(q.dtype), cache_v.astype(q.dtype), (cache_k, cache_v)

    b, t, _, hd = q.shape
    groups = cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, cfg.num_kv_heads, groups, hd)
    # Scores accumulate and come out in float32 even when q and k are bfloat16 (the matmul
    # still runs on the bf16 units): a bf16 *output* would round every score to 8 bits
    # (steps of 1/8 at |s| in [16, 32)) before the softmax, whatever it is cast to afterwards.
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(hd)
    # [b, kv_heads, groups, t, s] before masking, kept only under mutable=['intermediates']
    # (tests, attention diagnostics); a no-op otherwise.
    self.sow("intermediates", "scores", scores)
    scores = jnp.where(allowed_bqk[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    # probs @ v stays in the compute dtype: probabilities in [0, 1] lose only relative
    # precision in bf16, and the result feeds the bf16 o_proj, which would round it anyway.
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, cfg.num_heads, hd)
    out = constrain(out, ("act_batch", "act_length", "act_heads", "act_kv"))
    out = Projection((cfg.num_heads, cfg.head_dim), (cfg.d_model,), ("heads", "kv", "embed"),
                     cfg.attn_bias, _dtype(cfg), _residual_std(cfg), name="o_proj")(out)
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return constrain(out, ("act_batch", "act_length", "act_embed")), new_cache


class Mlp(nn.Module):
  """GELU MLP (GPT-2, NeoX) or SwiGLU (Llama)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_btd: Array, deterministic: bool) -> Array:
    cfg = self.cfg

    def dense(x, d_in, d_out, axes, name, std=cfg.init_std):
      return Projection((d_in,), (d_out,), axes, cfg.use_bias, _dtype(cfg), std, name=name)(x)

    up = dense(x_btd, cfg.d_model, cfg.d_ff, ("embed", "mlp"), "up_proj")
    if cfg.mlp == "swiglu":
      h = nn.silu(dense(x_btd, cfg.d_model, cfg.d_ff, ("embed", "mlp"), "gate_proj")) * up
    else:
      h = nn.gelu(up, approximate=cfg.mlp == "gelu_tanh")
    h = constrain(h, ("act_batch", "act_length", "act_mlp"))
    out = dense(h, cfg.d_ff, cfg.d_model, ("mlp", "embed"), "down_proj", _residual_std(cfg))
    out = nn.Dropout(cfg.dropout_rate)(out, deterministic=deterministic)
    return constrain(out, ("act_batch", "act_length", "act_embed"))


class Block(nn.Module):
  """One pre-norm Transformer layer; sequential or parallel (GPT-NeoX) residual.

  The signature `(x, layer_cache, allowed, positions, cache_index) -> (x, layer_cache)` is
  what `nn.scan` needs: `x` is the carry, the cache is scanned over layers, the rest broadcast.
  """

  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_btd, layer_cache, allowed_bqk, positions_bt, cache_index):
    cfg = self.cfg
    attn_out, layer_cache = Attention(cfg, name="attn")(make_norm(cfg, "attn_norm")(x_btd),
                                                        allowed_bqk, positions_bt, layer_cache,
                                                        cache_index, self.deterministic)
    if cfg.parallel_residual:
      mlp_out = Mlp(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_btd), self.deterministic)
      x_btd = x_btd + attn_out + mlp_out
    else:
      x_btd = x_btd + attn_out
      x_btd = x_btd + Mlp(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x_btd), self.deterministic)
    return constrain(x_btd, ("act_batch", "act_length", "act_embed")), layer_cache
