"""TFDS builders that prepare local record files as ArrayRecord datasets.

The builders never download anything: each split is generated from a local
file named in a `LocalFilesConfig` (see `instruct.data.local_files`, whose
base builder these and the public-format builders subclass). The config name
is a fingerprint of the files (absolute path, size and modification time), so
editing a file makes TFDS prepare a fresh dataset version instead of reusing a
stale one. `load_split` prepares (or reuses) a dataset and returns a
random-access source of python examples (strings, and lists of strings or
ints); it does not import TensorFlow. Builders that skip invalid records
(every records builder, and the public-format ones) store how many they
skipped per split in their DatasetInfo metadata, so the counts survive reuse
of the prepared dataset.

Files are this repo's record files (`data_format='records'`, the default) or
public datasets in their published formats (`data_format` one of
`public.FORMAT_KINDS`, e.g. 'hh_rlhf'; see `instruct.data.public`), whose
paths may also be directories. `builder_class` chooses the builder of a kind
and format, from `BUILDERS` or `public.BUILDERS`.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Mapping
from typing import Any

from absl import logging
import filelock
import numpy as np
import tensorflow_datasets as tfds

from instruct import distributed
from instruct.data import comparisons
from instruct.data import feedback
from instruct.data import hindsight
from instruct.data import local_files
from instruct.data import public
from instruct.data import records

# Defined in `local_files` (below `public`, which subclasses the base builder
# too) and kept importable from here.
LocalFilesConfig = local_files.LocalFilesConfig
NUM_SKIPPED_KEY = local_files.NUM_SKIPPED_KEY
RECORDS_FORMAT = local_files.RECORDS_FORMAT
files_fingerprint = local_files.files_fingerprint


def read_file(kind: str, path: str | os.PathLike[str], skip_invalid: bool = False,
              max_responses: int | None = None, *,
              line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads one file of this repo's records of `kind`, in file order.

  This is what the record builders store (before TFDS's write-time shuffle).

  Args:
    kind: 'comparisons', 'demonstrations', 'prompts', 'text', 'scored_text' or 'hindsight'.
    path: The file.
    skip_invalid: Skip and count invalid records instead of raising.
    max_responses: For comparisons, the most responses a record may have
      (default `comparisons.MAX_RESPONSES`).
    line_numbers: If True, each record is returned as `(line_number, record)`.

  Returns:
    `(records, num_skipped)`.

  Raises:
    ValueError: `kind` is unknown, or the file holds no valid records.
    RecordError: A record is invalid and `skip_invalid` is False.
    FileNotFoundError, IsADirectoryError: `path` is not a file.
  """
  if kind == 'comparisons':
    limit = comparisons.MAX_RESPONSES if max_responses is None else max_responses
    return comparisons.read_comparisons(path, skip_invalid, limit, line_numbers=line_numbers)
  if kind == 'text':
    return records.read_text_file(path, skip_invalid, line_numbers=line_numbers)
  if kind == feedback.KIND:
    return feedback.read_scored_text(path, skip_invalid, line_numbers=line_numbers)
  if kind == hindsight.KIND:
    return hindsight.read_hindsight(path, skip_invalid, line_numbers=line_numbers)
  schemas = {'demonstrations': records.DEMONSTRATION_SCHEMA, 'prompts': records.PROMPT_SCHEMA}
  if kind not in schemas:
    raise ValueError(f'Unknown data kind {kind!r}; allowed kinds: '
                     f"{sorted(['comparisons', 'text', feedback.KIND, hindsight.KIND, *schemas])}.")
  return records.read_records(path, schemas[kind], skip_invalid, line_numbers=line_numbers)


class _RecordsBuilder(local_files.LocalFilesBuilder, skip_registration=True):
  """This repo's record files of one kind (`read_file`).

  With the config's `skip_invalid`, invalid records are skipped; the count
  per split is logged and stored in the DatasetInfo metadata under
  `NUM_SKIPPED_KEY`, so it survives reuse of the prepared dataset.
  """

  SUPPORTS_SKIP_INVALID = True
  KIND: str = ''

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns the features of one record."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset info: the record's features, with metadata."""
    return self.dataset_info_from_configs(features=self._features(),
                                          metadata=tfds.core.MetadataDict())

  def _read(self, path: str) -> list[dict]:
    """Reads the records of one file, recording the skipped count of each split of it."""
    config = self.builder_config
    examples, num_skipped = read_file(self.KIND, path, skip_invalid=config.skip_invalid,
                                      max_responses=getattr(config, 'max_responses', None))
    counts = self.info.metadata.setdefault(NUM_SKIPPED_KEY, {})
    for split, split_path in config.files.items():
      if split_path == path:
        counts[split] = num_skipped
        if num_skipped:
          logging.warning('Split %r: skipped %d invalid records of %s '
                          '(skip_invalid=True).', split, num_skipped, path)
    return examples


