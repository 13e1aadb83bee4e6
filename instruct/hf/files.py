"""Hugging Face checkpoint files: resolving a directory or cached hub name, config.json, and
sliced reads of the weights (safetensors, or pickled `pytorch_model.bin` when allowed)."""

from __future__ import annotations

import glob
import json
import os
import pickle
import struct
from typing import Any, Optional

import huggingface_hub
import ml_dtypes
import numpy as np
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError, safe_open

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def resolve_checkpoint(name_or_path: str, *, local_files_only: bool = True,
                       cache_dir: Optional[str] = None) -> str:
  """A local checkpoint directory: `name_or_path` itself, or a hub name's cached snapshot.

  Hub names are looked up in the Hugging Face cache first; they are downloaded only with
  `local_files_only=False` (instruct never downloads at run time by default).
  """
  if os.path.isdir(name_or_path):
    return name_or_path
  if os.path.exists(name_or_path):
    raise FileNotFoundError(f"Hugging Face checkpoint {name_or_path!r} is a file; expected a "
                            "checkpoint directory (config.json and weights).")
  if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
    raise FileNotFoundError(f"Hugging Face checkpoint directory {name_or_path!r} does not "
                            "exist.")
  patterns = [
      "config.json", "*.safetensors", SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX,
      "pytorch_model-*.bin"
  ]
  try:
    return huggingface_hub.snapshot_download(name_or_path, local_files_only=True,
                                             cache_dir=cache_dir, allow_patterns=patterns)
  except (hub_errors.LocalEntryNotFoundError, FileNotFoundError, OSError,
          hub_errors.HFValidationError) as e:
    cached_error = e
  if local_files_only:
    raise FileNotFoundError(
        f"Hugging Face checkpoint {name_or_path!r} is not a local directory and not in the "
        "Hugging Face cache; instruct does not download at run time. Download it first (e.g. "
        f"`huggingface-cli download {name_or_path}`) or pass a local directory.") from (
            cached_error)
  try:
    return huggingface_hub.snapshot_download(name_or_path, cache_dir=cache_dir,
                                             allow_patterns=patterns)
  except Exception as e:  # Offline, unknown repository, gated...
    raise FileNotFoundError(
        f"Could not download Hugging Face checkpoint {name_or_path!r} (offline, or no such "
        f"repository?): {e}") from e


def _read_json(file: str) -> Any:
  """The contents of JSON file `file`; a ValueError naming the file (and the line) when it is
  not UTF-8 JSON."""
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}).") from e
  except UnicodeDecodeError as e:
    raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start}).") from e


def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of a checkpoint directory, as a dict.

  Raises:
    FileNotFoundError: `path` has no config.json.
    ValueError: config.json is not a JSON object (the error names the file and the line).
  """
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint.")
  config = _read_json(file)
  if not isinstance(config, dict):
    raise ValueError(f"{file}: expected a JSON object, got a {type(config).__name__}.")
  return config


def _index_files(path: str, index_name: str) -> list[str]:
  """The weight files a sharded checkpoint's index lists (`weight_map` values), each checked
  to exist; errors name the index file."""
  index = os.path.join(path, index_name)
  weight_map = _read_json(index)
  weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"{index}: expected a JSON object with a non-empty 'weight_map' "
                     "(tensor name -> weight file).")
  names = set(weight_map.values())
  if not all(isinstance(n, str) and n for n in names):
    raise ValueError(f"{index}: 'weight_map' values must be weight file names.")
  files = [os.path.join(path, name) for name in sorted(names)]
  for file in files:
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{index} lists weight file {os.path.basename(file)!r}, which "
                              f"is not in {path}: the checkpoint is incomplete.")
  return files


def _weight_files(path: str, allow_pickle: bool) -> tuple[str, list[str]]:
  """('safetensors' | 'pickle', files) of a checkpoint directory."""
  if os.path.exists(os.path.join(path, SAFE_INDEX)):
    return "safetensors", _index_files(path, SAFE_INDEX)
  if os.path.exists(os.path.join(path, SAFE_WEIGHTS)):
    return "safetensors", [os.path.join(path, SAFE_WEIGHTS)]
  pickles = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
  if pickles:
    if not allow_pickle:
      raise ValueError(
          f"{path} holds only pickled PyTorch weights ({os.path.basename(pickles[0])}); "
          "unpickling can run arbitrary code, so it is refused. Convert the checkpoint to "
          "safetensors, or pass allow_pickle=True if you trust its source.")
    if os.path.exists(os.path.join(path, PICKLE_INDEX)):
      pickles = _index_files(path, PICKLE_INDEX)
    return "pickle", pickles
  raise FileNotFoundError(f"{path} has no weights: expected {SAFE_WEIGHTS} or {SAFE_INDEX} "
                          "(or pickled pytorch_model.bin, with allow_pickle=True).")


# safetensors dtypes numpy has no type for, read through a memory map with ml_dtypes.
_MEMMAP_DTYPES = {
    "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2
}


class _Tensors:
  """Read-only, sliced access to the tensors of a checkpoint, by name."""

  def __init__(self, kind: str, files: list[str]):
    self._handles, self._where, self._arrays, self._headers = {}, {}, {}, {}
    if kind == "pickle":
      import torch  # An optional extra, only for pickled checkpoints (allow_pickle=True).
      for file in files:
        try:
          state = torch.load(file, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
          raise ValueError(f"{file}: not a readable PyTorch weights file "
                           f"({' '.join(str(e).split())[:200]}).") from e
        for name, t in state.items():
          self._arrays[name] = t.detach().float().numpy()
      return
    for file in files:
      try:
        handle = safe_open(file, framework="numpy")
        keys = handle.keys()
      except SafetensorError as e:
        # Truncated, empty, or a damaged header; the library's message names no file.
        raise ValueError(f"{file}: not a readable safetensors file ({e}).") from e
      self._handles[file] = handle
      for name in keys:
        self._where[name] = file

  def names(self) -> set[str]:
    return set(self._where) | set(self._arrays)

  def shape(self, name: str) -> tuple[int, ...]:
    if name in self._arrays:
      return self._arrays[name].shape
    return tuple(self._handles[self._where[name]].get_slice(name).get_shape())

  def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
    """tensor[index] as float32, reading only that block from disk."""
    if name in self._arrays:
      return self._arrays[name][index]
    file = self._where[name]
    tensor = self._handles[file].get_slice(name)
    if tensor.get_dtype() in _MEMMAP_DTYPES:
      return np.asarray(self._memmap(file, name)[index], np.float32)
    return np.asarray(tensor[index], np.float32)

  def _memmap(self, file: str, name: str) -> np.ndarray:
    if file not in self._headers:
      with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        self._headers[file] = (8 + size, json.loads(f.read(size)))
    offset, header = self._headers[file]
    info = header[name]
    start, _ = info["data_offsets"]
    return np.memmap(file, dtype=_MEMMAP_DTYPES[info["dtype"]], mode="r", offset=offset + start,
                     shape=tuple(info["shape"]))

  def close(self) -> None:
    self._handles.clear()
    self._arrays.clear()
