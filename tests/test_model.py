"""Tests of the Transformer model: numerics against a numpy reference, padding, KV cache,
scanned layers, remat, dropout, bfloat16, the scalar head, logical names, config
validation, parameter counts and rotary embeddings.

Numerics use random parameters of O(1) scale (norm scales and biases not at their init
values) so that every parameter influences the logits; the references are written in numpy
(float64) from the parameter tree, independently of the Flax code.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax.linen import meta

from instruct import config_lib
from instruct.model import (KVCache, ModelConfig, Transformer, count_params, preset, stack_layers,
                            unstack_layers)
from instruct.model.layers import apply_rope, rope_frequencies
from instruct.sharding import DEFAULT_RULES
from tests.conftest import is_boxed

FAMILIES = ("tiny", "tiny_llama")
# A GPT-NeoX/Pythia-like variant: partial rotary, parallel residual, exact GELU, untied head.
NEOX = dict(position="rope", rotary_fraction=0.25, parallel_residual=True, mlp="gelu",
            tie_embeddings=False)
# Llama 3.1 / 3.2 frequency scaling with a short original context, so that the head's 8
# frequency pairs fall in all three regimes (kept, interpolated, divided).
LLAMA3_ROPE = dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_length=64)
VARIANTS = {
    "tiny": ("tiny", {}), "tiny_llama": ("tiny_llama", {}), "tiny_neox": ("tiny", NEOX),
    "tiny_llama3_rope": ("tiny_llama", LLAMA3_ROPE)
}

# ----------------------------------------------------------------------------- helpers


def make_cfg(name: str, **overrides) -> ModelConfig:
  return ModelConfig(**preset(name, **overrides))


def abstract_variables(model: Transformer):
  """Boxed abstract variables of `model` (no memory, no compilation)."""
  return _abstract_variables(model.cfg, model.head)


@functools.lru_cache(maxsize=None)
def _abstract_variables(cfg: ModelConfig, head: str):
  model = Transformer(cfg, head)
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def random_params(cfg: ModelConfig, head: str = "lm", seed: int = 0) -> dict:
  """Random float32 parameters of O(1) scale with the tree of `Transformer(cfg, head)`."""
  shapes = meta.unbox(abstract_variables(Transformer(cfg, head)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    names = [k.key for k in path]
    kind, shape = names[-1], leaf.shape
    if kind == "scale":
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif kind == "bias":
      x = 0.1 * rng.standard_normal(shape)
    elif kind == "embedding":
      x = (0.5 if "pos_embed" in names else 1.0) * rng.standard_normal(shape)
    else:  # kernel
      fan_in = shape[0] * shape[1] if "o_proj" in names else shape[0]
      x = rng.standard_normal(shape) / math.sqrt(fan_in)
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def count_leaves(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def np_tree(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def jit(fun, **kwargs):
  """jax.jit without LLVM optimisation: the tiny models compile ~35% faster on CPU."""
  return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


# ------------------------------------------------------------------ numpy reference


def np_rope(x, positions, rotary_dim, theta, freq=None):
  """Rotate-half RoPE via complex numbers: feature i pairs with i + rotary_dim/2."""
  half = rotary_dim // 2
  if freq is None:
    freq = theta ** (-np.arange(half) * 2.0 / rotary_dim)
  z = x[..., :half] + 1j * x[..., half:rotary_dim]
  z = z * np.exp(1j * positions[:, :, None, None] * freq)
  return np.concatenate([z.real, z.imag, x[..., rotary_dim:]], axis=-1)


def np_norm(x, p, cfg):
  if cfg.norm == "rmsnorm":
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * p["scale"]
  mu = np.mean(x, -1, keepdims=True)
  var = np.mean((x - mu) ** 2, -1, keepdims=True)
  return (x - mu) / np.sqrt(var + cfg.norm_eps) * p["scale"] + p["bias"]


def np_proj(x, p, n_in):
  y = np.tensordot(x, p["kernel"], axes=n_in)
  return y + p["bias"] if "bias" in p else y


def np_attention(x, p, cfg, positions, mask):
  q, k, v = (np_proj(x, p[n], 1) for n in ("q_proj", "k_proj", "v_proj"))  # [b, t, h, d]
  if cfg.position == "rope":
    freq = rope_frequencies(cfg).astype(np.float64)
    q = np_rope(q, positions, cfg.rotary_dim, cfg.rope_theta, freq)
    k = np_rope(k, positions, cfg.rotary_dim, cfg.rope_theta, freq)
  groups = cfg.num_heads // cfg.num_kv_heads
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # HF repeat_kv.
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.head_dim)
  t = x.shape[1]
  allowed = np.tril(np.ones((t, t), bool))[None, None] & (mask[:, None, None, :] > 0)
  scores = np.where(allowed, scores, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqk,bkhd->bqhd", probs, v)
  return np_proj(out, p["o_proj"], 2)


def np_mlp(x, p, cfg):
  up = np_proj(x, p["up_proj"], 1)
  if cfg.mlp == "swiglu":
    g = np_proj(x, p["gate_proj"], 1)
    h = g / (1.0 + np.exp(-g)) * up
  elif cfg.mlp == "gelu_tanh":
    h = 0.5 * up * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (up + 0.044715 * up ** 3)))
  else:
    h = 0.5 * up * (1.0 + np.vectorize(math.erf)(up / math.sqrt(2.0)))
  return np_proj(h, p["down_proj"], 1)


def np_backbone(params, cfg, tokens, mask):
  """Final-normed hidden states [b, t, d] of the architecture, in float64."""
  p = np_tree(params["params"])
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  x = p["embed"]["embedding"][tokens]
  if cfg.position == "learned":
    x = x + p["pos_embed"]["embedding"][positions]
  for i in range(cfg.num_layers):
    lp = p[f"layers_{i}"]
    attn = np_attention(np_norm(x, lp["attn_norm"], cfg), lp["attn"], cfg, positions, mask)
    if cfg.parallel_residual:
      x = x + attn + np_mlp(np_norm(x, lp["mlp_norm"], cfg), lp["mlp"], cfg)
    else:
      x = x + attn
      x = x + np_mlp(np_norm(x, lp["mlp_norm"], cfg), lp["mlp"], cfg)
  return np_norm(x, p["final_norm"], cfg), p


def np_logits(params, cfg, tokens, mask):
  h, p = np_backbone(params, cfg, tokens, mask)
  if cfg.tie_embeddings:
    return h @ p["embed"]["embedding"].T
  return h @ p["lm_head"]["kernel"]


# ---------------------------------------------------------------------- shared models

# Shapes shared by the tests so that the jitted functions below compile once per family.
BATCH, LENGTH, PROMPT = 2, 12, 4


class Family:
  """A config with its model, random parameters and jitted forward / cached-step functions."""

  def __init__(self, cfg: ModelConfig, seed: int = 0):
    self.cfg = cfg
    self.model = Transformer(cfg)
    self.params = random_params(cfg, seed=seed)
    self.logits = jit(lambda p, t, m: self.model.apply(p, t, m).logits)

    def step(params, tokens, mask, cache):
      out = self.model.apply(params, tokens, mask, cache=cache)
      return out.logits, out.cache

    self.step = jit(step)


@functools.lru_cache(maxsize=None)
def get_family(name: str) -> Family:
  """The shared Family of a VARIANTS name (built once per test session)."""
  base, overrides = VARIANTS[name]
  return Family(make_cfg(base, **overrides))


def random_tokens(cfg, shape, seed=1):
  return np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)


# ------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("name", list(VARIANTS))
def test_forward_matches_numpy_reference(name):
  """Transformer logits equal an independent numpy forward pass of the architecture."""
  fam = get_family(name)
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH))
  mask = np.ones_like(tokens)
  got = np.asarray(fam.logits(fam.params, tokens, mask))
  want = np_logits(fam.params, fam.cfg, tokens, mask)
  assert got.dtype == np.float32 and got.shape == (BATCH, LENGTH, fam.cfg.vocab_size)
  scale = np.abs(want).max()
  assert scale > 1.0  # Non-trivial logits, so the tolerance below is meaningful.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("name", FAMILIES)
def test_padded_batch_matches_numpy_reference(name):
  """With left and right padding, real-token logits equal the masked numpy reference."""
  fam = get_family(name)
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH), seed=2)
  mask = np.ones_like(tokens)
  mask[0, :4] = 0
  mask[1, 9:] = 0
  got = np.asarray(fam.logits(fam.params, tokens, mask))
  want = np_logits(fam.params, fam.cfg, tokens, mask)
  real = mask > 0
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4 * np.abs(want[real]).max())


@pytest.mark.parametrize("name", FAMILIES)
def test_left_and_right_padding_match_unpadded(name):
  """A padded row gives the unpadded sequence's logits on its real tokens."""
  fam = get_family(name)
  n, pad = 7, LENGTH - 7
  seq = random_tokens(fam.cfg, (n,), seed=3)
  unpadded = np.asarray(fam.logits(fam.params, seq[None], np.ones((1, n), np.int32)))[0]
  tokens = np.zeros((BATCH, LENGTH), np.int32)
  mask = np.zeros((BATCH, LENGTH), np.int32)
  # Row 0 left-padded, row 1 right-padded; pad tokens are arbitrary (not 0) on purpose.
  tokens[0, :pad], tokens[0, pad:], mask[0, pad:] = 17, seq, 1
  tokens[1, :n], tokens[1, n:], mask[1, :n] = seq, 23, 1
  got = np.asarray(fam.logits(fam.params, tokens, mask))
  np.testing.assert_allclose(got[0, pad:], unpadded, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[1, :n], unpadded, rtol=1e-5, atol=1e-4)
  # Sanity check that positions matter: shifting the positions changes the logits.
  shifted = np.asarray(fam.logits(fam.params, tokens, np.ones_like(tokens)))
  assert np.abs(shifted[0, pad:] - unpadded).max() > 1e-2


