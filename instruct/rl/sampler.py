"""Jitted sampling with a preallocated key/value cache, for PPO rollouts and evaluation.

One program: prefill of left-padded prompts, then a `lax.while_loop` that decodes one token
per iteration over the cache and stops early once every row has emitted EOS (or at
`max_new_tokens`). Shapes are fixed by (batch, prompt length, max_new_tokens), so after the
first call nothing recompiles. It runs from the (sharded) parameters it is given; the cache is
created inside and constrained to the logical cache axes, so it is sharded like activations.

The distribution sampled at each step is

  pi(v) = softmax(mask_banned(logits / T))(v),

where `mask_banned` sets the logits of `SamplingConfig.banned_ids` (the tokenizer's special
tokens other than EOS: pad, unk, BOS, ...; see `banned_token_ids`) to the float32 minimum, so
they have probability exactly 0 and the others are renormalised. Banning pad matters for RLHF:
a policy that can emit pad mid-answer has a channel that the reward model scores but a judge
or decoder strips (reward hacking). The returned log-probabilities are log pi of the chosen
tokens: the quantity PPO's ratio and KL need, recomputed identically by `scoring.sequence_logprobs`
given the same temperature and `banned_ids`. top-k / top-p filter pi further before the draw
but are NOT in the returned log-probs (PPO with them is off-policy; `rl.config.validate_rl`
refuses that unless asked). temperature == 0 means greedy decoding (its log-probs use T = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from instruct import reductions
from instruct.model.transformer import CACHE_KV_AXES, CACHE_MASK_AXES, KVCache, Transformer

Array = jax.Array


# yapf: disable
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample. eos_id, pad_id and banned_ids come from the tokenizer.

  banned_ids: tokens never sampled (greedy included), given probability 0 in the returned
  log-probs too; normally `banned_token_ids(tokenizer)`. Stored sorted and deduplicated so
  that equal sets give equal (hashable, jit-cache-friendly) configs. Must not contain EOS.
  """

  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0   # 0: greedy.
  top_k: int = 0             # 0: off. Exactly k tokens are kept (ties broken by lower id).
  top_p: float = 1.0         # 1: off.
  banned_ids: tuple[int, ...] = ()

  def __post_init__(self):
    banned = tuple(sorted({int(i) for i in self.banned_ids}))
    if self.eos_id in banned:
      raise ValueError(f"SamplingConfig.banned_ids={banned} contains eos_id={self.eos_id}: "
                       "a policy that cannot emit EOS can never stop.")
    object.__setattr__(self, "banned_ids", banned)  # Frozen: normalise once, here.
# yapf: enable


@flax.struct.dataclass
class Samples:
  """A batch of sampled responses.

  response_tokens: [b, r] (pad after EOS); response_logprobs: [b, r] log pi of the chosen
  tokens, pi the tempered distribution with banned tokens masked (0 where masked);
  response_mask: [b, r] 1 on real response tokens up to and including EOS; ended_with_eos: [b]
  bool; num_decode_steps: int32 scalar, loop iterations run (< r when every row ended early).
  """

  response_tokens: Array
  response_logprobs: Array
  response_mask: Array
  ended_with_eos: Array
  num_decode_steps: Array


def banned_token_ids(tokenizer) -> tuple[int, ...]:
  """The ids a policy must never sample: every special token of `tokenizer` except EOS.

  That is `all_special_ids` plus pad and unk (declared or not among the special tokens, e.g. a
  `config.data.pad_token` chosen from the vocabulary), minus EOS: pad, unk, BOS, mask, ...
  Sorted. If pad were EOS it would stay allowed (`tokenization.check_special_tokens` refuses
  that tokenizer anyway).
  """
  ids = set(getattr(tokenizer, "all_special_ids", None) or ())
  for name in ("pad_token_id", "unk_token_id", "bos_token_id"):
    token_id = getattr(tokenizer, name, None)
    if token_id is not None:
      ids.add(token_id)
  ids.discard(tokenizer.eos_token_id)
  return tuple(sorted(int(i) for i in ids))


