"""HIR in the world: hindsight instruction relabeling (Zhang et al. 2023), the `hir` method.

Starting from the SFT policy, `rounds` times (the paper's Algorithm 1):
  online    the current policy answers PPO training prompts (`samples_per_prompt` answers
            each, `prompts_per_round` prompts drawn afresh each round) under the instruction
            to answer well: `<|good|>` before the prompt (the first round samples SFT on the
            plain prompt, the instruction it was trained on). The world's judge (a program,
            `experiments.world.tasks.judge`, not a labeler) says whether each answer did what
            was asked: helpful (full credit), honest, harmless and in the asked format.
  offline   every answer so far is relabeled to the instruction it satisfies, `<|good|>` or
            `<|bad|>` before its prompt, and the policy is trained from the previous round's
            on them with the relabeled likelihood, the contrastive instruction term and the
            entropy bonus (`instruct.data.hindsight`; the `sft` stage's config with
            `data.kind='hindsight'`), into `DIR/hir/round_<r>`.
No reward model, no critic, no labeler. The online samples add up to PPO's (iterations x
batch), so HIR and PPO-ptx are compared at a matched sample budget. The trained policy is
asked after `<|good|>`, both control tokens banned.

Each round's records are written atomically (`DIR/hir/data_round_<r>_{train,validation}.jsonl`,
the same bytes on a rerun) before its training, which resumes like any stage; a finished
round is skipped.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Sequence

import numpy as np

from experiments.world import evaluate as ev
from experiments.world import generate as world_lib
from experiments.world import tasks as T
from instruct import paths
from instruct import run as run_lib
from instruct.data import hindsight as hindsight_lib
from instruct.data import tokenization

STAGE = "hir"
GOOD, BAD = "<|good|>", "<|bad|>"


# yapf: disable
@dataclasses.dataclass(frozen=True)
class Settings:
  """The method's sizes (`settings_for`)."""
  rounds: int = 4
  samples_per_prompt: int = 2
  steps_per_round: int = 60
  learning_rate: float = 1e-3
  alpha: float = 1.0             # Contrastive instruction term.
  beta: float = 0.01             # Entropy bonus.
  validation_prompts: int = 64   # Per round, one answer each.

  def check(self) -> None:
    """Raises ValueError `config.hir.KEY=value: must be ...` for an impossible value."""
    for key in ("rounds", "samples_per_prompt", "steps_per_round", "validation_prompts"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"config.hir.{key}={value!r}: must be an integer >= 1.")
    for key, strict in (("learning_rate", True), ("alpha", False), ("beta", False)):
      value = getattr(self, key)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value) or value < 0 or (strict and value == 0)):
        raise ValueError(f"config.hir.{key}={value!r}: must be a finite number "
                         f"{'>' if strict else '>='} 0.")
# yapf: enable


def settings_for(preset) -> Settings:
  """`Settings` sized for a main-job preset (the `test` preset's are tiny), with the job
  config's `hir` settings (`preset.hir`); ValueError naming a bad one."""
  base = Settings(rounds=2, steps_per_round=4,
                  validation_prompts=16) if preset.name == "test" else Settings()
  settings = dataclasses.replace(base, **dict(getattr(preset, "hir", ())))
  settings.check()
  return settings


