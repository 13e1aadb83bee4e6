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

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from instruct.data import local_files
from instruct.data import records
from instruct.data.public_rows import (FORMAT_KINDS, HH_RLHF, HH_SPLIT_FILES, Parse,
                                       SUMMARIZE_FROM_FEEDBACK, TLDR, TLDR_SPLIT_FILES,
                                       hh_rlhf_comparison, hh_rlhf_demonstration, hh_rlhf_prompt,
                                       summarize_split_parser, tldr_demonstration, tldr_prompt)

# -------------------------------------------------------- files and reading


def _split_file(directory: str, stem: str, suffixes: Sequence[str]) -> str | None:
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
                   if not name.startswith('.') and os.path.isdir(os.path.join(path, name)))
  files = [
      f for f in (_split_file(os.path.join(path, name), stem, suffixes) for name in subsets) if f
  ]
  if not files:
    raise FileNotFoundError(f'No HH-RLHF {stem}.jsonl.gz (or {stem}.jsonl) for split {split!r} in '
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
  files = [
      os.path.join(path, name) for name in sorted(os.listdir(path))
      if name.endswith(('.json', '.jsonl')) and not name.startswith('.')
      and os.path.isfile(os.path.join(path, name))
  ]
  if not files:
    raise FileNotFoundError(f'No summarize-from-feedback comparison files (*.json, *.jsonl) in '
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


def read_split(data_format: str, kind: str, path: str | os.PathLike[str], split: str,
               skip_invalid: bool = False) -> tuple[list[dict], int]:
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
    allowed = sorted((local_files.RECORDS_FORMAT, *FORMAT_KINDS))
    raise ValueError(f'Unknown data format {data_format!r}; allowed formats: '
                     f'{allowed}.')
  if kind not in FORMAT_KINDS[data_format]:
    raise ValueError(f'Data format {data_format!r} provides no {kind!r} records; it '
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


class _PublicBuilder(local_files.LocalFilesBuilder, skip_registration=True):
  """One public format read as one kind of records.

  The config's files map split names to files or directories (see
  `read_split`). Invalid rows may be skipped (config `skip_invalid`); the
  count per split is logged and stored in the DatasetInfo metadata under
  `local_files.NUM_SKIPPED_KEY`. The features are those of the kind's records
  builder (`instruct.data.builders.BUILDERS`).
  """

  SUPPORTS_SKIP_INVALID = True
  FORMAT: str = ''
  KIND: str = ''

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset info: the kind's features, with metadata."""
    return self.dataset_info_from_configs(features=_FEATURES[self.KIND](),
                                          metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Returns one example generator per split of the config."""
    del dl_manager  # Nothing is downloaded.
    return {
        split: self._generate_split(split, path)
        for split, path in self.builder_config.files.items()
    }

  def _generate_split(self, split: str, path: str) -> Iterator[tuple[int, dict]]:
    """Yields `(record_index, record)` of one split, recording skips."""
    examples, num_skipped = read_split(self.FORMAT, self.KIND, path, split,
                                       skip_invalid=self.builder_config.skip_invalid)
    self.info.metadata.setdefault(local_files.NUM_SKIPPED_KEY, {})[split] = num_skipped
    if num_skipped:
      logging.warning('Split %r: skipped %d invalid %s rows of %s '
                      '(skip_invalid=True).', split, num_skipped, self.FORMAT, path)
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


class SummarizeFromFeedbackComparisons(_PublicBuilder, skip_registration=True):
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
              SummarizeFromFeedbackComparisons, TLDRDemonstrations, TLDRPrompts)
}


def builder_class(kind: str, data_format: str) -> type[_PublicBuilder]:
  """Returns the builder of `kind` records in public `data_format`.

  Raises:
    ValueError: See `check_format`.
  """
  check_format(kind, data_format)
  return BUILDERS[(data_format, kind)]
