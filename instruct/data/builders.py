"""TFDS builders that prepare local record files as ArrayRecord datasets.

The builders never download anything: each split is generated from a local
file named in a `LocalFilesConfig`. The config name is a fingerprint of the
files (absolute path, size and modification time), so editing a file makes
TFDS prepare a fresh dataset version instead of reusing a stale one.
`load_split` prepares (or reuses) a dataset and returns a random-access source
of python-string examples; it does not import TensorFlow.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from instruct.data import records

_VERSION = tfds.core.Version('1.0.0')
_RELEASE_NOTES = {'1.0.0': 'Initial release.'}


def files_fingerprint(files: Mapping[str, str]) -> str:
  """Returns a hex digest of each split's absolute path, size and mtime.

  Args:
    files: Split name mapped to a local file path.

  Raises:
    FileNotFoundError: One of the files does not exist.
  """
  digest = hashlib.sha1()
  for split in sorted(files):
    path = os.path.abspath(files[split])
    if not os.path.isfile(path):
      raise FileNotFoundError(f'Record file for split {split!r} not found: '
                              f'{path}')
    stat = os.stat(path)
    digest.update(f'{split}\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0'
                  .encode('utf-8'))
  return digest.hexdigest()


class LocalFilesConfig(tfds.core.BuilderConfig):
  """Builder config naming one local file per split.

  Attributes:
    files: Split name mapped to the absolute path of its file.
  """

  def __init__(self, *, files: Mapping[str, str]) -> None:
    """Initializes the config; its name fingerprints the files' contents.

    Args:
      files: Split name (e.g. 'train') mapped to a local file path.

    Raises:
      ValueError: `files` is empty.
      FileNotFoundError: One of the files does not exist.
    """
    if not files:
      raise ValueError('LocalFilesConfig needs at least one split file.')
    absolute = {split: os.path.abspath(path) for split, path in files.items()}
    super().__init__(name=f'files-{files_fingerprint(absolute)[:12]}',
                     version=_VERSION, release_notes=_RELEASE_NOTES,
                     description=f'Local files: {absolute}')
    self.files = absolute


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder,
                         skip_registration=True):
  """Shared logic: one split per config file, keyed by record index."""

  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """Returns None: these builders have no checksums file beside the code.

    TFDS's default looks up the module's resource path, which needs the
    optional `importlib_resources` package for modules inside packages.
    """
    return None

  def _split_generators(
      self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Returns one example generator per split file of the config."""
    del dl_manager  # Nothing is downloaded.
    return {split: self._generate_examples(path)
            for split, path in self.builder_config.files.items()}

  def _read(self, path: str) -> list[dict]:
    """Reads and validates the records of one file."""
    raise NotImplementedError

  def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
    """Yields `(record_index, record)`; bad records raise RecordError."""
    yield from enumerate(self._read(path))


class Demonstrations(_LocalFilesBuilder, skip_registration=True):
  """Prompt/completion demonstrations from local JSON-lines files."""

  name = 'instruct_demonstrations'

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset info: text features `prompt` and `completion`."""
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'prompt': tfds.features.Text(),
            'completion': tfds.features.Text(),
        }))

  def _read(self, path: str) -> list[dict]:
    """Reads demonstrations validated against DEMONSTRATION_SCHEMA."""
    return records.read_jsonl(path, records.DEMONSTRATION_SCHEMA)


class PlainText(_LocalFilesBuilder, skip_registration=True):
  """Pretraining text from local `.jsonl` or blank-line-separated files."""

  name = 'instruct_plain_text'

  def _info(self) -> tfds.core.DatasetInfo:
    """Returns the dataset info: one text feature `text`."""
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}))

  def _read(self, path: str) -> list[dict]:
    """Reads text records (see `records.read_text_records`)."""
    return records.read_text_records(path)


BUILDERS: Mapping[str, type[_LocalFilesBuilder]] = {
    'demonstrations': Demonstrations,
    'text': PlainText,
}


class StringSource:
  """Random-access view of a TFDS data source giving python strings."""

  def __init__(self, source: Any) -> None:
    """Wraps `source`, whose examples are dicts of `bytes` or `str`."""
    self._source = source

  def __len__(self) -> int:
    """Returns the number of examples."""
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, str]:
    """Returns example `index` with byte values decoded as UTF-8."""
    example = self._source[index]
    return {key: value.decode('utf-8') if isinstance(value, bytes) else value
            for key, value in example.items()}


def load_split(kind: str, files: Mapping[str, str], split: str,
               data_dir: str | os.PathLike[str]) -> StringSource:
  """Prepares (or reuses) a local dataset and returns one split.

  Args:
    kind: 'demonstrations' or 'text' (see `BUILDERS`).
    files: Split name mapped to a local file path.
    split: The split to return, e.g. 'train'; a TFDS split expression such as
      'train[:10]' also works.
    data_dir: Where TFDS keeps prepared datasets.

  Preparation is not coordinated between processes: several hosts should
  not prepare the same dataset in one shared `data_dir` at the same time (use
  a per-host `data_dir`, or prepare once before starting them).

  Returns:
    A source with `len()` and `[i]` giving dicts of python strings. The
    example order is TFDS's deterministic write-time shuffle, not file order.

  Raises:
    ValueError: `kind` is unknown.
    RecordError: A record file is invalid (raised during preparation).
  """
  if kind not in BUILDERS:
    raise ValueError(f'Unknown data kind {kind!r}; allowed kinds: '
                     f'{sorted(BUILDERS)}.')
  tfds.disable_progress_bar()
  builder = BUILDERS[kind](config=LocalFilesConfig(files=files),
                           data_dir=os.fspath(data_dir),
                           file_format='array_record')
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False))
  return StringSource(builder.as_data_source(split=split))
