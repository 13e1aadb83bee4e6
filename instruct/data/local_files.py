"""The base of the TFDS builders: one local file (or directory) per split.

Nothing is downloaded: each split is generated from a local file named in a
`LocalFilesConfig`. The config name is a fingerprint of the files (absolute
path, size and modification time), so editing a file makes TFDS prepare a
fresh dataset version instead of reusing a stale one.

This module is the bottom of the builders' layering: `LocalFilesBuilder` is
subclassed by this repo's record builders (`instruct.data.builders`) and by
the public-format builders (`instruct.data.public`), and `builders` (which
imports `public`) chooses between them by data format.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

_VERSION = tfds.core.Version('1.0.0')
_RELEASE_NOTES = {'1.0.0': 'Initial release.'}
# The data format of this repo's own record files (see `records`,
# `comparisons`); other formats are public datasets (`instruct.data.public`).
RECORDS_FORMAT = 'records'
# DatasetInfo metadata key: split name mapped to its skipped-record count.
NUM_SKIPPED_KEY = 'num_skipped'


def _directory_files(directory: str) -> Iterator[str]:
  """Yields the files under `directory` in a fixed order, skipping dot names."""
  for root, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(names):
      if not name.startswith('.'):
        yield os.path.join(root, name)


def files_fingerprint(files: Mapping[str, str], allow_directories: bool = False) -> str:
  """Returns a hex digest of each split's absolute path, size and mtime.

  Args:
    files: Split name mapped to a local file path.
    allow_directories: Whether a path may be a directory; its digest covers
      every file under it (recursively, dot names skipped).

  Raises:
    FileNotFoundError: One of the files does not exist.
    IsADirectoryError: A path is a directory and `allow_directories` is
      False.
  """
  digest = hashlib.sha1()
  for split in sorted(files):
    path = os.path.abspath(files[split])
    if os.path.isdir(path):
      if not allow_directories:
        raise IsADirectoryError(f'Record file for split {split!r} is a directory: {path}; '
                                'records are read from one file per split (only public '
                                'data formats read directories)')
      paths = list(_directory_files(path))
    elif os.path.isfile(path):
      paths = [path]
    else:
      raise FileNotFoundError(f'Record file for split {split!r} not found: '
                              f'{path}')
    for file_path in paths:
      stat = os.stat(file_path)
      digest.update(f'{split}\0{file_path}\0{stat.st_size}\0{stat.st_mtime_ns}\0'.encode('utf-8'))
  return digest.hexdigest()


class LocalFilesConfig(tfds.core.BuilderConfig):
  """Builder config naming one local file (or directory) per split.

  Attributes:
    files: Split name mapped to the absolute path of its file.
    skip_invalid: Whether invalid records are skipped (and counted) instead
      of failing preparation; only some builders support it.
    max_responses: The most responses a comparison record may have (more
      make it invalid), or None for no limit beyond the format's own.
  """

  def __init__(self, *, files: Mapping[str, str], skip_invalid: bool = False,
               allow_directories: bool = False, max_responses: int | None = None) -> None:
    """Initializes the config; its name fingerprints the files' contents.

    Args:
      files: Split name (e.g. 'train') mapped to a local file path.
      skip_invalid: Whether to skip invalid records; when True the name ends
        with '-skip-invalid' (so both datasets can coexist).
      allow_directories: Whether a path may be a directory (public formats);
        the name then fingerprints every file under it.
      max_responses: For comparisons, the most responses a record may have;
        when set the name ends with '-max{max_responses}', since the limit
        decides which records are valid.

    Raises:
      ValueError: `files` is empty.
      FileNotFoundError: One of the files does not exist.
      IsADirectoryError: A path is a directory and `allow_directories` is
        False.
    """
    if not files:
      raise ValueError('LocalFilesConfig needs at least one split file.')
    absolute = {split: os.path.abspath(path) for split, path in files.items()}
    suffix = f'-max{max_responses}' if max_responses is not None else ''
    suffix += '-skip-invalid' if skip_invalid else ''
    fingerprint = files_fingerprint(absolute, allow_directories)
    super().__init__(name=f'files-{fingerprint[:12]}{suffix}', version=_VERSION,
                     release_notes=_RELEASE_NOTES, description=f'Local files: {absolute}{suffix}')
    self.files = absolute
    self.skip_invalid = bool(skip_invalid)
    self.max_responses = max_responses


class LocalFilesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared logic: one split per config file, keyed by record index."""

  VERSION = _VERSION
  RELEASE_NOTES = _RELEASE_NOTES
  # Whether `_read` honours `LocalFilesConfig.skip_invalid`.
  SUPPORTS_SKIP_INVALID = False

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """Returns None: these builders have no checksums file beside the code.

    TFDS's default looks up the module's resource path, which needs the
    optional `importlib_resources` package for modules inside packages.
    """
    return None

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    """Returns one example generator per split file of the config."""
    del dl_manager  # Nothing is downloaded.
    return {
        split: self._generate_examples(path) for split, path in self.builder_config.files.items()
    }

  def _read(self, path: str) -> list[dict]:
    """Reads and validates the records of one file."""
    raise NotImplementedError

  def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
    """Yields `(record_index, record)`; bad records raise RecordError."""
    yield from enumerate(self._read(path))