# ------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_from_is_a_slice_of_the_full_logits(name):
  """`logits_from` / `logits_stop` run the LM head on a range of positions only: the same
  values as slicing the full logits, with and without a cache."""
  fam = get_family(name)
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH), seed=9)
  mask = np.ones_like(tokens)
  mask[0, :3] = 0
  model = Transformer(fam.cfg)
  full = np.asarray(model.apply(fam.params, tokens, mask).logits)
  for start, stop in ((5, None), (-1, None), (0, -1), (5, -1), (-3, -1)):
    part = model.apply(fam.params, tokens, mask, logits_from=start, logits_stop=stop).logits
    assert part.shape == (BATCH, full[:, start:stop].shape[1], fam.cfg.vocab_size)
    np.testing.assert_allclose(np.asarray(part), full[:, start:stop], rtol=1e-5, atol=1e-5)
  cache = KVCache.init(fam.cfg, BATCH, LENGTH)
  out = model.apply(fam.params, tokens, mask, cache=cache, logits_from=-1)
  np.testing.assert_allclose(np.asarray(out.logits[:, 0]), full[:, -1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_prefill_and_decode_match_full_forward(name):
  """Prefill of a left-padded prompt then one-token decode steps equals one forward pass."""
  fam = get_family(name)
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH), seed=4)
  mask = np.ones_like(tokens)
  mask[0, :2] = 0  # Row 0: a 2-token prompt, left-padded to PROMPT.
  full = np.asarray(fam.logits(fam.params, tokens, mask))

  cache = KVCache.init(fam.cfg, batch=BATCH, length=LENGTH)
  logits, cache = fam.step(fam.params, tokens[:, :PROMPT], mask[:, :PROMPT], cache)
  got = [np.asarray(logits)]
  for i in range(PROMPT, LENGTH):
    logits, cache = fam.step(fam.params, tokens[:, i:i + 1], mask[:, i:i + 1], cache)
    got.append(np.asarray(logits))
  got = np.concatenate(got, axis=1)
  assert int(cache.index) == LENGTH
  np.testing.assert_array_equal(np.asarray(cache.mask), mask)
  real = mask > 0
  np.testing.assert_allclose(got[real], full[real], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_greedy_decoding_with_cache_matches_recomputation(name):
  """Greedy decoding with the KV cache equals recomputing the full sequence at each step."""
  fam = get_family(name)
  prompt = random_tokens(fam.cfg, (BATCH, PROMPT), seed=5)
  prompt_mask = np.ones_like(prompt)
  prompt_mask[1, :1] = 0

  # With the cache: prefill, then LENGTH - PROMPT (= 8) one-token steps.
  cache = KVCache.init(fam.cfg, batch=BATCH, length=LENGTH)
  logits, cache = fam.step(fam.params, prompt, prompt_mask, cache)
  cached = []
  for _ in range(PROMPT, LENGTH):
    tok = np.asarray(logits)[:, -1].argmax(-1).astype(np.int32)
    cached.append(tok)
    logits, cache = fam.step(fam.params, tok[:, None], np.ones((BATCH, 1), np.int32), cache)

  # Recomputing: a fixed-length buffer, not-yet-generated slots masked out (right padding).
  tokens = np.zeros((BATCH, LENGTH), np.int32)
  mask = np.zeros((BATCH, LENGTH), np.int32)
  tokens[:, :PROMPT], mask[:, :PROMPT] = prompt, prompt_mask
  recomputed = []
  for i in range(PROMPT, LENGTH):
    logits_full = np.asarray(fam.logits(fam.params, tokens, mask))
    tok = logits_full[:, i - 1].argmax(-1).astype(np.int32)
    recomputed.append(tok)
    tokens[:, i], mask[:, i] = tok, 1

  np.testing.assert_array_equal(np.stack(cached, 1), np.stack(recomputed, 1))
  assert len(np.unique(np.stack(cached, 1))) > 1  # Not a degenerate constant sequence.


# -------------------------------------------------------------------- scanned layers


@pytest.mark.parametrize("name", FAMILIES)
def test_scan_layers_with_stacked_params_matches_unscanned(name):
  """scan_layers=True with `stack_layers` parameters gives the unscanned logits."""
  fam = get_family(name)
  scan_cfg = make_cfg(name, scan_layers=True)
  scan_model = Transformer(scan_cfg)
  stacked = {"params": stack_layers(fam.params["params"], fam.cfg.num_layers)}
  # The stacked tree is exactly the tree the scanned model creates.
  scan_shapes = meta.unbox(abstract_variables(scan_model))
  assert (jax.tree.map(lambda x: x.shape, scan_shapes) == jax.tree.map(lambda x: x.shape, stacked))
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH), seed=6)
  mask = np.ones_like(tokens)
  mask[0, :3] = 0
  want = np.asarray(fam.logits(fam.params, tokens, mask))
  got = np.asarray(jit(lambda p: scan_model.apply(p, tokens, mask).logits)(stacked))
  real = mask > 0
  np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-4)


