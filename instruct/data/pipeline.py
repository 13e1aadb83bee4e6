"""Deterministic, resumable, host-sharded batching of encoded examples.

`Batches` turns a random-access source of examples into padded numpy batches.
The order depends only on the seed and the epoch; each host reads only its
slice of every global batch, so the hosts' batches concatenated in process
order are the global batch whatever the number of hosts. The position
(`get_state`/`set_state`) is two integers, so resuming is exact and cheap.
How rows become a batch is pluggable (`collate`): padded sequences by
default, K-wise comparisons with `make_comparison_batches`, left-padded
prompts of one fixed length for RL rollouts with
`prompts.make_prompt_batches`.

The `make_*` functions (through `load_batches`) check a split when they load it: every example is
encoded once, and those longer than the length limit (truncated by the
encoders) are counted and reported in one warning line naming the split and
its file, or refused with `allow_truncation=False`. `Batches.data_metrics`
gives the counts for a run's metrics.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np

from instruct.data import builders
from instruct.data import comparisons
from instruct.data import tokenization

Example = Mapping[str, Any]
# Maps an example to a row: a tuple whose third item says if it was truncated.
Encode = Callable[[Example], tuple[Any, ...]]
# Maps up to `local_batch_size` rows to a batch of `local_batch_size` rows.
Collate = Callable[[Sequence[Any], int], dict[str, np.ndarray]]
_STATE_KEYS = frozenset({'epoch', 'batch'})


class Batches:
  """An iterator of padded batches, with a resumable position.

  Order: epoch `e` visits the source in the order
  `np.random.default_rng([seed, e]).permutation(len(source))` (or in file
  order if not `shuffle`). Global batch `g` of an epoch is permutation rows
  `[g * B, (g + 1) * B)`; the host with `process_index` p reads its
  contiguous slice of `B // process_count` of them.

  With `repeat`, batches never end and an incomplete last batch of an epoch
  is dropped. Without `repeat` (evaluation) there is one pass and the last
  batch is filled with dummy rows (pad tokens, all masks zero) so every batch
  has the same number of rows; then `StopIteration`. For another pass, call
  `set_state({'epoch': 0, 'batch': 0})`.

  By default each batch is a dict of int32 arrays of shape
  `[B // process_count, L]`: `tokens` (right-padded with `pad_id`),
  `loss_mask` and `attention_mask` (1 on real tokens). `L` is the smallest
  bucket that fits the longest of the host's rows; with `process_count > 1`
  and several buckets, of the whole global batch's rows, so that every host
  builds the same shape (a custom `collate` needs a single bucket then). A custom `collate` builds
  the batch instead (see `make_comparison_batches` and
  `prompts.make_prompt_batches`); ordering, host slicing, caching, eval padding,
  state and `num_truncated` work the same.

  Examples are encoded lazily, only for the host's rows, and by default kept
  in memory keyed by source index so later epochs do not re-tokenize (meant
  for small datasets; pass `cache_encoded=False` otherwise).
  `count_truncated` (which the `make_*` functions call when loading) encodes
  every example of the source once, filling the cache.

  Attributes:
    num_truncated: How many truncated examples this iterator has put in its
      batches (counted per occurrence; not part of the saved state).
    num_skipped: How many invalid records the source skipped when prepared
      (its `num_skipped`, else 0).
    num_truncated_examples: How many distinct examples of the source are
      truncated, once `count_truncated` has run (the `make_*` functions run
      it when loading); else None.
    name: How messages name the data, e.g. 'train split (/data/x.jsonl)'.
  """

  def __init__(self, source: Any, encode: Encode, *, global_batch_size: int, buckets: Sequence[int],
               pad_id: int, seed: int, shuffle: bool, repeat: bool, process_index: int = 0,
               process_count: int = 1, cache_encoded: bool = True, collate: Collate | None = None,
               name: str = 'The dataset', batch_size_name: str = 'global_batch_size') -> None:
    """Initializes the iterator at epoch 0, batch 0.

    Args:
      source: Examples, supporting `len()` and integer `[i]`.
      encode: Maps an example to a row. For the default collation a row is
        `(tokens, loss_mask, truncated)` with at most `max(buckets)` tokens;
        for a custom `collate`, any tuple whose third item is `truncated`.
      global_batch_size: Rows per global batch, summed over hosts.
      buckets: Allowed sequence lengths, e.g. `(32, 64, 128)`.
      pad_id: The token id used for padding (by the default collation).
      seed: Seed of the per-epoch shuffle.
      shuffle: Whether to shuffle each epoch.
      repeat: Whether to loop over epochs forever (training) or make one
        padded pass (evaluation).
      process_index: This host's index.
      process_count: The number of hosts.
      cache_encoded: Whether to keep encoded examples in memory.
      collate: Maps `(rows, local_batch_size)` to a batch, adding dummy rows
        when given fewer rows (the last evaluation batch). Default: the
        sequence padding described above, with its length checks.
      name: How messages name the data (see `describe_split`).
      batch_size_name: How messages name the global batch size, e.g. the
        config key that sets it.

    Raises:
      ValueError: On inconsistent sizes or buckets (see the messages).
    """
    self.name = name
    self.num_skipped = int(getattr(source, 'num_skipped', 0))
    self.num_truncated_examples: int | None = None
    _check_sizes(len(source), global_batch_size, process_index, process_count, repeat, name=name,
                 batch_size_name=batch_size_name, num_skipped=self.num_skipped)
    self._buckets = check_buckets(buckets, process_count, custom_collate=collate is not None)
    self._global_lengths = process_count > 1 and len(self._buckets) > 1
    self._longest = 0  # With several hosts and buckets: the global batch's longest row.
    self._source = source
    self._encode = encode
    self._global_batch_size = global_batch_size
    self._local_batch_size = global_batch_size // process_count
    self._pad_id = pad_id
    self._seed = seed
    self._shuffle = shuffle
    self._repeat = repeat
    self._process_index = process_index
    self._collate = collate or self._pad_sequences
    self._check_sequences = collate is None
    self._cache: dict[int, tuple[Any, ...]] | None = {} if cache_encoded else None
    self._order: tuple[int, np.ndarray] | None = None
    self._epoch = 0
    self._batch = 0
    self.num_truncated = 0

  @property
  def num_examples(self) -> int:
    """Examples in the source."""
    return len(self._source)

  @property
  def batches_per_epoch(self) -> int:
    """Global batches per epoch (the last one padded when not repeating)."""
    n, b = len(self._source), self._global_batch_size
    return n // b if self._repeat else math.ceil(n / b)

  @property
  def local_batch_size(self) -> int:
    """Rows per batch on this host."""
    return self._local_batch_size

  def count_truncated(self) -> tuple[int, int | None]:
    """Encodes every example of the source once and counts the truncated ones.

    The encoded examples are kept in the cache (when caching), so batching
    does not encode them again; `num_truncated` (which counts batched rows)
    is not changed. Sets `num_truncated_examples`.

    Returns:
      `(count, first)`: how many examples are truncated, and the source index
      of the first of them (None when there is none).

    Raises:
      ValueError: An example cannot be encoded; the message starts with
        `name`.
    """
    count, first = 0, None
    for index in range(len(self._source)):
      if self._encoded(index, count=False)[2]:
        count += 1
        first = index if first is None else first
    self.num_truncated_examples = count
    return count, first

  def data_metrics(self, prefix: str) -> dict[str, int]:
    """`{prefix}_skipped` and (once counted) `{prefix}_truncated` example counts."""
    metrics = {f'{prefix}_skipped': self.num_skipped}
    if self.num_truncated_examples is not None:
      metrics[f'{prefix}_truncated'] = self.num_truncated_examples
    return metrics

  def get_state(self) -> dict[str, int]:
    """Returns the position of the next global batch (JSON-serialisable)."""
    return {'epoch': self._epoch, 'batch': self._batch}

  def set_state(self, state: Mapping[str, int]) -> None:
    """Moves to a position returned by `get_state`.

    Raises:
      ValueError: `state` does not have exactly the keys 'epoch' and 'batch'
        with non-negative integer values, or the batch is out of range.
    """
    if not isinstance(state, Mapping) or set(state) != _STATE_KEYS:
      got = sorted(state) if isinstance(state, Mapping) else type(state)
      raise ValueError("Batches state must have exactly the keys 'batch' "
                       f"and 'epoch', got {got}.")
    for key in sorted(_STATE_KEYS):
      value = state[key]
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ValueError(f'Batches state {key!r} must be a non-negative '
                         f'integer, got {value!r}.')
    if state['batch'] >= max(self.batches_per_epoch, 1):
      raise ValueError(f"Batches state 'batch'={state['batch']} is out of "
                       f'range: an epoch has {self.batches_per_epoch} '
                       'batches.')
    self._epoch, self._batch = int(state['epoch']), int(state['batch'])

  def __iter__(self) -> Batches:
    """Returns self: the iterator continues from its current position."""
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """Returns this host's part of the next global batch."""
    if not self._repeat and self._epoch > 0:
      raise StopIteration
    if self.batches_per_epoch == 0:  # Only possible for an empty eval source.
      self._epoch = 1
      raise StopIteration
    start = (self._batch * self._global_batch_size + self._process_index * self._local_batch_size)
    order = self._permutation(self._epoch)
    rows = [int(i) for i in order[start:start + self._local_batch_size]]
    if self._global_lengths:
      # Every host pads to the bucket of the whole global batch's longest row, so all hosts
      # agree on the shape (the other hosts' rows are encoded, not batched, here).
      first = self._batch * self._global_batch_size
      self._longest = max(
          len(self._encoded(int(i), count=False)[0])
          for i in order[first:first + self._global_batch_size])
    batch = self._collate([self._encoded(i) for i in rows], self._local_batch_size)
    self._batch += 1
    if self._batch == self.batches_per_epoch:
      self._epoch, self._batch = self._epoch + 1, 0
    return batch

  def _permutation(self, epoch: int) -> np.ndarray:
    """Returns the order of source indices in `epoch` (memoized)."""
    if self._order is None or self._order[0] != epoch:
      n = len(self._source)
      if self._shuffle:
        order = np.random.default_rng([self._seed, epoch]).permutation(n)
      else:
        order = np.arange(n)
      self._order = (epoch, order)
    return self._order[1]

  def _encoded(self, index: int, count: bool = True) -> tuple[Any, ...]:
    """Returns the encoded example `index`, from the cache if possible.

    `count`: whether to add it to `num_truncated` (a row put in a batch).
    """
    if self._cache is not None and index in self._cache:
      encoded = self._cache[index]
    else:
      try:
        encoded = self._encode(self._source[index])
        if self._check_sequences:
          _check_encoded(encoded, index, self._buckets[-1])
      except ValueError as e:
        raise ValueError(f'{self.name}: {e}') from e
      if self._cache is not None:
        self._cache[index] = encoded
    if count:
      self.num_truncated += int(encoded[2])
    return encoded

  def _pad_sequences(self, rows: Sequence[tokenization.Encoded],
                     local_batch_size: int) -> dict[str, np.ndarray]:
    """Right-pads `rows` (plus dummy rows) into a `[local_batch, L]` batch."""
    longest = max([len(tokens) for tokens, _, _ in rows] + [self._longest])
    length = next(b for b in self._buckets if b >= longest)
    shape = (local_batch_size, length)
    tokens = np.full(shape, self._pad_id, np.int32)
    # 0/1 masks, or float target weights (scored text): example 0's, the same on every host.
    loss_mask = np.zeros(shape, self._encoded(0, count=False)[1].dtype)
    attention_mask = np.zeros(shape, np.int32)
    for row, (row_tokens, row_mask, _) in enumerate(rows):
      n = len(row_tokens)
      tokens[row, :n] = row_tokens
      loss_mask[row, :n] = row_mask
      attention_mask[row, :n] = 1
    return {'tokens': tokens, 'loss_mask': loss_mask, 'attention_mask': attention_mask}


