"""Weighted mixtures of record files (instruction-tuning mixtures, FLAN-style).

`config.data.mixture` names the components, each a pair of record files of the stage's kind
and a weight:

  config.data.mixture = {
      "qa_zero_shot": {"train_file": "qa_zero.jsonl", "validation_file": "qa_zero_val.jsonl",
                       "weight": 2.0},
      "qa_few_shot": {"train_file": "qa_few.jsonl", "validation_file": "qa_few_val.jsonl",
                      "weight": 1.0},
  }

and replaces `data.train_file` / `data.validation_file`. Each component is prepared by its
own TFDS builder (as a single file would be). An epoch of the training mixture has as many
rows as the components together (or `data.mixture_size`), component k's share being
weight_k / sum of weights (largest remainders, so the counts add up exactly): a component
with fewer rows than its share repeats them (each pass in a fresh order), one with more
contributes a fixed random subset. Which rows make up the epoch is fixed by `seed`; the data
pipeline then shuffles the epoch as usual, so resume and multi-host slicing are unchanged.
The validation split is every component's validation rows, once each, whatever the weights,
so that validation losses compare across mixtures.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from instruct import paths
from instruct.data import builders
from instruct.data import pipeline
from instruct.data import tokenization


@dataclasses.dataclass(frozen=True)
class Component:
  name: str
  train_file: str
  validation_file: str
  weight: float


def components(mixture: Mapping[str, Any]) -> list[Component]:
  """The components of `config.data.mixture`, in name order; ValueError naming a bad key."""
  out = []
  for name in sorted(mixture):
    section = dict(mixture[name])
    key = f"config.data.mixture.{name}"
    unknown = sorted(set(section) - {"train_file", "validation_file", "weight"})
    if unknown:
      raise ValueError(f"{key}.{unknown[0]}: unknown key; expected train_file, "
                       "validation_file and weight.")
    weight = section.get("weight", 1.0)
    if (not isinstance(weight, (int, float)) or isinstance(weight, bool)
        or not math.isfinite(weight) or weight < 0):
      raise ValueError(f"{key}.weight={weight!r}: must be a finite number >= 0.")
    for field in ("train_file", "validation_file"):
      if not section.get(field):
        raise ValueError(f"{key}.{field} is empty: every component needs both files.")
    out.append(Component(name, section["train_file"], section["validation_file"], float(weight)))
  if not out:
    raise ValueError("config.data.mixture is empty.")
  if sum(c.weight for c in out) <= 0:
    raise ValueError("config.data.mixture: every weight is 0; at least one must be positive.")
  return out


def directory_mixture(directory: str, weight: float = 1.0) -> dict[str, dict[str, Any]]:
  """A mixture of every `NAME_train.jsonl` in `directory` with its `NAME_validation.jsonl`,
  named NAME, equal weights (`config.data.mixture`'s form); ValueError naming what is
  missing."""
  if not paths.isdir(directory):
    raise ValueError(f"mixture directory {directory} does not exist.")
  names = sorted(
      f[:-len("_train.jsonl")] for f in paths.listdir(directory) if f.endswith("_train.jsonl"))
  if not names:
    raise ValueError(f"mixture directory {directory} holds no NAME_train.jsonl files.")
  out = {}
  for name in names:
    validation = paths.join(directory, f"{name}_validation.jsonl")
    if not paths.exists(validation):
      raise ValueError(f"{paths.join(directory, name + '_train.jsonl')} has no "
                       f"{name}_validation.jsonl beside it.")
    out[name] = {
        "train_file": paths.join(directory, f"{name}_train.jsonl"), "validation_file": validation,
        "weight": weight
    }
  return out


def shares(sizes: Sequence[int], weights: Sequence[float], total: int) -> list[int]:
  """Rows of each component in an epoch of `total`: proportional to the weights, rounded by
  largest remainders (ties to the earlier component) so that they sum to `total`."""
  w = np.asarray(weights, np.float64)
  exact = total * w / w.sum()
  counts = np.floor(exact).astype(int)
  order = sorted(range(len(w)), key=lambda k: (-(exact[k] - counts[k]), k))
  for k in order[:total - int(counts.sum())]:
    counts[k] += 1
  return [int(c) for c in counts]


class MixtureSource:
  """A random-access source over component sources (`len()`, `[i]`, `num_skipped`).

  Row i of the mixture is row `rows[i]` of component `parts[i]`; `describe(i)` names the
  component, for messages.
  """

  def __init__(self, sources: Sequence[Any], names: Sequence[str], counts: Sequence[int],
               seed: int) -> None:
    parts, rows = [], []
    for k, (source, count) in enumerate(zip(sources, counts)):
      n = len(source)
      if count and not n:
        raise ValueError(f"config.data.mixture.{names[k]} has no rows but weight > 0.")
      rng = np.random.default_rng([seed, k])
      picked = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))]) if count else []
      parts.append(np.full(count, k, np.int64))
      rows.append(np.asarray(picked[:count], np.int64))
    self._sources, self._names = list(sources), list(names)
    self._parts = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    self._rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    self.num_skipped = sum(int(getattr(s, "num_skipped", 0)) for s in sources)
    self.counts = dict(zip(names, (int(c) for c in counts)))

  def __len__(self) -> int:
    return len(self._parts)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._sources[self._parts[index]][int(self._rows[index])]

  def describe(self, index: int) -> str:
    return f"row {int(self._rows[index])} of component {self._names[self._parts[index]]!r}"


def mixture_source(parts: Sequence[Component], sources: Sequence[Any], split: str, seed: int,
                   size: int = 0) -> MixtureSource:
  """The training mixture (`split == 'train'`: weighted, `size` rows or all components'
  together) or the validation one (every row of every component once)."""
  names = [c.name for c in parts]
  sizes = [len(s) for s in sources]
  if split != "train":
    return MixtureSource(sources, names, sizes, seed)
  if size < 0:
    raise ValueError(f"config.data.mixture_size={size}: must be >= 0 (0: the components' rows "
                     "together).")
  return MixtureSource(sources, names, shares(sizes, [c.weight for c in parts], size or sum(sizes)),
                       seed)


def make_mixture_batches(kind: str, parts: Sequence[Component], split: str, tokenizer: Any, *,
                         global_batch_size: int, buckets: Sequence[int], seed: int, shuffle: bool,
                         repeat: bool, data_dir: str, process_index: int = 0,
                         process_count: int = 1, data_format: str = builders.RECORDS_FORMAT,
                         skip_invalid: bool = False, allow_truncation: bool = True,
                         batch_size_name: str = 'global_batch_size', mixture_size: int = 0,
                         encoder: Callable | None = None) -> pipeline.Batches:
  """`pipeline.make_batches` over a mixture of `kind` record files (see the module docstring)
  instead of one file per split; the same arguments, checks and messages."""
  if encoder is None and kind not in pipeline.ENCODERS:
    raise ValueError(f'Unknown data kind {kind!r} for a mixture; allowed kinds: '
                     f'{sorted(pipeline.ENCODERS)}.')
  tokenization.check_special_tokens(tokenizer)
  max_length = pipeline.check_buckets(buckets, process_count)[-1]
  sources = [
      builders.load_split(kind, {split: c.train_file if split == 'train' else c.validation_file},
                          split, data_dir, skip_invalid=skip_invalid, data_format=data_format)
      for c in parts
  ]
  source = mixture_source(parts, sources, split, seed, mixture_size)
  encode = functools.partial(encoder or pipeline.ENCODERS[kind], tokenizer, max_length)
  batches = pipeline.Batches(
      source, encode, name=f'{split} split of config.data.mixture '
      f'({len(parts)} components)', global_batch_size=global_batch_size, buckets=buckets,
      pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle, repeat=repeat,
      process_index=process_index, process_count=process_count, batch_size_name=batch_size_name)
  pipeline.check_loaded(batches, noun='examples', limit=f'{max_length} tokens',
                        allow_truncation=allow_truncation, locate=source.describe)
  return batches
