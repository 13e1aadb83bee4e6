"""Pretraining with human preferences (Korbak et al. 2023): scored text and its objectives.

A scored-text record is a document cut into segments (sentences, say), each with a score
from a preference model or a rule, higher = better:

  {"segments": ["the cat sees the dog .", " you stupid cow ."], "scores": [1.0, 0.0]}

Each segment is tokenized on its own and the document is their tokens in order (with a BPE
tokenizer, start every segment after the first with its space).
A segment scoring below `threshold` is *bad*. The objectives of Korbak et al. (section 3)
differ only in how a document is encoded, so each is a rule for the tokens and for the
per-token weights of the loss (`objectives.weighted_next_token_loss`; a negative weight is an
unlikelihood target):

  mle           every token weight 1: plain language modelling, the baseline.
  filter        the document's tokens weigh 1 when its score, its worst segment's, is at
                least the threshold, else 0 (it is left out of training).
  conditional   each segment is preceded by a control token, `good_token` or `bad_token` by
                its score, which is itself a target; a fraction `drop_control` of the
                segments (fixed per segment) go without, so the model can also generate
                unconditionally. Sample by starting from `good_token` and banning
                `bad_token` (`control_token_ids`).
  unlikelihood  good segments weigh 1 (likelihood); bad ones -alpha: their tokens are
                pushed down by alpha * -log(1 - p(token)) (Welleck et al. 2019).
  rwr           reward-weighted regression: each segment's tokens weigh exp(score / beta).

EOS weighs what the document does under `filter` (1 or 0) and `rwr` (exp(document score /
beta)), and 1 otherwise. A document's score is its worst segment's: one insult makes a page
one to filter (Korbak et al. score documents by their sentences too). Sequences longer than
the largest bucket are cut on the right.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib
from typing import Any, Mapping

import numpy as np

from instruct.data import records
from instruct.data import tokenization

KIND = 'scored_text'
OBJECTIVES = ('mle', 'filter', 'conditional', 'unlikelihood', 'rwr')


@dataclasses.dataclass(frozen=True)
class Feedback:
  """How scored text is trained on (`config.feedback`; see the module docstring)."""
  objective: str = 'mle'
  threshold: float = 0.5
  rwr_beta: float = 1.0
  unlikelihood_alpha: float = 1.0
  drop_control: float = 0.01
  good_token: str = '<|good|>'
  bad_token: str = '<|bad|>'
  seed: int = 0

  @classmethod
  def from_config(cls, config) -> 'Feedback':
    """From `config.feedback` (and `config.seed`); ValueError naming a bad key."""
    feedback = cls(
        **records.config_section(config, 'feedback', cls, f'config.data.kind={KIND!r}',
                                 'configs/pretrain.py', exclude=('seed',)), seed=config.seed)
    feedback.check()
    return feedback

  def check(self) -> None:
    if self.objective not in OBJECTIVES:
      raise ValueError(f'config.feedback.objective={self.objective!r}: expected one of '
                       f'{list(OBJECTIVES)}.')
    for key, value, low, strict in (('rwr_beta', self.rwr_beta, 0.0, True),
                                    ('unlikelihood_alpha', self.unlikelihood_alpha, 0.0,
                                     False), ('drop_control', self.drop_control, 0.0, False)):
      if not math.isfinite(value) or value < low or (strict and value == low):
        raise ValueError(f'config.feedback.{key}={value}: must be {">" if strict else ">="} '
                         f'{low}.')
    if self.drop_control >= 1.0:
      raise ValueError(f'config.feedback.drop_control={self.drop_control}: must be below 1.')
    if not math.isfinite(self.threshold):
      raise ValueError(f'config.feedback.threshold={self.threshold}: must be finite.')

  def segment_weights(self, scores) -> tuple[list[float], float]:
    """The weight of each segment's tokens and of EOS."""
    scores = [float(s) for s in scores]
    document = min(scores)
    if self.objective == 'filter':
      keep = float(document >= self.threshold)
      return [keep] * len(scores), keep
    if self.objective == 'unlikelihood':
      return [1.0 if s >= self.threshold else -self.unlikelihood_alpha for s in scores], 1.0
    if self.objective == 'rwr':
      return [math.exp(s / self.rwr_beta) for s in scores], math.exp(document / self.rwr_beta)
    return [1.0] * len(scores), 1.0  # mle, conditional

  def keeps_control(self, text: str, index: int) -> bool:
    """Whether segment `index` gets its control token (a fixed draw per segment)."""
    draw = zlib.crc32(f'{self.seed}:{index}:{text}'.encode('utf-8')) / 2 ** 32
    return draw >= self.drop_control


def control_token_ids(tokenizer: Any, feedback: Feedback) -> tuple[int, int]:
  """The ids of the good and bad control tokens; ValueError unless both are in the
  tokenizer's vocabulary (a new token would have no embedding row)."""
  return tokenization.vocabulary_ids(
      tokenizer, {'good_token': feedback.good_token, 'bad_token': feedback.bad_token}, 'feedback',
      'conditional training needs both control tokens in its vocabulary')


def encode(feedback: Feedback, tokenizer: Any, max_length: int,
           example: Mapping[str, Any]) -> tokenization.Encoded:
  """`(tokens, weights, truncated)` of a scored-text record under `feedback`'s objective
  (see the module docstring); weights are float32. `functools.partial(encode, feedback)` is
  the data pipeline's encoder."""
  if max_length < 1:
    raise ValueError(f'max_length must be positive, got {max_length}.')
  segments, scores = list(example['segments']), list(example['scores'])
  weights, eos_weight = feedback.segment_weights(scores)
  control = control_token_ids(tokenizer, feedback) if feedback.objective == 'conditional' else None
  ids: list[int] = []
  token_weights: list[float] = []
  for index, (text, score, weight) in enumerate(zip(segments, scores, weights)):
    if control is not None and feedback.keeps_control(text, index):
      ids.append(control[0] if score >= feedback.threshold else control[1])
      token_weights.append(1.0)
    segment = list(tokenizer.encode(text, add_special_tokens=False))
    ids += segment
    token_weights += [weight] * len(segment)
  ids.append(tokenizer.eos_token_id)
  token_weights.append(eos_weight)
  truncated = len(ids) > max_length
  return (np.asarray(ids[:max_length], np.int32), np.asarray(token_weights[:max_length],
                                                             np.float32), truncated)


def _parse(value: Any, path: str, line_number: int) -> dict:
  if not isinstance(value, dict):
    raise records.RecordError(path, line_number, f'expected a JSON object, got '
                              f'{type(value).__name__}')
  segments, scores = value.get('segments'), value.get('scores')
  if not isinstance(segments, list) or not segments or not all(
      isinstance(s, str) and s.strip() for s in segments):
    raise records.RecordError(path, line_number,
                              "field 'segments' must be a non-empty list of non-empty strings")
  if not isinstance(scores, list) or len(scores) != len(segments) or not all(
      isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
    raise records.RecordError(
        path, line_number, f"field 'scores' must be a list of {len(segments)} finite numbers, "
        "one per segment")
  return {'segments': segments, 'scores': [float(s) for s in scores]}


def read_scored_text(path: str | os.PathLike[str], skip_invalid: bool = False, *,
                     line_numbers: bool = False) -> tuple[list[Any], int]:
  """Reads a JSON-lines file of scored-text records; `(records, num_skipped)` as
  `records.read_json_lines`."""
  records.check_file(path)
  return records.read_json_lines([path], _parse, skip_invalid, line_numbers=line_numbers)