def _check_sizes(num_examples: int, global_batch_size: int, process_index: int, process_count: int,
                 repeat: bool, name: str = 'The dataset',
                 batch_size_name: str = 'global_batch_size', num_skipped: int = 0) -> None:
  """Raises ValueError on inconsistent batch, host or dataset sizes.

  `name` and `batch_size_name` name the data and the batch size in the
  message about a dataset smaller than one batch.
  """
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index ({process_index}) < '
                     f'process_count ({process_count}).')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size ({global_batch_size}) must be '
                     f'divisible by process_count ({process_count}).')
  if repeat and num_examples < global_batch_size:
    skipped = f' (after skipping {num_skipped} invalid ones)' if num_skipped else ''
    raise ValueError(f'{name} has {num_examples} examples{skipped}, fewer than one global '
                     f'batch of {global_batch_size} ({batch_size_name}); with repeat=True '
                     'and the incomplete last batch dropped there would be no batches. '
                     f'Lower {batch_size_name}, or add examples.')


def check_buckets(buckets: Sequence[int], process_count: int,
                  custom_collate: bool = False) -> tuple[int, ...]:
  """Returns `buckets` as a tuple; ValueError if they are not positive and
  strictly increasing, or several with `process_count > 1` and a custom
  collate (which picks its lengths from the host's own rows)."""
  buckets = tuple(int(b) for b in buckets)
  if not buckets or buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError('buckets must be positive and strictly increasing, got '
                     f'{buckets}.')
  if process_count > 1 and len(buckets) > 1 and custom_collate:
    raise ValueError(f'With process_count={process_count} comparisons need a single bucket '
                     f'(got {buckets}): each host picks its lengths from its own rows, so '
                     'several buckets could give hosts different shapes.')
  return buckets


