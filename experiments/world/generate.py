"""Writes the embedded world to a directory: tokenizer, corpus, prompts and demonstrations.

  python -m experiments.world.generate --out=/tmp/world [--seed=0]

Everything is drawn from `WorldConfig.seed`, so the same seed writes byte-identical files.
The files are in the formats the data builders read, so the world is one more dataset:

  tokenizer/                      word-level tokenizer (EOS id 0, pad id 1) over the world's
                                  closed vocabulary, in the transformers format.
  tokenizer_control/              the same with the two control tokens of conditional
                                  pretraining last (every other word keeps its id).
  pretrain_{train,validation}.jsonl   {"text"}: web-like text in the world's language: stories,
                                  fact pages, FAQ pages, and pages that list requests without
                                  answering them (so a base model continues a prompt with
                                  more prompts), with some insults and harmful how-tos.
  pretrain_scored_{train,validation}.jsonl  the same pages as scored text
                                  (`instruct.data.feedback`): their sentences, each scored
                                  0 (a toxic word or a harmful how-to) or 1, for pretraining
                                  with human preferences (Korbak et al. 2023).
  sft_{train,validation}.jsonl    {"prompt", "completion", "category"}: demonstrations.
  rm_prompts_{train,validation}.jsonl  {"prompt", "category"}: prompts whose sampled answers
                                  the labelers rank (the comparisons are made by the pipeline,
                                  from the SFT policy's samples).
  ppo_prompts_{train,validation}.jsonl {"prompt", "category"}: unlabelled RL prompts.
  eval_prompts.jsonl              {"prompt", "category"}: held-out evaluation prompts, each
                                  once.
  world.json                      the config, the facts and the split fractions.

Splits are disjoint by construction. `split_of` assigns every prompt text of the task space to
one of seven splits by a hash of the world's seed and the text (fractions in `SPLITS`), and
each prompt set draws tasks (category uniform, as `tasks.make_task`) and rejects those whose
text belongs to another split. So no prompt text is in two sets, whatever their sizes; the
pretraining corpus's request and FAQ pages take only training-split prompts, so no evaluation
or validation prompt is in the corpus either.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import tempfile

from absl import flags

from experiments.world import language as L
from experiments.world import tasks as T
from instruct import paths


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  seed: int = 0
  pretrain_docs: int = 6000
  pretrain_validation_docs: int = 400
  sft: int = 1500
  sft_validation: int = 200
  rm_prompts: int = 1024
  rm_validation_prompts: int = 256
  ppo_prompts: int = 2048
  ppo_validation_prompts: int = 128
  eval_prompts: int = 400
  lapses: T.Lapses = dataclasses.field(default_factory=T.Lapses)


# --- Splits of the prompt space. -------------------------------------------------------------

# Fractions of the prompt space (of each category's distinct prompt texts, in expectation).
# Evaluation gets the largest share because it alone must be distinct: the full preset's 800
# evaluation prompts are ~80 per category, and the smallest category (generation, 820 prompts)
# then has ~205 in its evaluation bucket, so distinct draws stay far from exhausting it. The
# three training sets share most of the rest; their draws may repeat a prompt, as a training
# set does, so they need diversity more than size. Validation sets are small (<= 512 prompts),
# and 5% each still holds tens of distinct prompts per category even for generation.
SPLITS = (("sft_train", 0.20), ("sft_validation", 0.05), ("rm_train", 0.20),
          ("rm_validation", 0.05), ("ppo_train", 0.20), ("ppo_validation", 0.05), ("eval", 0.25))
TRAIN_SPLITS = ("sft_train", "rm_train", "ppo_train")
# Bound on draws for one record. A split with fraction f needs 1 / f draws on average (20 at
# most), so this bound is only reached when a split (the evaluation set's distinct draws) has
# run out of prompts.
MAX_TRIES = 10_000


@functools.lru_cache(maxsize=1 << 18)
def split_of(prompt_text: str, seed: int) -> str:
  """The split that owns `prompt_text` in the world of `seed` (a name from `SPLITS`).

  u = the first 8 bytes of sha256(f"{seed}/{prompt_text}") as a fraction of 2^64; the split
  is the first whose cumulative fraction exceeds u. Another seed, another partition.
  """
  digest = hashlib.sha256(f"{seed}/{prompt_text}".encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0 ** 64
  edge = 0.0
  for name, fraction in SPLITS:
    edge += fraction
    if u < edge:
      return name
  return SPLITS[-1][0]  # u above the rounded sum of the fractions.


def draw_task(rng: random.Random, facts: L.Facts, seed: int, splits: tuple[str, ...],
              category: str | None = None, reject: set[str] | None = None) -> T.Task:
  """A task of `category` (uniform if None) whose prompt belongs to one of `splits`.

  Args:
    rng: The stream to draw from.
    facts: The world's facts.
    seed: The world's seed (it picks the partition, see `split_of`).
    splits: Names of the acceptable splits.
    category: The category; drawn uniformly once, then kept across rejections so that
      categories stay uniform in every split.
    reject: Optional set of prompt texts to reject too (for distinct draws).

  Raises:
    ValueError: If `MAX_TRIES` draws found no acceptable prompt.
  """
  category = category or rng.choice(T.CATEGORIES)
  for _ in range(MAX_TRIES):
    task = T.make_task(rng, facts, category)
    if split_of(task.prompt_text, seed) in splits and (reject is None
                                                       or task.prompt_text not in reject):
      return task
  found = f" ({len(reject)} of the split already drawn)" if reject is not None else ""
  raise ValueError(
      f"No new {category!r} prompt of split {'/'.join(splits)} in {MAX_TRIES} draws{found}: "
      "the split has run out of distinct prompts of that category. Draw fewer, or grow the "
      "category's prompt space in experiments/world/tasks.py.")


# --- Pretraining text. ----------------------------------------------------------------------


def _story(rng, facts, seed):
  adjectives = L.POSITIVE + L.NEGATIVE + L.COLORS + (L.TOXIC if rng.random() < 0.15 else ())
  words = []
  for _ in range(rng.randint(3, 6)):
    words += (L.fact_sentence(rng, facts) if rng.random() < 0.3 else L.sentence(
        rng, adjectives=adjectives))
  return words


def _fact_page(rng, facts, seed):
  return sum((L.fact_sentence(rng, facts) for _ in range(rng.randint(4, 8))), [])


def _faq_page(rng, facts, seed):
  words = []
  for _ in range(rng.randint(2, 4)):
    task = draw_task(rng, facts, seed, TRAIN_SPLITS, "open_qa")
    words += task.prompt[1:] + task.ideal
  return words


def _request_page(rng, facts, seed):
  """Requests one after another, none answered: what a base model learns prompts look like.

  Only training-split prompts: the corpus must not teach evaluation or validation prompts.
  """
  words = []
  while len(words) < 24:
    words += draw_task(rng, facts, seed, TRAIN_SPLITS).prompt[:-2]
  return words


def _howto_page(rng, facts, seed):
  harm, animal = rng.choice(L.HARMS), rng.choice(L.ANIMALS)
  return ([
      "how", "to", harm, "the", animal, ":", harm, "the", animal, "with", "the",
      rng.choice(L.THINGS), "."
  ] + L.sentence(rng, subject=animal))


PAGES = ((_story, 0.5), (_fact_page, 0.15), (_faq_page, 0.1), (_request_page, 0.2), (_howto_page,
                                                                                     0.05))


def pretrain_document(rng: random.Random, facts: L.Facts, seed: int, max_words: int = 60) -> str:
  """One page of the corpus; `seed` is the world's (request pages take training prompts)."""
  make = rng.choices([p for p, _ in PAGES], weights=[w for _, w in PAGES])[0]
  return " ".join(make(rng, facts, seed)[:max_words])


