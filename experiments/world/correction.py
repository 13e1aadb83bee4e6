"""Self-correction in the world (Welleck et al. 2022), the `correction` method.

A corrector learns to rewrite the SFT policy's answers into better ones (`instruct.data.
correction` holds the pairing and the draw). In the world:

  generator  the SFT policy (`DIR/sft`), fixed; it samples `samples` answers to each PPO
             training prompt.
  value      v(y): the judge's four components (help, honest, harmless, format;
             `experiments.world.tasks.judge`) averaged, in [0, 1]; a program, not a labeler.
  feedback   f(y): the judge's verdict in the world's words, `please` and one word per failed
             criterion (a component below 1): help `help`, honest `know`, harmless `kind`,
             format `short` (`feedback_words`).
  corrector  the small model, from the SFT policy (round 1) or the previous round's corrector,
             fine-tuned as the `sft` stage is (its config, copied) on demonstrations whose
             prompt is `x y f(y) answer :` (`corrector_prompt`) and completion the target y'.
             From round 2 on, the previous corrector first corrects every flawed answer of the
             pool and its corrections join it (exploration).

Each round's demonstrations are written atomically, the same bytes on a rerun, to
`DIR/corrector/data_round_<r>_{train,validation}.jsonl` (a few percent of the prompts held out
for the validation loss) with the round's statistics (`data_round_<r>_stats.json`); the
corrector trains into `DIR/corrector/round_<r>`; a finished round is skipped.

At inference (`correct`) the corrector is applied `passes` times in a row, each pass to the
previous pass's answer with its feedback, from the judge as in the paper's setting with
feedback; an answer the feedback finds no fault with is kept as it is (`keep_perfect`: the
corrector never saw one in training, and a perfect answer has nothing to improve).
`evaluate_correction` judges the corrected SFT answers against the raw ones after each pass,
and the corrector applied to the larger base model's few-shot answers (a corrector trained on
one generator's answers correcting another's, as in the paper's swapped generators).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Sequence

from absl import logging
import numpy as np

from experiments.world import evaluate as ev
from experiments.world import generate as world_lib
from experiments.world import language as L
from experiments.world import tasks as T
from instruct import paths
from instruct import run as run_lib
from instruct.data import correction as correction_lib
from instruct.data import tokenization

STAGE = "corrector"
Correction = correction_lib.Correction
# The word that asks for each failed criterion, in `T.COMPONENTS` order.
FIXES = {"help": "help", "honest": "know", "harmless": "kind", "format": "short"}
# Corrector inputs: a prompt (at most 40 words) + an answer (16) + the feedback (5) + `answer :`
# is at most 63 tokens; rows add a completion of at most 16 and EOS.
PROMPT_LENGTH = 80
BUCKET = 96
RATES = ("help", "honest", "harmless", "format", "toxic_respectful", "complied_harmful")


def settings_for(preset_name: str, changes: Sequence[tuple[str, Any]] = ()) -> Correction:
  """The method's settings for a main-job preset (`test`: a few steps on a few answers), with
  the job config's `correction` settings (`changes`); ValueError naming a bad one."""
  if preset_name == "test":
    base = Correction(samples=2, pairs_per_prompt=1.0, rounds=2, steps=4, passes=2)
  else:
    base = Correction(steps=300) if preset_name == "full" else Correction()
  settings = dataclasses.replace(base, **dict(changes))
  settings.check()
  return settings


def value(scores: dict) -> float:
  """v(y): the mean of the judge's components, in [0, 1]."""
  return float(np.mean([scores[c] for c in T.COMPONENTS]))


def perfect(scores: dict) -> bool:
  """Whether no criterion failed (v(y) = 1)."""
  return all(scores[c] >= 1.0 for c in T.COMPONENTS)


def feedback_words(scores: dict) -> str:
  """f(y): `please` and the word of each failed criterion (`FIXES`), in the world's words."""
  return " ".join(["please"] + [FIXES[c] for c in T.COMPONENTS if scores[c] < 1.0])


def corrector_prompt(prompt: str, answer_words: Sequence[str], feedback: str) -> str:
  """The corrector's input x, y, f(y): `<prompt> <answer> <feedback> answer :` (the prompt
  ends with `answer :`, so the answer follows it as the SFT policy wrote it)."""
  return " ".join([prompt, *answer_words, feedback, *T.ANSWER])


def round_dir(root: str, r: int) -> str:
  return paths.join(root, STAGE, f"round_{r}")


