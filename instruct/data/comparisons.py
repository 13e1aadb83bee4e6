"""Comparison data for reward models and DPO: K-wise rankings of responses.

A comparison is a prompt, K responses (`MIN_RESPONSES <= K <= MAX_RESPONSES`)
and their ranking. Every record becomes
`{'prompt': str, 'responses': list[str], 'ranks': list[int]}` where
`ranks[i]` is the rank of response `i` (0 is best). Equal ranks are ties: no
preference is known between those responses. JSON-lines records may use any
of three shapes:

* full ranking: `{"prompt", "responses": [...], "ranking": [...]}` where
  `ranking` lists the response indices best first (a permutation of
  `range(K)`), so `ranks[ranking[j]] = j`;
* chosen/rejected: `{"prompt", "chosen", "rejected"}`, giving responses
  `[chosen, rejected]` with ranks `[0, 1]`;
* best-of-K: `{"prompt", "responses": [...], "best": i}`, giving rank 0 to
  response `i` and rank 1 (tied) to all others.

Invalid records raise `RecordError` (`path:line: what`), or are skipped and
counted by `read_comparisons(..., skip_invalid=True)`. A record with more
responses than the reward model's `max_responses` slots is invalid too, so it
is reported (or skipped) when the file is read rather than when a batch is
built.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from instruct.data import records
from instruct.data import tokenization

MIN_RESPONSES: int = 2
MAX_RESPONSES: int = 9

# A row of comparison batches: one token vector per response, the int32
# ranks, and whether any response sequence was truncated; with
# `response_masks`, a fourth item: one 0/1 vector per response marking its
# response tokens (see `encode_comparison`).
EncodedComparison = tuple[Any, ...]

_SHAPES = ("{'prompt', 'responses', 'ranking'} (full ranking, best first), "
           "{'prompt', 'chosen', 'rejected'} or "
           "{'prompt', 'responses', 'best'} (best-of-K)")


def _type_name(value: Any) -> str:
  """Returns the JSON-facing name of a decoded value's type."""
  return type(value).__name__


def _is_int(value: Any) -> bool:
  """Returns whether a decoded JSON value is an integer (not a boolean)."""
  return isinstance(value, int) and not isinstance(value, bool)


def _shape(record: dict, path: str | os.PathLike[str], line_number: int) -> str:
  """Returns the shape of a record: 'ranking', 'pair' or 'best'.

  Raises:
    RecordError: The record matches none of the shapes, mixes them, or lacks
      a field of its shape.
  """
  error = functools.partial(records.RecordError, path, line_number)
  listed = {'responses', 'ranking', 'best'} & set(record)
  if 'chosen' in record or 'rejected' in record:
    if listed:
      raise error(f'mixes the chosen/rejected shape with {sorted(listed)}; '
                  f'use exactly one of the shapes {_SHAPES}')
    missing = 'rejected' if 'chosen' in record else 'chosen'
    if missing not in record:
      raise error(f"missing field {missing!r} (a chosen/rejected record "
                  "needs both 'chosen' and 'rejected')")
    return 'pair'
  if 'ranking' in record and 'best' in record:
    raise error("has both 'ranking' and 'best'; give either a full ranking "
                'or the index of the best response, not both')
  if 'responses' not in record:
    if listed:
      raise error(f"missing field 'responses' (needed with "
                  f'{sorted(listed)[0]!r})')
    raise error(f'matches none of the comparison shapes {_SHAPES}')
  if 'ranking' in record:
    return 'ranking'
  if 'best' in record:
    return 'best'
  raise error("'responses' needs either 'ranking' (the response indices, best "
              "first) or 'best' (the index of the best response)")


def _check_responses(values: Sequence[Any], names: Sequence[str], path: str | os.PathLike[str],
                     line_number: int, max_responses: int = MAX_RESPONSES) -> list[str]:
  """Checks the number, types, emptiness and distinctness of responses.

  Args:
    values: The decoded responses.
    names: How error messages name each response, e.g. 'response 0'.
    path: The file the record came from (for error messages).
    line_number: The 1-based line of the record (for error messages).
    max_responses: The most responses a record may have (the reward model's
      `config.rm.max_responses`).

  Returns:
    The responses, as a list.

  Raises:
    RecordError: Too few or too many responses, a response that is not a
      string or is empty, or two responses identical after stripping.
  """
  error = functools.partial(records.RecordError, path, line_number)
  if not MIN_RESPONSES <= len(values) <= MAX_RESPONSES:
    raise error(f'has {len(values)} responses; a comparison needs between '
                f'{MIN_RESPONSES} and {MAX_RESPONSES}')
  if len(values) > max_responses:
    raise error(f'has {len(values)} responses, more than '
                f'config.rm.max_responses={max_responses}')
  seen = {}
  for name, value in zip(names, values):
    if not isinstance(value, str):
      raise error(f'{name} must be a string, got {_type_name(value)}')
    if not value.strip():
      raise error(f'{name} is empty or whitespace-only')
    if value.strip() in seen:
      raise error(f'{seen[value.strip()]} and {name} are duplicates '
                  '(identical after stripping whitespace); responses must '
                  'differ')
    seen[value.strip()] = name
  return list(values)


