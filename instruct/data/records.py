"""Reading and validating local record files.

Records are dictionaries of non-empty strings. Demonstrations, prompts (for
RL rollouts) and JSON-lines pretraining text are stored one JSON object per
line; plain-text pretraining files hold one record per blank-line-separated
paragraph. Fields outside a schema are ignored, so demonstration files are
also valid prompt files. Every validation
error is a `RecordError` whose message starts with `path:line:` (1-based) so
the offending record can be found directly.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

DEMONSTRATION_SCHEMA: Mapping[str, type] = {'prompt': str, 'completion': str}
PROMPT_SCHEMA: Mapping[str, type] = {'prompt': str}
TEXT_SCHEMA: Mapping[str, type] = {'text': str}


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


def _check_exists(path: str | os.PathLike[str]) -> None:
  """Raises FileNotFoundError naming `path` if it is not a regular file."""
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


def _open_text(path: str | os.PathLike[str]) -> TextIO:
  """Opens a UTF-8 text file, gunzipping it when its name ends in `.gz`."""
  if os.fspath(path).endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8')
  return open(path, encoding='utf-8')


def read_json_lines(paths: Sequence[str | os.PathLike[str]], parse: Callable[[Any, str, int], Any],
                    skip_invalid: bool = False) -> tuple[list[Any], int]:
  """Reads JSON-lines files (gzip when named `*.gz`) through a row parser.

  Args:
    paths: The files, read in order as one dataset; blank lines skipped.
    parse: Maps `(decoded_row, path, line_number)` to a record, or None to
      leave the row out; raises RecordError for an invalid row.
    skip_invalid: If True, invalid rows (JSON syntax errors included) are
      skipped and counted instead of raising.

  Returns:
    `(records, num_skipped)`: the records in file order and how many invalid
    rows were skipped.

  Raises:
    FileNotFoundError: A file does not exist.
    RecordError: A row is invalid and `skip_invalid` is False.
    ValueError: The files give no records.
  """
  parsed, num_skipped = [], 0
  for path in paths:
    _check_exists(path)
    with _open_text(path) as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          try:
            value = json.loads(line)
          except json.JSONDecodeError as e:
            raise RecordError(path, line_number, f'invalid JSON: {e.msg}') from e
          example = parse(value, path, line_number)
        except RecordError:
          if not skip_invalid:
            raise
          num_skipped += 1
          continue
        if example is not None:
          parsed.append(example)
  if not parsed:
    skipped = f' ({num_skipped} invalid ones skipped)' if num_skipped else ''
    names = ', '.join(os.fspath(p) for p in paths)
    raise ValueError(f'{names}: no valid records{skipped}')
  return parsed, num_skipped


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
  parse = lambda value, p, n: validate_record(value, schema, p, n)  # noqa: E731
  return read_json_lines([path], parse)[0]


def _read_paragraphs(path: str | os.PathLike[str]) -> list[dict]:
  """Reads a plain-text file as one `{"text": ...}` record per paragraph."""
  _check_exists(path)
  records, paragraph = [], []
  with open(path, encoding='utf-8') as f:
    for line in f:
      if line.strip():
        paragraph.append(line.rstrip('\n'))
      elif paragraph:
        records.append({'text': '\n'.join(paragraph)})
        paragraph = []
  if paragraph:
    records.append({'text': '\n'.join(paragraph)})
  if not records:
    raise ValueError(f'{os.fspath(path)}: no records in file')
  return records


def read_text_records(path: str | os.PathLike[str]) -> list[dict]:
  """Reads pretraining text records.

  Args:
    path: A `.jsonl` file of `{"text": ...}` objects, or any other file, read
      as plain text with records separated by blank lines.

  Returns:
    The records, each `{"text": str}`, in file order.

  Raises:
    FileNotFoundError: `path` does not exist.
    RecordError: A JSON-lines record is invalid.
    ValueError: The file holds no records.
  """
  if os.fspath(path).endswith('.jsonl'):
    return read_jsonl(path, TEXT_SCHEMA)
  return _read_paragraphs(path)