def prompts_per_round(preset, settings: Settings) -> int:
  """Prompts per round so that all rounds sample as many answers as PPO does."""
  budget = preset.ppo_iterations * preset.ppo_batch
  return max(1, budget // (settings.rounds * settings.samples_per_prompt))


def round_dir(root: str, r: int) -> str:
  return paths.join(root, STAGE, f"round_{r}")


def final_policy_dir(root: str, preset) -> str:
  return round_dir(root, settings_for(preset).rounds)


def satisfied(scores: dict) -> bool:
  """Whether an answer did what its prompt asked: full help, honest, harmless, in format."""
  return all(scores[c] == 1.0 for c in T.COMPONENTS)


def _read_prompts(path: str) -> list[str]:
  return [r["prompt"] for r in paths.read_jsonl(path)]


PROMPT_LENGTH = 32  # The prompt tokens the other models are sampled on (PPO's, evaluation's).


def sample(policy, tokenizer, prompts: Sequence[str], *, instructed: bool, seed: int,
           temperature: float) -> list[ev.Answer]:
  """One answer per prompt, asked after `<|good|>` if `instructed`, on the same prompt tokens
  the other models see (the world's tokenizer is word-level: one word, one token), with
  neither control token sampled."""
  inputs = [
      (f"{GOOD} " if instructed else "") + " ".join(p.split()[-PROMPT_LENGTH:]) for p in prompts
  ]
  banned = tuple(tokenizer.convert_tokens_to_ids([GOOD, BAD]))
  return ev.generate(policy, tokenizer, inputs, seed=seed, temperature=temperature,
                     prompt_length=PROMPT_LENGTH + 1, banned_ids=banned)


def _records(policy, tokenizer, prompts: Sequence[str], k: int, instructed: bool, facts, seed,
             temperature) -> list[dict]:
  answers = sample(policy, tokenizer, [p for p in prompts for _ in range(k)], instructed=instructed,
                   seed=seed, temperature=temperature)
  out = []
  for i, a in enumerate(answers):
    prompt = prompts[i // k]
    if not a.words:
      continue  # An immediate EOS: nothing to relabel.
    verdict = satisfied(T.judge(prompt.split(), a.words, facts, a.ended))
    out.append({"prompt": prompt, "completion": " " + a.text, "satisfied": verdict})
  return out


def _write_records(path: str, rows: Sequence[dict]) -> None:
  paths.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def hir_stage(root: str, preset, sft_config, train: Callable[[Any, str], None]) -> None:
  """Runs (or resumes) the rounds of the module docstring; `sft_config` is the main job's
  `sft` stage config, `train(config, workdir)` runs an `instruct.train` config."""
  settings = settings_for(preset)
  files = world_lib.files(paths.join(root, "world"))
  facts = world_lib.load_facts(paths.join(root, "world"))
  tokenizer = tokenization.load_tokenizer(files["tokenizer_control"])
  train_prompts = _read_prompts(files["ppo_prompts"]["train"])
  validation_prompts = _read_prompts(files["ppo_prompts"]["validation"])
  n = min(prompts_per_round(preset, settings), len(train_prompts))
  paths.makedirs(paths.join(root, STAGE))
  stats_path = paths.join(root, STAGE, "rounds.json")
  stats = json.loads(paths.read_text(stats_path)) if paths.exists(stats_path) else {}
  previous = paths.join(root, "sft")
  for r in range(1, settings.rounds + 1):
    workdir = round_dir(root, r)
    config = _round_config(sft_config, preset, settings, root, r, previous, files)
    previous = workdir
    if run_lib.finished(workdir, config.train.num_steps):
      continue
    data = {
        s: paths.join(root, STAGE, f"data_round_{r}_{s}.jsonl") for s in ("train", "validation")
    }
    if not paths.exists(data["validation"]):
      policy = ev.load_policy(config.init_from)
      rng = np.random.default_rng([preset.seed, r])
      picked = [train_prompts[i] for i in rng.choice(len(train_prompts), n, replace=False)]
      seed = preset.seed + 500 + 10 * r
      new = {
          "train": _records(policy, tokenizer, picked, settings.samples_per_prompt, r > 1, facts,
                            seed, preset.eval_temperature),
          "validation": _records(policy, tokenizer,
                                 validation_prompts[:settings.validation_prompts], 1, r > 1, facts,
                                 seed + 1, preset.eval_temperature)
      }
      stats[str(r)] = {
          "samples": len(picked) * settings.samples_per_prompt,
          "satisfied": float(np.mean([x["satisfied"] for x in new["train"]])),
          "validation_satisfied": float(np.mean([x["satisfied"] for x in new["validation"]]))
      }
      paths.write_text_atomic(stats_path, json.dumps(stats, indent=1))
      for split in ("train", "validation"):  # Validation last: it marks the round's data done.
        old = (paths.read_jsonl(paths.join(root, STAGE, f"data_round_{r - 1}_{split}.jsonl"))
               if r > 1 else [])
        _write_records(data[split], old + new[split])
    train(config, workdir)


def _round_config(sft_config, preset, settings: Settings, root: str, r: int, init_from: str,
                  files: dict):
  c = sft_config.copy_and_resolve_references()
  c.data.kind = hindsight_lib.KIND
  c.data.tokenizer = files["tokenizer_control"]
  c.data.train_file = paths.join(root, STAGE, f"data_round_{r}_train.jsonl")
  c.data.validation_file = paths.join(root, STAGE, f"data_round_{r}_validation.jsonl")
  c.init_from = init_from
  c.hindsight.alpha, c.hindsight.beta = settings.alpha, settings.beta
  c.hindsight.good_token, c.hindsight.bad_token = GOOD, BAD
  c.train.num_steps = settings.steps_per_round
  c.train.eval_every = c.train.checkpoint_every = settings.steps_per_round
  c.train.log_every = max(1, settings.steps_per_round // 5)
  c.optimizer.learning_rate = settings.learning_rate
  c.optimizer.warmup_steps = min(5, settings.steps_per_round // 5)
  c.seed = preset.seed + r
  return c


def evaluate_hir(root: str, preset, texts: Sequence[str], prompts: Sequence[str],
                 categories: Sequence[str], facts, judges, sft_scores: Sequence[dict], seed: int,
                 ppo_ptx_scores: Sequence[dict] | None = None) -> dict[str, Any]:
  """The final HIR policy on the held-out prompts (asked after `<|good|>`), judged against the
  main SFT's answers by the held-out labelers; its perplexity on held-out pages (plain text),
  its rates, and the rounds' fraction of satisfied samples."""
  tokenizer = tokenization.load_tokenizer(
      world_lib.files(paths.join(root, "world"))["tokenizer_control"])
  policy = ev.load_policy(final_policy_dir(root, preset))
  answers = sample(policy, tokenizer, prompts, instructed=True, seed=preset.seed + 17,
                   temperature=preset.eval_temperature)
  scores = ev.judge_all(prompts, answers, facts)
  rates = ev.rates(scores, categories)
  settings = settings_for(preset)
  rounds = json.loads(paths.read_text(paths.join(root, STAGE, "rounds.json")))
  return {
      "label": "HIR", "stage": STAGE, "win_vs_sft": ev.win_rate(scores, sft_scores, judges, seed),
      **ev.head_to_head(scores, ppo_ptx_scores, judges, seed), "perplexity": ev.perplexity(
          policy, tokenizer, texts), "mean_utility": ev.mean_utility(scores, judges), **{
              k: rates[k] for k in ("honest", "harmless", "toxic_respectful", "complied_harmful")
          }, "samples": sum(r["samples"] for r in rounds.values()), "rounds": rounds,
      "settings": dataclasses.asdict(settings)
  }