def _check_encoded(encoded: tokenization.Encoded, index: int, max_length: int) -> None:
  """Raises ValueError if an encoded example is malformed or too long."""
  tokens, loss_mask, _ = encoded
  if len(tokens) != len(loss_mask):
    raise ValueError(f'Example {index}: {len(tokens)} tokens but '
                     f'{len(loss_mask)} loss mask entries.')
  if len(tokens) > max_length:
    raise ValueError(f'Example {index} has {len(tokens)} tokens, more than '
                     f'the largest bucket ({max_length}); encode must '
                     'truncate to max(buckets).')


def _encode_demonstration(tokenizer: Any, max_length: int,
                          example: Example) -> tokenization.Encoded:
  """Encodes a `{"prompt", "completion"}` example."""
  return tokenization.encode_demonstration(tokenizer, example['prompt'], example['completion'],
                                           max_length)


def _encode_text(tokenizer: Any, max_length: int, example: Example) -> tokenization.Encoded:
  """Encodes a `{"text"}` example."""
  return tokenization.encode_text(tokenizer, example['text'], max_length)


ENCODERS: Mapping[str, Callable[[Any, int, Example], tokenization.Encoded]] = {
    'demonstrations': _encode_demonstration,
    'text': _encode_text,
}


def describe_split(files: Mapping[str, str], split: str) -> str:
  """How messages name a split, e.g. 'train split (/data/demos.jsonl)'."""
  path = files.get(split)
  if path is None:
    return f'{split} split of {dict(files)}'
  return f'{split} split ({os.fspath(path)})'


