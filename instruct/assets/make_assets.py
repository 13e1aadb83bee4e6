"""Regenerates the embedded tokenizer and the small datasets shipped with the package.

Everything under `instruct/assets/` is produced by this script from a fixed seed, so the
tiny presets run offline and the files can be rebuilt and diffed:

  python -m instruct.assets.make_assets

Outputs:
  tokenizer/            a byte-level BPE tokenizer (transformers `PreTrainedTokenizerFast`
                        files) with `<|endoftext|>` as EOS and a distinct `<|pad|>`.
  data/demos_{train,validation}.jsonl      demonstrations: {"prompt", "completion"}.
  data/pretrain_{train,validation}.jsonl   plain text: {"text"}.

The demonstrations are small instruction-following tasks over a closed vocabulary (reverse,
sort, count, repeat, pick the first or last word, upper-case): a tiny model learns them on a
CPU in seconds to minutes, which is what the tests and the tiny presets need.
"""

from __future__ import annotations

import json
import os
import random

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_DIR = os.path.join(ASSETS_DIR, "tokenizer")
DATA_DIR = os.path.join(ASSETS_DIR, "data")

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
VOCAB_SIZE = 512
SEED = 1234

NOUNS = ("cat dog bird fish tree river stone cloud apple bread lamp door book chair "
         "garden window road horse star moon sun field song ship").split()
ADJECTIVES = "red blue green small big old new quiet bright dark warm cold".split()
VERBS = "sees finds likes follows carries paints hears keeps".split()
NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()


def _words(rng: random.Random, lo: int = 2, hi: int = 6) -> list[str]:
  return [rng.choice(NOUNS) for _ in range(rng.randint(lo, hi))]


def _task(rng: random.Random) -> tuple[str, str]:
  """One (prompt, completion) pair of a randomly chosen task."""
  words = _words(rng)
  joined = " ".join(words)
  kind = rng.randrange(7)
  if kind == 0:
    return f"Reverse the words: {joined}\nAnswer:", " " + " ".join(reversed(words))
  if kind == 1:
    return f"Sort the words: {joined}\nAnswer:", " " + " ".join(sorted(words))
  if kind == 2:
    return f"How many words are in: {joined}\nAnswer:", " " + NUMBER_WORDS[len(words)]
  if kind == 3:
    word, n = rng.choice(NOUNS), rng.randint(1, 4)
    return (f"Repeat the word {word} {NUMBER_WORDS[n]} times.\nAnswer:",
            " " + " ".join([word] * n))
  if kind == 4:
    return f"What is the first word of: {joined}\nAnswer:", " " + words[0]
  if kind == 5:
    return f"What is the last word of: {joined}\nAnswer:", " " + words[-1]
  return f"Write in capitals: {joined}\nAnswer:", " " + joined.upper()


def _sentence(rng: random.Random) -> str:
  """One sentence of the pretraining language (no instructions, only prose)."""
  subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
  obj = f"the {rng.choice(NOUNS)}"
  return f"{subject.capitalize()} {rng.choice(VERBS)} {obj}."


def make_records(seed: int = SEED) -> dict[str, list[dict[str, str]]]:
  """All shipped records, by file stem."""
  rng = random.Random(seed)
  demos = [dict(zip(("prompt", "completion"), _task(rng))) for _ in range(600)]
  texts = [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))}
           for _ in range(600)]
  return {
      "demos_train": demos[:512], "demos_validation": demos[512:],
      "pretrain_train": texts[:512], "pretrain_validation": texts[512:],
  }


def train_tokenizer(corpus: list[str], out_dir: str) -> None:
  """Trains a byte-level BPE and saves it in the transformers format."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN, PAD_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(corpus, trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN,
                                 pad_token=PAD_TOKEN, bos_token=EOS_TOKEN)
  fast.save_pretrained(out_dir)


def write_jsonl(path: str, records: list[dict[str, str]]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
  records = make_records()
  os.makedirs(DATA_DIR, exist_ok=True)
  for stem, recs in records.items():
    write_jsonl(os.path.join(DATA_DIR, f"{stem}.jsonl"), recs)
  corpus = [r.get("text") or r["prompt"] + r["completion"]
            for recs in records.values() for r in recs]
  train_tokenizer(corpus, TOKENIZER_DIR)
  print(f"wrote {sum(map(len, records.values()))} records and a tokenizer to {ASSETS_DIR}")


if __name__ == "__main__":
  main()
