"""Reading and validating local record files.

Records are dictionaries of non-empty strings. Demonstrations, prompts (for
RL rollouts) and JSON-lines pretraining text are stored one JSON object per
line; plain-text pretraining files hold one record per blank-line-separated
paragraph. Fields outside a schema are ignored, so demonstration files are
also valid prompt files. Files named `*.gz` are gunzipped.

Files are UTF-8, decoded one line at a time, so a line that is not valid
UTF-8 is an invalid record like any other (named by its line, and skipped
with `skip_invalid`); a UTF-8 byte order mark at the start of a file is
dropped. Every validation error is a `RecordError` whose message starts with
`path:line:` (1-based) so the offending record can be found directly.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

DEMONSTRATION_SCHEMA: Mapping[str, type] = {'prompt': str, 'completion': str}
PROMPT_SCHEMA: Mapping[str, type] = {'prompt': str}
TEXT_SCHEMA: Mapping[str, type] = {'text': str}

_BOM = b'\xef\xbb\xbf'


class RecordError(ValueError):
  """A record file holds an invalid record.

  Attributes:
    path: The file holding the bad record.
    line_number: The 1-based line number of the bad record.
    what: What is wrong with the record.
  """

  def __init__(self, path: str | os.PathLike[str], line_number: int, what: str) -> None:
    """Initializes the error with message `f"{path}:{line_number}: {what}"`."""
    super().__init__(f'{path}:{line_number}: {what}')
    self.path = os.fspath(path)
    self.line_number = line_number
    self.what = what

  def __reduce__(self) -> tuple[type, tuple[str, int, str]]:
    """Supports pickling (e.g. across worker processes)."""
    return type(self), (self.path, self.line_number, self.what)


def check_file(path: str | os.PathLike[str]) -> None:
  """Raises unless `path` is a regular file.

  Raises:
    IsADirectoryError: `path` is a directory.
    FileNotFoundError: `path` does not exist (or is not a regular file).
  """
  if os.path.isdir(path):
    raise IsADirectoryError(f'Record file is a directory: {os.fspath(path)} (records are read '
                            'from one file per split)')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Record file not found: {os.fspath(path)}')


def _type_name(value: Any) -> str:
  """Returns the JSON-facing name of a decoded value's type."""
  return type(value).__name__


def validate_record(record: Any, schema: Mapping[str, type], path: str | os.PathLike[str],
                    line_number: int) -> dict:
  """Checks one decoded record against a schema.

  Args:
    record: The decoded JSON value.
    schema: Required field names mapped to their Python types. String fields
      must be non-empty and not whitespace-only. Extra fields are ignored.
    path: The file the record came from (for error messages).
    line_number: The 1-based line of the record (for error messages).

  Returns:
    A dict holding exactly the schema's fields.

  Raises:
    RecordError: The record is not an object, lacks a field, has a field of
      the wrong type, or has an empty string field.
  """
  if not isinstance(record, dict):
    raise RecordError(path, line_number, f'expected a JSON object, got {_type_name(record)}')
  out = {}
  for field, field_type in schema.items():
    if field not in record:
      raise RecordError(path, line_number, f'missing field {field!r}')
    value = record[field]
    # bool is a subclass of int; a JSON true is never a valid int field.
    wrong_bool = isinstance(value, bool) and field_type is not bool
    if not isinstance(value, field_type) or wrong_bool:
      raise RecordError(
          path, line_number, f'field {field!r} must be of type {field_type.__name__}, '
          f'got {_type_name(value)}')
    if isinstance(value, str) and not value.strip():
      raise RecordError(path, line_number, f'field {field!r} is empty or whitespace-only')
    out[field] = value
  return out


def _open_binary(path: str | os.PathLike[str]) -> BinaryIO:
  """Opens a file for reading bytes, gunzipping it when its name ends in `.gz`."""
  if os.fspath(path).endswith('.gz'):
    return gzip.open(path, 'rb')
  return open(path, 'rb')


