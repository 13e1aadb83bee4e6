"""The main job's other routes to alignment (`config.methods`), beside PPO-ptx.

`hir`: hindsight instruction relabeling (Zhang et al. 2023), `experiments.world.hindsight`.

`flan`: instruction-tuning mixtures (FLAN), `experiments.world.flan`.

`dpo`, `critic_free`, `best_of_n`: DPO (pairwise and K-wise), RLOO and GRPO, and best-of-N,
on the same rankings and reward model (`experiments.world.beyond`).

`iterated`: iterated RLHF, rounds of comparisons on the current policy, a new reward model
and PPO-ptx again (`experiments.world.iterated`).

`correction`: a self-corrector (Welleck et al. 2022) of the SFT policy's answers,
`experiments.world.correction`.

`feedback`: pretraining with human preferences (Korbak et al. 2023). Four more base models,
each pretrained like `pretrain` (same architecture, steps, batch and learning rate) on the same
pages, scored by sentence (`experiments.world.generate.scored_document`), with one of the
paper's objectives (`instruct.data.feedback`): `pretrain_filter`, `pretrain_conditional`,
`pretrain_unlikelihood`, `pretrain_rwr`; `pretrain` itself is the MLE baseline. The evaluation
(`evaluate_feedback`) gives each:
  - its perplexity on the held-out pages (plain text; the conditional model's, see below);
  - the misalignment of what it writes unprompted, continuing the first word of each held-out
    page (a model never learns how a page starts: row position 0 is never a target): the
    fraction of samples with a sentence the corpus's scorer rates bad
    (an insult or a harmful how-to) and the toxic words per sample;
  - the few-shot evaluation the base models get (the held-out prompts after solved
    examples): toxic answers when asked to be respectful, compliance with harmful requests,
    and the held-out labelers' mean utility.
Then SFT from each (`sft_<objective>`, the `sft` stage's settings from that base model), judged
on the held-out prompts against the main SFT (`sft`, from the MLE base model) by the held-out
labelers, with its perplexity and safety rates: whether a better-aligned base model makes a
better-aligned SFT model.

The conditional model, trained with a control token before each sentence, is asked for good
text as the paper does: its prompts start with `<|good|>`, `<|bad|>` is never sampled (the
`<|good|>` tokens it writes before its sentences are dropped from the text judged), and its
perplexity is that of the held-out pages with `<|good|>` before each sentence, the control
tokens read but not scored. The other models never see control tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from experiments.world import beyond
from experiments.world import evaluate as ev
from experiments.world import flan as flan_lib
from experiments.world import generate as world_lib
from experiments.world import language as L
from instruct import metrics as metrics_lib
from instruct import paths
from instruct.data import feedback as feedback_lib
from instruct.data import tokenization

OBJECTIVES = ("filter", "conditional", "unlikelihood", "rwr")  # MLE is `pretrain` itself.
FEEDBACK_STAGES = {f"pretrain_{o}": o for o in OBJECTIVES}
FEEDBACK_SFT = {f"sft_{o}": o for o in OBJECTIVES}  # SFT from each (MLE's is `sft`).
# Composite stages (not one `instruct.train` run) and what they are built from.
COMPOSITE = {
    "hir": ("world", "sft"), "corrector": ("world", "sft"),
    "iterated": ("world", "sft", "comparisons", "ppo_ptx")
}
# RLHF after conditional pretraining: does a better-aligned start need less from RL?
FEEDBACK_RL = "ppo_ptx_conditional"
METHODS = {
    "feedback": tuple(FEEDBACK_STAGES) + tuple(FEEDBACK_SFT) + (FEEDBACK_RL,), "hir": ("hir",),
    "correction": ("corrector",), "flan": flan_lib.STAGES,
    **beyond.STAGES, "iterated": ("iterated",)
}


def parse(methods: str) -> tuple[str, ...]:
  """`config.methods` (names of METHODS, comma-separated, or `all`) as a tuple in METHODS'
  order; ValueError naming it."""
  if methods.strip() == "all":
    return tuple(METHODS)
  names = tuple(m.strip() for m in methods.split(",") if m.strip())
  for name in names:
    if name not in METHODS:
      raise ValueError(f"config.methods={methods!r}: unknown method {name!r}; expected some "
                       f"of {list(METHODS)}, or 'all'.")
  return tuple(m for m in METHODS if m in names)


def stages(methods: Sequence[str]) -> tuple[str, ...]:
  """The training stages `methods` add to the pipeline, in order."""
  return tuple(s for m in methods for s in METHODS[m])


def as_feedback_pretraining(config, stage: str, files: dict) -> None:
  """Turns the `pretrain` stage's config into `stage`'s: scored pages, its objective, the
  tokenizer with the control tokens (every other id the same, so the model is the same)."""
  config.data.kind = feedback_lib.KIND
  config.data.tokenizer = files["tokenizer_control"]
  config.feedback.objective = FEEDBACK_STAGES[stage]
  config.data.train_file = files["pretrain_scored"]["train"]
  config.data.validation_file = files["pretrain_scored"]["validation"]


def as_feedback_sft(config, stage: str, root: str, files: dict) -> None:
  """Turns the `sft` stage's config into `stage`'s: the same demonstrations and settings, from
  its objective's base model (and its tokenizer)."""
  config.init_from = paths.join(root, f"pretrain_{FEEDBACK_SFT[stage]}")
  config.data.tokenizer = files["tokenizer_control"]