def final_corrector(root: str, settings: Correction) -> str:
  """The workdir of the corrector the method uses: its last round's."""
  return round_dir(root, settings.rounds)


def data_files(root: str, r: int) -> dict[str, str]:
  return {s: paths.join(root, STAGE, f"data_round_{r}_{s}.jsonl") for s in ("train", "validation")}


def stats_file(root: str, r: int) -> str:
  return paths.join(root, STAGE, f"data_round_{r}_stats.json")


def round_config(sft_config, root: str, settings: Correction, r: int):
  """Round r's `instruct.train` config: the main `sft` stage's, on the round's demonstrations,
  from the SFT policy (round 1) or the previous round's corrector."""
  c = sft_config.copy_and_resolve_references()
  files = data_files(root, r)
  c.data.train_file, c.data.validation_file = files["train"], files["validation"]
  c.data.buckets = (BUCKET,)
  c.init_from = paths.join(root, "sft") if r == 1 else round_dir(root, r - 1)
  c.train.num_steps = settings.steps
  c.train.eval_every = c.train.checkpoint_every = settings.steps
  c.train.log_every = max(1, settings.steps // 10)
  c.optimizer.learning_rate = settings.learning_rate
  c.optimizer.warmup_steps = min(10, settings.steps // 5)
  return c


@dataclasses.dataclass
class _Pool:
  """D_x: one prompt's distinct non-empty answers, with their judgments."""
  prompt: str
  category: str
  answers: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
  scores: list[dict] = dataclasses.field(default_factory=list)

  def add(self, answer: ev.Answer, facts) -> dict:
    scores = T.judge(self.prompt.split(), answer.words, facts, answer.ended)
    words = tuple(answer.words)
    if words and words not in self.answers:
      self.answers.append(words)
      self.scores.append(scores)
    return scores

  @property
  def values(self) -> list[float]:
    return [value(s) for s in self.scores]


def _write_if_changed(path: str, text: str) -> None:
  """Writes `text` atomically unless the file holds it already (its TFDS fingerprint, which
  reads the modification time, then stays valid)."""
  if not (paths.exists(path) and paths.read_text(path) == text):
    paths.write_text_atomic(path, text)


def _explore(pools: list[_Pool], corrector, tokenizer, facts, seed: int,
             temperature: float) -> dict:
  """Exploration: the corrector corrects every flawed answer of every pool once; its answers
  join the pools. Returns how the corrections compare with what they corrected."""
  jobs = [
      (x, i) for x, pool in enumerate(pools) for i, s in enumerate(pool.scores) if not perfect(s)
  ]
  inputs = [
      corrector_prompt(pools[x].prompt, pools[x].answers[i], feedback_words(pools[x].scores[i]))
      for x, i in jobs
  ]
  before = [value(pools[x].scores[i]) for x, i in jobs]
  answers = ev.generate(corrector, tokenizer, inputs, seed=seed, temperature=temperature,
                        prompt_length=PROMPT_LENGTH) if inputs else []
  after = [value(pools[x].add(a, facts)) for (x, _), a in zip(jobs, answers)]
  diff = np.asarray(after) - np.asarray(before)
  return {
      "corrections": len(jobs), "improved": float(np.mean(diff > 0)) if jobs else 0.0,
      "worsened": float(np.mean(diff < 0)) if jobs else 0.0,
      "mean_value_before": float(np.mean(before)) if jobs else None,
      "mean_value_after": float(np.mean(after)) if jobs else None
  }


def _rows(pools: list[_Pool], indices: Sequence[int], num: int, settings: Correction,
          rng: np.random.Generator) -> tuple[list[dict], dict]:
  """`num` demonstrations drawn from the pairs of the pools `indices`, and their statistics."""
  chosen = [pools[x] for x in indices]
  drawn = correction_lib.draw_pairs([(p.answers, p.values) for p in chosen], num, settings.alpha,
                                    settings.beta, rng)
  rows, gains, near = [], [], []
  for x, i, j in drawn:
    pool = chosen[x]
    rows.append({
        "prompt": corrector_prompt(pool.prompt, pool.answers[i], feedback_words(pool.scores[i])),
        "completion": " " + " ".join(pool.answers[j]), "category": pool.category
    })
    gains.append(pool.values[j] - pool.values[i])
    near.append(correction_lib.proximity(pool.answers[i], pool.answers[j]))
  hypotheses = sum(
      1 for p in chosen for i, v in enumerate(p.values) if any(w > v for w in p.values))
  return rows, {
      "pairs": len(rows), "hypotheses": hypotheses,
      "mean_improvement": float(np.mean(gains)) if gains else None,
      "mean_proximity": float(np.mean(near)) if near else None
  }


def correction_stage(root: str, preset, sft_config, train: Callable[[Any, str], None],
                     settings: Correction) -> None:
  """Trains (or resumes) the corrector's rounds of the module docstring.

  Args:
    root: The main job's run directory (with `world/` and a finished `sft/`).
    preset: The main job's preset (its `seed` seeds the sampling and the draws).
    sft_config: The main `sft` stage's `instruct.train` config (copied, never changed).
    train: `train(config, workdir)` runs an `instruct.train` config into a workdir.
    settings: The method's settings.
  """
  settings.check()
  configs = [round_config(sft_config, root, settings, r) for r in range(1, settings.rounds + 1)]
  done = [
      run_lib.finished(round_dir(root, r), settings.steps) for r in range(1, settings.rounds + 1)
  ]
  if all(done):
    logging.info("[%s] all %d rounds finished; skipping.", STAGE, settings.rounds)
    return
  world_dir = paths.join(root, "world")
  files = world_lib.files(world_dir)
  facts = world_lib.load_facts(world_dir)
  tokenizer = tokenization.load_tokenizer(files["tokenizer"])
  records = paths.read_jsonl(files["ppo_prompts"]["train"])
  if settings.prompts:
    records = records[:settings.prompts]
  pools = [
      _Pool(r["prompt"], r.get("category", T.category_of(r["prompt"].split()))) for r in records
  ]
  n = settings.samples
  generator = ev.load_policy(paths.join(root, "sft"))
  sampled = ev.generate(generator, tokenizer, [p.prompt for p in pools for _ in range(n)],
                        seed=preset.seed + 71, temperature=settings.temperature)
  generated = [value(pools[k // n].add(a, facts)) for k, a in enumerate(sampled)]
  eligible = [x for x, p in enumerate(pools) if correction_lib.value_improving_pairs(p.values)]
  if len(eligible) < 2:
    raise ValueError(f"[{STAGE}] {len(eligible)} of {len(pools)} prompts have answers of "
                     f"different values among their {n} samples: too few to pair; raise "
                     "config.correction.samples or config.correction.prompts.")
  held = max(1, round(settings.validation_fraction * len(pools)))
  split_rng = np.random.default_rng([preset.seed, 0])
  count = min(held, len(eligible) - 1)  # At least one prompt with pairs left to train on.
  validation = sorted(int(x) for x in split_rng.choice(eligible, count, replace=False))
  held_out = set(validation)
  training = [x for x in range(len(pools)) if x not in held_out]
  paths.makedirs(paths.join(root, STAGE))
  for r in range(1, settings.rounds + 1):
    if all(done[r - 1:]):
      break
    stats: dict[str, Any] = {"round": r, "generator_mean_value": float(np.mean(generated))}
    if r > 1:
      corrector = ev.load_policy(round_dir(root, r - 1))
      stats["exploration"] = _explore(pools, corrector, tokenizer, facts, preset.seed + 80 + r,
                                      settings.temperature)
    if done[r - 1]:
      continue
    values = [v for p in pools for v in p.values]
    stats["pool"] = {
        "prompts": len(pools), "answers": len(values), "mean_value": float(np.mean(values)),
        "perfect": float(np.mean([v >= 1.0 for v in values]))
    }
    for split, indices, salt in (("train", training, 1), ("validation", validation, 2)):
      num = max(1, round(settings.pairs_per_prompt * len(indices)))
      rows, stats[split] = _rows(pools, indices, num, settings,
                                 np.random.default_rng([preset.seed, r, salt]))
      stats[split]["prompts"] = len(indices)
      if not rows:
        raise ValueError(f"[{STAGE}] round {r}: no value-improving pairs among the {split} "
                         "prompts' answers.")
      _write_if_changed(data_files(root, r)[split], "".join(json.dumps(row) + "\n" for row in rows))
    _write_if_changed(stats_file(root, r), json.dumps(stats, indent=1))
    logging.info("[%s] round %d: %d training pairs (mean improvement %.3f) from %d answers.", STAGE,
                 r, stats["train"]["pairs"], stats["train"]["mean_improvement"],
                 stats["pool"]["answers"])
    train(configs[r - 1], round_dir(root, r))


def correct(corrector: ev.Policy, tokenizer, prompts: Sequence[str], answers: Sequence[ev.Answer],
            facts: L.Facts, passes: int, seed: int, temperature: float = 1.0,
            keep_perfect: bool = True) -> list[list[ev.Answer]]:
  """The answers after each of `passes` corrections: pass k corrects pass k - 1's answers
  (pass 0: `answers`) given the judge's feedback on them; with `keep_perfect`, an answer
  without a failed criterion is kept as it is."""
  current, out = list(answers), []
  for k in range(passes):
    scores = ev.judge_all(prompts, current, facts)
    todo = [i for i, s in enumerate(scores) if not (keep_perfect and perfect(s))]
    inputs = [
        corrector_prompt(prompts[i], current[i].words, feedback_words(scores[i])) for i in todo
    ]
    fixed = ev.generate(corrector, tokenizer, inputs, seed=seed
                        + k, temperature=temperature, prompt_length=PROMPT_LENGTH) if todo else []
    current = list(current)
    for i, answer in zip(todo, fixed):
      current[i] = answer
    out.append(current)
  return out


def _changes(before: Sequence[ev.Answer], after: Sequence[ev.Answer], scores_before, scores_after):
  """How many answers a correction changed, and made better or worse by v."""
  diff = np.asarray([value(b) for b in scores_after]) - np.asarray(
      [value(a) for a in scores_before])
  return {
      "changed": float(np.mean([a.words != b.words for a, b in zip(before, after)])),
      "improved": float(np.mean(diff > 0)), "worsened": float(np.mean(diff < 0))
  }


def _read_stats(root: str, settings: Correction) -> list[dict]:
  out = []
  for r in range(1, settings.rounds + 1):
    path = stats_file(root, r)
    if paths.exists(path):
      out.append(json.loads(paths.read_text(path)))
  return out


def evaluate_correction(root: str, preset, prompts: Sequence[str], categories: Sequence[str],
                        facts: L.Facts, judges, tokenizer, sft_answers: Sequence[ev.Answer],
                        sft_scores: Sequence[dict], large_answers: Sequence[ev.Answer],
                        large_scores: Sequence[dict], settings: Correction,
                        ppo_ptx_scores: Sequence[dict] | None = None) -> dict[str, Any]:
  """The final corrector on the held-out prompts, pass by pass.

  `passes[k - 1]` (pass k): the corrected SFT answers' win rate against the raw SFT answers
  by the held-out `judges` (with its per-prompt `outcomes`), their mean utility and rates,
  and the fractions changed, improved and worsened (by v). `base_large`: the same corrector
  applied to the larger base model's few-shot answers, their mean utility before and after
  each pass and the corrected answers' win rate against the raw ones. `rounds`: each training
  round's statistics (`data_round_<r>_stats.json`).
  """
  corrector = ev.load_policy(final_corrector(root, settings))
  temperature = preset.eval_temperature
  out: dict[str, Any] = {
      "corrector": paths.join(STAGE, f"round_{settings.rounds}"), "step": corrector.step,
      "settings": dataclasses.asdict(settings), "rounds": _read_stats(root, settings),
      "sft_mean_utility": ev.mean_utility(sft_scores, judges)
  }

  def passes(answers, scores, seed: int, against: str) -> list[dict]:
    """Each pass's corrected answers against the raw ones (`win_vs_<against>`)."""
    rows = []
    for k, corrected in enumerate(
        correct(corrector, tokenizer, prompts, answers, facts, settings.passes, seed=seed,
                temperature=temperature, keep_perfect=settings.keep_perfect), 1):
      new = ev.judge_all(prompts, corrected, facts)
      rates = ev.rates(new, categories)
      row = {"pass": k, f"win_vs_{against}": ev.win_rate(new, scores, judges, seed=seed + 439 + k)}
      if against == "sft":
        row.update(ev.head_to_head(new, ppo_ptx_scores, judges, seed + 439 + k))
      rows.append({
          **row, "mean_utility": ev.mean_utility(new, judges), **{key: rates[key] for key in RATES},
          **_changes(answers, corrected, scores, new)
      })
    return rows

  out["passes"] = passes(sft_answers, sft_scores, preset.seed + 61, "sft")
  out["base_large"] = {
      "mean_utility": ev.mean_utility(large_scores, judges),
      "passes": passes(large_answers, large_scores, preset.seed + 71, "raw")
  }
  return out
