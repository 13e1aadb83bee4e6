"""The name mapping between HF checkpoints and our parameters, and `load_hf_params`.

The mapping is a table per family: each of our parameters is a view of one source tensor
(axes split, e.g. [heads * head_dim, d] -> [heads, head_dim, d]), possibly one slice of a
fused tensor (GPT-2's Conv1D `c_attn` is [d, (q|k|v) x heads x head_dim]; GPT-NeoX's
`query_key_value` is per-head interleaved, [heads x (q|k|v) x head_dim, d]), transposed into
our layout (kernels are [in..., out...]). Rotary embeddings need no permutation: ours use the
'rotate half' layout of HF Llama and GPT-NeoX (`instruct.model.layers.apply_rope`).

`load_hf_params` builds every parameter by `jax.make_array_from_callback` with its target
sharding; the callback reads only the rows/columns of the source tensor that the shard needs,
so no full host copy of a sharded parameter is made.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from instruct.hf.configs import NUMERICS_KEYS, SCORE_BIAS_KEY, model_config_from_checkpoint
from instruct.hf.files import _Tensors, _weight_files, read_hf_config, resolve_checkpoint
from instruct.model.config import ModelConfig
from instruct.model.transformer import Transformer

# Prefix of the backbone's tensors in the checkpoints of the task models (base-model
# checkpoints, e.g. the original `gpt2`, have none).
PREFIX = {"gpt2": "transformer.", "gpt_neox": "gpt_neox.", "llama": "model."}


# yapf: disable
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
# yapf: enable


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
      out[("attn", p, "bias")] = ("attn.c_attn.bias", _src((3 * d,), (3, h, hd), (1, 2), ((0, j),)))
    out[("attn", "o_proj", "kernel")] = ("attn.c_proj.weight", _src((d, d), (h, hd, d), (0, 1, 2)))
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
    out[("mlp", "up_proj", "kernel")] = ("mlp.dense_h_to_4h.weight", _src((f, d), (f, d), (1, 0)))
    out[("mlp", "up_proj", "bias")] = ("mlp.dense_h_to_4h.bias", vec(f))
    out[("mlp", "down_proj", "kernel")] = ("mlp.dense_4h_to_h.weight", _src((d, f), (d, f), (1, 0)))
    out[("mlp", "down_proj", "bias")] = ("mlp.dense_4h_to_h.bias", vec(d))
  else:  # llama: Linear weights [out, in], heads-major outputs.
    norm("attn_norm", "input_layernorm")
    norm("mlp_norm", "post_attention_layernorm")
    for p, heads in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
      out[("attn", p, "kernel")] = (f"self_attn.{p}.weight",
                                    _src((heads * hd, d), (heads, hd, d), (2, 0, 1)))
      out[("attn", p, "bias")] = (f"self_attn.{p}.bias", _src((heads * hd,), (heads, hd), (0, 1)))
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
      "llama": ("embed_tokens", None, "norm", "layers")
  }[family]
  named = lambda name, src: dataclasses.replace(src, names=(name,))
  sources = {("embed", "embedding"): named(f"{p}{embed}.weight", _src((v, d), (v, d), (0, 1)))}
  if cfg.position == "learned":
    sources[("pos_embed",
             "embedding")] = named(f"{p}{pos}.weight",
                                   _src((cfg.max_length, d), (cfg.max_length, d), (0, 1)))
  sources[("final_norm", "scale")] = named(f"{p}{final}.weight", _src((d,), (d,), (0,)))
  if cfg.norm == "layernorm":
    sources[("final_norm", "bias")] = named(f"{p}{final}.bias", _src((d,), (d,), (0,)))
  per_layer = _layer_sources(cfg, family)
  for i in range(cfg.num_layers):
    for path, (local, src) in per_layer.items():
      sources[(f"layers_{i}",) + path] = named(f"{p}{layers}.{i}.{local}", src)
  if head == "lm" and not cfg.tie_embeddings:
    # GPT-NeoX checkpoints name the LM head `embed_out` (transformers 5 renames it lm_head).
    names = ("embed_out.weight", "lm_head.weight") if family == "gpt_neox" else ("lm_head.weight",)
    sources[("lm_head", "kernel")] = dataclasses.replace(_src((v, d), (v, d), (1, 0)), names=names)
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
    model_config: the ModelConfig (default: `model_config_from_checkpoint`); its
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
  expected = model_config_from_checkpoint(
      path, hf_config,
      **({} if model_config is None else {k: getattr(model_config, k) for k in NUMERICS_KEYS}))
  family = hf_config["model_type"]
  if model_config is not None and model_config != expected:
    diff = [
        f"{f.name}={getattr(model_config, f.name)!r} (checkpoint: "
        f"{getattr(expected, f.name)!r})" for f in dataclasses.fields(ModelConfig)
        if getattr(model_config, f.name) != getattr(expected, f.name)
    ]
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
    abstract.update({("layers",) + k[1:]: jax.ShapeDtypeStruct((cfg.num_layers,) + v.shape, v.dtype)
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
        blocks[ranges] = np.stack([src.read(tensors, name, inner) for src, name in plan[l0:l1]])
      else:
        src, name = plan[0]
        blocks[ranges] = src.read(tensors, name, ranges)
    return blocks[ranges]

  return callback
