"""Prompts for RL rollouts: encoding, left-padded collation and batches.

Every prompt is its tokens without special tokens, keeping the LAST
`prompt_length` when longer (the end of a prompt is what a response
continues), left-padded to that one fixed length so a sampler compiles once.
Batching (order, host slices, resume, load-time checks) is
`pipeline.Batches`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from instruct.data import local_files
from instruct.data import pipeline
from instruct.data import tokenization

# A row of prompt batches: the prompt's int32 tokens, no loss mask, and
# whether the prompt was truncated (the `Batches` row convention).
EncodedPrompt = tuple[np.ndarray, None, bool]


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


def _encode_prompt_row(tokenizer: Any, max_length: int, example: pipeline.Example) -> EncodedPrompt:
  """Encodes a `{"prompt"}` example as a `Batches` row."""
  tokens, truncated = encode_prompt(tokenizer, example['prompt'], max_length)
  return tokens, None, truncated


def make_prompt_batches(files: Mapping[str, str], split: str, tokenizer: Any, *,
                        global_batch_size: int, prompt_length: int, seed: int, shuffle: bool,
                        repeat: bool, data_dir: str, process_index: int = 0, process_count: int = 1,
                        cache_encoded: bool = True, data_format: str = local_files.RECORDS_FORMAT,
                        skip_invalid: bool = False, allow_truncation: bool = True,
                        batch_size_name: str = 'global_batch_size') -> pipeline.Batches:
  """Loads a split of prompt files and returns its batches (RL rollouts).

  Each row is one prompt encoded by `encode_prompt` (keeping its last
  `prompt_length` tokens) and batches are built by `collate_prompts`: int32
  `prompt_tokens` and `prompt_mask` `[B, prompt_length]`, LEFT-padded so the
  last column holds every prompt's last token. Evaluation dummy rows are all
  pad with mask 0. Every prompt is encoded when loading; truncated ones are
  counted (`num_truncated_examples`) and logged in one warning, and counted
  again per batched row in `num_truncated`.

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
      records instead of raising RecordError.
    allow_truncation: If False, prompts longer than `prompt_length` are an
      error instead of being truncated.
    batch_size_name: How messages name `global_batch_size` (its config key).

  Returns:
    The `Batches` iterator, with `num_truncated_examples` set.

  Raises:
    ValueError: Bad tokenizer, non-positive `prompt_length`, a format without
      prompts, inconsistent sizes, a prompt of no tokens, or truncated
      prompts and `allow_truncation` False.
    RecordError: A record lacks a non-empty string `prompt`.
  """
  if prompt_length < 1:
    raise ValueError(f'prompt_length must be positive, got {prompt_length}.')
  tokenization.check_special_tokens(tokenizer)
  encode = functools.partial(_encode_prompt_row, tokenizer, prompt_length)
  collate = functools.partial(collate_prompts, prompt_length=prompt_length,
                              pad_id=tokenizer.pad_token_id)
  return pipeline.load_batches(
      'prompts', files, split, encode, data_dir=data_dir, data_format=data_format,
      skip_invalid=skip_invalid, allow_truncation=allow_truncation, noun='prompts',
      limit=f'prompt_length={prompt_length} tokens', global_batch_size=global_batch_size,
      buckets=(prompt_length,), pad_id=tokenizer.pad_token_id, seed=seed, shuffle=shuffle,
      repeat=repeat, process_index=process_index, process_count=process_count,
      cache_encoded=cache_encoded, collate=collate, batch_size_name=batch_size_name)
