"""The embedded preference tasks of the default collection: the right answer over a wrong one.

For the generated arithmetic and list tasks (addition, subtraction, list_sort, list_max) each prompt is the task's
own prompt (its templates, its seen-cluster wording) and the preference follows a rule anyone can check: `chosen` is
the correct answer, `rejected` a wrong one: for arithmetic the other operation's result (a - b for a + b, and back),
for lists a wrong order (descending, or one adjacent pair left unswapped) or a wrong element (the minimum, or the
runner-up). Ties (a + b = |a - b| when b = 0) are drawn again. Prompts are partitioned between
train and validation exactly as the instruction task's records are (flan_jax.data.sources.generated: same generator, same
partition key), so a validation prompt is in neither the preference train split nor the SFT train split.

Mixture flan_default_preference: the four `<task>_pref` seqio tasks, equal rates.
"""
from __future__ import annotations

import random

from flan_jax.data import mixing, preference as preference_data, registry
from flan_jax.data.sources import generated as gen
from flan_jax.data.sources.generated import GeneratedSource
from flan_jax.tasks import default

PREFERENCE_MIXTURE = "flan_default_preference"
NUM_EXAMPLES = {"train": 10_000, "validation": 200}


def wrong_addition(record: dict, rng: random.Random) -> str:
    del rng
    return str(abs(int(record["a"]) - int(record["b"])))       # the wrong operation: a difference for a sum


def wrong_subtraction(record: dict, rng: random.Random) -> str:
    del rng
    return str(int(record["a"]) + int(record["b"]))            # a sum for a difference


def wrong_list_sort(record: dict, rng: random.Random) -> str:
    items = sorted(int(x) for x in record["items"].split())
    if rng.random() < 0.5:
        return " ".join(map(str, reversed(items)))            # sorted the wrong way round
    pairs = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
    if not pairs:
        return record["items"]
    i = rng.choice(pairs)                                     # two neighbours left unswapped
    items[i], items[i + 1] = items[i + 1], items[i]
    return " ".join(map(str, items))


def wrong_list_max(record: dict, rng: random.Random) -> str:
    items = [int(x) for x in record["items"].split(", ")]
    smaller = sorted(set(items) - {max(items)})
    if not smaller:
        return str(max(items) + 1)
    return str(min(items)) if rng.random() < 0.5 else str(smaller[-1])  # the minimum, or the runner-up


# task -> (generator, wrong-answer function)
WRONG_ANSWERS = {
    "addition": (gen.gen_addition, wrong_addition),
    "subtraction": (gen.gen_subtraction, wrong_subtraction),
    "list_sort": (gen.gen_list_sort, wrong_list_sort),
    "list_max": (gen.gen_list_max, wrong_list_max),
}


def preference_generator(generate, wrong):
    """Records {prompt fields, chosen, rejected}; draws again until the wrong answer differs from the right one."""
    def generate_preference(rng: random.Random) -> dict:
        while True:
            record = generate(rng)
            rejected = wrong(record, rng)
            if rejected != record["answer"]:
                return {**record, "chosen": record["answer"], "rejected": rejected}
    return generate_preference


def instruction_partition_key(generate):
    """The instruction task's partition key, read from the record without the preference fields."""
    key = gen.PARTITION_KEYS.get(generate, dict)
    return lambda record: key({k: v for k, v in record.items() if k not in ("chosen", "rejected")})


def register(seed: int = default.SEED) -> list[str]:
    names = []
    for name, (generate, wrong) in WRONG_ANSWERS.items():
        spec = registry.task_spec(name)
        source = GeneratedSource(name + "_pref", preference_generator(generate, wrong), seed=seed,
                                 num_examples=NUM_EXAMPLES,
                                 partition_key=instruction_partition_key(generate))
        prompt_fields = [f for f in spec.fields if f != "answer"]
        names.append(preference_data.register_preference_task(
            name, source, spec.templates, prompt_fields=prompt_fields, vocabulary=spec.vocabulary,
            cluster=spec.cluster, collection=default.COLLECTION, seed=seed))
    mixing.register_mixture(PREFERENCE_MIXTURE, {n: 1.0 for n in names})
    return names


register()
