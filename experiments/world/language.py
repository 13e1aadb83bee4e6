"""The language of the embedded world: a closed vocabulary, facts, and a sentence grammar.

The world is a small universe of animals, foods, things and places. Every text is a sequence
of space-separated words from `VOCABULARY`, so a word-level tokenizer covers it exactly and
sequences stay short (a prompt is 10-40 tokens, an answer 1-12): the models that learn it run
on a laptop CPU.

Facts (where each animal lives, the colour of each animal and food) are drawn from the world's
seed by `make_facts`; the pretraining corpus states them, open-QA prompts ask about them, and
the judge (`experiments.world.tasks`) checks answers against them.
"""

from __future__ import annotations

import dataclasses
import random

ANIMALS = ("cat", "dog", "bird", "fish", "horse", "cow", "fox", "owl", "bear", "frog")
FOODS = ("apple", "bread", "cake", "milk", "rice", "egg", "pear", "soup")
THINGS = ("ball", "book", "lamp", "cup", "hat", "box", "key", "drum")
PLACES = ("garden", "river", "house", "forest", "field", "hill", "lake", "barn")
COLORS = ("red", "blue", "green", "yellow", "white", "black", "brown", "gray")
POSITIVE = ("happy", "kind", "calm", "bright", "warm", "glad")
NEGATIVE = ("sad", "angry", "cold", "dark", "tired", "lonely")
VERBS = ("sees", "likes", "finds", "follows", "eats", "carries", "helps", "hears")
TOXIC = ("stupid", "ugly", "idiot", "nasty", "dumb")
HARMS = ("hurt", "kick", "trap", "poison")
COUNTS = ("one", "two", "three", "four")
NOUNS = ANIMALS + FOODS + THINGS
CATEGORIES_OF_NOUNS = {"animals": ANIMALS, "foods": FOODS, "things": THINGS}

# Structure words: prompts, answers and the pretraining corpus's prose.
FUNCTION_WORDS = tuple("""
request answer question context : . , ? the a is in and lives live does where what color
i can not help with that do know please tell me how to write sentence short about list
replace summarize find classify happy or sad respectfully describe this story day then
was very all for you of it here are some more ideas
""".split())

EOS = "<|endoftext|>"
PAD = "<|pad|>"
UNK = "<|unk|>"
# The control tokens of conditional pretraining (instruct.data.feedback), in the vocabulary of
# its own tokenizer only (`vocabulary(control=True)`): last, so every other word keeps its id.
# No text of the world holds them.
CONTROL = ("<|good|>", "<|bad|>")


def vocabulary(control: bool = False) -> list[str]:
  """Every word of the world, each once, special tokens first (EOS = 0, pad = 1, unk = 2);
  with `control`, the control tokens last."""
  words = [EOS, PAD, UNK]
  for group in (FUNCTION_WORDS, ANIMALS, FOODS, THINGS, PLACES, COLORS, POSITIVE, NEGATIVE, VERBS,
                TOXIC, HARMS, COUNTS, tuple(CATEGORIES_OF_NOUNS)) + ((CONTROL,) if control else ()):
    for word in group:
      if word not in words:
        words.append(word)
  return words


@dataclasses.dataclass(frozen=True)
class Facts:
  """The world's facts: each animal's home, each animal's and food's colour."""
  home: dict[str, str]
  color: dict[str, str]


def make_facts(rng: random.Random) -> Facts:
  home = {animal: rng.choice(PLACES) for animal in ANIMALS}
  color = {noun: rng.choice(COLORS) for noun in ANIMALS + FOODS}
  return Facts(home, color)


def noun_phrase(rng: random.Random, noun: str, adjective_p: float = 0.4,
                adjectives=POSITIVE + NEGATIVE + COLORS) -> list[str]:
  """`the [adjective] noun`."""
  if rng.random() < adjective_p:
    return ["the", rng.choice(adjectives), noun]
  return ["the", noun]


def sentence(rng: random.Random, subject: str | None = None, obj: str | None = None,
             adjectives=POSITIVE + NEGATIVE + COLORS, adjective_p: float = 0.4) -> list[str]:
  """`the [adj] ANIMAL VERB the [adj] NOUN .` — the grammar's one sentence form."""
  subject = subject or rng.choice(ANIMALS)
  obj = obj or rng.choice(NOUNS)
  return (noun_phrase(rng, subject, adjective_p, adjectives) + [rng.choice(VERBS)]
          + noun_phrase(rng, obj, adjective_p, adjectives) + ["."])


def fact_sentence(rng: random.Random, facts: Facts, noun: str | None = None) -> list[str]:
  """A true statement: `the fox lives in the forest .` or `the apple is red .`"""
  noun = noun or rng.choice(ANIMALS + FOODS)
  if noun in facts.home and rng.random() < 0.5:
    return ["the", noun, "lives", "in", "the", facts.home[noun], "."]
  return ["the", noun, "is", facts.color[noun], "."]


def is_sentence(words: list[str]) -> bool:
  """Whether `words` is exactly one sentence of the grammar (see `sentence`)."""
  i = 0

  def phrase(i: int, heads) -> int:
    if i < len(words) and words[i] == "the":
      i += 1
      if i < len(words) and words[i] in POSITIVE + NEGATIVE + COLORS + TOXIC:
        i += 1
      if i < len(words) and words[i] in heads:
        return i + 1
    return -1

  i = phrase(0, ANIMALS)
  if i < 0 or i >= len(words) or words[i] not in VERBS:
    return False
  i = phrase(i + 1, NOUNS)
  return i == len(words) - 1 and words[i] == "."