def _ranks_from_ranking(ranking: Any, k: int, path: str | os.PathLike[str],
                        line_number: int) -> list[int]:
  """Returns the ranks given by a best-first ranking of `k` responses.

  Raises:
    RecordError: `ranking` is not a permutation of `range(k)`; the message
      says whether its length, an index's range or a repeat is wrong.
  """
  error = functools.partial(records.RecordError, path, line_number)
  if not isinstance(ranking, list):
    raise error("field 'ranking' must be a list of response indices, got "
                f'{_type_name(ranking)}')
  if len(ranking) != k:
    raise error(f"'ranking' has {len(ranking)} entries but there are {k} "
                'responses; it must list every response index once, best '
                'first')
  ranks = [-1] * k
  for position, index in enumerate(ranking):
    if not _is_int(index):
      raise error(f"'ranking' entry {position} must be an integer, got "
                  f'{_type_name(index)}')
    if not 0 <= index < k:
      raise error(f"'ranking' index {index} is out of range: with {k} "
                  f'responses the indices are 0..{k - 1}')
    if ranks[index] >= 0:
      raise error(f"'ranking' repeats index {index}; it must be a "
                  f'permutation of 0..{k - 1}')
    ranks[index] = position
  return ranks


def _ranks_from_best(best: Any, k: int, path: str | os.PathLike[str],
                     line_number: int) -> list[int]:
  """Returns rank 0 for response `best` and 1 (tied) for the others.

  Raises:
    RecordError: `best` is not an integer in `range(k)`.
  """
  if not _is_int(best):
    raise records.RecordError(
        path, line_number, "field 'best' must be an integer (the index of the "
        f'best response), got {_type_name(best)}')
  if not 0 <= best < k:
    raise records.RecordError(
        path, line_number, f"'best'={best} is out of range: with {k} "
        f'responses the indices are 0..{k - 1}')
  return [0 if i == best else 1 for i in range(k)]


def parse_comparison(record: Any, path: str | os.PathLike[str], line_number: int,
                     max_responses: int = MAX_RESPONSES) -> dict:
  """Validates one decoded comparison record and converts it to ranks.

  Args:
    record: The decoded JSON value, in one of the three shapes (see the
      module docstring). Extra fields are ignored.
    path: The file the record came from (for error messages).
    line_number: The 1-based line of the record (for error messages).
    max_responses: The most responses a record may have.

  Returns:
    `{'prompt': str, 'responses': list[str], 'ranks': list[int]}`.

  Raises:
    RecordError: The record is invalid; the message says why.
  """
  prompt = records.validate_record(record, {'prompt': str}, path, line_number)['prompt']
  shape = _shape(record, path, line_number)
  if shape == 'pair':
    pair = [record['chosen'], record['rejected']]
    responses = _check_responses(pair, ["field 'chosen'", "field 'rejected'"], path, line_number,
                                 max_responses)
    return {'prompt': prompt, 'responses': responses, 'ranks': [0, 1]}
  values = record['responses']
  if not isinstance(values, list):
    raise records.RecordError(
        path, line_number, "field 'responses' must be a list of strings, got "
        f'{_type_name(values)}')
  names = [f'response {i}' for i in range(len(values))]
  responses = _check_responses(values, names, path, line_number, max_responses)
  if shape == 'ranking':
    ranks = _ranks_from_ranking(record['ranking'], len(responses), path, line_number)
  else:
    ranks = _ranks_from_best(record['best'], len(responses), path, line_number)
  return {'prompt': prompt, 'responses': responses, 'ranks': ranks}