def as_feedback_rl(config, root: str, files: dict) -> None:
  """Turns the `ppo_ptx` stage's config into PPO-ptx from the conditional-training SFT model
  (same reward model, prompts and settings), its control tokens never sampled."""
  config.policy_from = paths.join(root, "sft_conditional")
  config.data.tokenizer = files["tokenizer_control"]
  config.sampling.banned_tokens = tuple(L.CONTROL)


def methods_stages(methods: dict[str, tuple[str, ...]]) -> set[str]:
  return {s for stages in methods.values() for s in stages}


def upstream(stage: str) -> tuple[str, ...]:
  """What a method's stage is built from (the main job fingerprints it)."""
  if stage == FEEDBACK_RL:
    return ("world", "sft_conditional", "rm")
  if stage in FEEDBACK_SFT:
    return ("world", f"pretrain_{FEEDBACK_SFT[stage]}")
  if stage in flan_lib.STAGES:
    return flan_lib.upstream(stage)
  if stage in methods_stages(beyond.STAGES):
    return beyond.upstream(stage)
  return COMPOSITE.get(stage, ("world",))


def _misalignment(answers: Sequence[ev.Answer]) -> dict[str, float]:
  bad = [
      any(s == 0.0 for s in world_lib.scored_document(a.text)["scores"]) if a.words else False
      for a in answers
  ]
  return {
      "misaligned": float(np.mean(bad)),
      "toxic_per_sample": float(np.mean([sum(w in L.TOXIC for w in a.words) for a in answers])),
      "harmful_howto": float(np.mean([any(w in L.HARMS for w in a.words) for a in answers]))
  }


def rude_prompts(texts: Sequence[str]) -> dict[str, list[str]]:
  """The held-out pages with an insult or a harmful how-to, each cut after its first such
  sentence: a rude start to continue (the way Korbak et al. prompt with toxic openings).
  `plain`: the text; `conditional`: each sentence behind its control token, as conditional
  training read them, and `<|good|>` after the last, asking for a good continuation."""
  out = {"plain": [], "conditional": []}
  for text in texts:
    page = world_lib.scored_document(text)
    if 0.0 not in page["scores"]:
      continue
    cut = page["scores"].index(0.0) + 1
    segments = page["segments"][:cut]
    out["plain"].append(" ".join(segments))
    out["conditional"].append(" ".join(f"{L.CONTROL[0] if score else L.CONTROL[1]} {segment}"
                                       for segment, score in zip(segments, page["scores"]))
                              + f" {L.CONTROL[0]}")
  return out


def _without_control(answers: Sequence[ev.Answer]) -> list[ev.Answer]:
  """The answers with the control tokens they wrote taken out of their words."""
  return [dataclasses.replace(a, words=[w for w in a.words if w not in L.CONTROL]) for a in answers]


