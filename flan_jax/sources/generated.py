"""Procedurally generated records for the embedded default mixture (nothing is downloaded).

`GeneratedSource` turns a `generate(rng) -> dict` function into a `RecordSource` with random access: record `i` of a
split is generated from its own `random.Random` seeded by (seed, task, split, i), so any shard or any single record can
be produced without the others, and the same seed always gives the same data.

The generator functions below return template fields (all str; option lists as lists of str). Option tasks return an
"options" field and an "answer" that is one of them. The templates that turn these fields into prompts live in
`tasks/default.py`.
"""
from __future__ import annotations

import random
from typing import Callable, Iterator, Mapping

from flan_jax.sources import Record, RecordSource

DEFAULT_NUM_EXAMPLES = {"train": 20_000, "validation": 200}


class GeneratedSource(RecordSource):
    """Records generated on the fly, deterministic in (seed, name, split, index)."""

    records_generated = 0  # class-wide counter: lets tests assert that registration generates nothing

    def __init__(self, name: str, generate: Callable[[random.Random], Record], seed: int = 0,
                 num_examples: Mapping[str, int] | None = None):
        num_examples = dict(num_examples or DEFAULT_NUM_EXAMPLES)
        super().__init__(tuple(num_examples), num_examples)
        self.name, self.generate, self.seed = name, generate, seed

    def record(self, split: str, index: int) -> Record:
        GeneratedSource.records_generated += 1
        return self.generate(random.Random(f"{self.seed}/{self.name}/{split}/{index}"))

    def records(self, split: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[tuple[int, Record]]:
        self.check_split(split)
        for index in range(shard_index, self._num_examples[split], num_shards):
            yield index, self.record(split, index)

    def describe(self) -> str:
        return f"GeneratedSource({self.name}, seed={self.seed})"


# ----------------------------------------------------------------------------------------------------------------
# Word lists (our own)
# ----------------------------------------------------------------------------------------------------------------

WORDS = ("apple", "river", "orange", "table", "window", "island", "garden", "umbrella", "pencil", "engine",
         "mountain", "ocean", "candle", "eagle", "tiger", "planet", "yellow", "bottle", "insect", "forest",
         "onion", "jacket", "arrow", "basket", "elbow", "kitten", "ladder", "oven", "rabbit", "violin",
         "anchor", "button", "igloo", "mirror", "needle", "owl", "pepper", "uncle", "wagon", "zebra",
         "acorn", "bridge", "echo", "feather", "helmet", "iron", "lemon", "olive", "puzzle", "rocket",
         "album", "cactus", "emerald", "dragon", "giant", "idea", "marble", "otter", "quilt", "sugar",
         "angle", "cloud", "empty", "honey", "ink", "lantern", "nest", "orbit", "shadow", "tulip", "up",
         "attic", "desk", "elephant", "kite", "moon", "oak", "parrot", "stone", "unicorn", "valley", "wolf")
VOWELS = "aeiou"

SENTIMENT_WORDS = {
    "positive": ("great", "wonderful", "excellent", "lovely", "fantastic", "delightful", "superb", "pleasant"),
    "negative": ("awful", "terrible", "boring", "dreadful", "horrible", "disappointing", "poor", "unpleasant"),
}
SENTIMENT_SUBJECTS = ("the movie", "the meal", "my trip", "the service", "this phone", "the show", "the book",
                      "our hotel", "the game", "the class")
SENTIMENT_FRAMES = ("{s} was {w}.", "I thought {s} was {w}.", "Honestly, {s} was {w} overall.",
                    "{s} felt {w} to me.", "All in all, {s} was {w}.")

TOPIC_WORDS = {
    "sports": ("football", "tennis", "referee", "goalkeeper", "stadium", "marathon", "basketball"),
    "food": ("pasta", "soup", "bread", "recipe", "cheese", "dessert", "salad"),
    "weather": ("rain", "storm", "snowfall", "forecast", "thunder", "sunshine", "fog"),
    "music": ("guitar", "melody", "drummer", "orchestra", "piano", "chorus", "album"),
}
TOPIC_FRAMES = ("We talked about the {k} all evening.", "She wrote a long post about the {k}.",
                "Everyone was excited about the {k} today.", "The news mentioned the {k} again.",
                "My friend keeps asking about the {k}.")


def _number(rng: random.Random, low: int = 0, high: int = 9999) -> int:
    return rng.randint(low, high)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# ----------------------------------------------------------------------------------------------------------------
# Generators: cluster number_properties
# ----------------------------------------------------------------------------------------------------------------

def gen_parity(rng: random.Random) -> dict:
    n = _number(rng, 0, 999)
    answer = "even" if n % 2 == 0 else "odd"
    return {"number": str(n), "answer": answer, "options": ["even", "odd"],
            "rationale": f"The last digit of {n} is {n % 10}, which is {answer}."}


def gen_larger_number(rng: random.Random) -> dict:
    a, b = rng.sample(range(100), 2)
    return {"a": str(a), "b": str(b), "answer": str(max(a, b)), "options": [str(a), str(b)]}


def gen_multiple_of_five(rng: random.Random) -> dict:
    n = _number(rng, 0, 999)
    if rng.random() < 0.5:
        n = n - n % 5
    return {"number": str(n), "answer": _yes_no(n % 5 == 0), "options": ["yes", "no"]}


# ----------------------------------------------------------------------------------------------------------------
# Cluster text_classification
# ----------------------------------------------------------------------------------------------------------------

def gen_keyword_sentiment(rng: random.Random) -> dict:
    label = rng.choice(("positive", "negative"))
    sentence = rng.choice(SENTIMENT_FRAMES).format(s=rng.choice(SENTIMENT_SUBJECTS),
                                                   w=rng.choice(SENTIMENT_WORDS[label]))
    return {"sentence": sentence[0].upper() + sentence[1:], "answer": label, "options": ["positive", "negative"]}


def gen_topic(rng: random.Random) -> dict:
    label = rng.choice(tuple(TOPIC_WORDS))
    sentence = rng.choice(TOPIC_FRAMES).format(k=rng.choice(TOPIC_WORDS[label]))
    return {"sentence": sentence, "answer": label, "options": list(TOPIC_WORDS)}


# ----------------------------------------------------------------------------------------------------------------
# Cluster list_ops
# ----------------------------------------------------------------------------------------------------------------

LIST_LETTERS = "abcdefghjk"


def gen_list_contains(rng: random.Random) -> dict:
    items = rng.sample(LIST_LETTERS, rng.randint(2, 4))
    if rng.random() < 0.5:
        item, present = rng.choice(items), True
    else:
        item, present = rng.choice([v for v in LIST_LETTERS if v not in items]), False
    return {"items": ", ".join(items), "item": item, "answer": _yes_no(present), "options": ["yes", "no"]}


def gen_list_sort(rng: random.Random) -> dict:
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return {"items": " ".join(map(str, items)), "answer": " ".join(map(str, sorted(items)))}


def gen_list_max(rng: random.Random) -> dict:
    items = [rng.randint(0, 99) for _ in range(rng.randint(3, 6))]
    return {"items": ", ".join(map(str, items)), "answer": str(max(items))}


# ----------------------------------------------------------------------------------------------------------------
# Cluster arithmetic
# ----------------------------------------------------------------------------------------------------------------

def gen_addition(rng: random.Random) -> dict:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    ones = a % 10 + b % 10
    rationale = (f"The ones digits give {a % 10} + {b % 10} = {ones}. The tens digits give "
                 f"{a // 10} + {b // 10} + {ones // 10} = {a // 10 + b // 10 + ones // 10}.")
    return {"a": str(a), "b": str(b), "answer": str(a + b), "rationale": rationale}


def gen_subtraction(rng: random.Random) -> dict:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return {"a": str(a), "b": str(b), "answer": str(a - b)}


# ----------------------------------------------------------------------------------------------------------------
# Cluster string_editing
# ----------------------------------------------------------------------------------------------------------------

def gen_uppercase(rng: random.Random) -> dict:
    text = " ".join(rng.sample(WORDS, rng.randint(1, 3)))
    return {"text": text, "answer": text.upper()}


def gen_acronym(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 4))
    return {"phrase": " ".join(words), "answer": "".join(w[0] for w in words).upper()}


# ----------------------------------------------------------------------------------------------------------------
# Cluster word_analysis (held out of default training)
# ----------------------------------------------------------------------------------------------------------------

def gen_vowel_start(rng: random.Random) -> dict:
    starts_with_vowel = rng.random() < 0.5
    word = rng.choice([w for w in WORDS if (w[0] in VOWELS) == starts_with_vowel])
    return {"word": word, "answer": _yes_no(starts_with_vowel), "options": ["yes", "no"]}


def gen_contains_letter(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    present = rng.random() < 0.5
    letters = sorted(set(word)) if present else [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word]
    return {"word": word, "letter": rng.choice(letters), "answer": _yes_no(present), "options": ["yes", "no"]}


def gen_reverse_word(rng: random.Random) -> dict:
    word = rng.choice(WORDS)
    return {"word": word, "answer": word[::-1]}