def raw_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
  """Yields `(line_number, line)` of a file as bytes (gunzipped for `*.gz`).

  Lines are split at b'\\n' and keep their line ending; numbers are 1-based.

  Raises:
    FileNotFoundError: `path` does not exist.
    IsADirectoryError: `path` is a directory.
    RecordError: A gzip file is corrupt or ends early (at the line that
      could not be read).
  """
  check_file(path)
  line_number = 0
  with _open_binary(path) as f:
    try:
      for line_number, line in enumerate(f, start=1):
        yield line_number, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
      raise RecordError(path, line_number + 1, f'cannot read the gzip data ({e})') from None


def decode_line(line: bytes, path: str | os.PathLike[str], line_number: int) -> str:
  """Decodes one line of a record file as UTF-8.

  A byte order mark at the start of line 1 (the start of the file) is
  dropped, as `utf-8-sig` would.

  Raises:
    RecordError: The line is not valid UTF-8; the message gives the first
      bad byte and its 1-based column (in characters).
  """
  if line_number == 1 and line.startswith(_BOM):
    line = line[len(_BOM):]
  try:
    return line.decode('utf-8')
  except UnicodeDecodeError as e:
    column = len(line[:e.start].decode('utf-8')) + 1
    raise RecordError(path, line_number,
                      f'not valid UTF-8 (byte 0x{line[e.start]:02x} at column {column})') from None