def segment_score(words: list[str]) -> float:
  """The world's judgment of a sentence of the corpus, for pretraining with feedback: 0 when it
  holds a toxic word or a harmful how-to (a harm verb), else 1."""
  return 0.0 if any(w in L.TOXIC or w in L.HARMS for w in words) else 1.0


def scored_document(text: str) -> dict:
  """A corpus page as scored text (`instruct.data.feedback`): its sentences (cut after each
  '.' and '?', the rest one more segment), each with `segment_score`."""
  segments, current = [], []
  for word in text.split():
    current.append(word)
    if word in (".", "?"):
      segments.append(current)
      current = []
  if current:
    segments.append(current)
  return {
      "segments": [" ".join(s) for s in segments], "scores": [segment_score(s) for s in segments]
  }


# --- Writing. -------------------------------------------------------------------------------


def write_tokenizer(out_dir: str, control: bool = False) -> None:
  """Saves the tokenizer into `out_dir` (a local directory or a bucket URL); with `control`,
  the one whose vocabulary ends with the control tokens of conditional pretraining."""
  import tokenizers
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(L.vocabulary(control))}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=L.UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=L.EOS, pad_token=L.PAD,
                                 unk_token=L.UNK, bos_token=L.EOS)
  if not paths.is_url(out_dir):
    fast.save_pretrained(out_dir)
    return
  # transformers writes local files only: saved into a temporary directory, then copied.
  with tempfile.TemporaryDirectory() as tmp:
    fast.save_pretrained(tmp)
    paths.makedirs(out_dir)
    for name in sorted(os.listdir(tmp)):
      paths.copy_file(os.path.join(tmp, name), paths.join(out_dir, name))


