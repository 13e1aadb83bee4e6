"""The decoder-only Transformer: backbone, language-model head and scalar head.

`Transformer(cfg, head='lm')` returns next-token logits, `head='scalar'` one scalar per position
(reward and value models: read it at the last real token), and `head='policy_value'` both:
the LM head plus a zero-initialised `value_head` on the same trunk (PPO with a shared
critic). Both share the same backbone parameters, so an SFT checkpoint initialises a reward
model by dropping `lm_head` (if any) and adding `scalar_head`.

Padding: the attention mask ([batch, length], 1 on real tokens) may have padding on either
side. Positions are the cumulative sum of the mask, so a left-padded prompt gets the same
positions as the unpadded one, and padded keys are never attended to.

Precision: with `dtype='bfloat16'` the trunk computes in bf16 (parameters stay float32), but
the LM head and the attention scores accumulate *and return* float32 (`preferred_element_type`),
so logits and scores are not rounded to bf16's 8 significant bits before the softmax.

Incremental decoding uses an explicit `KVCache` pytree passed in and returned: a call writes
its tokens at `cache.index` and attends over everything written so far. Prefill is a call with
the whole (left-padded) prompt; each decode step is a call with one token.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from instruct.model.config import ModelConfig
from instruct.model.layers import Block, Projection, constrain, make_norm

Array = jax.Array
HEADS = ("lm", "scalar", "policy_value")

# Logical axes of the KV cache arrays, for sharding a cache on a mesh.
CACHE_KV_AXES = ("layers", "act_batch", "act_length", "act_kv_heads", "act_kv")
CACHE_MASK_AXES = ("act_batch", "act_length")


@flax.struct.dataclass
class KVCache:
  """Keys and values of every layer for incremental decoding.

  k, v: [layers, batch, cache_length, kv_heads, head_dim]; mask: [batch, cache_length] int32,
  1 where a real token has been written; index: int32 scalar, the next slot to write.
  The caller keeps `index + new tokens <= cache_length` (inside jit a write past the end
  cannot raise; `dynamic_update_slice` would clamp it onto the last slots).
  """

  k: Array
  v: Array
  mask: Array
  index: Array

  @classmethod
  def init(cls, cfg: ModelConfig, batch: int, length: int, dtype=None) -> "KVCache":
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or jnp.dtype(cfg.dtype)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), mask=jnp.zeros(
        (batch, length), jnp.int32), index=jnp.zeros((), jnp.int32))


@flax.struct.dataclass
class ModelOutput:
  """logits: [batch, length, vocab] float32 (head 'lm'); values: [batch, length] float32
  (head 'scalar'); cache: the updated KVCache when one was given."""

  logits: Optional[Array] = None
  values: Optional[Array] = None
  cache: Optional[KVCache] = None


def _positions_and_allowed(attention_mask_bt: Array, cache: Optional[KVCache]):
  """Positions of the new tokens, the key mask after writing them, and the [b, q, k] mask."""
  t = attention_mask_bt.shape[1]
  if cache is None:
    key_mask = attention_mask_bt
    previous = jnp.zeros(attention_mask_bt.shape[:1], jnp.int32)
    query_slot = jnp.arange(t)
  else:
    key_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask_bt, (0, cache.index))
    previous = jnp.sum(cache.mask, axis=1)
    query_slot = cache.index + jnp.arange(t)
  positions = previous[:, None] + jnp.cumsum(attention_mask_bt, axis=1) - 1
  positions = jnp.maximum(positions, 0)
  key_slot = jnp.arange(key_mask.shape[1])
  causal_qk = key_slot[None, :] <= query_slot[:, None]
  allowed = causal_qk[None] & (key_mask[:, None, :] > 0)
  return positions, key_mask, allowed


class Transformer(nn.Module):
  """Decoder-only Transformer with an 'lm' or 'scalar' head."""

  cfg: ModelConfig
  head: str = "lm"

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f"head={self.head!r}; expected one of {HEADS}.")

  @nn.compact
  def __call__(self, tokens_bt: Array, attention_mask_bt: Optional[Array] = None,
               cache: Optional[KVCache] = None, deterministic: bool = True, logits_from: int = 0,
               logits_stop: Optional[int] = None) -> ModelOutput:
    """tokens_bt: [batch, length] int; attention_mask_bt: [batch, length], 1 on real tokens.

    `logits_from` (a Python int, possibly negative): the LM head runs on positions
    `logits_from:` only, so `logits` is [batch, length - logits_from, vocab]. A prefill needs
    only the last position (-1) and response scoring only the positions that predict the
    response; at a 50k-128k vocabulary the full [batch, length, vocab] logits are often the
    largest buffer of the step. `logits_stop` (a Python int or None) ends that range, as in
    `x[:, logits_from:logits_stop]`: a next-token loss needs no logits at the last position,
    and slicing them off the [batch, length, vocab] logits instead would copy the logits
    forward and pad and transpose their gradient backward.
    """
    cfg = self.cfg
    if attention_mask_bt is None:
      attention_mask_bt = jnp.ones_like(tokens_bt, jnp.int32)
    attention_mask_bt = attention_mask_bt.astype(jnp.int32)
    positions_bt, key_mask, allowed_bqk = _positions_and_allowed(attention_mask_bt, cache)

    embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype), name="embed",
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                    ("vocab", "embed")))
    x = embed(tokens_bt)
    if cfg.position == "learned":
      x = x + nn.Embed(
          cfg.max_length, cfg.d_model, dtype=jnp.dtype(cfg.dtype), name="pos_embed",
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std / 2),
                                                      ("length", "embed")))(positions_bt)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = constrain(x, ("act_batch", "act_length", "act_embed"))

    layer_caches = None if cache is None else (cache.k, cache.v)
    cache_index = None if cache is None else cache.index
    x, layer_caches = self._layers(x, layer_caches, allowed_bqk, positions_bt, cache_index,
                                   deterministic)
    x = make_norm(cfg, "final_norm")(x)

    new_cache = None
    if cache is not None:
      new_cache = KVCache(k=layer_caches[0], v=layer_caches[1], mask=key_mask,
                          index=cache.index + tokens_bt.shape[1])
    if self.head == "scalar":
      return ModelOutput(values=self._scalar(x, "scalar_head"), cache=new_cache)
    values = self._scalar(x, "value_head") if self.head == "policy_value" else None
    if logits_from or logits_stop is not None:
      x = x[:, logits_from:logits_stop]
    logits = self._lm_head(x, embed)
    logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
    return ModelOutput(logits=logits, values=values, cache=new_cache)

  def _lm_head(self, x, embed: nn.Embed):
    """[b, t, vocab] float32 logits of the final hidden states x, through the tied embedding
    or `lm_head`.

    The inputs are in the compute dtype but the matmul accumulates and returns float32: a
    bfloat16 output would round every logit to 8 significant bits (steps of 1/16 to 1/8 at
    |logit| 8-32), a noise of several hundredths of a nat per token in the log-probabilities
    that the KL penalty and the PPO ratio compare.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    if cfg.tie_embeddings:
      return jax.lax.dot_general(x.astype(dtype), embed.embedding.astype(dtype),
                                 (((x.ndim - 1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
    return Projection((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), False, dtype,
                      cfg.init_std, out_dtype=jnp.float32, name="lm_head")(x)

  def _scalar(self, x, name: str):
    """[b, t] scalar head: `scalar_head` N(0, 1/sqrt(d+1)) (reward model, Ouyang et al.), or a
    zero-initialised `value_head` on a policy trunk.

    `dtype=float32` promotes the (bf16) hidden states, so the product is a float32 matmul and
    the values are not rounded to bf16; it is one column, so the cost does not matter."""
    std = 0.0 if name == "value_head" else (self.cfg.d_model + 1) ** -0.5
    init = nn.initializers.normal(std) if std else nn.initializers.zeros_init()
    values = nn.Dense(1, dtype=jnp.float32, name=name,
                      kernel_init=nn.with_logical_partitioning(init, ("embed", None)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                             (None,)))(x)
    return values[..., 0]

  def _layers(self, x, layer_caches, allowed_bqk, positions_bt, cache_index, deterministic):
    """Runs the layers, scanned (stacked parameters under 'layers') or as `layers_{i}`."""
    cfg = self.cfg
    block_cls = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
                if cfg.remat == "dots" else None)
      block_cls = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      return scanned(cfg, deterministic, name="layers")(x, layer_caches, allowed_bqk, positions_bt,
                                                        cache_index)
    for i in range(cfg.num_layers):
      # Each layer writes its keys and values into the stacked buffers in place.
      layer_cache = None if layer_caches is None else (*layer_caches[:2], i)
      x, layer_cache = block_cls(cfg, deterministic,
                                 name=f"layers_{i}")(x, layer_cache, allowed_bqk, positions_bt,
                                                     cache_index)
      layer_caches = None if layer_cache is None else layer_cache[:2]
    return x, layer_caches


def stack_layers(params: dict, num_layers: int) -> dict:
  """Converts `layers_{i}` parameters (unscanned) to one stacked `layers` tree (scanned)."""
  params = dict(params)
  per_layer = [params.pop(f"layers_{i}") for i in range(num_layers)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return params


def unstack_layers(params: dict, num_layers: int) -> dict:
  """Inverse of `stack_layers`."""
  params = dict(params)
  stacked = params.pop("layers")
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