def mask_banned(logits_xv: Array, banned_ids: tuple[int, ...]) -> Array:
  """logits [..., v] with the `banned_ids` columns set to the float32 minimum.

  A finite minimum rather than -inf: softmax gives those tokens probability exactly 0, while
  log_softmax, entropies (0 * log 0 terms) and their gradients stay finite, which -inf would
  turn into NaN wherever a masked position is multiplied by zero.
  """
  if not banned_ids:
    return logits_xv
  logits_xv = logits_xv.astype(jnp.float32)
  return logits_xv.at[..., jnp.asarray(banned_ids, jnp.int32)].set(jnp.finfo(jnp.float32).min)


def _keep_ranked(logits_bv: Array, order_bv: Array, keep_sorted_bv: Array) -> Array:
  """Scatters a keep-mask given in `order_bv` (ranked ids per row) back to vocabulary order."""
  rows = jnp.arange(logits_bv.shape[0])[:, None]
  return jnp.zeros(logits_bv.shape, bool).at[rows, order_bv].set(keep_sorted_bv)


def filter_logits(logits_bv: Array, top_k: int, top_p: float) -> Array:
  """Sets logits outside the top-k and outside the top-p nucleus to the dtype's minimum.

  logits_bv: [b, v]. Tokens are ranked by logit, ties by lower id (`jax.lax.top_k`'s order);
  top-k keeps exactly the first k of that ranking (comparing against the k-th value would keep
  every token tied with it), and top-p keeps the shortest prefix of it whose probability mass
  reaches top_p: token at rank i is kept iff sum_{j < i} p_j < top_p, so rank 0 always is.
  """
  neg_inf = jnp.finfo(logits_bv.dtype).min
  vocab = logits_bv.shape[-1]
  if 0 < top_k < vocab:
    order = jax.lax.top_k(logits_bv, top_k)[1]
    keep = _keep_ranked(logits_bv, order, jnp.ones(order.shape, bool))
    logits_bv = jnp.where(keep, logits_bv, neg_inf)
  if top_p < 1.0:
    sorted_logits, order = jax.lax.top_k(logits_bv, vocab)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Probability mass of better-ranked tokens.
    keep = _keep_ranked(logits_bv, order, before < top_p)
    logits_bv = jnp.where(keep, logits_bv, neg_inf)
  return logits_bv


def choose_tokens(logits_bv: Array, rng: Array, cfg: SamplingConfig) -> tuple[Array, Array]:
  """One decoding step: (token [b], log pi(token) [b]) from the model's logits [b, v].

  pi = softmax(mask_banned(logits / T)) (T = 1 when greedy); the draw is from pi filtered by
  top-k / top-p, greedy takes its argmax, so a banned token is never chosen either way.
  """
  temperature = cfg.temperature if cfg.temperature > 0 else 1.0
  tempered = mask_banned(logits_bv / temperature, cfg.banned_ids)
  log_probs = jax.nn.log_softmax(tempered, axis=-1)
  if cfg.temperature == 0:
    token = reductions.argmax(tempered)
  else:
    filtered = filter_logits(tempered, cfg.top_k, cfg.top_p)
    token = reductions.categorical(rng, filtered)
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
      token, logprob = choose_tokens(s["logits"], jax.random.fold_in(rng, s["step"]), cfg)
      live = ~s["done"]
      token = jnp.where(live, token, cfg.pad_id).astype(jnp.int32)
      at = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None].astype(buf.dtype),
                                                       (0, s["step"]))
      step_out = model.apply({"params": params}, token[:, None], live[:, None].astype(jnp.int32),
                             cache=s["cache"])
      return dict(step=s["step"] + 1, cache=step_out.cache, logits=step_out.logits[:, 0],
                  done=s["done"] | (token == cfg.eos_id), tokens=at(s["tokens"], token),
                  logprobs=at(s["logprobs"], logprob * live), mask=at(s["mask"],
                                                                      live.astype(jnp.int32)))

    final = jax.lax.while_loop(cond, body, init)
    ended = jnp.any((final["tokens"] == cfg.eos_id) & (final["mask"] > 0), axis=1)
    return Samples(response_tokens=final["tokens"], response_logprobs=final["logprobs"],
                   response_mask=final["mask"], ended_with_eos=ended,
                   num_decode_steps=final["step"])

  return sample