class Demonstrations(_RecordsBuilder, skip_registration=True):
  """Prompt/completion demonstrations from local JSON-lines files."""

  name = 'instruct_demonstrations'
  KIND = 'demonstrations'

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns text features `prompt` and `completion`."""
    return tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(),
        'completion': tfds.features.Text(),
    })


class Prompts(_RecordsBuilder, skip_registration=True):
  """Prompts for RL rollouts from local JSON-lines files.

  Each record needs a non-empty string `prompt`; other fields (such as a
  demonstration's `completion`) are ignored, so demonstration files also
  work as prompt files.
  """

  name = 'instruct_prompts'
  KIND = 'prompts'

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns one text feature `prompt`."""
    return tfds.features.FeaturesDict({'prompt': tfds.features.Text()})


class PlainText(_RecordsBuilder, skip_registration=True):
  """Pretraining text from local `.jsonl` or blank-line-separated files (either gzipped)."""

  name = 'instruct_plain_text'
  KIND = 'text'

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns one text feature `text`."""
    return tfds.features.FeaturesDict({'text': tfds.features.Text()})


class ScoredText(_RecordsBuilder, skip_registration=True):
  """Pretraining text cut into scored segments (`instruct.data.feedback`)."""

  name = 'instruct_scored_text'
  KIND = feedback.KIND

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns `segments` (text) and `scores` (float64, one per segment)."""
    return tfds.features.FeaturesDict({
        'segments': tfds.features.Sequence(tfds.features.Text()),
        'scores': tfds.features.Sequence(np.float64),
    })


class Hindsight(_RecordsBuilder, skip_registration=True):
  """Demonstrations with a verdict, for hindsight relabeling (`instruct.data.hindsight`)."""

  name = 'instruct_hindsight'
  KIND = hindsight.KIND

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns `prompt`, `completion` (text) and `satisfied` (bool)."""
    return tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(),
        'completion': tfds.features.Text(),
        'satisfied': np.bool_,
    })


class Comparisons(_RecordsBuilder, skip_registration=True):
  """Ranked responses to prompts (reward-model data) from JSON-lines files.

  See `comparisons` for the accepted record shapes. The config's
  `max_responses` limits the responses of a record (more make it invalid).
  """

  name = 'instruct_comparisons'
  KIND = 'comparisons'

  def _features(self) -> tfds.features.FeaturesDict:
    """Returns `prompt`, `responses` and `ranks`."""
    return tfds.features.FeaturesDict({
        'prompt': tfds.features.Text(),
        'responses': tfds.features.Sequence(tfds.features.Text()),
        'ranks': tfds.features.Sequence(np.int32),
    })


BUILDERS: Mapping[str, type[local_files.LocalFilesBuilder]] = {
    'comparisons': Comparisons,
    'demonstrations': Demonstrations,
    'prompts': Prompts,
    'text': PlainText,
    feedback.KIND: ScoredText,
    hindsight.KIND: Hindsight,
}


def _to_python(value: Any) -> Any:
  """Converts a TFDS value to python: bytes to str, numpy to int/list."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_to_python(item) for item in value]
  return value


def _num_skipped(info: tfds.core.DatasetInfo, split: str) -> int:
  """Returns the invalid records skipped for a split (expression).

  Counts are per split file: a sliced split such as 'train[:10]' reports the
  whole file's count; 'train+validation' reports the sum.
  """
  if info.metadata is None:
    return 0
  counts = info.metadata.get(NUM_SKIPPED_KEY, {})
  return sum(int(counts.get(part.split('[')[0].strip(), 0)) for part in split.split('+'))


class StringSource:
  """Random-access view of a TFDS data source giving python values.

  Attributes:
    num_skipped: How many invalid records were skipped when preparing the
      split (0 unless prepared with `skip_invalid`).
  """

  def __init__(self, source: Any, num_skipped: int = 0) -> None:
    """Wraps `source`, whose examples are dicts of bytes, numpy or lists."""
    self._source = source
    self.num_skipped = num_skipped

  def __len__(self) -> int:
    """Returns the number of examples."""
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Returns example `index`: bytes decoded as UTF-8, sequences as lists."""
    example = self._source[index]
    return {key: _to_python(value) for key, value in example.items()}


def builder_class(kind: str,
                  data_format: str = RECORDS_FORMAT) -> type[local_files.LocalFilesBuilder]:
  """Returns the builder of `kind` records read from `data_format` files.

  Args:
    kind: 'comparisons', 'demonstrations', 'prompts' or 'text'.
    data_format: `RECORDS_FORMAT` (this repo's files, see `BUILDERS`) or a
      public format of `public.FORMAT_KINDS`.

  Raises:
    ValueError: `kind` is unknown, `data_format` is unknown, or the format
      does not provide `kind` records.
  """
  if data_format == RECORDS_FORMAT:
    if kind not in BUILDERS:
      raise ValueError(f'Unknown data kind {kind!r}; allowed kinds: '
                       f'{sorted(BUILDERS)}.')
    return BUILDERS[kind]
  return public.builder_class(kind, data_format)


def load_split(kind: str, files: Mapping[str, str], split: str, data_dir: str | os.PathLike[str],
               skip_invalid: bool = False, data_format: str = RECORDS_FORMAT,
               max_responses: int | None = None) -> StringSource:
  """Prepares (or reuses) a local dataset and returns one split.

  Args:
    kind: 'comparisons', 'demonstrations', 'prompts' or 'text' (see
      `BUILDERS`).
    files: Split name mapped to a local file path (for public formats, a
      file or a directory; see `instruct.data.public`).
    split: The split to return, e.g. 'train'; a TFDS split expression such as
      'train[:10]' also works.
    data_dir: Where TFDS keeps prepared datasets.
    skip_invalid: Skip (and count) invalid records instead of raising; only
      for builders that support it (every records builder, and every public
      format). Part of the dataset's config, so it is prepared separately
      from the strict one.
    data_format: `RECORDS_FORMAT` (this repo's JSON-lines records) or a
      public format: 'hh_rlhf', 'summarize_from_feedback' or 'tldr' (see
      `public.FORMAT_KINDS` for the kinds each provides).
    max_responses: For comparison records, the most responses a record may
      have: a record with more is invalid (a RecordError naming its line, or
      skipped with `skip_invalid`). Public comparisons have two responses.

  Preparation is not coordinated between processes: several hosts should
  not prepare the same dataset in one shared `data_dir` at the same time (use
  a per-host `data_dir`, or prepare once before starting them).

  Returns:
    A source with `len()` and `[i]` giving dicts of python values (strings,
    and lists of strings or ints), and `num_skipped` (see `StringSource`;
    also right when a prepared dataset is reused). The example order is
    TFDS's deterministic write-time shuffle, not file order.

  Raises:
    ValueError: `kind` or `data_format` is unknown, the format does not
      provide `kind` records, `skip_invalid` is given for a builder that
      does not support it, or `max_responses` for records other than
      comparisons.
    RecordError: A record file is invalid (raised during preparation).
    FileNotFoundError, IsADirectoryError: A records file is missing or is a
      directory.
  """
  builder_cls = builder_class(kind, data_format)
  if skip_invalid and not builder_cls.SUPPORTS_SKIP_INVALID:
    supported = sorted(k for k, b in BUILDERS.items() if b.SUPPORTS_SKIP_INVALID)
    raise ValueError(f'skip_invalid is not supported for kind {kind!r}; only '
                     f'for {supported} and public data formats.')
  if max_responses is not None and kind != 'comparisons':
    raise ValueError(f'max_responses is only for comparisons, not {kind!r} records.')
  if data_format != RECORDS_FORMAT or (max_responses is not None
                                       and max_responses >= comparisons.MAX_RESPONSES):
    max_responses = None  # No limit beyond the format's own (public comparisons are pairs).
  tfds.disable_progress_bar()
  config = LocalFilesConfig(files=files, skip_invalid=skip_invalid,
                            allow_directories=(data_format
                                               != RECORDS_FORMAT), max_responses=max_responses)
  make = lambda: builder_cls(config=config, data_dir=os.fspath(data_dir),  # noqa: E731
                             file_format='array_record')
  builder = make()
  # Several processes of one run (or several runs) sharing a data directory prepare a dataset
  # once: the first to take the lock prepares it; the others, once they have the lock, open a
  # new builder (one opened before reads the dataset's info as it was then: no splits) and
  # find it prepared. Hosts with their own disks each prepare the same copy.
  os.makedirs(os.path.dirname(builder.data_dir), exist_ok=True)
  with filelock.FileLock(builder.data_dir + '.lock'):
    builder = make()
    if not os.path.isdir(builder.data_dir) or not os.listdir(builder.data_dir):
      logging.info('Preparing %s from local files %s into %s.', builder.name, dict(files),
                   builder.data_dir)
    # TFDS prints "Downloading and preparing ..." on stdout even for local files; nothing is
    # downloaded, so keep that line out of the output.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
  source = StringSource(builder.as_data_source(split=split),
                        num_skipped=_num_skipped(builder.info, split))
  # The split's file; a split expression ('train[:10%]', 'train+validation') names its first.
  first = split.split('[')[0].split('+')[0]
  distributed.check_same_data(f'split {split!r} ({files.get(first, dict(files))})', source)
  return source
