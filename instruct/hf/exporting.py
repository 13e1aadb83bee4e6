"""Export: a run's model as a Hugging Face checkpoint directory (`export`).

A policy run (pretrain, sft, rl) is written as a `...ForCausalLM` directory and an `rm` run
as a `...ForSequenceClassification` with `num_labels=1`, with config.json, model.safetensors
and the run's tokenizer. HF's `score` layer has no bias while our scalar head has one; the bias
is a constant shift of every reward (the ranking loss is blind to it), so the exported
`score.weight` is our kernel and the bias is recorded in config.json as `instruct_score_bias`
(with the run's reward normalisation as `instruct_reward_normalization`), and README.md gives
the formula: reward = gain * (logits + instruct_score_bias) + bias. Importing the directory
back restores the bias from config.json, so export -> import is the identity on parameters.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator, Optional, Sequence

import jax
import ml_collections
import ml_dtypes
import numpy as np
import safetensors.numpy
import transformers
from absl import logging
from jax.experimental import multihost_utils

from instruct import paths
from instruct import run as run_lib
from instruct import sharding as shd
from instruct.data import load_tokenizer
from instruct.hf.configs import (NORMALIZATION_KEY, SCORE_BIAS_KEY, hf_config_from_model_config,
                                 infer_family)
from instruct.hf.files import SAFE_INDEX, SAFE_WEIGHTS
from instruct.hf.mapping import _flatten, param_sources
from instruct.model.config import ModelConfig
from instruct.stages import table


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
  if isinstance(node, jax.Array) and not node.is_fully_addressable:
    # Several processes: every process takes part in the gather (a collective).
    return np.asarray(multihost_utils.process_allgather(node, tiled=True), np.float32)
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
_SIZE_UNITS = {
    "": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "KIB": 2 ** 10, "MIB": 2 ** 20,
    "GIB": 2 ** 30
}


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
    index = {
        "metadata": {"total_size": total},
        "weight_map": {t: names[i] for i, shard in enumerate(shards) for t in shard}
    }
    with open(os.path.join(out_dir, SAFE_INDEX), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
    names.append(SAFE_INDEX)
  return names


def _check_out_dir(out_dir: str, overwrite: bool) -> None:
  """Refuses, before any work, an `out_dir` that is a file, lies under a file, or is a
  non-empty directory without `overwrite` (on a bucket, where directories are name prefixes,
  only the last two)."""
  if paths.is_url(out_dir):
    if paths.isfile(out_dir):
      raise FileExistsError(f"out_dir={out_dir!r} (--out) is an object; expected a directory "
                            "(new or empty, or existing with overwrite=True).")
    if paths.isdir(out_dir) and paths.listdir(out_dir) and not overwrite:
      raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True "
                            "(--overwrite) to replace its files.")
    return
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"out_dir={out_dir!r} (--out) is a file; expected a directory (new or "
                          "empty, or existing with overwrite=True).")
  if os.path.isdir(out_dir):
    if os.listdir(out_dir) and not overwrite:
      raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True "
                            "(--overwrite) to replace its files.")
    return
  ancestor = os.path.dirname(os.path.abspath(out_dir))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    raise FileExistsError(f"out_dir={out_dir!r} (--out) cannot be created: {ancestor} is a "
                          "file, not a directory.")


def _load_run(workdir: str, step: Optional[int],
              mesh_shape: Optional[Sequence[int]] = None) -> run_lib.Run:
  """The run with its model's parameters restored sharded over the run's mesh
  (`config.mesh`, its -1 entry taking the devices present; `mesh_shape` overrides the shape),
  so no device or host holds a full copy."""
  info = run_lib.describe(workdir, "workdir")
  mesh_config = ml_collections.ConfigDict(info.config.mesh.to_dict())
  if mesh_shape is not None:
    mesh_config.shape = tuple(mesh_shape)
  try:
    mesh = shd.make_mesh(mesh_config)
  except ValueError as e:
    source = "mesh_shape (--mesh_shape)" if mesh_shape is not None else (
        f"the run's config.mesh ({workdir}/config.json; pass mesh_shape to override it)")
    raise ValueError(f"Cannot restore {workdir} over {source}: {e}") from e
  return run_lib.load_run(workdir, step, mesh=mesh, rules=shd.rules_from_config(mesh_config),
                          what="workdir")


def export(workdir: str, out_dir: str, step: Optional[int] = None, *, family: Optional[str] = None,
           overwrite: bool = False, dtype: str = "float32", max_shard_size: "int | str" = "5GB",
           mesh_shape: Optional[Sequence[int]] = None) -> str:
  """Writes a run's model as a Hugging Face directory; returns `out_dir`.

  pretrain / sft / ppo runs give the policy as `...ForCausalLM`; an rm run gives
  `...ForSequenceClassification` (num_labels=1; see the module docstring for the bias).
  The family (gpt2, gpt_neox, llama) is inferred from the model config unless given.
  Weights are `dtype` ('float32' or 'bfloat16'), in safetensors files of at most
  `max_shard_size` with an index when there is more than one. The parameters stay sharded on
  the devices and are gathered one tensor at a time. Everything is written to a temporary
  directory beside `out_dir` and moved in at the end, so a failed export leaves `out_dir` as
  it was. `out_dir` may be a bucket URL (`gs://...`): the files are then written to a local
  temporary directory and copied to it at the end (object by object: an export that fails
  while copying leaves some of the new files there). Run by several processes (a model
  sharded over hosts), every process takes part in each tensor's gather and process 0 writes.
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"dtype={dtype!r}; expected one of {sorted(EXPORT_DTYPES)}.")
  parse_size(max_shard_size)
  _check_out_dir(out_dir, overwrite)
  run = _load_run(workdir, step, mesh_shape)
  config, cfg, params, step = run.config, run.model_config, run.params, run.step
  head, norm = run.stage.head, run.reward_normalization
  family = family or infer_family(cfg)
  tokenizer = load_tokenizer(config["data"]["tokenizer"],
                             pad_token=config["data"].get("pad_token", ""))
  hf_config = hf_config_from_model_config(cfg, family, head=head,
                                          bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id)
  hf_config.dtype = dtype
  if head == "scalar":
    bias = float(np.asarray(jax.device_get(params["scalar_head"]["bias"])).reshape(-1)[0])
    setattr(hf_config, SCORE_BIAS_KEY, bias)
    if norm is not None:
      setattr(hf_config, NORMALIZATION_KEY, dict(norm))
  cast = EXPORT_DTYPES[dtype]
  tensors = ((n, a.astype(cast)) for n, a in iter_hf_tensors(params, cfg, family, head))
  if jax.process_index() != 0:
    # Several processes: each takes part in every tensor's gather; process 0 writes.
    for _ in tensors:
      pass
    multihost_utils.sync_global_devices(f"exported {out_dir}")
    return out_dir
  if paths.is_url(out_dir):
    staging = tempfile.mkdtemp(prefix=f".{paths.basename(out_dir)}-")
  else:
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}-", dir=parent)
  try:
    write_safetensors(tensors, staging, max_shard_size)
    hf_config.save_pretrained(staging)
    if head == "lm":
      transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with open(os.path.join(staging, "README.md"), "w") as f:
      f.write(_readme(workdir, run.stage, step, family, hf_config, norm))
    _move_into(staging, out_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  logging.info("Exported %s (step %d) as %s to %s.", workdir, step, hf_config.architectures[0],
               out_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"exported {out_dir}")
  return out_dir


def _move_into(staging: str, out_dir: str) -> None:
  """Replaces `out_dir`'s weights with the files of the local directory `staging` (moved in
  locally; copied, object by object, to a bucket)."""
  paths.makedirs(out_dir)
  for stale in fnmatch.filter(paths.listdir(out_dir), "model*.safetensors*"):
    paths.remove(paths.join(out_dir, stale))
  for name in sorted(os.listdir(staging)):
    paths.move(os.path.join(staging, name), paths.join(out_dir, name))


def _readme(workdir, stage: table.Stage, step, family, hf_config, norm) -> str:
  lines = [
      f"# {hf_config.architectures[0]} exported by instruct", "",
      f"- source run: `{paths.absolute(workdir)}` (stage `{stage.name}`, step {step})",
      f"- family: `{family}`; {hf_config.dtype} safetensors weights; the run's tokenizer.", ""
  ]
  if stage.head == "scalar":
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
        f"{'absent: the run did not reach its final step' if norm is None else 'from the run'})."
    ]
  return "\n".join(lines) + "\n"