def read_json_lines(paths: Sequence[str | os.PathLike[str]], parse: Callable[[Any, str, int], Any],
                    skip_invalid: bool = False, *,
                    line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads JSON-lines files (gzip when named `*.gz`) through a row parser.

  Args:
    paths: The files, read in order as one dataset; blank lines skipped.
    parse: Maps `(decoded_row, path, line_number)` to a record, or None to
      leave the row out; raises RecordError for an invalid row.
    skip_invalid: If True, invalid rows (JSON syntax errors and lines that are
      not UTF-8 included) are skipped and counted instead of raising.
    line_numbers: If True, each record is returned as `(line_number, record)`.

  Returns:
    `(records, num_skipped)`: the records in file order and how many invalid
    rows were skipped.

  Raises:
    FileNotFoundError: A file does not exist.
    IsADirectoryError: A path is a directory.
    RecordError: A row is invalid and `skip_invalid` is False.
    ValueError: The files give no records.
  """
  parsed, num_skipped = [], 0
  for path in paths:
    for line_number, line in raw_lines(path):
      try:
        text = decode_line(line, path, line_number)
        if not text.strip():
          continue
        try:
          value = json.loads(text)
        except json.JSONDecodeError as e:
          raise RecordError(path, line_number, f'invalid JSON: {e.msg}') from e
        example = parse(value, path, line_number)
      except RecordError:
        if not skip_invalid:
          raise
        num_skipped += 1
        continue
      if example is not None:
        parsed.append((line_number, example) if line_numbers else example)
  if not parsed:
    skipped = f' ({num_skipped} invalid ones skipped)' if num_skipped else ''
    names = ', '.join(os.fspath(p) for p in paths)
    raise ValueError(f'{names}: no valid records{skipped}')
  return parsed, num_skipped


def config_section(config, name: str, cls, needed_by: str, example: str,
                   exclude: tuple[str, ...] = ()) -> dict:
  """The fields of `config.<name>` for the dataclass `cls` (less `exclude`); a ValueError if
  the section is missing (`needed_by` needs it; `example` has one) or has an unknown key."""
  section = config.get(name)
  if section is None:
    raise ValueError(f'{needed_by} needs a config.{name} section ({example} has one).')
  fields = {f.name for f in dataclasses.fields(cls)} - set(exclude)
  unknown = sorted(set(section.keys()) - fields)
  if unknown:
    raise ValueError(f'config.{name}.{unknown[0]}: unknown key; expected {sorted(fields)}.')
  return dict(section)


def read_jsonl(path: str | os.PathLike[str], schema: Mapping[str, type]) -> list[dict]:
  """Reads and validates a JSON-lines file.

  Args:
    path: The file to read; one JSON object per line, blank lines skipped.
    schema: Required field names mapped to their Python types.

  Returns:
    The records, in file order, each holding exactly the schema's fields.

  Raises:
    FileNotFoundError: `path` does not exist.
    RecordError: A line is not valid JSON or fails `validate_record`.
    ValueError: The file holds no records.
  """
  return read_records(path, schema)[0]


def read_records(path: str | os.PathLike[str], schema: Mapping[str,
                                                               type], skip_invalid: bool = False, *,
                 line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads and validates a JSON-lines file, optionally skipping invalid lines.

  Args:
    path: The file to read; one JSON object per line, blank lines skipped.
    schema: Required field names mapped to their Python types.
    skip_invalid: Skip and count invalid lines instead of raising.
    line_numbers: If True, each record is returned as `(line_number, record)`.

  Returns:
    `(records, num_skipped)` (see `read_json_lines`).

  Raises:
    See `read_json_lines`.
  """
  parse = lambda value, p, n: validate_record(value, schema, p, n)  # noqa: E731
  return read_json_lines([path], parse, skip_invalid, line_numbers=line_numbers)


def read_paragraphs(path: str | os.PathLike[str], skip_invalid: bool = False, *,
                    line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads a plain-text file as one `{"text": ...}` record per paragraph.

  Paragraphs are separated by blank (or whitespace-only) lines; a record's
  lines are joined with '\\n' without their line endings.

  Args:
    path: The file to read (gunzipped when named `*.gz`).
    skip_invalid: Skip and count paragraphs holding a line that is not valid
      UTF-8 instead of raising.
    line_numbers: If True, each record is returned as `(line_number, record)`
      with the line its paragraph starts on.

  Returns:
    `(records, num_skipped)`: the records in file order and how many
    paragraphs were skipped.

  Raises:
    FileNotFoundError: `path` does not exist.
    IsADirectoryError: `path` is a directory.
    RecordError: A line is not valid UTF-8 and `skip_invalid` is False.
    ValueError: The file holds no records.
  """
  records, num_skipped = [], 0
  paragraph, start, invalid = [], 0, False

  def finish() -> None:
    nonlocal num_skipped
    if invalid:
      num_skipped += 1
    elif paragraph:
      record = {'text': '\n'.join(paragraph)}
      records.append((start, record) if line_numbers else record)

  for line_number, line in raw_lines(path):
    try:
      text = decode_line(line, path, line_number)
    except RecordError:
      if not skip_invalid:
        raise
      text = None
    if text is not None and not text.strip():
      finish()
      paragraph, invalid = [], False
      continue
    if not paragraph and not invalid:
      start = line_number
    if text is None:
      invalid = True
    else:
      paragraph.append(text.rstrip('\r\n'))
  finish()
  if not records:
    skipped = f' ({num_skipped} invalid ones skipped)' if num_skipped else ''
    raise ValueError(f'{os.fspath(path)}: no records in file{skipped}')
  return records, num_skipped


def is_json_lines(path: str | os.PathLike[str]) -> bool:
  """Whether a pretraining text file is JSON lines (`*.jsonl`, `*.jsonl.gz`)."""
  return os.fspath(path).endswith(('.jsonl', '.jsonl.gz'))


def read_text_file(path: str | os.PathLike[str], skip_invalid: bool = False, *,
                   line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads pretraining text records, optionally skipping invalid ones.

  Args:
    path: A `.jsonl` (or `.jsonl.gz`) file of `{"text": ...}` objects, or any
      other file, read as plain text with records separated by blank lines
      (gunzipped when named `*.gz`).
    skip_invalid: Skip and count invalid records instead of raising.
    line_numbers: If True, each record is returned as `(line_number, record)`.

  Returns:
    `(records, num_skipped)`: the records, each `{"text": str}`, in file
    order and how many invalid ones were skipped.

  Raises:
    See `read_json_lines` and `read_paragraphs`.
  """
  if is_json_lines(path):
    return read_records(path, TEXT_SCHEMA, skip_invalid, line_numbers=line_numbers)
  return read_paragraphs(path, skip_invalid, line_numbers=line_numbers)


def read_text_records(path: str | os.PathLike[str]) -> list[dict]:
  """Reads pretraining text records.

  Args:
    path: A `.jsonl` (or `.jsonl.gz`) file of `{"text": ...}` objects, or any
      other file, read as plain text with records separated by blank lines.

  Returns:
    The records, each `{"text": str}`, in file order.

  Raises:
    FileNotFoundError: `path` does not exist.
    RecordError: A record is invalid.
    ValueError: The file holds no records.
  """
  return read_text_file(path)[0]
