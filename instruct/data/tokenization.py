"""Tokenizer loading and encoding of examples into tokens and loss masks.

Every encoded example is a triple `(tokens, loss_mask, truncated)`: `tokens`
and `loss_mask` are int32 vectors of equal length and `loss_mask[i]` is 1 when
`tokens[i]` is a target of the language-modelling loss. Sequences always end
with EOS (unless truncation removed it), and the pad token must differ from
EOS so that masking padding never masks EOS: policies must learn to stop.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import transformers

DEFAULT_TOKENIZER: str = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      'assets', 'tokenizer')

Encoded = tuple[np.ndarray, np.ndarray, bool]

# The JSON files a Hugging Face tokenizer directory may hold.
_TOKENIZER_JSON_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                         'added_tokens.json', 'vocab.json')


def check_special_tokens(tokenizer: Any) -> None:
  """Checks that `tokenizer` has EOS and a dedicated pad token.

  Raises:
    ValueError: EOS is missing, the pad token is missing, or the pad token is
      EOS (padding masks would then also mask EOS and the policy would never
      learn to stop).
  """
  if tokenizer.eos_token_id is None:
    raise ValueError('The tokenizer has no EOS token; one is required to end '
                     'sequences.')
  if tokenizer.pad_token_id is None or (tokenizer.pad_token_id == tokenizer.eos_token_id):
    raise ValueError('The tokenizer needs a dedicated pad token distinct from EOS (got '
                     f'pad_token_id={tokenizer.pad_token_id}, '
                     f'eos_token_id={tokenizer.eos_token_id}). Padding is masked out of '
                     'the loss; if pad were EOS, EOS would be masked too and policies '
                     'would not learn to stop. Declare a token of the vocabulary that '
                     'does not occur in your data as the pad token with '
                     '--config.data.pad_token=TOKEN (e.g. Pythia: "<|padding|>"; '
                     'Llama 3.1 / 3.2: "<|finetune_right_pad_id|>").')


def _looks_like_path(name_or_path: str) -> bool:
  """Whether `name_or_path` can only be a local path (hub names are `name` or `owner/name`)."""
  return (name_or_path.startswith(('.', '~', os.sep)) or os.path.isabs(name_or_path)
          or name_or_path.count('/') > 1 or (os.sep != '/' and os.sep in name_or_path))


def _check_json_files(directory: str) -> None:
  """Raises ValueError naming the first JSON file of a tokenizer directory that does not
  parse (the usual damage: a truncated copy or download)."""
  for name in _TOKENIZER_JSON_FILES:
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      continue
    try:
      with open(file, encoding='utf-8') as f:
        json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{file}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}): '
                       'a damaged tokenizer (config.data.tokenizer).') from e
    except UnicodeDecodeError as e:
      raise ValueError(f'{file}: not UTF-8 text: a damaged tokenizer '
                       '(config.data.tokenizer).') from e


def load_tokenizer(name_or_path: str = DEFAULT_TOKENIZER, *, pad_token: str = '',
                   local_files_only: bool = True) -> Any:
  """Loads a Hugging Face tokenizer and checks its special tokens.

  Args:
    name_or_path: A local tokenizer directory or a Hugging Face hub name
      (`config.data.tokenizer`, which every error names).
    pad_token: If set, this token of the vocabulary becomes the pad token
      (`config.data.pad_token`; for checkpoints whose tokenizer declares none,
      e.g. Pythia's `<|padding|>`). Adding a new token is refused: the
      embedding has no row for it.
    local_files_only: If True (the default), never download: hub names load
      only when already in the Hugging Face cache.

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: The path does not exist, is a file, or is a hub name that
      could not be loaded (not cached while offline).
    ValueError: The directory holds no loadable tokenizer (empty, or damaged
      files), the tokenizer lacks a dedicated pad token distinct from EOS, or
      `pad_token` is not in its vocabulary.
  """
  key = f'config.data.tokenizer={name_or_path!r}'
  if os.path.exists(name_or_path) and not os.path.isdir(name_or_path):
    raise FileNotFoundError(f'{key} is a file; expected a tokenizer directory (with '
                            'tokenizer.json or the files of a slow tokenizer) or a hub name.')
  if _looks_like_path(name_or_path) and not os.path.exists(name_or_path):
    raise FileNotFoundError(f'{key}: no such tokenizer directory.')
  if os.path.isdir(name_or_path):
    if not os.listdir(name_or_path):
      raise ValueError(f'{key} is an empty directory; expected a Hugging Face tokenizer '
                       '(tokenizer.json, tokenizer_config.json, ...).')
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path,
                                                             local_files_only=local_files_only)
    except Exception as e:  # pylint: disable=broad-except
      # transformers and tokenizers raise many kinds (ValueError, OSError, the Rust
      # library's bare Exception), with messages that span lines and name no file.
      _check_json_files(name_or_path)
      reason = ' '.join(str(e).split())
      reason = reason if len(reason) <= 300 else reason[:297] + '...'
      raise ValueError(f'{key}: the directory could not be loaded as a Hugging Face '
                       f'tokenizer ({type(e).__name__}: {reason}).') from e
  else:
    try:
      tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path,
                                                             local_files_only=local_files_only)
    except (OSError, ValueError) as e:
      raise FileNotFoundError(
          f'{key} is not a local directory, and models/tokenizers are not downloaded at run '
          'time unless the Hugging Face cache already has them (offline by default; '
          f'local_files_only={local_files_only}).') from e
  if pad_token:
    if pad_token not in tokenizer.get_vocab():
      raise ValueError(f'config.data.pad_token={pad_token!r} is not a token of the '
                       f'tokenizer {name_or_path!r}; use one of its existing tokens that '
                       'does not occur in the data (a new token would have no embedding).')
    tokenizer.pad_token = pad_token
  check_special_tokens(tokenizer)
  return tokenizer


def vocabulary_ids(tokenizer: Any, tokens: dict[str, str], section: str,
                   purpose: str) -> tuple[int, ...]:
  """The ids of `tokens` ({config key: token}, e.g. control tokens), in order; ValueError
  naming `config.{section}.KEY` unless each is one token of the tokenizer's vocabulary (an
  added token would have no embedding row). `purpose` ends the message: what needs them."""
  vocab = tokenizer.get_vocab()
  for key, token in tokens.items():
    if token not in vocab:
      raise ValueError(f'config.{section}.{key}={token!r} is not a token of the tokenizer '
                       f'(config.data.tokenizer); {purpose}.')
  return tuple(vocab[token] for token in tokens.values())


def _tokenize(tokenizer: Any, text: str) -> list[int]:
  """Returns the token ids of `text` without special tokens."""
  return list(tokenizer.encode(text, add_special_tokens=False))


def _check_max_length(max_length: int) -> None:
  """Raises ValueError unless `max_length` is a positive integer."""
  if max_length < 1:
    raise ValueError(f'max_length must be positive, got {max_length}.')


def encode_demonstration(tokenizer: Any, prompt: str, completion: str, max_length: int) -> Encoded:
  """Encodes a prompt/completion pair for supervised fine-tuning.

  The tokens are `tokenize(prompt) + tokenize(completion) + [eos]`; the loss
  mask is 1 exactly on the completion tokens and EOS. When longer than
  `max_length`, tokens are first dropped from the left of the prompt (keeping
  at least one prompt token if there was any), then from the right of
  `completion + [eos]` (so a cut completion has no EOS: it did not end there).

  Args:
    tokenizer: A tokenizer with an EOS token.
    prompt: The prompt text.
    completion: The completion text (usually starting with a space).
    max_length: The maximum number of tokens.

  Returns:
    `(tokens, loss_mask, truncated)`: int32 vectors of equal length and
    whether any token was dropped.
  """
  _check_max_length(max_length)
  prompt_ids = _tokenize(tokenizer, prompt)
  target_ids = _tokenize(tokenizer, completion) + [tokenizer.eos_token_id]
  n = len(prompt_ids) + len(target_ids)
  truncated = n > max_length
  if truncated:
    keep_prompt = min(len(prompt_ids), 1)
    excess = n - max_length
    drop_prompt = min(excess, len(prompt_ids) - keep_prompt)
    prompt_ids = prompt_ids[drop_prompt:]
    target_ids = target_ids[:max_length - len(prompt_ids)]
  tokens = np.asarray(prompt_ids + target_ids, dtype=np.int32)
  loss_mask = np.concatenate(
      [np.zeros(len(prompt_ids), np.int32),
       np.ones(len(target_ids), np.int32)])
  return tokens, loss_mask, truncated


def encode_text(tokenizer: Any, text: str, max_length: int) -> Encoded:
  """Encodes pretraining text: `tokenize(text) + [eos]`, all in the loss.

  Args:
    tokenizer: A tokenizer with an EOS token.
    text: The text.
    max_length: The maximum number of tokens; longer sequences are cut on the
      right (dropping EOS first).

  Returns:
    `(tokens, loss_mask, truncated)`: int32 vectors of equal length (the mask
    all ones) and whether any token was dropped.
  """
  _check_max_length(max_length)
  ids = _tokenize(tokenizer, text) + [tokenizer.eos_token_id]
  truncated = len(ids) > max_length
  tokens = np.asarray(ids[:max_length], dtype=np.int32)
  return tokens, np.ones(len(tokens), np.int32), truncated
