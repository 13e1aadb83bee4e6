"""Regenerates the embedded tokenizer and the small datasets shipped with the package.

Everything under `instruct/assets/` is produced by this script from a fixed seed, so the
tiny presets run offline and the files can be rebuilt and diffed:

  python -m instruct.assets.make_assets

Outputs:
  tokenizer/            a byte-level BPE tokenizer (transformers `PreTrainedTokenizerFast`
                        files) with `<|endoftext|>` as EOS and a distinct `<|pad|>`.
  data/demos_{train,validation}.jsonl      demonstrations: {"prompt", "completion"}.
  data/pretrain_{train,validation}.jsonl   plain text: {"text"}.
  data/comparisons_{train,validation}.jsonl  reward-model comparisons: graded responses to
                        the same tasks, ranked by a hidden quality score (see
                        `make_comparison_records`). They use their own random stream and are
                        not in the tokenizer's training corpus, so adding them changed no
                        other file.
  data/prompts_{train,validation}.jsonl    prompts for RL (PPO rollouts): {"prompt"} of the
                        same tasks, from their own random stream and not in the tokenizer's
                        corpus either (adding them changed no other file).

The demonstrations are small instruction-following tasks over a closed vocabulary (reverse,
sort, count, repeat, pick the first or last word, upper-case): a tiny model learns them on a
CPU in seconds to minutes, which is what the tests and the tiny presets need.
"""

from __future__ import annotations

import fractions
import json
import os
import random
import re

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
    return (f"Repeat the word {word} {NUMBER_WORDS[n]} times.\nAnswer:", " " + " ".join([word] * n))
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
  texts = [{"text": " ".join(_sentence(rng) for _ in range(rng.randint(2, 6)))} for _ in range(600)]
  return {
      "demos_train": demos[:512],
      "demos_validation": demos[512:],
      "pretrain_train": texts[:512],
      "pretrain_validation": texts[512:],
  }


def _wrong_words(prompt: str, answer: list[str]) -> list[str]:
  """Words a corrupted answer may use: never in the prompt, never in the answer."""
  if len(answer) == 1 and answer[0] in NUMBER_WORDS:  # Counting: wrong numbers.
    return [w for w in NUMBER_WORDS if w != answer[0]]
  taken = set(re.findall(r"[a-z]+", prompt.lower())) | {w.lower() for w in answer}
  pool = [w for w in NOUNS if w not in taken]
  return [w.upper() for w in pool] if answer[0].isupper() else pool


def _degrade(rng: random.Random, answer: list[str], pool: list[str], level: int) -> list[str]:
  """The answer degraded to `level`: 0 correct, 1 one word wrong, 2 said twice,
  3 half the words wrong, 4 only wrong words."""
  if level == 0:
    return list(answer)
  if level == 2:
    return answer + answer
  if level == 4:
    return [rng.choice(pool) for _ in answer]
  out = list(answer)
  for i in rng.sample(range(len(answer)), 1 if level == 1 else (len(answer) + 1) // 2):
    out[i] = rng.choice(pool)
  return out


def _quality(response: str, answer: list[str]) -> fractions.Fraction:
  """The hidden score: the fraction of positions holding the right word."""
  words = response.split()
  right = sum(a == b for a, b in zip(words, answer))
  return fractions.Fraction(right, max(len(words), len(answer)))


def _graded(rng: random.Random, prompt: str,
            completion: str) -> list[tuple[fractions.Fraction, int, str]]:
  """`(quality, level, response)` for levels 0..4, all responses distinct."""
  answer = completion.split()
  pool = _wrong_words(prompt, answer)
  out, seen = [], set()
  for level in range(5):
    for _ in range(100):
      response = " " + " ".join(_degrade(rng, answer, pool, level))
      if response.strip() not in seen:
        break
    else:
      raise RuntimeError(f"no distinct level-{level} response for {prompt!r}")
    seen.add(response.strip())
    out.append((_quality(response, answer), level, response))
  return out


def _pick(rng: random.Random, graded: list, k: int, with_correct: bool) -> list:
  """`k` graded responses (the correct one first if `with_correct`), preferring
  distinct qualities so that few rankings need a tie broken."""
  picked = graded[:1] if with_correct else []
  rest = graded[1:]
  rng.shuffle(rest)
  for c in rest:
    if len(picked) < k and c[0] not in {p[0] for p in picked}:
      picked.append(c)
  for c in rest:
    if len(picked) < k and c not in picked:
      picked.append(c)
  rng.shuffle(picked)
  return picked


def _comparison(rng: random.Random) -> dict:
  """One comparison record; mostly full rankings, some chosen/rejected, some best-of-4.

  Responses are ranked by quality, ties broken by degradation level (fewer edits first).
  """
  prompt, completion = _task(rng)
  graded = _graded(rng, prompt, completion)
  shape = rng.random()
  if shape < 0.7:
    picked = _pick(rng, graded, rng.choice((2, 3, 4)), rng.random() < 0.8)
    ranking = sorted(range(len(picked)), key=lambda i: (-picked[i][0], picked[i][1]))
    return {"prompt": prompt, "responses": [c[2] for c in picked], "ranking": ranking}
  if shape < 0.85:
    better, worse = sorted(_pick(rng, graded, 2, rng.random() < 0.6), key=lambda c: (-c[0], c[1]))
    return {"prompt": prompt, "chosen": better[2], "rejected": worse[2]}
  picked = _pick(rng, graded, 4, True)
  best = next(i for i, c in enumerate(picked) if c[1] == 0)
  return {"prompt": prompt, "responses": [c[2] for c in picked], "best": best}


def make_comparison_records(seed: int = SEED + 1) -> dict[str, list[dict]]:
  """The shipped comparisons, by file stem (a random stream separate from `make_records`)."""
  rng = random.Random(seed)
  comparisons = [_comparison(rng) for _ in range(608)]
  return {"comparisons_train": comparisons[:512], "comparisons_validation": comparisons[512:]}


def make_prompt_records(seed: int = SEED + 2) -> dict[str, list[dict[str, str]]]:
  """The shipped RL prompts, by file stem (a random stream of its own)."""
  rng = random.Random(seed)
  prompts = [{"prompt": _task(rng)[0]} for _ in range(608)]
  return {"prompts_train": prompts[:512], "prompts_validation": prompts[512:]}


def train_tokenizer(corpus: list[str], out_dir: str) -> None:
  """Trains a byte-level BPE and saves it in the transformers format."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(corpus, trainer=trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                 bos_token=EOS_TOKEN)
  fast.save_pretrained(out_dir)


def write_jsonl(path: str, records: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main() -> None:
  records = make_records()
  os.makedirs(DATA_DIR, exist_ok=True)
  for stem, recs in records.items():
    write_jsonl(os.path.join(DATA_DIR, f"{stem}.jsonl"), recs)
  corpus = [
      r.get("text") or r["prompt"] + r["completion"] for recs in records.values() for r in recs
  ]
  train_tokenizer(corpus, TOKENIZER_DIR)
  comparisons = make_comparison_records()  # Not in the tokenizer corpus.
  prompts = make_prompt_records()  # Nor these.
  for stem, recs in {**comparisons, **prompts}.items():
    write_jsonl(os.path.join(DATA_DIR, f"{stem}.jsonl"), recs)
  count = sum(len(recs) for group in (records, comparisons, prompts) for recs in group.values())
  print(f"wrote {count} records and a tokenizer to {ASSETS_DIR}")


if __name__ == "__main__":
  main()