def test_scan_layers_kv_cache_matches_unscanned():
  """The scanned model's cache (stacked over layers) equals the unscanned model's."""
  fam = get_family("tiny_llama")
  scan_model = Transformer(make_cfg("tiny_llama", scan_layers=True))
  stacked = {"params": stack_layers(fam.params["params"], fam.cfg.num_layers)}
  tokens = random_tokens(fam.cfg, (BATCH, PROMPT), seed=7)
  mask = np.ones_like(tokens)
  mask[0, :2] = 0
  cache = KVCache.init(fam.cfg, batch=BATCH, length=LENGTH)
  want_logits, want = fam.step(fam.params, tokens, mask, cache)

  @jit
  def scan_step(params, cache):
    out = scan_model.apply(params, tokens, mask, cache=cache)
    return out.logits, out.cache

  got_logits, got = scan_step(stacked, cache)
  assert np.abs(np.asarray(want.k)[:, :, :PROMPT]).max() > 0
  np.testing.assert_allclose(np.asarray(got.k), np.asarray(want.k), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.v), np.asarray(want.v), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
  real = mask > 0
  np.testing.assert_allclose(
      np.asarray(got_logits)[real],
      np.asarray(want_logits)[real], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_unstack_of_stack_is_identity(name):
  """`unstack_layers(stack_layers(p))` returns the same tree and values."""
  fam = get_family(name)
  p = fam.params["params"]
  stacked = stack_layers(p, fam.cfg.num_layers)
  assert "layers" in stacked and not any(k.startswith("layers_") for k in stacked)
  np.testing.assert_array_equal(stacked["layers"]["attn"]["q_proj"]["kernel"][1],
                                p["layers_1"]["attn"]["q_proj"]["kernel"])
  back = unstack_layers(stacked, fam.cfg.num_layers)
  assert jax.tree.structure(back) == jax.tree.structure(p)
  jax.tree.map(np.testing.assert_array_equal, back, p)


# ---------------------------------------------------------------------------- remat


@pytest.mark.parametrize("name", FAMILIES)
def test_remat_policies_give_same_logits_and_gradients(name):
  """remat 'full' and 'dots' give the logits and parameter gradients of 'none'."""
  fam = get_family(name)
  tokens = random_tokens(fam.cfg, (2, 8), seed=8)
  mask = np.ones_like(tokens)
  mask[1, :2] = 0
  weights = np.random.default_rng(9).standard_normal((2, 8, fam.cfg.vocab_size))

  def run(remat):
    model = Transformer(make_cfg(name, remat=remat))

    def loss(p):
      logits = model.apply(p, tokens, mask).logits
      return jnp.mean(jnp.tanh(logits) * weights), logits

    (_, logits), grads = jit(jax.value_and_grad(loss, has_aux=True))(fam.params)
    return np.asarray(logits), grads

  ref_logits, ref_grads = run("none")
  assert min(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(ref_grads)) > 0
  for remat in ("full", "dots"):
    logits, grads = run(remat)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
                 ref_grads)


