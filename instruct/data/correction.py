r"""Self-correction (Welleck et al. 2022, "Generating Sequences by Learning to [Self-]Correct"):
the value-improving pairs a corrector is trained on, and how they are drawn.

A generator p0 proposes answers y to an input x; a corrector p_theta(y' | x, y, f(y)) learns to
rewrite them into better ones, given a value v (higher is better) and feedback f. Training
repeats the paper's Algorithm 1:

  initialisation  D_x = {(x, y, v(y), f(y)) | y in y^{1:N} ~ p0(. | x)},  D = U_x D_x
  pairing         P_x = {(x, y, y') | v(y) < v(y'), y, y' in D_x},         P = U_x P_x
  learning        the corrector is fine-tuned on x, y, f(y) -> y' for pairs drawn from
                    P[(x, y, y')] = exp(alpha * (v(y') - v(y)) + beta * s(y, y')) / Z(y)
                  with Z(y) the sum of the numerator over the y' that improve on y: every
                  hypothesis (x, y) with a better answer is equally likely, and its target is
                  a softmax of the improvement (alpha) and the proximity (beta)
  exploration     D'_x = {(x, y', v(y'), f(y')) | y' ~ p_theta(. | x, y, f(y)), y in D_x},
                  D = D U D': the current corrector's own corrections join the pool.

`s(y, y')` is a proximity in [0, 1], here `proximity`: difflib.SequenceMatcher's ratio over
words, 2 M / (|y| + |y'|) with M the matched words; beta > 0 favours targets that edit little.
This module holds the world-independent part (numpy only): the pairs, their probabilities,
the draw, and the method's settings (`Correction`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Mapping, Sequence

import numpy as np


def proximity(a: Sequence[str], b: Sequence[str]) -> float:
  """s(a, b) in [0, 1]: difflib.SequenceMatcher's ratio over the words (1 for equal
  sequences, two empty ones included)."""
  return difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).ratio()


def value_improving_pairs(values: Sequence[float]) -> list[tuple[int, int]]:
  """P_x as index pairs (i, j), row-major: every (y_i, y_j) of one input with v_i < v_j."""
  return [(i, j) for i, vi in enumerate(values) for j, vj in enumerate(values) if vi < vj]


def pair_probabilities(values: Sequence[float], proximities: np.ndarray, alpha: float,
                       beta: float) -> np.ndarray:
  """The [n, n] matrix P[i, j] = P(y' = y_j | y = y_i) of one input's pool: the softmax over
  the j with v_j > v_i of alpha * (v_j - v_i) + beta * s(y_i, y_j), zero elsewhere; a row
  without a better answer is all zeros (y_i is never a hypothesis)."""
  v = np.asarray(values, np.float64)
  s = np.asarray(proximities, np.float64)
  if s.shape != (len(v), len(v)):
    raise ValueError(f"proximities must be [{len(v)}, {len(v)}], got {list(s.shape)}.")
  better = v[None, :] > v[:, None]
  logits = np.where(better, alpha * (v[None, :] - v[:, None]) + beta * s, -np.inf)
  top = np.max(logits, axis=1, keepdims=True)
  weights = np.where(better, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
  totals = weights.sum(axis=1, keepdims=True)
  return np.divide(weights, totals, out=np.zeros_like(weights), where=totals > 0)


def pool_probabilities(answers: Sequence[Sequence[str]], values: Sequence[float], alpha: float,
                       beta: float) -> np.ndarray:
  """`pair_probabilities` of one input's answers (word sequences) with s = `proximity`."""
  n = len(answers)
  if len(values) != n:
    raise ValueError(f"{n} answers but {len(values)} values.")
  s = np.eye(n)
  for i in range(n):
    for j in range(i + 1, n):
      s[i, j] = s[j, i] = proximity(answers[i], answers[j])
  return pair_probabilities(values, s, alpha, beta)


def draw_pairs(pools: Sequence[tuple[Sequence[Sequence[str]], Sequence[float]]], num: int,
               alpha: float, beta: float, rng: np.random.Generator) -> list[tuple[int, int, int]]:
  """`num` training pairs (input, i, j) drawn with replacement from P over all the pools.

  `pools[x]` is input x's (answers, values). A hypothesis (x, i) is drawn uniformly among
  those with a better answer in their pool (each Z(y)-normalised row weighs the same), then
  its target j from row i of x's `pool_probabilities`. Deterministic given `rng`'s state;
  [] when no pool has a value-improving pair.
  """
  if num < 0:
    raise ValueError(f"num={num}: must be >= 0.")
  rows: list[tuple[int, int, np.ndarray]] = []
  for x, (answers, values) in enumerate(pools):
    probabilities = pool_probabilities(answers, values, alpha, beta)
    for i, row in enumerate(probabilities):
      if row.sum() > 0:
        rows.append((x, i, np.cumsum(row)))
  if not rows or num == 0:
    return []
  out = []
  for k in rng.integers(len(rows), size=num):
    x, i, cumulative = rows[int(k)]
    j = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    out.append((x, i, min(j, len(cumulative) - 1)))
  return out


# yapf: disable
@dataclasses.dataclass(frozen=True)
class Correction:
  """The method's settings (`config.correction`)."""
  samples: int = 4                # N: the generator's answers per training input.
  prompts: int = 0                # Training inputs used (0: all of them).
  validation_fraction: float = 0.05  # Inputs held out for the corrector's validation loss.
  pairs_per_prompt: float = 2.0   # Training pairs drawn per round, per input.
  alpha: float = 5.0              # Weight of the improvement v(y') - v(y).
  beta: float = 1.0               # Weight of the proximity s(y, y').
  rounds: int = 2                 # Training rounds; each after the first explores first.
  steps: int = 200                # Corrector training steps per round.
  learning_rate: float = 1e-3
  temperature: float = 1.0        # Sampling the generator and, exploring, the corrector.
  passes: int = 3                 # Corrections applied in a row at inference.
  keep_perfect: bool = True       # Leave answers whose feedback names no fault unchanged.
  # yapf: enable

  @classmethod
  def from_dict(cls, section: Mapping[str, Any]) -> "Correction":
    """From `config.correction`'s keys (missing ones keep their defaults); ValueError naming
    an unknown or bad key."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in section:
      if key not in fields:
        raise ValueError(f"config.correction.{key}: unknown key; expected one of {fields}.")
    settings = cls(**dict(section))
    settings.check()
    return settings

  def check(self) -> None:
    """Raises ValueError `config.correction.KEY=value: must be ...` for an impossible value."""
    ints = (("samples", 2), ("prompts", 0), ("rounds", 1), ("steps", 1), ("passes", 1))
    for key, low in ints:
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.correction.{key}={value!r}: must be an integer >= {low}.")
    floats = (("alpha", 0.0, False), ("beta", 0.0, False), ("pairs_per_prompt", 0.0, True),
              ("learning_rate", 0.0, True), ("temperature", 0.0, True))
    for key, low, strict in floats:
      value = getattr(self, key)
      if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
          or value < low or (strict and value == low)):
        raise ValueError(f"config.correction.{key}={value!r}: must be a finite number "
                         f"{'>' if strict else '>='} {low}.")
    fraction = self.validation_fraction
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
        or not 0.0 < fraction < 1.0):
      raise ValueError(f"config.correction.validation_fraction={fraction!r}: must be in (0, 1).")
    if not isinstance(self.keep_perfect, bool):
      raise ValueError(f"config.correction.keep_perfect={self.keep_perfect!r}: must be True or "
                       "False.")
