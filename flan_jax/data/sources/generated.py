"""Procedurally generated records for the embedded default mixture (nothing is downloaded).

`GeneratedSource` turns a `generate(rng) -> dict` function into a `RecordSource` with random access: record `i` of a
split is generated from its own `random.Random` seeded by (seed, task, split, i), so any shard or any single record can
be produced without the others, and the same seed always gives the same data.

Splits are disjoint by construction: a hash of each record's defining fields (its partition key) places it in exactly
one split, and a split draws until it gets a record of its own. Validation then measures the rule a task teaches, not
recall of train records. A generator whose value space is too small to share out raises a clear error.

The generator functions below return template fields (all str; option lists as lists of str). Option tasks return an
"options" field and an "answer" that is one of them. The templates that turn these fields into prompts live in
`tasks/default.py`.
"""
from __future__ import annotations

import hashlib
import json
import random
from typing import Any, Callable, Iterator, Mapping

from flan_jax.data.sources import Record, RecordSource

DEFAULT_NUM_EXAMPLES = {"train": 20_000, "validation": 200}
HELD_OUT_FRACTION = 0.1   # share of the value space each non-train split owns (train owns the rest)
MAX_DRAWS = 1000          # draws per record before a split is declared unreachable


def record_key(record: Record) -> str:
    """The canonical text of a record's fields (what "two records are equal" means before templating)."""
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


def split_point(key: Any) -> float:
    """A stable position in [0, 1) for a partition key (sha1: the same in every process and Python version)."""
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_ranges(splits: tuple[str, ...], held_out_fraction: float) -> dict[str, tuple[float, float]]:
    """[low, high) share of the hash range per split: each non-train split `held_out_fraction`, train the rest."""
    others = [s for s in splits if s != "train"]
    if held_out_fraction * len(others) >= 1.0 or held_out_fraction <= 0.0:
        raise ValueError(f"held_out_fraction={held_out_fraction} cannot give {len(others)} non-train splits a share")
    ranges = {s: (i * held_out_fraction, (i + 1) * held_out_fraction) for i, s in enumerate(others)}
    if "train" in splits:
        ranges["train"] = (len(others) * held_out_fraction, 1.0)
    return ranges


class GeneratedSource(RecordSource):
    """Records generated on the fly, deterministic in (seed, name, split, index), each split owning its own part of
    the value space (`partition_key(record)`, default the whole record, is hashed to decide which)."""

    records_generated = 0  # class-wide counter: lets tests assert that registration generates nothing

    def __init__(self, name: str, generate: Callable[[random.Random], Record], seed: int = 0,
                 num_examples: Mapping[str, int] | None = None,
                 partition_key: Callable[[Record], Any] | None = None,
                 held_out_fraction: float = HELD_OUT_FRACTION):
        num_examples = dict(num_examples or DEFAULT_NUM_EXAMPLES)
        super().__init__(tuple(num_examples), num_examples)
        self.name, self.generate, self.seed = name, generate, seed
        self.partition_key = partition_key or PARTITION_KEYS.get(generate, dict)
        self._ranges = split_ranges(self.splits, held_out_fraction)

    def split_of(self, record: Record) -> str:
        """The one split that may hold `record`."""
        point = split_point(self.partition_key(record))
        return next(s for s, (low, high) in self._ranges.items() if low <= point < high)

    def record(self, split: str, index: int) -> Record:
        self.check_split(split)
        GeneratedSource.records_generated += 1
        rng = random.Random(f"{self.seed}/{self.name}/{split}/{index}")
        for _ in range(MAX_DRAWS):
            record = self.generate(rng)
            if self.split_of(record) == split:
                return record
        raise ValueError(f"generated task {self.name!r}: no {split!r} record in {MAX_DRAWS} draws; its value space "
                         f"is too small to partition between splits {list(self.splits)} (widen the generator)")

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
         "attic", "desk", "elephant", "kite", "moon", "oak", "parrot", "stone", "unicorn", "valley", "wolf",
         # widened so that each split owns enough words (validation gets ~10% of them)
         "actor", "ankle", "apron", "artist", "autumn", "avenue", "axe", "eel", "effort", "egg", "elm", "energy",
         "envelope", "evening", "exit", "icicle", "image", "index", "inch", "inn", "item", "ivy", "oar", "object",
         "office", "onset", "opera", "option", "ostrich", "outlet", "oyster", "udder", "ulcer", "umpire", "under",
         "unit", "urchin", "usher", "utensil", "badge", "banana", "beach", "blanket", "cabin", "camera", "carpet",
         "castle", "copper", "cotton", "daisy", "donkey", "fabric", "falcon", "fence", "finger", "garlic", "glove",
         "hammer", "harbor", "jungle", "kettle", "lizard", "magnet", "meadow", "muffin", "napkin", "pillow",
         "pirate", "pocket", "radish", "saddle", "salmon", "spider", "summer", "temple", "ticket", "tunnel",
         "turtle", "velvet", "walnut", "winter", "wizard", "yogurt")