def _first_truncated(kind: str, files: Mapping[str, str], split: str, data_format: str,
                     skip_invalid: bool, max_responses: int | None, encode: Encode, source: Any,
                     index: int) -> str:
  """Names the first truncated example: `path:line` in a records file, else its beginning.

  A prepared split is not in file order, so a records file is read again in
  order (only when truncation is refused) to find the line.
  """
  path = files.get(split)
  if data_format == builders.RECORDS_FORMAT and path is not None:
    numbered, _ = builders.read_file(kind, path, skip_invalid, max_responses, line_numbers=True)
    for line_number, example in numbered:
      if encode(example)[2]:
        return f'{path}:{line_number}'
  example = source[index]
  field = 'text' if 'text' in example else 'prompt'
  return f'the example whose {field} begins {example[field][:60]!r}'


def check_loaded(batches: Batches, *, noun: str, limit: str, allow_truncation: bool,
                 locate: Callable[[int], str]) -> None:
  """Logs a loaded split's skipped records, and counts its truncated examples.

  Truncated examples are logged in one warning line, or refused.

  Args:
    batches: The split's batches (`count_truncated` encodes every example).
    noun: What the examples are, e.g. 'examples' or 'prompts'.
    limit: The length limit, e.g. '128 tokens'.
    allow_truncation: Whether truncated examples are allowed (a warning) or
      an error.
    locate: Maps the source index of the first truncated example to where
      it is (see `_first_truncated`).

  Raises:
    ValueError: Examples are truncated and `allow_truncation` is False; the
      message names the split, the first truncated example, the count and
      `config.data.allow_truncation`.
  """
  if batches.num_skipped:
    logging.warning('%s: skipped %d invalid records (skip_invalid=True).', batches.name,
                    batches.num_skipped)
  count, first = batches.count_truncated()
  if not count:
    return
  total = batches.num_examples
  if allow_truncation:
    logging.warning('%s: %d of %d %s longer than %s were truncated.', batches.name, count, total,
                    noun, limit)
    return
  raise ValueError(f'{batches.name}: {count} of {total} {noun} are longer than {limit}, the '
                   f'first at {locate(first)}; config.data.allow_truncation=False refuses to '
                   'truncate them (raise the length limit, shorten or drop them, or set '
                   'config.data.allow_truncation=True).')


