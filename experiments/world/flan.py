r"""Instruction-tuning mixtures in the world (FLAN, Wei et al. 2022; Chung et al. 2022): `flan`.

  python -m experiments.world.flan --world=/tmp/world [--per_component=160]

writes the collection into a written world's `flan/` (what `configs/sft.py:tiny,mixture=DIR`
trains on); the main job writes it itself.

The world's public instruction datasets: tasks of six categories, those of academic NLP
benchmarks (`FLAN_CATEGORIES`: classification, extraction, closed and open QA, summarization,
rewriting), with their correct answers (the tasks' ideal answers, not labelers'
demonstrations), rendered through several templates each (`TEMPLATES`: the users' own
`request ... answer :` and four rephrasings) in zero-shot and few-shot styles (two solved
examples of the category before the task, in the same template). The other four categories
(`HELD_OUT`: open-ended generation, brainstorming, a harmful request, a request to be
respectful) are in no public dataset: what InstructGPT found most of its users asked for.
Prompts come from the training splits of the prompt space, never the evaluation prompts.

Each (category, template, style) is one file (`DIR/world/flan/<category>_<template>_<style>_
{train,validation}.jsonl`), and a FLAN model is the `sft` stage's config from the base small
model with `config.data.mixture` naming the files it mixes, equal weights
(`instruct.data.mixture`):

  flan_c1, flan_c2, flan_c4, flan    the first 1, 2, 4 and all 6 categories, every template,
                                     both styles
  flan_t1, flan_t3                   all categories, the first 1 or 3 templates
  flan_zero, flan_few                all categories and templates, one style only
  sft_flan                           the SFT stage from `flan` (instruction tuning, then the
                                     labelers' demonstrations)
  rm_flan, ppo_ptx_flan              the reward model from `sft_flan` on the same comparisons,
                                     and PPO-ptx from `sft_flan` against it

Every FLAN run trains as many steps on as many rows per step as SFT, so runs of fewer
categories see their data more often. `evaluate_flan` scores each on the held-out categories'
evaluation prompts, zero-shot and few-shot, and on the held-in ones zero-shot, by the
held-out labelers' mean utility; `sft_flan` and `ppo_ptx_flan` are judged against SFT like
every method.
"""

from __future__ import annotations

import json
import random
from typing import Any, Sequence

from absl import flags
import numpy as np

from experiments.world import evaluate as ev
from experiments.world import generate as world_lib
from experiments.world import tasks as T
from instruct import paths
from instruct.data import tokenization

FLAN_CATEGORIES = ("classification", "extraction", "closed_qa", "open_qa", "summarization",
                   "rewrite")
HELD_OUT = tuple(c for c in T.CATEGORIES if c not in FLAN_CATEGORIES)
# Template name -> (words before the task's body, words after it); the first is the users'.
TEMPLATES = {
    "request": (["request"], ["answer", ":"]),
    "please": (["please"], ["answer", ":"]),
    "can_you": (["can", "you"], ["answer", ":"]),
    "tell_me": (["tell", "me", ":"], ["answer", ":"]),
    "here_is": ([], ["here", "is", "the", "answer", ":"]),
}
STYLES = ("zero", "few")
# FLAN runs: (categories, templates, styles).
RUNS = {
    "flan_c1": (1, 5, STYLES),
    "flan_c2": (2, 5, STYLES),
    "flan_c4": (4, 5, STYLES),
    "flan": (6, 5, STYLES),
    "flan_t1": (6, 1, STYLES),
    "flan_t3": (6, 3, STYLES),
    "flan_zero": (6, 5, ("zero",)),
    "flan_few": (6, 5, ("few",)),
}
STAGES = tuple(RUNS) + ("sft_flan", "rm_flan", "ppo_ptx_flan")
FEW_SHOT_EXAMPLES = 2


def render(task: T.Task, template: str, examples: Sequence[T.Task] = ()) -> str:
  """A task's prompt in `template`, after solved `examples` (few-shot) if any."""
  before, after = TEMPLATES[template]

  def prompt(t: T.Task) -> list[str]:
    return before + t.prompt[1:-2] + after  # The body: without `request` and `answer :`.

  words = []
  for example in examples:
    words += prompt(example) + example.ideal
  return " ".join(words + prompt(task))


def component(category: str, template: str, style: str) -> str:
  return f"{category}_{template}_{style}"


def flan_dir(world_dir: str) -> str:
  return paths.join(world_dir, "flan")


def files_of(world_dir: str, name: str) -> dict[str, str]:
  return {s: paths.join(flan_dir(world_dir), f"{name}_{s}.jsonl") for s in ("train", "validation")}