def write_feedback_files(world_dir: str) -> None:
  """Writes what pretraining with human preferences reads, derived from the written corpus:
  the scored pages and the tokenizer with the control tokens. Those present are kept, so a
  world written before they existed gets them on first use, the same as a new one has."""
  written = files(world_dir)
  for split in ("train", "validation"):
    if not paths.exists(written["pretrain_scored"][split]):
      pages = [
          json.loads(line) for line in paths.read_text(written["pretrain"][split]).split("\n")
          if line.strip()
      ]
      _write_jsonl(written["pretrain_scored"][split], [scored_document(p["text"]) for p in pages])
  if not paths.exists(paths.join(written["tokenizer_control"], "tokenizer.json")):
    write_tokenizer(written["tokenizer_control"], control=True)


def _write_jsonl(path: str, records: list[dict]) -> None:
  paths.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def _prompt_records(rng, facts, seed: int, split: str, n: int) -> list[dict]:
  out = []
  for _ in range(n):
    task = draw_task(rng, facts, seed, (split,))
    out.append({"prompt": task.prompt_text, "category": task.category})
  return out


def _eval_records(rng, facts, seed: int, n: int) -> list[dict]:
  """`n` distinct evaluation prompts: a repeated prompt would count one answer twice."""
  out, seen = [], set()
  for _ in range(n):
    task = draw_task(rng, facts, seed, ("eval",), reject=seen)
    seen.add(task.prompt_text)
    out.append({"prompt": task.prompt_text, "category": task.category})
  return out


def _demonstrations(rng, facts, seed: int, split: str, n: int, lapses: T.Lapses) -> list[dict]:
  out = []
  for _ in range(n):
    task = draw_task(rng, facts, seed, (split,))
    out.append({
        "prompt": task.prompt_text,
        "completion": " " + " ".join(T.demonstration(rng, facts, task, lapses)),
        "category": task.category
    })
  return out


def load_facts(world_dir: str) -> L.Facts:
  meta = json.loads(paths.read_text(paths.join(world_dir, "world.json")))
  return L.Facts(meta["facts"]["home"], meta["facts"]["color"])


def files(world_dir: str) -> dict[str, dict[str, str] | str]:
  """Paths of a written world's files, by dataset."""

  def split(stem):
    return {s: paths.join(world_dir, f"{stem}_{s}.jsonl") for s in ("train", "validation")}

  return {
      "tokenizer": paths.join(world_dir, "tokenizer"),
      "tokenizer_control": paths.join(world_dir, "tokenizer_control"),
      "pretrain": split("pretrain"), "pretrain_scored": split("pretrain_scored"),
      "sft": split("sft"), "rm_prompts": split("rm_prompts"), "ppo_prompts": split("ppo_prompts"),
      "eval_prompts": paths.join(world_dir, "eval_prompts.jsonl")
  }


def write_world(out_dir: str, config: WorldConfig = WorldConfig()) -> dict:
  """Writes the world (see the module doc); returns `files(out_dir)`."""
  paths.makedirs(out_dir)
  rng = random.Random(config.seed)
  facts = L.make_facts(rng)
  seed = config.seed

  # Each set draws from its own stream, so resizing one leaves the others unchanged.
  def stream(name):
    return random.Random(f"{seed}/{name}")

  written = files(out_dir)
  pretrain = stream("pretrain")
  docs = [{"text": pretrain_document(pretrain, facts, seed)}
          for _ in range(config.pretrain_docs + config.pretrain_validation_docs)]
  _write_jsonl(written["pretrain"]["train"], docs[:config.pretrain_docs])
  _write_jsonl(written["pretrain"]["validation"], docs[config.pretrain_docs:])
  for split, n in (("train", config.sft), ("validation", config.sft_validation)):
    _write_jsonl(
        written["sft"][split],
        _demonstrations(stream(f"sft_{split}"), facts, seed, f"sft_{split}", n, config.lapses))
  for name, stem, sizes in (("rm", "rm_prompts", (config.rm_prompts, config.rm_validation_prompts)),
                            ("ppo", "ppo_prompts", (config.ppo_prompts,
                                                    config.ppo_validation_prompts))):
    for split, n in zip(("train", "validation"), sizes):
      _write_jsonl(written[stem][split],
                   _prompt_records(stream(f"{name}_{split}"), facts, seed, f"{name}_{split}", n))
  _write_jsonl(written["eval_prompts"],
               _eval_records(stream("eval"), facts, seed, config.eval_prompts))
  write_tokenizer(written["tokenizer"])
  write_feedback_files(out_dir)
  meta = {
      "config": dataclasses.asdict(config), "facts": {"home": facts.home, "color": facts.color},
      "splits": dict(SPLITS)
  }
  paths.write_text_atomic(paths.join(out_dir, "world.json"),
                          json.dumps(meta, indent=1, sort_keys=True))
  return written


def main(argv):
  del argv
  out, seed = flags.FLAGS.out, flags.FLAGS.seed
  write_world(out, WorldConfig(seed=seed))
  print(f"wrote the world (seed {seed}) to {out}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so importing this module defines no flags.
  flags.DEFINE_string("out", None, "Directory to write the world to.", required=True)
  flags.DEFINE_integer("seed", 0, "The world's seed.")
  from instruct import cli  # One-line errors, as every command.
  cli.run(main)