VOWELS = "aeiou"

SENTIMENT_WORDS = {
    "positive": ("great", "wonderful", "excellent", "lovely", "fantastic", "delightful", "superb", "pleasant"),
    "negative": ("awful", "terrible", "boring", "dreadful", "horrible", "disappointing", "poor", "unpleasant"),
}
SENTIMENT_SUBJECTS = ("the movie", "the meal", "my trip", "the service", "this phone", "the show", "the book",
                      "our hotel", "the game", "the class", "the concert", "the museum", "this laptop", "the park",
                      "the flight", "the restaurant", "the lecture", "the album", "this car", "the party")
SENTIMENT_FRAMES = ("{s} was {w}.", "I thought {s} was {w}.", "Honestly, {s} was {w} overall.",
                    "{s} felt {w} to me.", "All in all, {s} was {w}.", "My friends said {s} was {w}.",
                    "We agreed that {s} was {w}.", "Looking back, {s} was {w}.")

# Each label owns its keywords; a sentence names a person, a frame and one keyword, so the label is visible in the
# input and a validation sentence (an unseen combination) is decided by a keyword that train also labels.
TOPIC_WORDS = {
    "sports": ("football", "tennis", "referee", "goalkeeper", "stadium", "marathon", "basketball"),
    "food": ("pasta", "soup", "bread", "recipe", "cheese", "dessert", "salad"),
    "weather": ("rain", "storm", "snowfall", "forecast", "thunder", "sunshine", "fog"),
    "music": ("guitar", "melody", "drummer", "orchestra", "piano", "chorus", "album"),
}
TOPIC_PEOPLE = ("We", "She", "He", "They", "My friend", "Our teacher", "The neighbours", "My sister")
TOPIC_FRAMES = ("{p} talked about the {k} all evening.", "{p} wrote a long post about the {k}.",
                "{p} got excited about the {k} today.", "{p} mentioned the {k} again.",
                "{p} kept asking about the {k}.", "{p} read an article on the {k}.")


def _number(rng: random.Random, low: int = 0, high: int = 9999) -> int:
    return rng.randint(low, high)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


# ----------------------------------------------------------------------------------------------------------------
# Generators: cluster number_properties
# ----------------------------------------------------------------------------------------------------------------

def gen_parity(rng: random.Random) -> dict:
    n = _number(rng, 0, 9999)
    answer = "even" if n % 2 == 0 else "odd"
    return {"number": str(n), "answer": answer, "options": ["even", "odd"],
            "rationale": f"The last digit of {n} is {n % 10}, which is {answer}."}


def gen_larger_number(rng: random.Random) -> dict:
    a, b = rng.sample(range(100), 2)
    return {"a": str(a), "b": str(b), "answer": str(max(a, b)), "options": [str(a), str(b)]}


def gen_multiple_of_five(rng: random.Random) -> dict:
    n = _number(rng, 0, 9999)
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
    sentence = rng.choice(TOPIC_FRAMES).format(p=rng.choice(TOPIC_PEOPLE), k=rng.choice(TOPIC_WORDS[label]))
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


# ----------------------------------------------------------------------------------------------------------------
# Partition keys: what decides a record's split, where the whole record is too fine
# ----------------------------------------------------------------------------------------------------------------

def _unordered_pair(record: Record) -> list[str]:
    """a ? b and b ? a share a split: for max and + the order of the operands is not a new question."""
    return sorted((record["a"], record["b"]))


PARTITION_KEYS: dict[Callable, Callable[[Record], Any]] = {
    gen_larger_number: _unordered_pair,
    gen_addition: _unordered_pair,
}
