"""Hindsight instruction relabeling (HIR; Zhang et al. 2023): records and their encoding.

HIR learns from its own samples without a reward model or a critic. Online, the current model
answers instructions and a program says whether each answer did what was asked. Offline, each
instruction is relabeled to one the answer satisfies ("answer correctly" for a good answer,
"answer incorrectly" for a bad one) and the model is trained on the relabeled pairs. A
hindsight record is a demonstration plus that verdict:

  {"prompt": "request list two foods . answer :", "completion": " milk , cake .",
   "satisfied": true}

The instruction is the prompt behind a control token: `good_token` when the answer satisfied
it, `bad_token` when not, so relabeling flips one token. The encoding is the demonstration's
(`tokenization.encode_demonstration`: loss on the completion and EOS) behind that token, which
always sits at position 0, so the contrasting instruction (the other token) is the same
sequence with token 0 swapped; the training step builds it (`instruct.stages.sft`) and adds
to the relabeled likelihood the paper's two terms (`objectives.hindsight_terms`):

  contrastive  -log p(o | i+) / (p(o | i+) + p(o | i-))   weight `alpha`, per answer
  entropy      sum_v p log p at each target position       weight `beta` (a bonus to entropy)

Sample the trained model after `good_token` with both control tokens banned.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping

import numpy as np

from instruct.data import records
from instruct.data import tokenization

KIND = 'hindsight'
SCHEMA: Mapping[str, type] = {'prompt': str, 'completion': str, 'satisfied': bool}


@dataclasses.dataclass(frozen=True)
class Hindsight:
  """How hindsight records are trained on (`config.hindsight`; see the module docstring)."""
  alpha: float = 1.0  # Weight of the contrastive instruction term.
  beta: float = 0.01  # Weight of the entropy term (the loss adds -beta * entropy).
  good_token: str = '<|good|>'
  bad_token: str = '<|bad|>'

  @classmethod
  def from_config(cls, config) -> 'Hindsight':
    """From `config.hindsight`; ValueError naming a bad key."""
    hindsight = cls(**records.config_section(config, 'hindsight', cls, f'config.data.kind={KIND!r}',
                                             'configs/sft.py:tiny,hir'))
    for key in ('alpha', 'beta'):
      value = getattr(hindsight, key)
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f'config.hindsight.{key}={value}: must be a finite number >= 0.')
    if hindsight.good_token == hindsight.bad_token:
      raise ValueError(f'config.hindsight.bad_token={hindsight.bad_token!r}: must differ from '
                       'config.hindsight.good_token.')
    return hindsight

  def token_ids(self, tokenizer: Any) -> tuple[int, int]:
    """The ids of the good and bad instruction tokens; ValueError unless both are single
    tokens of the tokenizer's vocabulary (a new token would have no embedding row)."""
    return tokenization.vocabulary_ids(tokenizer,
                                       {'good_token': self.good_token, 'bad_token': self.bad_token},
                                       'hindsight',
                                       'HIR needs both instruction tokens in its vocabulary')


def encode(hindsight: Hindsight, tokenizer: Any, max_length: int,
           example: Mapping[str, Any]) -> tokenization.Encoded:
  """`(tokens, loss_mask, truncated)` of a hindsight record: its verdict's instruction token,
  then the demonstration's encoding in `max_length - 1` tokens (a long prompt loses its
  left end, never the instruction token). `functools.partial(encode, hindsight)` is the data
  pipeline's encoder."""
  if max_length < 2:
    raise ValueError(f'max_length must be at least 2, got {max_length}.')
  good, bad = hindsight.token_ids(tokenizer)
  tokens, mask, truncated = tokenization.encode_demonstration(tokenizer, example['prompt'],
                                                              example['completion'], max_length - 1)
  tag = good if example['satisfied'] else bad
  return (np.concatenate([np.asarray([tag], np.int32),
                          tokens]), np.concatenate([np.zeros(1, mask.dtype), mask]), truncated)


def read_hindsight(path: str | os.PathLike[str], skip_invalid: bool = False, *,
                   line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads a JSON-lines file of hindsight records; `(records, num_skipped)` as
  `records.read_json_lines`."""
  return records.read_records(path, SCHEMA, skip_invalid, line_numbers=line_numbers)