# -------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_deterministic_and_stochastic(name):
  """Dropout is off when deterministic (rng-independent, = rate 0) and rng-dependent when on."""
  fam = get_family(name)
  model = Transformer(make_cfg(name, dropout_rate=0.3))
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH), seed=10)

  def apply(p, key, deterministic):
    return model.apply(p, tokens, deterministic=deterministic, rngs={"dropout": key}).logits

  apply = jit(apply, static_argnums=2)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  no_dropout = np.asarray(fam.logits(fam.params, tokens, np.ones_like(tokens)))
  det1, det2 = np.asarray(apply(fam.params, k1, True)), np.asarray(apply(fam.params, k2, True))
  np.testing.assert_array_equal(det1, det2)
  np.testing.assert_allclose(det1, no_dropout, rtol=1e-6, atol=1e-6)
  sto1 = np.asarray(apply(fam.params, k1, False))
  sto1_again = np.asarray(apply(fam.params, k1, False))
  sto2 = np.asarray(apply(fam.params, k2, False))
  np.testing.assert_array_equal(sto1, sto1_again)
  assert np.abs(sto1 - sto2).max() > 1e-2
  assert np.abs(sto1 - det1).max() > 1e-2


# ------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_compute(name):
  """dtype bfloat16: parameters stay float32, logits are float32 and close to float32's."""
  fam = get_family(name)
  cfg = make_cfg(name, dtype="bfloat16")
  model = Transformer(cfg)
  for leaf in jax.tree.leaves(meta.unbox(abstract_variables(model))):
    assert leaf.dtype == jnp.float32
  tokens = random_tokens(cfg, (BATCH, LENGTH), seed=11)
  got = jit(lambda p: model.apply(p, tokens).logits)(fam.params)
  assert got.dtype == jnp.float32
  want = np.asarray(fam.logits(fam.params, tokens, np.ones_like(tokens)))
  got = np.asarray(got)
  scale = np.abs(want).mean()
  assert np.abs(got - want).mean() < 5e-2 * scale
  assert np.abs(got - want).max() > 0  # bf16 compute actually happened.