def write_flan_files(world_dir: str, seed: int, per_component: int) -> None:
  """Writes every (category, template, style) file, `per_component` training records each and
  a tenth of that for validation, unless present (the same bytes for the same world)."""
  if paths.exists(paths.join(flan_dir(world_dir), "done.json")):
    return
  facts = world_lib.load_facts(world_dir)
  paths.makedirs(flan_dir(world_dir))
  for c, category in enumerate(FLAN_CATEGORIES):
    for t, template in enumerate(TEMPLATES):
      for s, style in enumerate(STYLES):
        rng = random.Random(f"flan/{seed}/{category}/{template}/{style}")
        for split, n in (("train", per_component), ("validation", max(2, per_component // 10))):
          rows = []
          for _ in range(n):
            task = world_lib.draw_task(rng, facts, seed, world_lib.TRAIN_SPLITS, category)
            examples = [
                world_lib.draw_task(rng, facts, seed, world_lib.TRAIN_SPLITS, category)
                for _ in range(FEW_SHOT_EXAMPLES if style == "few" else 0)
            ]
            rows.append({
                "prompt": render(task, template, examples),
                "completion": " " + " ".join(task.ideal), "category": category
            })
          path = files_of(world_dir, component(category, template, style))[split]
          paths.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
  paths.write_text_atomic(paths.join(flan_dir(world_dir), "done.json"),
                          json.dumps({"seed": seed, "per_component": per_component}))


def mixture(world_dir: str, run: str) -> dict[str, dict[str, Any]]:
  """`config.data.mixture` of a FLAN run: its components, equal weights."""
  categories, templates, styles = RUNS[run]
  out = {}
  for category in FLAN_CATEGORIES[:categories]:
    for template in list(TEMPLATES)[:templates]:
      for style in styles:
        name = component(category, template, style)
        f = files_of(world_dir, name)
        out[name] = {"train_file": f["train"], "validation_file": f["validation"], "weight": 1.0}
  return out


def upstream(stage: str) -> tuple[str, ...]:
  """What each FLAN stage is built from (the main job fingerprints it)."""
  if stage == "sft_flan":
    return ("world", "flan")
  if stage == "rm_flan":
    return ("world", "sft_flan", "comparisons")
  if stage == "ppo_ptx_flan":
    return ("world", "sft_flan", "rm_flan")
  return ("world", "pretrain")


def _split(prompts, categories, keep) -> tuple[list[str], list[str]]:
  pairs = [(p, c) for p, c in zip(prompts, categories) if c in keep]
  return [p for p, _ in pairs], [c for _, c in pairs]


def _utility(policy, tokenizer, prompts, inputs, facts, judges, seed, temperature) -> dict:
  answers = ev.generate(policy, tokenizer, inputs, seed=seed, temperature=temperature,
                        prompt_length=128, stop_words=("request",))
  scores = ev.judge_all(prompts, answers, facts)
  return {
      "mean_utility": ev.mean_utility(scores, judges),
      "help": float(np.mean([s["help"] for s in scores]))
  }


def evaluate_flan(root: str, preset, prompts: Sequence[str], categories: Sequence[str], facts,
                  judges, tokenizer_dir: str, examples: dict) -> dict[str, Any]:
  """Each FLAN run, and base small for reference, on the held-out categories' evaluation
  prompts zero-shot (the prompt as users write it) and few-shot (two solved examples of the
  category first: `examples`, the base models' few-shot examples) and on the held-in
  categories' zero-shot, by the held-out labelers' mean utility and the judge's help."""
  tokenizer = tokenization.load_tokenizer(tokenizer_dir)
  held_out, held_out_categories = _split(prompts, categories, HELD_OUT)
  held_in, _ = _split(prompts, categories, FLAN_CATEGORIES)
  few = [ev.few_shot_prompt(p, examples[c]) for p, c in zip(held_out, held_out_categories)]
  out = {"held_out": list(HELD_OUT), "held_out_prompts": len(held_out), "runs": {}}
  for run in ("pretrain",) + tuple(RUNS):
    policy = ev.load_policy(paths.join(root, run))
    args = (facts, judges, preset.seed + 800, preset.eval_temperature)
    row = {
        "held_out_zero": _utility(policy, tokenizer, held_out, held_out, *args),
        "held_out_few": _utility(policy, tokenizer, held_out, few, *args),
        "held_in_zero": _utility(policy, tokenizer, held_in, held_in, *args)
    }
    if run in RUNS:
      row.update(zip(("categories", "templates", "styles"), RUNS[run]))
    out["runs"]["base_small" if run == "pretrain" else run] = row
  return out


def main(argv):
  del argv
  world_dir = flags.FLAGS.world
  seed = json.loads(paths.read_text(paths.join(world_dir, "world.json")))["config"]["seed"]
  write_flan_files(world_dir, seed, flags.FLAGS.per_component)
  print(f"wrote the FLAN collection to {flan_dir(world_dir)}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so importing this module defines no flags.
  flags.DEFINE_string("world", None, "A written world's directory.", required=True)
  flags.DEFINE_integer("per_component", 160, "Training records per (category, template, style).")
  from instruct import cli  # One-line errors, as every command.
  cli.run(main)