def load_batches(kind: str, files: Mapping[str, str], split: str, encode: Encode, *, data_dir: str,
                 data_format: str, skip_invalid: bool, allow_truncation: bool, noun: str,
                 limit: str, max_responses: int | None = None, **batches_args: Any) -> Batches:
  """Loads a split (`builders.load_split`), checks it and returns its batches.

  Skipped invalid records are logged, and every example is encoded once:
  the truncated ones are counted and logged in one warning line naming the
  split and its file, or refused (see `check_loaded`).

  Args:
    kind: The kind of records (see `builders.load_split`).
    files: Split name mapped to a local file path (see `builders.load_split`).
    split: The split to batch.
    encode: Maps an example to a row (see `Batches`).
    data_dir: Where TFDS keeps prepared datasets.
    data_format: 'records' or a public format (see `builders.load_split`).
    skip_invalid: Skip (and count) invalid records instead of raising.
    allow_truncation: If False, truncated examples are an error.
    noun: What the examples are, for messages, e.g. 'prompts'.
    limit: The length limit, for messages, e.g. '128 tokens'.
    max_responses: For comparisons (see `builders.load_split`).
    **batches_args: The other arguments of `Batches`.

  Returns:
    The `Batches`, with `num_truncated_examples` set.
  """
  source = builders.load_split(kind, files, split, data_dir, skip_invalid=skip_invalid,
                               data_format=data_format, max_responses=max_responses)
  batches = Batches(source, encode, name=describe_split(files, split), **batches_args)
  locate = functools.partial(_first_truncated, kind, files, split, data_format, skip_invalid,
                             max_responses, encode, source)
  check_loaded(batches, noun=noun, limit=limit, allow_truncation=allow_truncation, locate=locate)
  return batches


