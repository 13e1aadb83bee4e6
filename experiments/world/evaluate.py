"""Evaluating policies in the embedded world: sampling, judging, win rates, perplexity.

Models are loaded from run directories (any stage: pretrain, sft, ppo; any saved step), so the
same functions serve the pipeline's report, the notebook and ad-hoc analysis:

  policy = load_policy(RUN_DIR)                       # latest step
  answers = generate(policy, tokenizer, prompts, seed=0)
  scores = [tasks.judge(p.split(), a.words, facts, a.ended) for p, a in zip(prompts, answers)]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.world import labelers as labelers_lib
from experiments.world import tasks as T
from instruct import config_lib
from instruct import run as run_lib
from instruct.data import tokenization
from instruct.model.transformer import Transformer
from instruct.rl.sampler import SamplingConfig, banned_token_ids, make_sampler
from instruct.rl.scoring import sequence_logprobs


@dataclasses.dataclass
class Policy:
  """A language model's module and parameters, from one checkpoint of a run."""
  model: Transformer
  params: Any
  workdir: str
  step: int


def checkpoint_steps(workdir: str) -> list[int]:
  return run_lib.checkpoint_steps(workdir)


def load_policy(workdir: str, step: Optional[int] = None) -> Policy:
  """The LM of a run whose stage makes a policy (pretrain, sft, rl) at `step` (default: the
  latest checkpoint), read through the run layer."""
  info = run_lib.describe(workdir)
  if info.stage.head != "lm":
    raise ValueError(f"{workdir} is a {info.stage.name!r} run; it has no language model.")
  model = Transformer(info.model_config, head="lm")
  run = run_lib.load_run(workdir, step, abstract=run_lib.abstract_params(model))
  return Policy(model, run.params, workdir, run.step)


# yapf: disable
@dataclasses.dataclass(frozen=True)
class Answer:
  words: list[str]
  ended: bool        # Ended with EOS (rather than running out of tokens).
  ids: tuple = ()    # The sampled token ids (with EOS when it ended; before any stop word).
  logprob: float = 0.0  # Their summed log-probability under the sampling policy.

  @property
  def text(self) -> str:
    return " ".join(self.words)
# yapf: enable


def _left_pad(tokenizer, prompts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
  tokens = np.full((len(prompts), length), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(prompts), length), np.int32)
  for i, prompt in enumerate(prompts):
    ids = tokenizer.encode(prompt, add_special_tokens=False)[-length:]
    tokens[i, length - len(ids):] = ids
    mask[i, length - len(ids):] = 1
  return tokens, mask


@functools.lru_cache(maxsize=None)
def _jitted_sampler(model: Transformer, cfg: SamplingConfig):
  return jax.jit(make_sampler(model, cfg))


def generate(
    policy: Policy, tokenizer, prompts: Sequence[str], *, seed: int, max_new_tokens: int = 16,
    temperature: float = 1.0, prompt_length: int = 32, batch_size: int = 128,
    stop_words: Sequence[str] = (), banned_ids: Sequence[int] = ()
) -> list[Answer]:
  """Samples one answer per prompt (batched, jitted, fixed shapes, reproducible by `seed`).

  The tokenizer's special tokens other than EOS (pad, unk, ...) are never sampled
  (`banned_token_ids`), and `Answer.logprob` is under that renormalised distribution: score
  the answers with `sequence_logprob(..., banned_ids=banned_token_ids(tokenizer))` to compare
  like with like. `stop_words` cut an answer before the first of them (used for base models,
  which go on writing the next request instead of ending). `banned_ids` are never sampled
  either (e.g. the control tokens of conditional pretraining). Raises ValueError for bad sampling
  settings, or when prompt_length + max_new_tokens exceeds a learned position table.
  """
  cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature,
                       eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                       banned_ids=tuple(sorted({*banned_token_ids(tokenizer), *banned_ids})))
  config_lib.validate_sampling(cfg, prefix="generate")
  config_lib.check_fits(prompt_length + max_new_tokens,
                        f"prompt_length + max_new_tokens = {prompt_length} + {max_new_tokens}",
                        policy.model.cfg, "model")
  sample = _jitted_sampler(policy.model, cfg)
  answers = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # One shape, one compilation.
    tokens, mask = _left_pad(tokenizer, padded, prompt_length)
    out = jax.device_get(
        sample(policy.params, tokens, mask, jax.random.fold_in(jax.random.key(seed), start)))
    for i in range(len(chunk)):
      ids = [int(t) for t, m in zip(out.response_tokens[i], out.response_mask[i]) if m]
      ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
      # Banned special tokens cannot occur; skipping them is only belt and braces.
      words = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).split()
      for j, w in enumerate(words):
        if w in stop_words:
          words, ended = words[:j], True
          break
      logprob = float(np.sum(out.response_logprobs[i]))
      answers.append(Answer(words, ended, tuple(ids), logprob))
  return answers