def read_comparisons(path: str | os.PathLike[str], skip_invalid: bool = False,
                     max_responses: int = MAX_RESPONSES, *,
                     line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads and validates a JSON-lines file of comparisons.

  Args:
    path: The file to read; one JSON object per line, blank lines skipped.
    skip_invalid: If True, invalid records (JSON syntax errors, lines that
      are not UTF-8 and records with more than `max_responses` responses
      included) are skipped and counted instead of raising.
    max_responses: The most responses a record may have.
    line_numbers: If True, each record is returned as `(line_number, record)`.

  Returns:
    `(records, num_skipped)`: the parsed records in file order (see
    `parse_comparison`) and how many invalid records were skipped.

  Raises:
    FileNotFoundError: `path` does not exist.
    RecordError: A record is invalid and `skip_invalid` is False.
    ValueError: The file holds no valid records.
  """
  parse = functools.partial(parse_comparison, max_responses=max_responses)
  return records.read_json_lines([path], parse, skip_invalid, line_numbers=line_numbers)


def encode_comparison(tokenizer: Any, example: dict, max_length: int,
                      response_masks: bool = False) -> EncodedComparison:
  """Encodes a comparison: one token sequence per response.

  Each sequence is `tokenize(prompt) + tokenize(response) + [eos]`, truncated
  like `tokenization.encode_demonstration` (prompt dropped from the left
  first, keeping one prompt token).

  Args:
    tokenizer: A tokenizer with an EOS token.
    example: `{'prompt': str, 'responses': list[str], 'ranks': list[int]}`.
    max_length: The maximum number of tokens of each sequence.
    response_masks: Also return, per sequence, its int32 mask of response
      tokens (1 on the response and EOS, 0 on the prompt: SFT's loss mask),
      for losses on the responses' log-likelihoods (DPO).

  Returns:
    `(sequences, ranks, truncated)`: one int32 token vector per response,
    the int32 ranks, and whether any sequence was truncated; with
    `response_masks`, `(sequences, ranks, truncated, masks)`.

  Raises:
    ValueError: The numbers of responses and ranks differ.
  """
  responses, ranks = example['responses'], example['ranks']
  if len(responses) != len(ranks):
    raise ValueError(f'A comparison has {len(responses)} responses but '
                     f'{len(ranks)} ranks.')
  sequences, masks, truncated = [], [], False
  for response in responses:
    tokens, mask, cut = tokenization.encode_demonstration(tokenizer, example['prompt'], response,
                                                          max_length)
    sequences.append(tokens)
    masks.append(mask)
    truncated = truncated or cut
  encoded = sequences, np.asarray(ranks, np.int32), truncated
  return encoded + (masks,) if response_masks else encoded


def collate_comparisons(rows: Sequence[EncodedComparison], local_batch_size: int,
                        max_responses: int, buckets: Sequence[int], pad_id: int,
                        response_masks: bool = False) -> dict[str, np.ndarray]:
  """Pads encoded comparisons (plus dummy rows) into one batch.

  Args:
    rows: Encoded comparisons (see `encode_comparison`), at most
      `local_batch_size` of them; missing rows become dummy rows.
    local_batch_size: Rows per batch, B.
    max_responses: Response slots per row, R; rows with fewer responses are
      padded with empty response slots.
    buckets: Allowed sequence lengths.
    pad_id: The token id used for padding.
    response_masks: The rows carry response-token masks (encoded with
      `response_masks=True`); the batch then has `loss_mask` too.

  Returns:
    int32 arrays: `tokens` `[B, R, L]` (right-padded with `pad_id`),
    `attention_mask` `[B, R, L]` (1 on real tokens), `ranks` `[B, R]` (rank
    `R` for padding responses) and `response_mask` `[B, R]` (1 for real
    responses); with `response_masks`, `loss_mask` `[B, R, L]` (1 on
    response tokens and EOS). `L` is the smallest bucket holding the longest
    sequence. Dummy rows have all-zero masks.

  Raises:
    ValueError: Too many rows, a row with more than `max_responses`
      responses, mismatched ranks, or a sequence longer than every bucket.
  """
  if len(rows) > local_batch_size:
    raise ValueError(f'Got {len(rows)} rows for a batch of '
                     f'{local_batch_size}.')
  longest = max((len(t) for row in rows for t in row[0]), default=0)
  fitting = [int(b) for b in buckets if b >= longest]
  if not fitting:
    raise ValueError(f'A response sequence has {longest} tokens, more than '
                     f'the largest bucket ({max(buckets)}).')
  shape = (local_batch_size, max_responses, min(fitting))
  tokens = np.full(shape, pad_id, np.int32)
  attention_mask = np.zeros(shape, np.int32)
  ranks = np.full(shape[:2], max_responses, np.int32)
  response_mask = np.zeros(shape[:2], np.int32)
  loss_mask = np.zeros(shape, np.int32) if response_masks else None
  for row, encoded in enumerate(rows):
    sequences, row_ranks = encoded[:2]
    k = len(sequences)
    if k > max_responses:
      raise ValueError(f'A comparison has K={k} responses, more than '
                       f'max_responses={max_responses}; raise max_responses '
                       'or drop such records.')
    if len(row_ranks) != k:
      raise ValueError(f'A comparison has {k} responses but '
                       f'{len(row_ranks)} ranks.')
    for slot, sequence in enumerate(sequences):
      tokens[row, slot, :len(sequence)] = sequence
      attention_mask[row, slot, :len(sequence)] = 1
      if response_masks:
        loss_mask[row, slot, :len(sequence)] = encoded[3][slot]
    ranks[row, :k] = row_ranks
    response_mask[row, :k] = 1
  batch = {
      'tokens': tokens, 'attention_mask': attention_mask, 'ranks': ranks,
      'response_mask': response_mask
  }
  return dict(batch, loss_mask=loss_mask) if response_masks else batch
