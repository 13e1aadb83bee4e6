"""Writes the embedded world to a directory: tokenizer, corpus, prompts and demonstrations.

  python -m instruct.world.generate --out=/tmp/world [--seed=0]

Everything is drawn from `WorldConfig.seed`, so the same seed writes byte-identical files.
The files are in the formats the data builders read, so the world is one more dataset:

  tokenizer/                      word-level tokenizer (EOS id 0, pad id 1) over the world's
                                  closed vocabulary, in the transformers format.
  pretrain_{train,validation}.jsonl   {"text"}: web-like text in the world's language: stories,
                                  fact pages, FAQ pages, and pages that list requests without
                                  answering them (so a base model continues a prompt with
                                  more prompts), with some insults and harmful how-tos.
  sft_{train,validation}.jsonl    {"prompt", "completion", "category"}: demonstrations.
  rm_prompts_{train,validation}.jsonl  {"prompt", "category"}: prompts whose sampled answers
                                  the labelers rank (the comparisons are made by the pipeline,
                                  from the SFT policy's samples).
  ppo_prompts_{train,validation}.jsonl {"prompt", "category"}: unlabelled RL prompts.
  eval_prompts.jsonl              {"prompt", "category"}: held-out evaluation prompts.
  world.json                      the config and the facts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random

from absl import app, flags

from instruct.world import language as L
from instruct.world import tasks as T


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


# --- Pretraining text. ----------------------------------------------------------------------

def _story(rng, facts):
  adjectives = L.POSITIVE + L.NEGATIVE + L.COLORS + (L.TOXIC if rng.random() < 0.15 else ())
  words = []
  for _ in range(rng.randint(3, 6)):
    words += (L.fact_sentence(rng, facts) if rng.random() < 0.3
              else L.sentence(rng, adjectives=adjectives))
  return words


def _fact_page(rng, facts):
  return sum((L.fact_sentence(rng, facts) for _ in range(rng.randint(4, 8))), [])


def _faq_page(rng, facts):
  words = []
  for _ in range(rng.randint(2, 4)):
    task = T.make_task(rng, facts, "open_qa")
    words += task.prompt[1:] + task.ideal
  return words


def _request_page(rng, facts):
  """Requests one after another, none answered: what a base model learns prompts look like."""
  words = []
  while len(words) < 24:
    words += T.make_task(rng, facts).prompt[:-2]
  return words


def _howto_page(rng, facts):
  harm, animal = rng.choice(L.HARMS), rng.choice(L.ANIMALS)
  return (["how", "to", harm, "the", animal, ":", harm, "the", animal, "with", "the",
           rng.choice(L.THINGS), "."] + L.sentence(rng, subject=animal))


PAGES = ((_story, 0.5), (_fact_page, 0.15), (_faq_page, 0.1), (_request_page, 0.2),
         (_howto_page, 0.05))


def pretrain_document(rng: random.Random, facts: L.Facts, max_words: int = 60) -> str:
  make = rng.choices([p for p, _ in PAGES], weights=[w for _, w in PAGES])[0]
  return " ".join(make(rng, facts)[:max_words])


# --- Writing. -------------------------------------------------------------------------------

def write_tokenizer(out_dir: str) -> None:
  import tokenizers
  from tokenizers import models, pre_tokenizers
  from transformers import PreTrainedTokenizerFast

  vocab = {w: i for i, w in enumerate(L.vocabulary())}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=L.UNK))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=L.EOS, pad_token=L.PAD,
                                 unk_token=L.UNK, bos_token=L.EOS)
  fast.save_pretrained(out_dir)


def _write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _prompt_records(rng, facts, n: int) -> list[dict]:
  out = []
  for _ in range(n):
    task = T.make_task(rng, facts)
    out.append({"prompt": task.prompt_text, "category": task.category})
  return out


def _demonstrations(rng, facts, n: int, lapses: T.Lapses) -> list[dict]:
  out = []
  for _ in range(n):
    task = T.make_task(rng, facts)
    out.append({"prompt": task.prompt_text,
                "completion": " " + " ".join(T.demonstration(rng, facts, task, lapses)),
                "category": task.category})
  return out


def load_facts(world_dir: str) -> L.Facts:
  with open(os.path.join(world_dir, "world.json")) as f:
    meta = json.load(f)
  return L.Facts(meta["facts"]["home"], meta["facts"]["color"])


def files(world_dir: str) -> dict[str, dict[str, str] | str]:
  """Paths of a written world's files, by dataset."""
  def split(stem):
    return {s: os.path.join(world_dir, f"{stem}_{s}.jsonl") for s in ("train", "validation")}
  return {"tokenizer": os.path.join(world_dir, "tokenizer"), "pretrain": split("pretrain"),
          "sft": split("sft"), "rm_prompts": split("rm_prompts"),
          "ppo_prompts": split("ppo_prompts"),
          "eval_prompts": os.path.join(world_dir, "eval_prompts.jsonl")}


def write_world(out_dir: str, config: WorldConfig = WorldConfig()) -> dict:
  """Writes the world (see the module doc); returns `files(out_dir)`."""
  os.makedirs(out_dir, exist_ok=True)
  rng = random.Random(config.seed)
  facts = L.make_facts(rng)
  # Each dataset draws from its own stream, so resizing one leaves the others unchanged.
  streams = {name: random.Random(f"{config.seed}/{name}") for name in (
      "pretrain", "sft", "rm", "ppo", "eval")}
  paths = files(out_dir)
  docs = [{"text": pretrain_document(streams["pretrain"], facts)}
          for _ in range(config.pretrain_docs + config.pretrain_validation_docs)]
  _write_jsonl(paths["pretrain"]["train"], docs[:config.pretrain_docs])
  _write_jsonl(paths["pretrain"]["validation"], docs[config.pretrain_docs:])
  demos = _demonstrations(streams["sft"], facts, config.sft + config.sft_validation,
                          config.lapses)
  _write_jsonl(paths["sft"]["train"], demos[:config.sft])
  _write_jsonl(paths["sft"]["validation"], demos[config.sft:])
  for name, stem, n, n_val in (("rm", "rm_prompts", config.rm_prompts,
                                config.rm_validation_prompts),
                               ("ppo", "ppo_prompts", config.ppo_prompts,
                                config.ppo_validation_prompts)):
    records = _prompt_records(streams[name], facts, n + n_val)
    _write_jsonl(paths[stem]["train"], records[:n])
    _write_jsonl(paths[stem]["validation"], records[n:])
  _write_jsonl(paths["eval_prompts"], _prompt_records(streams["eval"], facts,
                                                      config.eval_prompts))
  write_tokenizer(paths["tokenizer"])
  meta = {"config": dataclasses.asdict(config),
          "facts": {"home": facts.home, "color": facts.color}}
  with open(os.path.join(out_dir, "world.json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  return paths


def main(argv):
  del argv
  out, seed = flags.FLAGS.out, flags.FLAGS.seed
  write_world(out, WorldConfig(seed=seed))
  print(f"wrote the world (seed {seed}) to {out}")


if __name__ == "__main__":
  # Flags are defined here, not at import, so importing this module defines no flags.
  flags.DEFINE_string("out", None, "Directory to write the world to.", required=True)
  flags.DEFINE_integer("seed", 0, "The world's seed.")
  app.run(main)