def bf16_representable(x) -> float:
  """The fraction of the float32 entries of x that bfloat16 represents exactly."""
  x = np.asarray(x, np.float32)
  return float(np.mean(x == x.astype(jnp.bfloat16).astype(np.float32)))


def bf16(x):
  """x rounded to bfloat16, as float64 (the exact value a bf16 matmul input holds)."""
  return np.asarray(np.asarray(x).astype(jnp.bfloat16), np.float64)


def bf16_forward(name: str, tokens, mask=None, **kwargs):
  """The bfloat16 model of FAMILIES `name` on the family's float32 parameters: its output and
  its intermediates (the final hidden states, each layer's q_proj / k_proj outputs and the
  sown attention scores), as numpy."""
  fam = get_family(name)
  model = Transformer(make_cfg(name, dtype="bfloat16"))
  keep = ("final_norm", "q_proj", "k_proj")

  @jit
  def apply(params):
    return model.apply(params, tokens, mask, capture_intermediates=lambda m, _: m.name in keep,
                       mutable=["intermediates"], **kwargs)

  out, state = apply(fam.params)
  return out, jax.tree.map(np.asarray, state["intermediates"])


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


# bf16 compute used to return the LM head's matmul in bf16 and only then cast it: every
# "float32" logit was bf16-representable. Mean |per-token log-prob, bf16 model - float32
# model| (same parameters, 8x64 random tokens, head scaled to logit std 3 / 6, tiny and
# tiny_llama): 0.020 / 0.053 and 0.019 / 0.046 nats before, 0.019 / 0.043 and 0.018 / 0.042
# after; the part the head's rounding caused (log-probs vs the exact head of the model's own
# bf16 hidden states) went from 0.007 / 0.028 and 0.007 / 0.021 nats to < 1e-6. The rest is
# the bf16 trunk (bf16 hidden states), which this does not change.
@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_logits_are_float32_sums_of_the_head(name):
  """dtype bfloat16: the logits are the float32-accumulated product of the model's own bf16
  final hidden states and the bf16 head (tied embedding or lm_head), not a bf16 rounding of
  it; the same through `logits_from` and the KV cache."""
  fam = get_family(name)
  tokens = random_tokens(fam.cfg, (BATCH, LENGTH), seed=12)
  out, inter = bf16_forward(name, tokens)
  got = np.asarray(out.logits)
  assert got.dtype == np.float32
  hidden = inter["final_norm"]["__call__"][0]  # [b, t, d], bf16 (the head's input).
  assert hidden.dtype == jnp.bfloat16
  p = fam.params["params"]
  kernel = p["embed"]["embedding"].T if fam.cfg.tie_embeddings else p["lm_head"]["kernel"]
  want = np.asarray(hidden, np.float64) @ bf16(kernel)
  scale = np.abs(want).max()
  assert scale > 1.0
  # Measured max error (float32 accumulation over d_model = 64): 7.6e-6 at max |logit| 53
  # (tiny), 4.7e-7 at 4.5 (tiny_llama); rounding these logits to bf16 errs by 9.4e-3 and
  # 1.2e-3 on average, which is what the old bf16 output did.
  rounding = np.abs(bf16(want) - want).mean()
  assert np.abs(got - want).max() < 1e-5 * scale < rounding / 10
  assert bf16_representable(got) < 0.01  # Was 1.0: each logit a bf16 value cast to float32.
  # In log-probabilities (what the KL penalty and the PPO ratio compare): measured 2e-6 and
  # 4e-8 nats mean.
  assert np.abs(np_log_softmax(got) - np_log_softmax(want)).mean() < 1e-5

  # logits_from and the cache path run the same head: float32 sums, close to the full pass.
  part = np.asarray(bf16_forward(name, tokens, logits_from=-1)[0].logits)
  np.testing.assert_allclose(part[:, 0], got[:, -1], rtol=0, atol=1e-5 * scale)
  cache = KVCache.init(make_cfg(name, dtype="bfloat16"), BATCH, LENGTH)
  cached = np.asarray(bf16_forward(name, tokens, cache=cache, logits_from=-1)[0].logits)
  assert bf16_representable(cached) < 0.01
  np.testing.assert_allclose(cached[:, 0], got[:, -1], rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("name", FAMILIES)
def test_bfloat16_attention_scores_are_float32_sums(name):
  """dtype bfloat16: each layer's attention scores (read from the sown 'scores') equal a
  float64 q.k / sqrt(head_dim) of the layer's own bf16 q and k, far below bf16 rounding."""
  fam = get_family(name)
  cfg = fam.cfg
  tokens = random_tokens(cfg, (BATCH, LENGTH), seed=13)
  _, inter = bf16_forward(name, tokens)
  positions = np.broadcast_to(np.arange(LENGTH), (BATCH, LENGTH))
  groups = cfg.num_heads // cfg.num_kv_heads
  for i in range(cfg.num_layers):
    attn = inter[f"layers_{i}"]["attn"]
    q, k = attn["q_proj"]["__call__"][0], attn["k_proj"]["__call__"][0]
    assert q.dtype == jnp.bfloat16
    if cfg.position == "rope":  # The model rotates in float32 and rounds back to bf16.
      q = apply_rope(jnp.asarray(q), positions, rope_frequencies(cfg))
      k = apply_rope(jnp.asarray(k), positions, rope_frequencies(cfg))
    q = np.asarray(q, np.float64).reshape(BATCH, LENGTH, cfg.num_kv_heads, groups, cfg.head_dim)
    want = np.einsum("btkgd,bskd->bkgts", q, np.asarray(k, np.float64)) / math.sqrt(cfg.head_dim)
    got = attn["scores"][0]
    assert got.dtype == np.float32 and got.shape == want.shape
    scale = np.abs(want).max()
    assert scale > 1.0
    # Measured: max error <= 2.1e-7 at max |score| 3.5-4.6; rounding these scores to bf16
    # (what the old bf16 einsum output did) errs by 1.2e-3 on average.
    rounding = np.abs(bf16(want) - want).mean()
    assert np.abs(got - want).max() < 1e-5 * scale < rounding / 10
    assert bf16_representable(got) < 0.01  # Was 1.0.


# ----------------------------------------------------------------------- scalar head


@pytest.mark.parametrize("name", FAMILIES)
def test_scalar_head_values_match_reference(name):
  """head='scalar' returns float32 values [batch, length] = final hidden @ w + b."""
  cfg = make_cfg(name)
  model = Transformer(cfg, head="scalar")
  params = random_params(cfg, head="scalar", seed=12)
  tokens = random_tokens(cfg, (3, 7), seed=13)
  mask = np.ones_like(tokens)
  mask[2, :3] = 0
  out = jit(lambda p: model.apply(p, tokens, mask))(params)
  assert out.logits is None
  assert out.values.shape == (3, 7) and out.values.dtype == jnp.float32
  h, p = np_backbone(params, cfg, tokens, mask)
  want = h @ p["scalar_head"]["kernel"][:, 0] + p["scalar_head"]["bias"][0]
  real = mask > 0
  np.testing.assert_allclose(np.asarray(out.values)[real], want[real], rtol=1e-4, atol=1e-4)


def test_scalar_head_init():
  """scalar_head kernel ~ N(0, 1/(d_model+1)), bias 0."""
  d = 256
  cfg = make_cfg("tiny", d_model=d, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8, d_ff=8,
                 vocab_size=8, max_length=8)
  model = Transformer(cfg, head="scalar")
  # Only the head leaves the jitted init, so XLA drops the other initialisers (fast compile).
  head = jit(lambda key: meta.unbox(model.init(key, jnp.zeros(
      (1, 2), jnp.int32)))["params"]["scalar_head"])(jax.random.key(0))
  kernel = np.asarray(head["kernel"])
  assert kernel.shape == (d, 1)
  np.testing.assert_array_equal(np.asarray(head["bias"]), np.zeros(1))
  std = kernel.std()
  assert abs(std / (1.0 / math.sqrt(d + 1)) - 1.0) < 0.15, std
  assert abs(kernel.mean()) < 3.0 * std / math.sqrt(d)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
def test_scalar_backbone_equals_lm_backbone(name, scan):
  """The scalar model's tree is the lm model's minus `lm_head` plus `scalar_head`."""
  cfg = make_cfg(name, scan_layers=scan)
  shapes = lambda head: jax.tree.map(  # noqa: E731
      lambda x: x.shape,
      meta.unbox(abstract_variables(Transformer(cfg, head)))["params"])
  lm, scalar = shapes("lm"), shapes("scalar")
  assert ("lm_head" in lm) == (not cfg.tie_embeddings)
  assert scalar.pop("scalar_head") == {"kernel": (cfg.d_model, 1), "bias": (1,)}
  lm.pop("lm_head", None)
  assert scalar == lm


def test_unknown_head_raises():
  """An unknown head name is an error."""
  with pytest.raises(ValueError, match="head"):
    abstract_variables(Transformer(make_cfg("tiny"), head="policy"))


# ------------------------------------------------------------------- logical names


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_every_parameter_has_logical_names(name, scan, head):
  """Each leaf is nn.Partitioned with one known logical name (or None) per array axis."""
  cfg = make_cfg(name, scan_layers=scan)
  boxed = abstract_variables(Transformer(cfg, head))["params"]
  leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=is_boxed)
  known = {logical for logical, _ in DEFAULT_RULES}
  assert len(leaves) == len(jax.tree.leaves(meta.unbox(boxed)))
  for path, leaf in leaves:
    where = jax.tree_util.keystr(path)
    assert is_boxed(leaf), where
    assert len(leaf.names) == leaf.value.ndim, where
    assert set(leaf.names) - {None} <= known, (where, leaf.names)
    if scan and "layers" in where:
      assert leaf.names[0] == "layers", where
  names = {jax.tree_util.keystr(p): leaf.names for p, leaf in leaves}
  prefix = "['layers']" if scan else "['layers_0']"
  q = names[prefix + "['attn']['q_proj']['kernel']"]
  assert q == (("layers",) if scan else ()) + ("embed", "heads", "kv")
  assert names["['embed']['embedding']"] == ("vocab", "embed")


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "overrides,key", [
        (dict(norm="batchnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(position="alibi"), "position"),
        (dict(remat="some"), "remat"),
        (dict(dtype="float16"), "dtype"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(rotary_fraction=0.0), "rotary_fraction"),
        (dict(rotary_fraction=1.5), "rotary_fraction"),
        (dict(head_dim=10, rotary_fraction=0.5), "rotary_fraction"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(dropout_rate=-0.1), "dropout_rate"),
    ], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_invalid_config_raises_naming_key(overrides, key):
  """Invalid field values raise ValueError naming config.model.<key>."""
  with pytest.raises(ValueError, match=rf"config\.model\.{key}\b"):
    ModelConfig(**preset("tiny", **overrides))


@pytest.mark.parametrize("key,value", [("num_kv_heads", 0), ("num_kv_heads", -2), ("d_model", 0),
                                       ("num_layers", -1)])
def test_non_positive_sizes_raise_naming_key(key, value):
  """Sizes must be positive integers; the error names config.model.<key>."""
  with pytest.raises(ValueError, match=rf"config\.model\.{key}"):
    ModelConfig(**preset("tiny", **{key: value}))


def test_zero_kv_heads_raises_naming_key():
  """num_kv_heads=0 raises ValueError naming config.model.num_kv_heads."""
  with pytest.raises(ValueError, match=r"config\.model\.num_kv_heads"):
    ModelConfig(**preset("tiny", num_kv_heads=0))


def test_valid_boundary_values_are_accepted():
  """Boundary values inside the allowed ranges are accepted."""
  ModelConfig(**preset("tiny", rotary_fraction=1.0, dropout_rate=0.0))
  ModelConfig(**preset("tiny_llama", num_heads=4, num_kv_heads=1))
  ModelConfig(**preset("tiny", position="rope", head_dim=16, rotary_fraction=0.25))


def test_from_dict():
  """from_dict accepts a ConfigDict of known keys and rejects (naming) unknown ones."""
  fields = preset("tiny_llama")
  assert ModelConfig.from_dict(ml_collections.ConfigDict(fields)) == ModelConfig(**fields)
  with pytest.raises(ValueError, match="d_modell"):
    ModelConfig.from_dict(dict(fields, d_modell=32))


def test_unknown_preset_lists_known_ones():
  """preset() of an unknown name raises listing the known names."""
  with pytest.raises(ValueError, match="tiny_llama"):
    preset("no_such_preset")


# ------------------------------------------------------------------ parameter counts


@pytest.mark.parametrize(
    "name,overrides", [
        ("tiny", {}),
        ("tiny_llama", {}),
        ("tiny", dict(tie_embeddings=False)),
        ("tiny_llama", dict(use_bias=True, tie_embeddings=True)),
        ("tiny", dict(position="rope", mlp="gelu", parallel_residual=True)),
        ("tiny", dict(position="rope", parallel_residual=True, attention_bias=False)),
        ("tiny_llama", dict(attention_bias=True)),
    ], ids=[
        "tiny", "tiny_llama", "tiny-untied", "tiny_llama-bias-tied", "tiny-rope-gelu-parallel",
        "tiny-no-attention-bias", "tiny_llama-attention-bias-only"
    ])
@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_count_params_matches_real_count(name, overrides, head):
  """count_params equals the number of parameters the model actually creates."""
  cfg = make_cfg(name, **overrides)
  real = count_leaves(meta.unbox(abstract_variables(Transformer(cfg, head))))
  assert count_params(cfg, head) == real


# ----------------------------------------------------------------------------- RoPE


@functools.partial(jit, static_argnums=(2, 3))
def rope(x, positions, rotary_dim, theta):
  """apply_rope with the unscaled frequencies of `rotary_dim` and `theta`."""
  cfg = make_cfg("tiny", position="rope", head_dim=rotary_dim, rope_theta=theta)
  return apply_rope(x, positions, rope_frequencies(cfg))


def test_apply_rope_matches_numpy():
  """apply_rope equals a complex-number numpy implementation of rotate-half RoPE."""
  rng = np.random.default_rng(14)
  x = rng.standard_normal((2, 9, 3, 16)).astype(np.float32)
  pos = rng.integers(0, 500, (2, 9)).astype(np.int32)
  got = np.asarray(rope(x, pos, 16, 10000.0))
  want = np_rope(x.astype(np.float64), pos, 16, 10000.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Position 0 is the identity; norms of each rotated pair are preserved.
  zero = np.asarray(rope(x, np.zeros((2, 9), np.int32), 16, 10000.0))
  np.testing.assert_allclose(zero, x, atol=1e-6)
  pair_norm = lambda y: y[..., :8] ** 2 + y[..., 8:] ** 2  # noqa: E731
  np.testing.assert_allclose(pair_norm(got), pair_norm(x), rtol=1e-4, atol=1e-5)


def test_apply_rope_partial_rotary():
  """With rotary_fraction 0.25 only the first quarter of each head is rotated."""
  cfg = make_cfg("tiny", position="rope", rotary_fraction=0.25, rope_theta=10000.0)
  rng = np.random.default_rng(15)
  x = rng.standard_normal((1, 6, 2, cfg.head_dim)).astype(np.float32)
  pos = np.arange(6, dtype=np.int32)[None] + 3
  got = np.asarray(rope(x, pos, cfg.rotary_dim, cfg.rope_theta))
  assert cfg.rotary_dim == 4
  np.testing.assert_array_equal(got[..., 4:], x[..., 4:])
  assert np.abs(got[..., :4] - x[..., :4]).max() > 1e-2
  np.testing.assert_allclose(got, np_rope(x.astype(np.float64), pos, 4, cfg.rope_theta), rtol=1e-4,
                             atol=1e-5)


def test_rope_frequency_scaling_by_hand():
  """'linear' divides every frequency by the factor; 'llama3' keeps wavelengths shorter than
  original / high_freq_factor, divides those longer than original / low_freq_factor, and in
  between interpolates by s = (original / wavelength - low) / (high - low)."""
  base = dict(position="rope", head_dim=16, rope_theta=10000.0)
  plain = rope_frequencies(make_cfg("tiny", **base)).astype(np.float64)
  np.testing.assert_allclose(plain, 10000.0 ** (-np.arange(8) / 8), rtol=1e-6)
  linear = rope_frequencies(make_cfg("tiny", **base, rope_scaling="linear", rope_factor=4.0))
  np.testing.assert_allclose(linear, plain / 4.0, rtol=1e-6)
  # Original context 64, factor 8: wavelengths 2 pi 10000^(i/8) = 6.3, 19.9, 62.8, 199, ...
  # so pair 0 is high-frequency (< 64 / 4 = 16), pairs 1 and 2 medium, pairs 3.. low (> 64).
  llama3 = rope_frequencies(
      make_cfg("tiny", **base, rope_scaling="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_length=64)).astype(np.float64)
  assert llama3[0] == pytest.approx(plain[0], rel=1e-6)
  np.testing.assert_allclose(llama3[3:], plain[3:] / 8.0, rtol=1e-6)
  for i in (1, 2):
    s = (64 / (2 * np.pi / plain[i]) - 1.0) / (4.0 - 1.0)
    assert 0 < s < 1
    assert llama3[i] == pytest.approx((1 - s) * plain[i] / 8.0 + s * plain[i], rel=1e-6)
    assert plain[i] / 8.0 < llama3[i] < plain[i]
  with pytest.raises(
      ValueError, match="rope_scaling='llama3' is invalid: expected 'none' with "
      "position='learned'"):
    make_cfg("tiny", rope_scaling="llama3")
  with pytest.raises(ValueError, match="rope_high_freq_factor=1.0 is invalid"):
    make_cfg("tiny", **base, rope_scaling="llama3", rope_high_freq_factor=1.0)
  with pytest.raises(ValueError, match="rope_scaling='yarn' is invalid"):
    make_cfg("tiny", **base, rope_scaling="yarn")


def test_apply_rope_relative_position():
  """<rope(q, m), rope(k, n)> depends only on m - n."""
  rng = np.random.default_rng(16)
  q = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)
  k = rng.standard_normal((1, 1, 1, 32)).astype(np.float32)

  def dot(m, n):
    rq = np.asarray(rope(q, np.array([[m]], np.int32), 32, 10000.0), np.float64)
    rk = np.asarray(rope(k, np.array([[n]], np.int32), 32, 10000.0), np.float64)
    return float(np.sum(rq * rk))

  for diff in (0, 3, -5, 17):
    base = dot(diff + 20, 20)
    for n in (0, 7, 101):
      assert abs(dot(n + diff, n) - base) < 1e-3 * (1 + abs(base)), (diff, n)
  assert abs(dot(3, 0) - dot(0, 0)) > 1e-3  # And it does depend on the offset.


def test_attention_bias_is_a_typed_config_field():
  """`config.model.attention_bias` defaults to None (as use_bias) but is a typed bool field,
  so --config.model.attention_bias=False can set it; the model then has no attention biases."""
  config = config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "sft.py"), "tiny")
  assert config.model.attention_bias is None
  assert ModelConfig.from_dict(config.model).attn_bias
  with pytest.raises(TypeError):
    config.model.attention_bias = "no"
  config.model.attention_bias = False
  cfg = ModelConfig.from_dict(config.model)
  params = meta.unbox(abstract_variables(Transformer(cfg)))["params"]
  assert "bias" not in params["layers_0"]["attn"]["q_proj"]
  assert "bias" in params["layers_0"]["mlp"]["down_proj"]
  with pytest.raises(ValueError, match="attention_bias='no' is invalid"):
    ModelConfig(attention_bias="no")