def make_batches(kind: str, files: Mapping[str, str], split: str, tokenizer: Any, *,
                 global_batch_size: int, buckets: Sequence[int], seed: int, shuffle: bool,
                 repeat: bool, data_dir: str, process_index: int = 0, process_count: int = 1,
                 cache_encoded: bool = True, data_format: str = builders.RECORDS_FORMAT,
                 skip_invalid: bool = False, allow_truncation: bool = True,
                 batch_size_name: str = 'global_batch_size', encoder=None) -> Batches:
  """Loads a split of local files and returns its batches.

  Every example is encoded when loading; those longer than `max(buckets)`
  are truncated (see `tokenization`), counted and logged in one warning.

  Args:
    kind: 'demonstrations' or 'text'.
    files: Split name mapped to a local file path (see `load_split`; for a
      public `data_format` a file or directory).
    split: The split to batch.
    tokenizer: A tokenizer with a pad token distinct from EOS.
    global_batch_size: Rows per global batch, summed over hosts.
    buckets: Allowed sequence lengths; examples are truncated to the largest.
    seed: Seed of the per-epoch shuffle.
    shuffle: Whether to shuffle each epoch.
    repeat: Loop forever (training) or one padded pass (evaluation).
    data_dir: Where TFDS keeps prepared datasets.
    process_index: This host's index.
    process_count: The number of hosts.
    cache_encoded: Whether to keep encoded examples in memory.
    data_format: 'records' (this repo's files) or a public format providing
      `kind` records: 'hh_rlhf' or 'tldr' for demonstrations (see
      `instruct.data.public`).
    skip_invalid: Skip (and count, see `Batches.num_skipped`) invalid
      records instead of raising RecordError.
    allow_truncation: If False, examples longer than `max(buckets)` are an
      error instead of being truncated.
    batch_size_name: How messages name `global_batch_size` (its config key).
    encoder: `(tokenizer, max_length, example) -> Encoded` for `kind` (default: the kind's
      own; scored text needs its objective's, `feedback.encode`).

  Returns:
    The `Batches` iterator, with `num_truncated_examples` set.

  Raises:
    ValueError: Unknown `kind`, a format without `kind` records, bad
      tokenizer, inconsistent sizes, or truncated examples and
      `allow_truncation` False.
    RecordError: A record is invalid and `skip_invalid` is False.
  """
  if encoder is None and kind not in ENCODERS:
    hint = {
        'comparisons': ' (batch comparisons with make_comparison_batches)',
        'prompts': ' (batch prompts with make_prompt_batches)',
    }.get(kind, '')
    raise ValueError(f'Unknown data kind {kind!r}; allowed kinds: '
                     f'{sorted(ENCODERS)}{hint}.')
  tokenization.check_special_tokens(tokenizer)
  max_length = check_buckets(buckets, process_count)[-1]
  encode = functools.partial(encoder or ENCODERS[kind], tokenizer, max_length)
  return load_batches(kind, files, split, encode, data_dir=data_dir, data_format=data_format,
                      skip_invalid=skip_invalid, allow_truncation=allow_truncation, noun='examples',
                      limit=f'{max_length} tokens', global_batch_size=global_batch_size,
                      buckets=buckets, pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle,
                      repeat=repeat, process_index=process_index, process_count=process_count,
                      cache_encoded=cache_encoded, batch_size_name=batch_size_name)


