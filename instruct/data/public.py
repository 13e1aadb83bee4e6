"""Public preference datasets read from local files in their published formats.

Nothing is downloaded: point `load_split(..., data_format=...)` (or
`config.data.format` with `config.data.train_file` / `validation_file`) at a
local copy. Each format maps its rows to this repo's records: demonstrations
`{'prompt', 'completion'}`, prompts `{'prompt'}` and comparisons
`{'prompt', 'responses', 'ranks'}` (see `comparisons`). Invalid rows raise
`RecordError` (`path:line: what`, the line counted in the decompressed file),
or are skipped and counted with `skip_invalid`.

Formats (`FORMAT_KINDS` lists the kinds each one provides):

* 'hh_rlhf': Anthropic HH-RLHF (github.com/anthropics/hh-rlhf). Gzip (or
  plain) JSON lines `{"chosen": dialogue, "rejected": dialogue}`, dialogues
  being `"\\n\\nHuman: ...\\n\\nAssistant: ..."` that share everything up to
  their final Assistant turn. The prompt is the chosen dialogue up to and
  including its last `HH_ASSISTANT`; it must equal the rejected dialogue's.
  The responses are the final Assistant turns, leading space kept.
  Demonstrations are prompt + chosen response; prompts are the prompt. A
  path may be a file, a subset directory (`helpful-base/`, ...: the split's
  file from `HH_SPLIT_FILES`, `.jsonl.gz` or `.jsonl`) or a directory of
  subset directories (the repository root: every subset holding the split's
  file, in name order).
* 'summarize_from_feedback': the comparisons of Stiennon et al. 2020
  (github.com/openai/summarize-from-feedback, `comparisons/batch*.json`).
  JSON lines `{"info": {...}, "summaries": [{"text", ...}, {"text", ...}],
  "choice": 0 | 1, "split": ..., ...}`. The prompt is `REDDIT_PROMPT` (or
  `ARTICLE_PROMPT` for CNN/DM rows, whose `info` has `article`), the
  responses are `" " + text.strip()` and summary `choice` is preferred.
  Rows are selected by their `split` field (`SUMMARIZE_SPLITS`), so the
  train and validation paths may be the same; a row whose split cannot be
  read is invalid (and, skipped, counted) in every split. A path may be a
  file or a directory, whose `*.json` / `*.jsonl` files (not recursive, name
  order) are read as one dataset.
* 'tldr': the filtered Reddit TL;DR of Stiennon et al. 2020 (`train.jsonl`,
  `valid.jsonl`, `test.jsonl`; JSON lines `{"id", "subreddit", "title",
  "post", "summary"}`). Demonstrations are `REDDIT_PROMPT` +
  `" " + summary.strip()`; prompts are `REDDIT_PROMPT`. A path may be a file
  or a directory holding the split's file from `TLDR_SPLIT_FILES`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from instruct.data import builders
from instruct.data import comparisons
from instruct.data import records

HH_RLHF = 'hh_rlhf'
SUMMARIZE_FROM_FEEDBACK = 'summarize_from_feedback'
TLDR = 'tldr'

# The kinds of records (see `builders.BUILDERS`) each public format provides.
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
    raise records.RecordError(
        path, line_number, f'field {field!r} has no Assistant turn (no '
        f'{HH_ASSISTANT!r})')
  end += len(HH_ASSISTANT)
  prompt, response = dialogue[:end], dialogue[end:]
  if not response.strip():
    raise records.RecordError(
        path, line_number, f'the final Assistant response of field {field!r} '
        'is empty or whitespace-only')
  return prompt, response


def parse_hh_rlhf(record: Any, path: str | os.PathLike[str],
                  line_number: int) -> dict:
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
  fields = records.validate_record(record, {'chosen': str, 'rejected': str},
                                   path, line_number)
  prompt, chosen = split_dialogue(fields['chosen'], 'chosen', path,
                                  line_number)
  rejected_prompt, rejected = split_dialogue(fields['rejected'], 'rejected',
                                             path, line_number)
  if prompt != rejected_prompt:
    at = next((i for i, (a, b) in enumerate(zip(prompt, rejected_prompt))
               if a != b), min(len(prompt), len(rejected_prompt)))
    raise records.RecordError(
        path, line_number, "'chosen' and 'rejected' differ before their "
        f'final Assistant turn (from character {at}); the dialogues must '
        'share everything up to it')
  return {'prompt': prompt, 'chosen': chosen, 'rejected': rejected}


def hh_rlhf_comparison(record: Any, path: str | os.PathLike[str],
                       line_number: int) -> dict:
  """Maps an HH-RLHF row to `{'prompt', 'responses', 'ranks'}` (chosen first).

  Raises:
    RecordError: See `parse_hh_rlhf`; also identical responses.
  """
  return comparisons.parse_comparison(
      parse_hh_rlhf(record, path, line_number), path, line_number)


def hh_rlhf_demonstration(record: Any, path: str | os.PathLike[str],
                          line_number: int) -> dict:
  """Maps an HH-RLHF row to `{'prompt', 'completion'}` (the chosen response).

  Raises:
    RecordError: See `parse_hh_rlhf`.
  """
  pair = parse_hh_rlhf(record, path, line_number)
  return {'prompt': pair['prompt'], 'completion': pair['chosen']}


def hh_rlhf_prompt(record: Any, path: str | os.PathLike[str],
                   line_number: int) -> dict:
  """Maps an HH-RLHF row to `{'prompt'}`.

  Raises:
    RecordError: See `parse_hh_rlhf`.
  """
  return {'prompt': parse_hh_rlhf(record, path, line_number)['prompt']}


# --------------------------------------------------- summarize from feedback


def summary_prompt(info: Any, path: str | os.PathLike[str],
                   line_number: int, field: str = 'info') -> str:
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
    raise records.RecordError(
        path, line_number, f'field {field!r} must be an object, got '
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


def summarize_row_split(record: Any, path: str | os.PathLike[str],
                        line_number: int) -> str:
  """Returns a summarize-from-feedback row's `split` field.

  Raises:
    RecordError: The row is not an object or its `split` is not one of
      `SUMMARIZE_ROW_SPLITS`.
  """
  value = records.validate_record(record, {'split': str}, path,
                                  line_number)['split']
  if value not in SUMMARIZE_ROW_SPLITS:
    raise records.RecordError(
        path, line_number, f"field 'split' is {value!r}; expected one of "
        f'{list(SUMMARIZE_ROW_SPLITS)}')
  return value


def summarize_comparison(record: Any, path: str | os.PathLike[str],
                         line_number: int) -> dict:
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
    got = (f'{len(summaries)} items' if isinstance(summaries, list) else
           _type_name(summaries))
    raise error(f"field 'summaries' must be a list of 2 summaries, got {got}")
  texts = []
  for i, summary in enumerate(summaries):
    if not isinstance(summary, dict) or not isinstance(summary.get('text'),
                                                       str):
      raise error(f"summary {i} must be an object with a string 'text'")
    texts.append(summary_response(summary['text']))
  choice = record['choice']
  if not _is_int(choice) or choice not in (0, 1):
    raise error(f"field 'choice' must be 0 or 1 (the index of the preferred "
                f'summary), got {choice!r}')
  return comparisons.parse_comparison(
      {'prompt': prompt, 'responses': texts, 'best': choice}, path,
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


def tldr_demonstration(record: Any, path: str | os.PathLike[str],
                       line_number: int) -> dict:
  """Maps a TL;DR row to `{'prompt', 'completion'}`.

  Raises:
    RecordError: A field of `{"subreddit", "title", "post", "summary"}` is
      missing, not a string or empty.
  """
  fields = records.validate_record(record, _TLDR_SCHEMA, path, line_number)
  return {'prompt': REDDIT_PROMPT.format(**fields),
          'completion': summary_response(fields['summary'])}


def tldr_prompt(record: Any, path: str | os.PathLike[str],
                line_number: int) -> dict:
  """Maps a TL;DR row to `{'prompt'}` (its `summary` is not needed).

  Raises:
    RecordError: A field of `{"subreddit", "title", "post"}` is missing, not
      a string or empty.
  """
  fields = records.validate_record(record, _TLDR_PROMPT_SCHEMA, path,
                                   line_number)
  return {'prompt': REDDIT_PROMPT.format(**fields)}


# -------------------------------------------------------- files and reading


def _split_file(directory: str, stem: str,
                suffixes: Sequence[str]) -> str | None:
  """Returns the first existing `directory/stem+suffix`, or None."""
  for suffix in suffixes:
    candidate = os.path.join(directory, stem + suffix)
    if os.path.isfile(candidate):
      return candidate
  return None


def _split_key(mapping: Mapping[str, str], split: str, what: str) -> str:
  """Returns `mapping[split]`, or raises ValueError naming the known splits."""
  if split not in mapping:
    raise ValueError(f'No split {split!r} in a {what} directory; known '
                     f'splits: {dict(mapping)}.')
  return mapping[split]


def hh_rlhf_files(path: str | os.PathLike[str], split: str) -> list[str]:
  """Returns the HH-RLHF files holding one split.

  Args:
    path: A file (returned as is), a subset directory holding
      `{HH_SPLIT_FILES[split]}.jsonl.gz` (preferred) or `.jsonl`, or a
      directory of such subset directories.
    split: Our split name (a key of `HH_SPLIT_FILES`; only used for
      directories).

  Raises:
    FileNotFoundError: No such file, or no split file in the directory.
    ValueError: A directory and an unknown split.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'HH-RLHF path not found: {path}')
  stem = _split_key(HH_SPLIT_FILES, split, 'HH-RLHF')
  suffixes = ('.jsonl.gz', '.jsonl')
  found = _split_file(path, stem, suffixes)
  if found:
    return [found]
  subsets = sorted(name for name in os.listdir(path)
                   if not name.startswith('.') and
                   os.path.isdir(os.path.join(path, name)))
  files = [f for f in (_split_file(os.path.join(path, name), stem, suffixes)
                       for name in subsets) if f]
  if not files:
    raise FileNotFoundError(
        f'No HH-RLHF {stem}.jsonl.gz (or {stem}.jsonl) for split {split!r} in '
        f'{path} or its subset directories.')
  return files