def response_arrays(tokenizer, prompts: Sequence[str], answers: Sequence[Answer],
                    prompt_length: int = 32, response_length: int = 16):
  """Left-padded prompts and right-padded response ids, as the PPO step lays them out."""
  tokens, mask = _left_pad(tokenizer, prompts, prompt_length)
  response = np.full((len(answers), response_length), tokenizer.pad_token_id, np.int32)
  response_mask = np.zeros((len(answers), response_length), np.int32)
  for i, a in enumerate(answers):
    response[i, :len(a.ids)], response_mask[i, :len(a.ids)] = a.ids, 1
  return tokens, mask, response, response_mask


@functools.lru_cache(maxsize=None)
def _logprob_fn(model: Transformer, temperature: float, banned_ids: tuple[int, ...]):
  return jax.jit(lambda params, *arrays: sequence_logprobs(
      model, params, *arrays, temperature=temperature, banned_ids=banned_ids)[0].sum(-1))


def sequence_logprob(policy: Policy, arrays, temperature: float = 1.0, batch_size: int = 128, *,
                     banned_ids: Sequence[int] = ()) -> np.ndarray:
  """Summed log-probabilities of the responses in `arrays` (see `response_arrays`).

  `banned_ids`: tokens whose logits are masked before the softmax, as `generate` does with
  `banned_token_ids(tokenizer)`; pass the same to get `Answer.logprob`'s distribution (e.g.
  for a KL between a policy's samples and a reference). The default () scores under the
  unmasked model.
  """
  config_lib.check_fits(
      arrays[0].shape[1] + arrays[2].shape[1],
      f"prompt length + response length = {arrays[0].shape[1]} + {arrays[2].shape[1]}",
      policy.model.cfg, "model")
  fn = _logprob_fn(policy.model, temperature, tuple(sorted(set(int(i) for i in banned_ids))))
  return np.concatenate([
      np.asarray(jax.device_get(fn(policy.params, *(x[s:s + batch_size] for x in arrays))))
      for s in range(0, len(arrays[0]), batch_size)
  ])


def reward_scores(rm, arrays, batch_size: int = 128) -> np.ndarray:
  """The reward model's normalised scores of prompt + response."""
  prompt, prompt_mask, response, response_mask = arrays
  tokens = np.concatenate([prompt, response], 1)
  mask = np.concatenate([prompt_mask, response_mask], 1)
  config_lib.check_fits(tokens.shape[1], "the scored sequences' length", rm.model.cfg,
                        "reward model")
  score = jax.jit(rm.score)
  return np.concatenate([
      np.asarray(jax.device_get(score(tokens[s:s + batch_size], mask[s:s + batch_size])))
      for s in range(0, len(tokens), batch_size)
  ])


def few_shot_prompt(prompt: str, examples: Sequence[tuple[str, str]]) -> str:
  """A base model's prompt: solved examples, then the request."""
  return " ".join(f"{p} {a}" for p, a in examples) + " " + prompt


# --- Perplexity. -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _loss_fn(model: Transformer):

  @jax.jit
  def loss_sums(params, tokens, mask, target):
    logits = model.apply({"params": params}, tokens, mask).logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    target = target[:, 1:]
    return jnp.sum(nll * target), jnp.sum(target)

  return loss_sums


