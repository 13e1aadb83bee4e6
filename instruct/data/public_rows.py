"""Row parsers of the public preference datasets (see `instruct.data.public`).

Each parser maps one decoded JSON line of a published file to this repo's record
(demonstration, prompt or comparison), or raises `RecordError` naming the file and line;
`instruct.data.public` finds the files and builds the datasets from these.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from instruct.data import comparisons
from instruct.data import records

HH_RLHF = 'hh_rlhf'
SUMMARIZE_FROM_FEEDBACK = 'summarize_from_feedback'
TLDR = 'tldr'

# The kinds of records (see `instruct.data.builders.BUILDERS`) each public
# format provides.
FORMAT_KINDS: Mapping[str, tuple[str, ...]] = {
    HH_RLHF: ('comparisons', 'demonstrations', 'prompts'),
    SUMMARIZE_FROM_FEEDBACK: ('comparisons',),
    TLDR: ('demonstrations', 'prompts'),
}

# HH-RLHF: the marker opening every Assistant turn; the prompt ends with it.
HH_ASSISTANT = '\n\nAssistant:'
# HH-RLHF: our split name -> the file stem read in a subset directory (the
# published data has train and test files only).
HH_SPLIT_FILES: Mapping[str, str] = {
    'train': 'train',
    'validation': 'test',
    'test': 'test',
}

# summarize-from-feedback: our split name -> the values of a row's `split`
# field it holds. valid1 served model selection and valid2 final evaluation in
# Stiennon et al.; both are validation here.
SUMMARIZE_SPLITS: Mapping[str, tuple[str, ...]] = {
    'train': ('train',),
    'validation': ('valid1', 'valid2'),
}
# Every published value of a row's `split` field.
SUMMARIZE_ROW_SPLITS: tuple[str, ...] = ('train', 'valid1', 'valid2')

# TL;DR: our split name -> the file read in a TL;DR directory.
TLDR_SPLIT_FILES: Mapping[str, str] = {
    'train': 'train.jsonl',
    'validation': 'valid.jsonl',
    'test': 'test.jsonl',
}

# Query formats of Stiennon et al. 2020 (openai/summarize-from-feedback,
# `utils/experiment_helpers.py`: `tldr_task` and the CNN/DM zero-shot format,
# both followed by a response with a leading space).
REDDIT_PROMPT = ('SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\n'
                 'POST: {post}\n\nTL;DR:')
ARTICLE_PROMPT = 'Article:\n\n{article}\n\nTL;DR:'

# Parses one decoded JSON line into a record, or None to leave it out (a row
# of another split); raises RecordError when it is invalid.
Parse = Callable[[Any, str, int], 'dict | None']


def _type_name(value: Any) -> str:
  """Returns the JSON-facing name of a decoded value's type."""
  return type(value).__name__


def _is_int(value: Any) -> bool:
  """Returns whether a decoded JSON value is an integer (not a boolean)."""
  return isinstance(value, int) and not isinstance(value, bool)


# ------------------------------------------------------------------ HH-RLHF


def split_dialogue(dialogue: str, field: str, path: str | os.PathLike[str],
                   line_number: int) -> tuple[str, str]:
  """Splits an HH-RLHF dialogue before its final Assistant response.

  Args:
    dialogue: `"\\n\\nHuman: ...\\n\\nAssistant: ..."`.
    field: The record field holding it (for error messages).
    path: The file the record came from (for error messages).
    line_number: The 1-based line of the record (for error messages).

  Returns:
    `(prompt, response)`: the dialogue up to and including its last
    `HH_ASSISTANT`, and the rest (leading space kept).

  Raises:
    RecordError: The dialogue has no Assistant turn, or its final response is
      empty or whitespace-only.
  """
  end = dialogue.rfind(HH_ASSISTANT)
  if end < 0:
    raise records.RecordError(path, line_number, f'field {field!r} has no Assistant turn (no '
                              f'{HH_ASSISTANT!r})')
  end += len(HH_ASSISTANT)
  prompt, response = dialogue[:end], dialogue[end:]
  if not response.strip():
    raise records.RecordError(
        path, line_number, f'the final Assistant response of field {field!r} '
        'is empty or whitespace-only')
  return prompt, response


