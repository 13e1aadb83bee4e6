"""Paths of a run: local files and bucket URLs (`gs://bucket/run`) through one small API.

Every read and write of a workdir (its config, metrics, TensorBoard events, lock, checkpoint
moves) and of an export's output directory goes through here. A path containing `://` is a
URL and goes through `etils.epath` (which Orbax uses too); any other path is a local path and
keeps the plain `os` calls, so local runs behave exactly as before (atomic `os.replace`,
appends, `fcntl` locks elsewhere).

Buckets are not file systems: an object has no rename (a "move" is a copy and a delete, and
is not atomic), cannot be appended to, and has no locks; writing a whole object is atomic by
itself (a reader sees the old object or the new one). The functions here pick, for each
operation, what is atomic on each kind of path.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import threading
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_url(path: PathLike) -> bool:
  """Whether `path` is a URL (`gs://...`, any `scheme://`) rather than a local path."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `etils.epath.Path` (what Orbax takes for a bucket)."""
  return epath.Path(os.fspath(path))


def join(path: PathLike, *parts: str) -> str:
  """`path` joined with `parts` ('/' for URLs, `os.path.join` for local paths)."""
  path = os.fspath(path)
  if is_url(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def absolute(path: PathLike) -> str:
  """The absolute form of a local path; a URL is returned unchanged (never `abspath`ed)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(path)


def basename(path: PathLike) -> str:
  """The last component of `path` (trailing slashes ignored)."""
  path = os.fspath(path)
  if is_url(path):
    return posixpath.basename(path.rstrip("/"))
  return os.path.basename(os.path.abspath(path))


def exists(path: PathLike) -> bool:
  if is_url(path):
    return as_path(path).exists()
  return os.path.exists(path)


def isdir(path: PathLike) -> bool:
  if is_url(path):
    return as_path(path).is_dir()
  return os.path.isdir(path)


def isfile(path: PathLike) -> bool:
  """Whether `path` is a file (an object, on a bucket)."""
  if is_url(path):
    path = as_path(path)
    return path.exists() and not path.is_dir()
  return os.path.isfile(path)


def listdir(path: PathLike) -> list[str]:
  """The names in directory `path` (the object names under the prefix, on a bucket)."""
  if is_url(path):
    return sorted(p.name for p in as_path(path).iterdir())
  return os.listdir(path)


def mtime(path: PathLike) -> float:
  """The time `path` was last modified, in seconds since the epoch (an object's: when it was
  written)."""
  if is_url(path):
    return float(as_path(path).stat().mtime)
  return os.path.getmtime(path)


def makedirs(path: PathLike) -> None:
  """Creates directory `path` and its parents when missing (on a bucket, where directories
  are only name prefixes, this creates at most a placeholder)."""
  if is_url(path):
    as_path(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def read_text(path: PathLike) -> str:
  if is_url(path):
    return as_path(path).read_text()
  with open(path) as f:
    return f.read()


def read_jsonl(path: PathLike) -> list:
  """The JSON values of a JSON-lines file, one per non-blank line (files this library or the
  main job wrote; user data goes through `instruct.data.records`, which validates)."""
  return [json.loads(line) for line in read_text(path).splitlines() if line.strip()]


def read_bytes(path: PathLike) -> bytes:
  """The content of file `path`, as it is stored (no newline or encoding translation)."""
  if is_url(path):
    return as_path(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def write_text_atomic(path: PathLike, text: str) -> None:
  """Replaces the file at `path` with `text`; a reader sees the old or the new content.

  Local: written beside it (under a name of this process and thread, so writers of the same
  file never share it) and `os.replace`d in. Bucket: one object write (atomic by itself;
  buckets have no rename).
  """
  if is_url(path):
    as_path(path).write_text(text)
    return
  tmp = f"{os.fspath(path)}.{os.getpid()}-{threading.get_ident()}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def append_text(path: PathLike, text: str) -> None:
  """Appends `text` to the local file at `path`. Objects cannot be appended to: a URL is an
  error (rewrite the whole object with `write_text_atomic` instead)."""
  if is_url(path):
    raise ValueError(f"{path}: a bucket's objects cannot be appended to.")
  with open(path, "a") as f:
    f.write(text)


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file, from or to either kind of path (overwriting `dst`)."""
  if not is_url(src) and not is_url(dst):
    shutil.copyfile(src, dst)
    return
  with as_path(src).open("rb") as fin, as_path(dst).open("wb") as fout:
    shutil.copyfileobj(fin, fout)


def remove(path: PathLike) -> None:
  """Deletes one file (object)."""
  if is_url(path):
    as_path(path).unlink()
  else:
    os.remove(path)


def rmtree(path: PathLike) -> None:
  """Deletes a directory and everything under it (every object under the prefix)."""
  if is_url(path):
    as_path(path).rmtree()
  else:
    shutil.rmtree(path)


def move(src: PathLike, dst: PathLike) -> None:
  """Moves file or directory `src` to `dst` (which must not exist).

  Local: `os.replace` (atomic on one file system). Bucket (or between the two): every file is
  copied, then `src` is deleted; not atomic, but `src` stays complete until the copy is.
  """
  if not is_url(src) and not is_url(dst):
    os.replace(src, dst)
    return
  if not isdir(src):
    copy_file(src, dst)
    remove(src)
    return
  source = os.fspath(as_path(src))
  for root, _, files in as_path(src).walk():
    relative = os.fspath(root)[len(source):].strip("/")
    target = join(dst, relative) if relative else os.fspath(dst)
    makedirs(target)
    for name in files:
      copy_file(join(os.fspath(root), name), join(target, name))
  rmtree(src)
