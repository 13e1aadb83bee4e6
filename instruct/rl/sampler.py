"""Jitted sampling with a preallocated key/value cache, for PPO rollouts and evaluation.

One program: prefill of left-padded prompts, then a `lax.while_loop` that decodes one token
per iteration over the cache and stops early once every row has emitted EOS (or at
`max_new_tokens`). Shapes are fixed by (batch, prompt length, max_new_tokens), so after the
first call nothing recompiles. It runs from the (sharded) parameters it is given; the cache is
created inside and constrained to the logical cache axes, so it is sharded like activations.

Log-probabilities are those of the tempered distribution, log softmax(logits / T), before
top-k / top-p filtering: the quantity PPO's ratio and KL need, recomputed identically by a
full forward pass with the same temperature. temperature == 0 means greedy decoding (its
log-probs use T = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from instruct.model.transformer import CACHE_KV_AXES, CACHE_MASK_AXES, KVCache, Transformer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. eos_id and pad_id come from the tokenizer."""

  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0   # 0: greedy.
  top_k: int = 0             # 0: off.
  top_p: float = 1.0         # 1: off.


@flax.struct.dataclass
class Samples:
  """A batch of sampled responses.

  response_tokens: [b, r] (pad after EOS); response_logprobs: [b, r] log-probs of the chosen
  tokens under the tempered distribution (0 where masked); response_mask: [b, r] 1 on real
  response tokens up to and including EOS; ended_with_eos: [b] bool; num_decode_steps: int32
  scalar, loop iterations run (< r when every row ended early).
  """

  response_tokens: Array
  response_logprobs: Array
  response_mask: Array
  ended_with_eos: Array
  num_decode_steps: Array


def filter_logits(logits_bv: Array, top_k: int, top_p: float) -> Array:
  """Sets logits outside the top-k and outside the top-p nucleus to -inf."""
  neg_inf = jnp.finfo(logits_bv.dtype).min
  if top_k > 0:
    kth = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth, neg_inf, logits_bv)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits_bv, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Probability mass of strictly better tokens.
    cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < cutoff, neg_inf, logits_bv)
  return logits_bv


def _choose(logits_bv: Array, rng: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
  """(token [b], log-prob of it under the tempered, unfiltered distribution [b])."""
  temperature = cfg.temperature if cfg.temperature > 0 else 1.0
  log_probs = jax.nn.log_softmax(logits_bv / temperature, axis=-1)
  if cfg.temperature == 0:
    token = jnp.argmax(logits_bv, axis=-1)
  else:
    filtered = filter_logits(logits_bv / temperature, cfg.top_k, cfg.top_p)
    token = jax.random.categorical(rng, filtered, axis=-1)
  return token, jnp.take_along_axis(log_probs, token[:, None], axis=-1)[:, 0]


def make_sampler(model: Transformer, cfg: SamplingConfig):
  """Returns pure `sample(params, prompt_tokens_bp, prompt_mask_bp, rng) -> Samples`.

  Prompts are LEFT-padded (`prompt_mask_bp` 1 on real tokens), so the last position of every
  row is its last prompt token. Jit it (with the params' shardings) in the driver.
  """
  r = cfg.max_new_tokens

  def sample(params: Any, prompt_tokens_bp: Array, prompt_mask_bp: Array, rng: Array):
    b, p = prompt_tokens_bp.shape
    cache = KVCache.init(model.cfg, b, p + r)
    cache = cache.replace(k=nn.with_logical_constraint(cache.k, CACHE_KV_AXES),
                          v=nn.with_logical_constraint(cache.v, CACHE_KV_AXES),
                          mask=nn.with_logical_constraint(cache.mask, CACHE_MASK_AXES))
    out = model.apply({"params": params}, prompt_tokens_bp, prompt_mask_bp, cache=cache,
                      logits_from=-1)
    init = dict(step=jnp.zeros((), jnp.int32), cache=out.cache, logits=out.logits[:, -1],
                done=jnp.zeros((b,), bool), tokens=jnp.full((b, r), cfg.pad_id, jnp.int32),
                logprobs=jnp.zeros((b, r), jnp.float32), mask=jnp.zeros((b, r), jnp.int32))

    def cond(s):
      return (s["step"] < r) & ~jnp.all(s["done"])

    def body(s):
      token, logprob = _choose(s["logits"], jax.random.fold_in(rng, s["step"]), cfg)
      live = ~s["done"]
      token = jnp.where(live, token, cfg.pad_id).astype(jnp.int32)
      at = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype),
                                                       (0, s["step"]))
      step_out = model.apply({"params": params}, token[:, None],
                             live[:, None].astype(jnp.int32), cache=s["cache"])
      return dict(step=s["step"] + 1, cache=step_out.cache, logits=step_out.logits[:, 0],
                  done=s["done"] | (token == cfg.eos_id),
                  tokens=at(s["tokens"], token), logprobs=at(s["logprobs"], logprob * live),
                  mask=at(s["mask"], live.astype(jnp.int32)))

    final = jax.lax.while_loop(cond, body, init)
    ended = jnp.any((final["tokens"] == cfg.eos_id) & (final["mask"] > 0), axis=1)
    return Samples(response_tokens=final["tokens"], response_logprobs=final["logprobs"],
                   response_mask=final["mask"], ended_with_eos=ended,
                   num_decode_steps=final["step"])

  return sample


def sequence_logprobs(model: Transformer, params: Any, prompt_tokens_bp: Array,
                      prompt_mask_bp: Array, response_tokens_br: Array,
                      response_mask_br: Array, temperature: float = 1.0):
  """Log-probs of the response tokens by one full forward pass, with the sampling temperature.

  Returns ([b, r] log-probs, zero where masked; [b, r, v] tempered logits of the response
  positions). The prediction for response token t comes from the position before it.
  """
  tokens = jnp.concatenate([prompt_tokens_bp, response_tokens_br], axis=1)
  mask = jnp.concatenate([prompt_mask_bp, response_mask_br], axis=1)
  p = prompt_tokens_bp.shape[1]
  logits = model.apply({"params": params}, tokens, mask, logits_from=p - 1).logits[:, :-1]
  logits = logits / (temperature if temperature > 0 else 1.0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(log_probs, response_tokens_br[..., None], axis=-1)[..., 0]
  return chosen * response_mask_br, logits