def parse_hh_rlhf(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps one HH-RLHF row to `{'prompt', 'chosen', 'rejected'}`.

  Args:
    record: The decoded row, `{"chosen": dialogue, "rejected": dialogue}`.
    path: The file the row came from (for error messages).
    line_number: The 1-based line of the row (for error messages).

  Returns:
    The shared prompt (ending with `HH_ASSISTANT`) and the two final
    Assistant responses, leading space kept.

  Raises:
    RecordError: A field is missing, not a string or empty; a dialogue has
      no non-empty final Assistant response; or the dialogues differ before
      their final Assistant turn.
  """
  fields = records.validate_record(record, {'chosen': str, 'rejected': str}, path, line_number)
  prompt, chosen = split_dialogue(fields['chosen'], 'chosen', path, line_number)
  rejected_prompt, rejected = split_dialogue(fields['rejected'], 'rejected', path, line_number)
  if prompt != rejected_prompt:
    at = next((i for i, (a, b) in enumerate(zip(prompt, rejected_prompt)) if a != b),
              min(len(prompt), len(rejected_prompt)))
    raise records.RecordError(
        path, line_number, "'chosen' and 'rejected' differ before their "
        f'final Assistant turn (from character {at}); the dialogues must '
        'share everything up to it')
  return {'prompt': prompt, 'chosen': chosen, 'rejected': rejected}


def hh_rlhf_comparison(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps an HH-RLHF row to `{'prompt', 'responses', 'ranks'}` (chosen first).

  Raises:
    RecordError: See `parse_hh_rlhf`; also identical responses.
  """
  return comparisons.parse_comparison(parse_hh_rlhf(record, path, line_number), path, line_number)


def hh_rlhf_demonstration(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps an HH-RLHF row to `{'prompt', 'completion'}` (the chosen response).

  Raises:
    RecordError: See `parse_hh_rlhf`.
  """
  pair = parse_hh_rlhf(record, path, line_number)
  return {'prompt': pair['prompt'], 'completion': pair['chosen']}


def hh_rlhf_prompt(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps an HH-RLHF row to `{'prompt'}`.

  Raises:
    RecordError: See `parse_hh_rlhf`.
  """
  return {'prompt': parse_hh_rlhf(record, path, line_number)['prompt']}


# --------------------------------------------------- summarize from feedback


def summary_prompt(info: Any, path: str | os.PathLike[str], line_number: int,
                   field: str = 'info') -> str:
  """Returns the query of Stiennon et al. for a post or an article.

  Args:
    info: A dict with `subreddit`, `title` and `post` (Reddit TL;DR), or
      with `article` (CNN/DM); other fields are ignored.
    path: The file the row came from (for error messages).
    line_number: The 1-based line of the row (for error messages).
    field: How error messages name `info`.

  Returns:
    `ARTICLE_PROMPT` when `info` has `article`, else `REDDIT_PROMPT`.

  Raises:
    RecordError: `info` is not an object, or a field it needs is missing,
      not a string or empty.
  """
  if not isinstance(info, dict):
    raise records.RecordError(path, line_number, f'field {field!r} must be an object, got '
                              f'{_type_name(info)}')
  if 'article' in info:
    schema, template = {'article': str}, ARTICLE_PROMPT
  else:
    schema = {'subreddit': str, 'title': str, 'post': str}
    template = REDDIT_PROMPT
  try:
    values = records.validate_record(info, schema, path, line_number)
  except records.RecordError as e:
    raise records.RecordError(path, line_number, f'{field}: {e.what}') from e
  return template.format(**values)


def summary_response(text: str) -> str:
  """Returns a summary as a response: stripped, after one space."""
  return ' ' + text.strip()


def summarize_row_split(record: Any, path: str | os.PathLike[str], line_number: int) -> str:
  """Returns a summarize-from-feedback row's `split` field.

  Raises:
    RecordError: The row is not an object or its `split` is not one of
      `SUMMARIZE_ROW_SPLITS`.
  """
  value = records.validate_record(record, {'split': str}, path, line_number)['split']
  if value not in SUMMARIZE_ROW_SPLITS:
    raise records.RecordError(
        path, line_number, f"field 'split' is {value!r}; expected one of "
        f'{list(SUMMARIZE_ROW_SPLITS)}')
  return value


def summarize_comparison(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps a summarize-from-feedback row to `{'prompt', 'responses', 'ranks'}`.

  Args:
    record: The decoded row: `info`, two `summaries` (objects with `text`)
      and `choice`, the index of the preferred one. Other fields (`worker`,
      `batch`, `split`, `extra`, a summary's `policy` and `note`) are
      ignored.
    path: The file the row came from (for error messages).
    line_number: The 1-based line of the row (for error messages).

  Returns:
    The query (see `summary_prompt`), the two summaries in file order (see
    `summary_response`) and ranks `[0, 1]` or `[1, 0]` (summary `choice`
    ranked 0).

  Raises:
    RecordError: A field is missing or malformed, `choice` is not 0 or 1,
      or the summaries are empty or identical.
  """
  error = functools.partial(records.RecordError, path, line_number)
  if not isinstance(record, dict):
    raise error(f'expected a JSON object, got {_type_name(record)}')
  for field in ('info', 'summaries', 'choice'):
    if field not in record:
      raise error(f'missing field {field!r}')
  prompt = summary_prompt(record['info'], path, line_number)
  summaries = record['summaries']
  if not isinstance(summaries, list) or len(summaries) != 2:
    got = (f'{len(summaries)} items' if isinstance(summaries, list) else _type_name(summaries))
    raise error(f"field 'summaries' must be a list of 2 summaries, got {got}")
  texts = []
  for i, summary in enumerate(summaries):
    if not isinstance(summary, dict) or not isinstance(summary.get('text'), str):
      raise error(f"summary {i} must be an object with a string 'text'")
    texts.append(summary_response(summary['text']))
  choice = record['choice']
  if not _is_int(choice) or choice not in (0, 1):
    raise error(f"field 'choice' must be 0 or 1 (the index of the preferred "
                f'summary), got {choice!r}')
  return comparisons.parse_comparison({'prompt': prompt, 'responses': texts, 'best': choice}, path,
                                      line_number)


def summarize_split_parser(split: str) -> Parse:
  """Returns a parser keeping the rows of one of our splits.

  Args:
    split: A key of `SUMMARIZE_SPLITS`.

  Returns:
    A `Parse` that returns `summarize_comparison` of the rows whose `split`
    field belongs to `split`, and None for the others. Rows whose `split`
    field is invalid are invalid in every split.

  Raises:
    ValueError: `split` is not a key of `SUMMARIZE_SPLITS`.
  """
  if split not in SUMMARIZE_SPLITS:
    raise ValueError(f'No split {split!r} in summarize-from-feedback data; '
                     f'splits (by row field): {dict(SUMMARIZE_SPLITS)}.')
  wanted = SUMMARIZE_SPLITS[split]

  def parse(record: Any, path: str, line_number: int) -> dict | None:
    if summarize_row_split(record, path, line_number) not in wanted:
      return None
    return summarize_comparison(record, path, line_number)

  return parse


# ------------------------------------------------------------------- TL;DR

_TLDR_PROMPT_SCHEMA = {'subreddit': str, 'title': str, 'post': str}
_TLDR_SCHEMA = {**_TLDR_PROMPT_SCHEMA, 'summary': str}


def tldr_demonstration(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps a TL;DR row to `{'prompt', 'completion'}`.

  Raises:
    RecordError: A field of `{"subreddit", "title", "post", "summary"}` is
      missing, not a string or empty.
  """
  fields = records.validate_record(record, _TLDR_SCHEMA, path, line_number)
  return {
      'prompt': REDDIT_PROMPT.format(**fields), 'completion': summary_response(fields['summary'])
  }


def tldr_prompt(record: Any, path: str | os.PathLike[str], line_number: int) -> dict:
  """Maps a TL;DR row to `{'prompt'}` (its `summary` is not needed).

  Raises:
    RecordError: A field of `{"subreddit", "title", "post"}` is missing, not
      a string or empty.
  """
  fields = records.validate_record(record, _TLDR_PROMPT_SCHEMA, path, line_number)
  return {'prompt': REDDIT_PROMPT.format(**fields)}
