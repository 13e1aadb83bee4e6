"""Deterministic, resumable, host-sharded batching of encoded examples.

`Batches` turns a random-access source of examples into padded numpy batches.
The order depends only on the seed and the epoch; each host reads only its
slice of every global batch, so the hosts' batches concatenated in process
order are the global batch whatever the number of hosts. The position
(`get_state`/`set_state`) is two integers, so resuming is exact and cheap.
How rows become a batch is pluggable (`collate`): padded sequences by
default, K-wise comparisons with `make_comparison_batches`, left-padded
prompts of one fixed length for RL rollouts with `make_prompt_batches`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
# A row of prompt batches: the prompt's int32 tokens, no loss mask, and
# whether the prompt was truncated (the `Batches` row convention).
EncodedPrompt = tuple[np.ndarray, None, bool]


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
  bucket that fits the longest of the host's rows. Hosts must agree on `L`,
  so with `process_count > 1` exactly one bucket is allowed (enforced): this
  keeps every host tokenizing only its own rows. A custom `collate` builds
  the batch instead (see `make_comparison_batches` and
  `make_prompt_batches`); ordering, host slicing, caching, eval padding,
  state and `num_truncated` work the same.

  Examples are encoded lazily, only for the host's rows, and by default kept
  in memory keyed by source index so later epochs do not re-tokenize (meant
  for small datasets; pass `cache_encoded=False` otherwise).

  Attributes:
    num_truncated: How many truncated examples this iterator has put in its
      batches (counted per occurrence; not part of the saved state).
    num_skipped: How many invalid records the source skipped when prepared
      (its `num_skipped`, else 0).
  """

  def __init__(self, source: Any, encode: Encode, *, global_batch_size: int, buckets: Sequence[int],
               pad_id: int, seed: int, shuffle: bool, repeat: bool, process_index: int = 0,
               process_count: int = 1, cache_encoded: bool = True,
               collate: Collate | None = None) -> None:
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

    Raises:
      ValueError: On inconsistent sizes or buckets (see the messages).
    """
    _check_sizes(len(source), global_batch_size, process_index, process_count, repeat)
    self._buckets = _check_buckets(buckets, process_count)
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
    self.num_skipped = int(getattr(source, 'num_skipped', 0))

  @property
  def batches_per_epoch(self) -> int:
    """Global batches per epoch (the last one padded when not repeating)."""
    n, b = len(self._source), self._global_batch_size
    return n // b if self._repeat else math.ceil(n / b)

  @property
  def local_batch_size(self) -> int:
    """Rows per batch on this host."""
    return self._local_batch_size

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

  def _encoded(self, index: int) -> tuple[Any, ...]:
    """Returns the encoded example `index`, from the cache if possible."""
    if self._cache is not None and index in self._cache:
      encoded = self._cache[index]
    else:
      encoded = self._encode(self._source[index])
      if self._check_sequences:
        _check_encoded(encoded, index, self._buckets[-1])
      if self._cache is not None:
        self._cache[index] = encoded
    self.num_truncated += int(encoded[2])
    return encoded

  def _pad_sequences(self, rows: Sequence[tokenization.Encoded],
                     local_batch_size: int) -> dict[str, np.ndarray]:
    """Right-pads `rows` (plus dummy rows) into a `[local_batch, L]` batch."""
    longest = max((len(tokens) for tokens, _, _ in rows), default=0)
    length = next(b for b in self._buckets if b >= longest)
    shape = (local_batch_size, length)
    tokens = np.full(shape, self._pad_id, np.int32)
    loss_mask = np.zeros(shape, np.int32)
    attention_mask = np.zeros(shape, np.int32)
    for row, (row_tokens, row_mask, _) in enumerate(rows):
      n = len(row_tokens)
      tokens[row, :n] = row_tokens
      loss_mask[row, :n] = row_mask
      attention_mask[row, :n] = 1
    return {'tokens': tokens, 'loss_mask': loss_mask, 'attention_mask': attention_mask}


def _check_sizes(num_examples: int, global_batch_size: int, process_index: int, process_count: int,
                 repeat: bool) -> None:
  """Raises ValueError on inconsistent batch, host or dataset sizes."""
  if global_batch_size < 1:
    raise ValueError(f'global_batch_size must be positive, got {global_batch_size}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index ({process_index}) < '
                     f'process_count ({process_count}).')
  if global_batch_size % process_count:
    raise ValueError(f'global_batch_size ({global_batch_size}) must be '
                     f'divisible by process_count ({process_count}).')
  if repeat and num_examples < global_batch_size:
    raise ValueError(f'The dataset has {num_examples} examples, fewer than one global '
                     f'batch (global_batch_size={global_batch_size}); with repeat=True '
                     'and the incomplete last batch dropped there would be no batches.')


def _check_buckets(buckets: Sequence[int], process_count: int) -> tuple[int, ...]:
  """Returns `buckets` as a tuple after checking them.

  Raises:
    ValueError: Buckets are empty, not positive and strictly increasing, or
      several while `process_count > 1` (hosts could disagree on lengths).
  """
  buckets = tuple(int(b) for b in buckets)
  if not buckets or buckets[0] < 1 or any(a >= b for a, b in zip(buckets, buckets[1:])):
    raise ValueError('buckets must be positive and strictly increasing, got '
                     f'{buckets}.')
  if process_count > 1 and len(buckets) > 1:
    raise ValueError(f'With process_count={process_count} use a single bucket (got '
                     f'{buckets}): each host picks its length from its own rows, so '
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


def _encode_comparison(tokenizer: Any, max_length: int,
                       example: Example) -> comparisons.EncodedComparison:
  """Encodes a `{"prompt", "responses", "ranks"}` example."""
  return comparisons.encode_comparison(tokenizer, example, max_length)


def encode_prompt(tokenizer: Any, prompt: str, max_length: int) -> tuple[np.ndarray, bool]:
  """Encodes a prompt for generation: its tokens, without special tokens.

  When longer than `max_length`, the LAST `max_length` tokens are kept: the
  end of a prompt (e.g. its final 'Answer:') is what a response continues.

  Args:
    tokenizer: A tokenizer.
    prompt: The prompt text.
    max_length: The maximum number of tokens.

  Returns:
    `(tokens, truncated)`: the int32 token vector (1 to `max_length` long)
    and whether any token was dropped.

  Raises:
    ValueError: `max_length` is not positive, or the prompt has no tokens.
  """
  if max_length < 1:
    raise ValueError(f'max_length must be positive, got {max_length}.')
  ids = list(tokenizer.encode(prompt, add_special_tokens=False))
  if not ids:
    raise ValueError(f'Prompt {prompt!r} encodes to no tokens.')
  truncated = len(ids) > max_length
  return np.asarray(ids[-max_length:], dtype=np.int32), truncated


def collate_prompts(rows: Sequence[EncodedPrompt], local_batch_size: int, prompt_length: int,
                    pad_id: int) -> dict[str, np.ndarray]:
  """Left-pads encoded prompts (plus dummy rows) into one batch.

  Left padding puts every prompt's last token in the last column, where
  generation continues it; the single fixed length means a sampler compiles
  once.

  Args:
    rows: Encoded prompts `(tokens, None, truncated)`, at most
      `local_batch_size` of them; missing rows become dummy rows.
    local_batch_size: Rows per batch, B.
    prompt_length: The fixed prompt length, P.
    pad_id: The token id used for padding.

  Returns:
    int32 arrays `[B, P]`: `prompt_tokens` (left-padded with `pad_id`) and
    `prompt_mask` (1 on real tokens). Dummy rows are all `pad_id` with mask
    0.

  Raises:
    ValueError: Too many rows, or an empty prompt or one longer than
      `prompt_length`.
  """
  if len(rows) > local_batch_size:
    raise ValueError(f'Got {len(rows)} rows for a batch of '
                     f'{local_batch_size}.')
  shape = (local_batch_size, prompt_length)
  tokens = np.full(shape, pad_id, np.int32)
  mask = np.zeros(shape, np.int32)
  for row, (row_tokens, _, _) in enumerate(rows):
    n = len(row_tokens)
    if not 0 < n <= prompt_length:
      raise ValueError(f'A prompt has {n} tokens; prompts need 1 to '
                       f'prompt_length={prompt_length} tokens (encode must '
                       'truncate them).')
    tokens[row, prompt_length - n:] = row_tokens
    mask[row, prompt_length - n:] = 1
  return {'prompt_tokens': tokens, 'prompt_mask': mask}


def _encode_prompt_row(tokenizer: Any, max_length: int, example: Example) -> EncodedPrompt:
  """Encodes a `{"prompt"}` example as a `Batches` row."""
  tokens, truncated = encode_prompt(tokenizer, example['prompt'], max_length)
  return tokens, None, truncated


_ENCODERS: Mapping[str, Callable[[Any, int, Example], tokenization.Encoded]] = {
    'demonstrations': _encode_demonstration,
    'text': _encode_text,
}


def make_batches(kind: str, files: Mapping[str, str], split: str, tokenizer: Any, *,
                 global_batch_size: int, buckets: Sequence[int], seed: int, shuffle: bool,
                 repeat: bool, data_dir: str, process_index: int = 0, process_count: int = 1,
                 cache_encoded: bool = True, data_format: str = builders.RECORDS_FORMAT,
                 skip_invalid: bool = False) -> Batches:
  """Loads a split of local files and returns its batches.

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
      records instead of raising RecordError; public formats only.

  Returns:
    The `Batches` iterator.

  Raises:
    ValueError: Unknown `kind`, a format without `kind` records, bad
      tokenizer or inconsistent sizes.
  """
  if kind not in _ENCODERS:
    hint = {
        'comparisons': ' (batch comparisons with make_comparison_batches)',
        'prompts': ' (batch prompts with make_prompt_batches)',
    }.get(kind, '')
    raise ValueError(f'Unknown data kind {kind!r}; allowed kinds: '
                     f'{sorted(_ENCODERS)}{hint}.')
  tokenization.check_special_tokens(tokenizer)
  max_length = _check_buckets(buckets, process_count)[-1]
  source = builders.load_split(kind, files, split, data_dir, skip_invalid=skip_invalid,
                               data_format=data_format)
  encode = functools.partial(_ENCODERS[kind], tokenizer, max_length)
  return Batches(source, encode, global_batch_size=global_batch_size, buckets=buckets,
                 pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle, repeat=repeat,
                 process_index=process_index, process_count=process_count,
                 cache_encoded=cache_encoded)


def make_comparison_batches(files: Mapping[str, str], split: str, tokenizer: Any, *,
                            global_batch_size: int, max_responses: int, buckets: Sequence[int],
                            seed: int, shuffle: bool, repeat: bool, data_dir: str,
                            skip_invalid: bool = False, process_index: int = 0,
                            process_count: int = 1, cache_encoded: bool = True,
                            data_format: str = builders.RECORDS_FORMAT) -> Batches:
  """Loads a split of comparison files and returns its batches.

  Each row is one comparison; each of its responses is encoded as
  `prompt + response + eos` (see `comparisons.encode_comparison`) and batches
  are built by `comparisons.collate_comparisons`: int32 `tokens` and
  `attention_mask` `[B, max_responses, L]`, `ranks` and `response_mask`
  `[B, max_responses]` (padding responses: mask 0, rank `max_responses`).

  Args:
    files: Split name mapped to a local JSON-lines file (see `load_split`; for
      a public `data_format` a file or directory).
    split: The split to batch.
    tokenizer: A tokenizer with a pad token distinct from EOS.
    global_batch_size: Comparisons per global batch, summed over hosts.
    max_responses: Response slots per row; a record with more responses
      raises ValueError when batched.
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

  Returns:
    The `Batches` iterator, with `num_skipped` set.

  Raises:
    ValueError: Bad tokenizer, `max_responses` below
      `comparisons.MIN_RESPONSES`, a format without comparisons, or
      inconsistent sizes.
    RecordError: A record is invalid and `skip_invalid` is False.
  """
  if max_responses < comparisons.MIN_RESPONSES:
    raise ValueError(f'max_responses must be at least '
                     f'{comparisons.MIN_RESPONSES}, got {max_responses}.')
  tokenization.check_special_tokens(tokenizer)
  buckets = _check_buckets(buckets, process_count)
  source = builders.load_split('comparisons', files, split, data_dir, skip_invalid=skip_invalid,
                               data_format=data_format)
  encode = functools.partial(_encode_comparison, tokenizer, buckets[-1])
  collate = functools.partial(comparisons.collate_comparisons, max_responses=max_responses,
                              buckets=buckets, pad_id=tokenizer.pad_token_id)
  return Batches(source, encode, global_batch_size=global_batch_size, buckets=buckets,
                 pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle, repeat=repeat,
                 process_index=process_index, process_count=process_count,
                 cache_encoded=cache_encoded, collate=collate)


def make_prompt_batches(files: Mapping[str, str], split: str, tokenizer: Any, *,
                        global_batch_size: int, prompt_length: int, seed: int, shuffle: bool,
                        repeat: bool, data_dir: str, process_index: int = 0, process_count: int = 1,
                        cache_encoded: bool = True, data_format: str = builders.RECORDS_FORMAT,
                        skip_invalid: bool = False) -> Batches:
  """Loads a split of prompt files and returns its batches (RL rollouts).

  Each row is one prompt encoded by `encode_prompt` (keeping its last
  `prompt_length` tokens) and batches are built by `collate_prompts`: int32
  `prompt_tokens` and `prompt_mask` `[B, prompt_length]`, LEFT-padded so the
  last column holds every prompt's last token. Evaluation dummy rows are all
  pad with mask 0. Truncated prompts are counted in `num_truncated`.

  Args:
    files: Split name mapped to a local JSON-lines file whose records have a
      `prompt` (see `load_split`; demonstration files work too), or for a
      public `data_format` a file or directory.
    split: The split to batch.
    tokenizer: A tokenizer with a pad token distinct from EOS.
    global_batch_size: Prompts per global batch, summed over hosts.
    prompt_length: The one fixed prompt length P (no buckets: generation
      compiles once per shape).
    seed: Seed of the per-epoch shuffle.
    shuffle: Whether to shuffle each epoch.
    repeat: Loop forever (training) or one padded pass (evaluation).
    data_dir: Where TFDS keeps prepared datasets.
    process_index: This host's index.
    process_count: The number of hosts.
    cache_encoded: Whether to keep encoded examples in memory.
    data_format: 'records' (this repo's files) or a public format providing
      prompts: 'hh_rlhf' or 'tldr' (see `instruct.data.public`).
    skip_invalid: Skip (and count, see `Batches.num_skipped`) invalid
      records instead of raising RecordError; public formats only.

  Returns:
    The `Batches` iterator.

  Raises:
    ValueError: Bad tokenizer, non-positive `prompt_length`, a format without
      prompts, or inconsistent sizes.
    RecordError: A record lacks a non-empty string `prompt`.
  """
  if prompt_length < 1:
    raise ValueError(f'prompt_length must be positive, got {prompt_length}.')
  tokenization.check_special_tokens(tokenizer)
  source = builders.load_split('prompts', files, split, data_dir, skip_invalid=skip_invalid,
                               data_format=data_format)
  encode = functools.partial(_encode_prompt_row, tokenizer, prompt_length)
  collate = functools.partial(collate_prompts, prompt_length=prompt_length,
                              pad_id=tokenizer.pad_token_id)
  return Batches(source, encode, global_batch_size=global_batch_size, buckets=(prompt_length,),
                 pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle, repeat=repeat,
                 process_index=process_index, process_count=process_count,
                 cache_encoded=cache_encoded, collate=collate)