def summarize_files(path: str | os.PathLike[str]) -> list[str]:
  """Returns the summarize-from-feedback comparison files at `path`.

  Args:
    path: A file (returned as is) or a directory, whose `*.json` and
      `*.jsonl` files (not recursive) are returned in name order.

  Raises:
    FileNotFoundError: No such path, or no such file in the directory.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'summarize-from-feedback path not found: {path}')
  files = [os.path.join(path, name) for name in sorted(os.listdir(path))
           if name.endswith(('.json', '.jsonl')) and not name.startswith('.')
           and os.path.isfile(os.path.join(path, name))]
  if not files:
    raise FileNotFoundError(
        f'No summarize-from-feedback comparison files (*.json, *.jsonl) in '
        f'{path}.')
  return files


def tldr_files(path: str | os.PathLike[str], split: str) -> list[str]:
  """Returns the TL;DR file of one split.

  Args:
    path: A file (returned as is) or a directory holding
      `TLDR_SPLIT_FILES[split]`.
    split: Our split name (only used for directories).

  Raises:
    FileNotFoundError: No such file.
    ValueError: A directory and an unknown split.
  """
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f'TL;DR path not found: {path}')
  name = _split_key(TLDR_SPLIT_FILES, split, 'TL;DR')
  found = os.path.join(path, name)
  if not os.path.isfile(found):
    raise FileNotFoundError(f'No TL;DR {name} for split {split!r} in {path}.')
  return [found]


_PARSERS: Mapping[tuple[str, str], Parse] = {
    (HH_RLHF, 'comparisons'): hh_rlhf_comparison,
    (HH_RLHF, 'demonstrations'): hh_rlhf_demonstration,
    (HH_RLHF, 'prompts'): hh_rlhf_prompt,
    (TLDR, 'demonstrations'): tldr_demonstration,
    (TLDR, 'prompts'): tldr_prompt,
}


def read_split(data_format: str, kind: str, path: str | os.PathLike[str],
               split: str, skip_invalid: bool = False
               ) -> tuple[list[dict], int]:
  """Reads one split of a public dataset as records of `kind`.

  Args:
    data_format: A key of `FORMAT_KINDS`.
    kind: One of `FORMAT_KINDS[data_format]`.
    path: A file or directory (see the module docstring).
    split: Our split name: selects the file in a directory, and the rows of
      summarize-from-feedback data.
    skip_invalid: Skip and count invalid rows instead of raising.

  Returns:
    `(records, num_skipped)`, see `records.read_json_lines`.

  Raises:
    ValueError: An unsupported format or kind, an unknown split, or no
      records.
    FileNotFoundError: A path or split file does not exist.
    RecordError: A row is invalid and `skip_invalid` is False.
  """
  check_format(kind, data_format)
  if data_format == HH_RLHF:
    paths, parse = hh_rlhf_files(path, split), _PARSERS[(HH_RLHF, kind)]
  elif data_format == TLDR:
    paths, parse = tldr_files(path, split), _PARSERS[(TLDR, kind)]
  else:
    paths, parse = summarize_files(path), summarize_split_parser(split)
  return records.read_json_lines(paths, parse, skip_invalid=skip_invalid)


def check_format(kind: str, data_format: str) -> None:
  """Raises ValueError unless public `data_format` provides `kind` records."""
  if data_format not in FORMAT_KINDS:
    allowed = sorted((builders.RECORDS_FORMAT, *FORMAT_KINDS))
    raise ValueError(f'Unknown data format {data_format!r}; allowed formats: '
                     f'{allowed}.')
  if kind not in FORMAT_KINDS[data_format]:
    raise ValueError(
        f'Data format {data_format!r} provides no {kind!r} records; it '
        f'provides {list(FORMAT_KINDS[data_format])}.')


# ------------------------------------------------------------ TFDS builders

_FEATURES: Mapping[str, Callable[[], tfds.features.FeaturesDict]] = {
    'comparisons': lambda: tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(),
        'responses': tfds.features.Sequence(tfds.features.Text()),
        'ranks': tfds.features.Sequence(np.int32),
    }),
    'demonstrations': lambda: tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(),
        'completion': tfds.features.Text(),
    }),
    'prompts': lambda: tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(),
    }),
}


class _PublicBuilder(
    builders._LocalFilesBuilder,  # pylint: disable=protected-access
    skip_registration=True):
  """One public format read as one kind of records.

  The config's files map split names to files or directories (see
  `read_split`). Invalid rows may be skipped (config `skip_invalid`); the
  count per split is logged and stored in the DatasetInfo metadata under
  `builders.NUM_SKIPPED_KEY`. The features are those of the kind's records
  builder (`builders.BUILDERS`).
  """

  SUPPORTS_SKIP_INVALID = True
  FORMAT: str = ''
  KIND: str = ''

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset info: the kind's features, with metadata."""
    return self.dataset_info_from_configs(features=_FEATURES[self.KIND](),
                                          metadata=tfds.core.MetadataDict())

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Returns one example generator per split of the config."""
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_split(split, path)
            for split, path in self.builder_config.files.items()}

  def _generate_split(self, split: str,
                      path: str) -> Iterator[tuple[int, dict]]:
    """Yields `(record_index, record)` of one split, recording skips."""
    examples, num_skipped = read_split(
        self.FORMAT, self.KIND, path, split,
        skip_invalid=self.builder_config.skip_invalid)
    self.info.metadata.setdefault(builders.NUM_SKIPPED_KEY, {})[split] = (
        num_skipped)
    if num_skipped:
      logging.warning('Split %r: skipped %d invalid %s rows of %s '
                      '(skip_invalid=True).', split, num_skipped, self.FORMAT,
                      path)
    yield from enumerate(examples)


class HHRLHFComparisons(_PublicBuilder, skip_registration=True):
  """Anthropic HH-RLHF pairs as comparisons (chosen ranked first)."""

  name = 'hh_rlhf_comparisons'
  FORMAT, KIND = HH_RLHF, 'comparisons'


class HHRLHFDemonstrations(_PublicBuilder, skip_registration=True):
  """Anthropic HH-RLHF as demonstrations: prompt and chosen response."""

  name = 'hh_rlhf_demonstrations'
  FORMAT, KIND = HH_RLHF, 'demonstrations'


class HHRLHFPrompts(_PublicBuilder, skip_registration=True):
  """Anthropic HH-RLHF dialogues up to their final Assistant turn."""

  name = 'hh_rlhf_prompts'
  FORMAT, KIND = HH_RLHF, 'prompts'


class SummarizeFromFeedbackComparisons(_PublicBuilder,
                                       skip_registration=True):
  """Stiennon et al.'s summary comparisons (rows chosen by `split` field)."""

  name = 'summarize_from_feedback_comparisons'
  FORMAT, KIND = SUMMARIZE_FROM_FEEDBACK, 'comparisons'


class TLDRDemonstrations(_PublicBuilder, skip_registration=True):
  """Filtered Reddit TL;DR posts and reference summaries."""

  name = 'tldr_demonstrations'
  FORMAT, KIND = TLDR, 'demonstrations'


class TLDRPrompts(_PublicBuilder, skip_registration=True):
  """Filtered Reddit TL;DR posts as queries."""

  name = 'tldr_prompts'
  FORMAT, KIND = TLDR, 'prompts'


BUILDERS: Mapping[tuple[str, str], type[_PublicBuilder]] = {
    (b.FORMAT, b.KIND): b
    for b in (HHRLHFComparisons, HHRLHFDemonstrations, HHRLHFPrompts,
              SummarizeFromFeedbackComparisons, TLDRDemonstrations,
              TLDRPrompts)
}


def builder_class(kind: str, data_format: str) -> type[_PublicBuilder]:
  """Returns the builder of `kind` records in public `data_format`.

  Raises:
    ValueError: See `check_format`.
  """
  check_format(kind, data_format)
  return BUILDERS[(data_format, kind)]