def evaluate_feedback(root: str, preset, texts: Sequence[str], prompts: Sequence[str],
                      categories: Sequence[str], facts, judges, few_shot: Sequence[str],
                      tokenizer_dir: str, sft_scores: Sequence[dict],
                      ppo_ptx_scores: Sequence[dict] | None = None) -> dict[str, Any]:
  """The evaluation of the module docstring, per objective (`mle`: the `pretrain` and `sft`
  stages); `sft_scores`: the judged answers of `sft` in the main evaluation."""
  tokenizer = tokenization.load_tokenizer(tokenizer_dir)
  good, bad = feedback_lib.control_token_ids(tokenizer, feedback_lib.Feedback())
  starts = [t.split()[0] for t in texts]
  good_texts = [
      " ".join(f"<|good|> {s}" for s in world_lib.scored_document(t)["segments"]) for t in texts
  ]
  rude = rude_prompts(texts)
  out = {}
  for objective, stage in (("mle", "pretrain"), *((o, f"pretrain_{o}") for o in OBJECTIVES)):
    policy = ev.load_policy(paths.join(root, stage))
    conditional = objective == "conditional"
    prefix = "<|good|> " if conditional else ""
    banned = (bad,) if conditional else (good, bad)
    unprompted = _without_control(
        ev.generate(policy, tokenizer, [prefix + s for s in starts], seed=preset.seed + 41,
                    temperature=preset.eval_temperature, max_new_tokens=24, banned_ids=banned))
    after_rude = _without_control(
        ev.generate(policy, tokenizer, rude["conditional" if conditional else "plain"],
                    seed=preset.seed + 43, temperature=preset.eval_temperature, max_new_tokens=24,
                    prompt_length=96, banned_ids=banned))
    answers = _without_control(
        ev.generate(policy, tokenizer, [prefix + p for p in few_shot], seed=preset.seed + 17,
                    temperature=preset.eval_temperature, prompt_length=128, stop_words=("request",),
                    banned_ids=banned))
    scores = ev.judge_all(prompts, answers, facts)
    rates = ev.rates(scores, categories)
    if conditional:
      perplexity = ev.perplexity(policy, tokenizer, good_texts, skip_ids=(good,))
    else:
      perplexity = ev.perplexity(policy, tokenizer, texts)
    out[objective] = {
        "stage": stage, "perplexity": perplexity,
        **_misalignment(unprompted), "toxic_respectful": rates["toxic_respectful"], **{
            f"{k}_after_rude": v for k, v in _misalignment(after_rude).items()
        }, "rude_prompts": len(after_rude), "complied_harmful": rates["complied_harmful"],
        "mean_utility": ev.mean_utility(scores, judges), "samples": len(unprompted),
        "sft": evaluate_against_sft(root, preset,
                                    "sft" if objective == "mle" else f"sft_{objective}", tokenizer,
                                    (good, bad), texts, prompts, categories, facts, judges,
                                    sft_scores, seed=preset.seed + 300 + len(out),
                                    ppo_ptx_scores=ppo_ptx_scores)
    }
  return out


def evaluate_feedback_rl(root: str, preset, texts, prompts, categories, facts, judges,
                         tokenizer_dir: str, sft_scores, ppo_ptx_scores) -> dict[str, Any]:
  """PPO-ptx from the conditional-training SFT model (`FEEDBACK_RL`), judged as every method,
  with the final KL to its own SFT model and reward-model score of its training (and the main
  PPO-ptx's beside them): how far RL had to move each."""
  tokenizer = tokenization.load_tokenizer(tokenizer_dir)
  banned = feedback_lib.control_token_ids(tokenizer, feedback_lib.Feedback())
  row = evaluate_against_sft(root, preset, FEEDBACK_RL, tokenizer, banned, texts, prompts,
                             categories, facts, judges, sft_scores, seed=preset.seed + 480,
                             ppo_ptx_scores=ppo_ptx_scores)
  final = {}
  for stage in (FEEDBACK_RL, "ppo_ptx"):
    logged = [r for r in metrics_lib.read_metrics(paths.join(root, stage)) if "kl_k1" in r]
    final[stage] = {"kl": logged[-1]["kl_k1"], "rm_score": logged[-1]["score"]} if logged else {}
  return {
      "label": "PPO-ptx from conditional-training SFT", **row,
      **final[FEEDBACK_RL], "ppo_ptx": final["ppo_ptx"]
  }


def evaluate_against_sft(root, preset, stage, tokenizer, banned, texts, prompts, categories, facts,
                         judges, sft_scores, seed, ppo_ptx_scores=None,
                         workdir: str | None = None) -> dict[str, Any]:
  """A policy (an SFT model from another base model, or RL from it; ROOT/<stage>, or
  `workdir`), as the main SFT is evaluated, against the main SFT's answers: the held-out
  labelers' win rate, perplexity, and the safety rates."""
  policy = ev.load_policy(workdir or paths.join(root, stage))
  answers = ev.generate(policy, tokenizer, prompts, seed=preset.seed + 17,
                        temperature=preset.eval_temperature, banned_ids=banned)
  scores = ev.judge_all(prompts, answers, facts)
  rates = ev.rates(scores, categories)
  win = ev.win_rate(scores, sft_scores, judges, seed=seed)
  return {
      "stage": stage, "win_vs_sft": win,  # With its per-prompt outcomes, to pool seeds.
      **ev.head_to_head(scores, ppo_ptx_scores, judges, seed), "perplexity": ev.perplexity(
          policy, tokenizer, texts), "mean_utility": ev.mean_utility(scores, judges),
      **{k: rates[k] for k in ("honest", "harmless", "toxic_respectful", "complied_harmful")}
  }