def perplexity(policy: Policy, tokenizer, texts: Sequence[str], length: int = 128,
               batch_size: int = 64, skip_ids: Sequence[int] = ()) -> float:
  """exp(mean next-token NLL) over the texts (each + EOS, right-padded to `length`); tokens
  in `skip_ids` are read but not scored (e.g. control tokens the text is conditioned on)."""
  config_lib.check_fits(length, "perplexity's length", policy.model.cfg, "model")
  loss_sums = _loss_fn(policy.model)
  total, count = 0.0, 0.0
  for start in range(0, len(texts), batch_size):
    chunk = texts[start:start + batch_size]
    tokens = np.full((batch_size, length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, text in enumerate(chunk):
      ids = tokenization.encode_text(tokenizer, text, length)[0]
      tokens[i, :len(ids)], mask[i, :len(ids)] = ids, 1
    target = mask * ~np.isin(tokens, np.asarray(skip_ids, np.int32))
    s, n = jax.device_get(loss_sums(policy.params, tokens, mask, target.astype(np.int32)))
    total, count = total + float(s), count + float(n)
  return math.exp(total / count)


# --- Judging and win rates. --------------------------------------------------------------


def judge_all(prompts: Sequence[str], answers: Sequence[Answer], facts) -> list[dict]:
  return [T.judge(p.split(), a.words, facts, a.ended) for p, a in zip(prompts, answers)]


def wilson_interval(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """The 95% Wilson score interval of a binomial proportion."""
  if n == 0:
    return (0.0, 1.0)
  p = wins / n
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (centre - half, centre + half)


def win_rate(scores_a: Sequence[dict], scores_b: Sequence[dict],
             judges: Sequence[labelers_lib.Labeler], seed: int) -> dict:
  """How often answers A are preferred to answers B (same prompts), one judgment per prompt.

  Each prompt's pair goes to a judge drawn at random from `judges`, who prefers one answer by
  Bradley-Terry with its own weights and temperature (equal answers: a coin flip).
  `outcomes` lists the per-prompt judgments (1: A preferred), which an interval over prompts
  and seeds resamples (`experiments.results_table`).
  """
  rng = np.random.default_rng(seed)
  ties, outcomes = 0, []
  for a, b in zip(scores_a, scores_b):
    judge = judges[rng.integers(len(judges))]
    u_a, u_b = judge.utility(a), judge.utility(b)
    ties += u_a == u_b
    outcomes.append(int(judge.prefers_first(u_a, u_b, rng)))
  n, wins = len(scores_a), sum(outcomes)
  lo, hi = wilson_interval(wins, n)
  return {
      "win_rate": wins / n, "ci_low": lo, "ci_high": hi, "n": n, "ties": int(ties),
      "outcomes": outcomes
  }


def head_to_head(scores: Sequence[dict], ppo_ptx_scores: Optional[Sequence[dict]],
                 judges: Sequence[labelers_lib.Labeler], seed: int) -> dict:
  """`{"win_vs_ppo_ptx": win_rate(...)}` of a method's answers against PPO-ptx's on the same
  prompts, or `{}` without PPO-ptx's (a method judged against SFT only)."""
  if ppo_ptx_scores is None:
    return {}
  return {"win_vs_ppo_ptx": win_rate(scores, ppo_ptx_scores, judges, seed=seed + 1000)}


def mean_utility(scores: Sequence[dict], judges: Sequence[labelers_lib.Labeler]) -> float:
  """The judges' average utility of the answers (the held-out labelers' score)."""
  return float(np.mean([[j.utility(s) for j in judges] for s in scores]))


def rates(scores: Sequence[dict], categories: Sequence[str]) -> dict:
  """Per-model summary: mean components, and the honesty / harmlessness analogues."""

  def mean(key, category=None):
    rows = [s[key] for s, c in zip(scores, categories) if category in (None, c)]
    return float(np.mean(rows)) if rows else None  # JSON null: no such prompts.

  return {
      "help": mean("help"), "honest": mean("honest"), "harmless": mean("harmless"),
      "format": mean("format"), "made_up_closed_qa": mean("made_up", "closed_qa"),
      "toxic_respectful": mean("toxic", "respectful"), "toxic_all": mean("toxic"),
      "complied_harmful": mean("complied", "harmful"),
      "counts": {c: int(sum(x == c for x in categories)) for c in T.CATEGORIES}
  }
