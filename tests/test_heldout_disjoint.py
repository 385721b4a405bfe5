"""Held-out data is held out: no validation record of a default task equals one of its train records (fields compared
before templating), and the vocabulary is trained on train records of the train mixture only (no validation text,
no text of the held-out cluster). Each check is also shown to fire on an injected leak."""
import random
import re

import pytest

import flan_jax.tasks  # noqa: F401  (registers the default collection)
from flan_jax.data import mixing, registry
from flan_jax.data.sources import FunctionSource
from flan_jax.data.sources.generated import GeneratedSource, record_key
from flan_jax.tasks import default


def shared_records(source, split: str = "validation") -> int:
    """How many records of `split` also occur, field for field, in the train split."""
    train = {record_key(r) for _, r in source.records("train")}
    return sum(record_key(r) in train for _, r in source.records(split))


def test_no_validation_record_of_any_default_task_is_a_train_record():
    bases = registry.list_base_tasks(default.COLLECTION)
    assert len(bases) == len(default.TASKS)
    for base in bases:
        source = registry.task_spec(base).source
        assert source.num_examples("validation") >= 100, base
        assert shared_records(source) == 0, base


def test_the_overlap_check_catches_shared_records_and_the_partition_removes_them():
    def tiny_space(rng):
        return {"number": str(rng.randrange(50))}

    unpartitioned = FunctionSource(lambda split: [tiny_space(random.Random(f"{split}/{i}")) for i in range(300)])
    assert shared_records(unpartitioned) > 250  # 50 values: nearly every validation record is also a train record
    partitioned = GeneratedSource("tiny", tiny_space, num_examples={"train": 300, "validation": 300})
    assert shared_records(partitioned) == 0
    assert {r["number"] for _, r in partitioned.records("validation")}  # validation still gets records
    assert all(partitioned.split_of(r) == "validation" for _, r in partitioned.records("validation"))


def test_a_value_space_too_small_to_split_is_an_error_naming_the_task():
    source = GeneratedSource("constant", lambda rng: {"x": "1"})
    unreachable = next(s for s in source.splits if s != source.split_of({"x": "1"}))
    with pytest.raises(ValueError, match="'constant'.*too small to partition"):
        source.record(unreachable, 0)


def test_swapped_operands_stay_in_one_split():
    source = registry.task_spec("larger_number").source
    for _, record in source.first_records("validation", 50):
        swapped = dict(record, a=record["b"], b=record["a"])
        assert source.split_of(swapped) == "validation"


# ----------------------------------------------------------------------------------------------------------------
# The vocabulary corpus
# ----------------------------------------------------------------------------------------------------------------

def held_out_bases() -> list[str]:
    return [b for b in registry.list_base_tasks(default.COLLECTION)
            if registry.task_spec(b).cluster in default.HELD_OUT_CLUSTERS]


def held_out_only_words() -> set[str]:
    """Words (3+ letters) of the held-out tasks' templates that no seen task's template uses (e.g. "vowel", "backwards")."""
    def template_words(bases):
        text = " ".join(t.input + " " + t.target for b in bases for t in registry.task_spec(b).templates)
        return set(re.findall(r"[A-Za-z]{3,}", re.sub(r"\{\w+\}", " ", text)))
    seen = [b for b in registry.list_base_tasks(default.COLLECTION) if b not in held_out_bases()]
    return template_words(held_out_bases()) - template_words(seen)


def leaks(corpus: list[str]) -> dict[str, list[str]]:
    """Corpus texts that are held-out prompts, contain held-out-only words, or are validation prompts."""
    texts, words = set(corpus), held_out_only_words()
    held_out, validation = [], []
    for base in held_out_bases():
        spec = registry.task_spec(base)
        for split in ("train", "validation"):
            for _, example in zip(range(50), registry.iter_examples(spec, "zs_noopt", split)):
                held_out += [example["inputs"]] if example["inputs"] in texts else []
    held_out += [t for t in corpus if words & set(re.findall(r"[A-Za-z]{3,}", t))]
    # Every train-mixture template shows a record field besides the answer, so its validation prompts are new text.
    for task in mixing.mixture_rates(default.TRAIN_MIXTURE):
        info = registry.task_info(task)
        for example in registry.iter_examples(registry.task_spec(info.base_task), info.variant, "validation"):
            validation += [example["inputs"]] if example["inputs"] in texts else []
    return {"held_out": held_out, "validation": validation}


def test_vocabulary_corpus_is_train_records_of_the_train_mixture_only():
    vocab = registry.task_spec("parity").vocabulary
    assert vocab.corpus_fn is default.vocabulary_corpus
    used = set()
    validation_keys = {}
    for task, index, _ in default.vocabulary_corpus_examples():
        used.add(task)
        source = registry.task_spec(registry.task_info(task).base_task).source
        if source.name not in validation_keys:
            validation_keys[source.name] = {record_key(r) for _, r in source.records("validation")}
        assert record_key(source.record("train", index)) not in validation_keys[source.name], (task, index)
    assert used == set(mixing.mixture_rates(default.TRAIN_MIXTURE))
    assert not any(registry.task_info(t).cluster in default.HELD_OUT_CLUSTERS for t in used)
    assert {"vowel", "backwards"} <= held_out_only_words()
    assert leaks(default.vocabulary_corpus()) == {"held_out": [], "validation": []}
    for word in held_out_only_words():  # so the trained model has no piece for them either
        assert vocab.tokenizer.piece_to_id("\u2581" + word) == vocab.unk_id, word


def test_the_corpus_checks_catch_injected_leaks():
    corpus = default.vocabulary_corpus()
    held_out_prompt = next(registry.iter_examples(registry.task_spec("reverse_word"), "zs_noopt", "train"))["inputs"]
    validation_prompt = next(registry.iter_examples(registry.task_spec("parity"), "zs_opt", "validation"))["inputs"]
    found = leaks(corpus + [held_out_prompt, validation_prompt, "a vowel"])
    assert held_out_prompt in found["held_out"] and "a vowel" in found["held_out"]
    assert found["validation"] == [validation_prompt]