def make_comparison_batches(files: Mapping[str, str], split: str, tokenizer: Any, *,
                            global_batch_size: int, max_responses: int, buckets: Sequence[int],
                            seed: int, shuffle: bool, repeat: bool, data_dir: str,
                            skip_invalid: bool = False, process_index: int = 0,
                            process_count: int = 1, cache_encoded: bool = True,
                            data_format: str = builders.RECORDS_FORMAT,
                            allow_truncation: bool = True,
                            batch_size_name: str = 'global_batch_size',
                            response_masks: bool = False) -> Batches:
  """Loads a split of comparison files and returns its batches.

  Each row is one comparison; each of its responses is encoded as
  `prompt + response + eos` (see `comparisons.encode_comparison`) and batches
  are built by `comparisons.collate_comparisons`: int32 `tokens` and
  `attention_mask` `[B, max_responses, L]`, `ranks` and `response_mask`
  `[B, max_responses]` (padding responses: mask 0, rank `max_responses`);
  with `response_masks`, also `loss_mask` `[B, max_responses, L]` (1 on
  response tokens and EOS, the tokens a DPO log-likelihood sums over).
  Every comparison is encoded when loading; those with a response sequence
  longer than `max(buckets)` are truncated, counted and logged in one warning.

  Args:
    files: Split name mapped to a local JSON-lines file (see `load_split`; for
      a public `data_format` a file or directory).
    split: The split to batch.
    tokenizer: A tokenizer with a pad token distinct from EOS.
    global_batch_size: Comparisons per global batch, summed over hosts.
    max_responses: Response slots per row; a record with more responses is
      invalid (RecordError naming its line when the split is prepared, or
      skipped with `skip_invalid`).
    buckets: Allowed sequence lengths; sequences are truncated to the
      largest.
    seed: Seed of the per-epoch shuffle.
    shuffle: Whether to shuffle each epoch.
    repeat: Loop forever (training) or one padded pass (evaluation).
    data_dir: Where TFDS keeps prepared datasets.
    skip_invalid: Skip (and count, see `Batches.num_skipped`) invalid
      records instead of raising RecordError.
    process_index: This host's index.
    process_count: The number of hosts.
    cache_encoded: Whether to keep encoded examples in memory.
    data_format: 'records' (comparison records, see `comparisons`) or a
      public format: 'hh_rlhf' or 'summarize_from_feedback' (see
      `instruct.data.public`).
    allow_truncation: If False, a response sequence longer than
      `max(buckets)` is an error instead of being truncated.
    batch_size_name: How messages name `global_batch_size` (its config key).
    response_masks: Also batch each response's `loss_mask` (see above).

  Returns:
    The `Batches` iterator, with `num_skipped` and `num_truncated_examples`
    set.

  Raises:
    ValueError: Bad tokenizer, `max_responses` below
      `comparisons.MIN_RESPONSES`, a format without comparisons,
      inconsistent sizes, or truncated comparisons and `allow_truncation`
      False.
    RecordError: A record is invalid and `skip_invalid` is False.
  """
  if max_responses < comparisons.MIN_RESPONSES:
    raise ValueError(f'max_responses must be at least '
                     f'{comparisons.MIN_RESPONSES}, got {max_responses}.')
  tokenization.check_special_tokens(tokenizer)
  buckets = check_buckets(buckets, process_count)
  encode = functools.partial(comparisons.encode_comparison, tokenizer, max_length=buckets[-1],
                             response_masks=response_masks)
  collate = functools.partial(comparisons.collate_comparisons, max_responses=max_responses,
                              buckets=buckets, pad_id=tokenizer.pad_token_id,
                              response_masks=response_masks)
  return load_batches('comparisons', files, split, encode, data_dir=data_dir,
                      data_format=data_format, skip_invalid=skip_invalid,
                      allow_truncation=allow_truncation, noun='comparisons',
                      limit=f'{buckets[-1]} tokens (prompt + response)',
                      max_responses=max_responses, global_batch_size=global_batch_size,
                      buckets=buckets, pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle,
                      repeat=repeat, process_index=process_index, process_count=process_count,
                      cache_encoded=cache_encoded, collate=collate, batch_size_name=batch_size_name)
