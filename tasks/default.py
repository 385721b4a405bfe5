"""The embedded default collection: procedurally generated instruction tasks (no downloads).

Clusters (seen = in the training mixture, held out = evaluated zero-shot only):
  number_properties (seen)   parity, larger_number, multiple_of_five                  options
  text_classification (seen) keyword_sentiment, topic                                 options
  list_ops (seen)            list_contains (options), list_sort, list_max             generative
  arithmetic (seen)          addition (+cot), subtraction                             generative
  string_editing (seen)      uppercase (+inv), acronym                                generative
  word_analysis (HELD OUT)   vowel_start, contains_letter (options), reverse_word     mixed

Mixtures:
  flan_default_train  zs_opt + zs_noopt variants of the seen clusters' tasks, example-proportional
                      (option tasks 20k train records, generative tasks 10k).
  flan_default_eval   one zero-shot task per base task on "validation": zs_opt for option tasks, zs_noopt otherwise.
Few-shot variants are registered (inputs fit 256 bytes) but left out of the default train mixture.

Validation records never equal train records: each generator's value space is partitioned between the splits (see
flan_jax.data.sources.generated), so seen-task accuracy measures the rule, not recall.

Vocabulary: a 2048-piece BPE model trained on first use on the train records of the train mixture's tasks only (see
flan_jax.data.vocabularies), so words and labels are single pieces and prompts are ~2.8x shorter than in bytes; the tiny
default model then learns the seen classification tasks within minutes. FLAN_JAX_VOCAB overrides it.
"""
from __future__ import annotations

import os
from typing import Iterator

from flan_jax.data import mixing, registry, vocabularies
from flan_jax.data.sources.generated import GeneratedSource
from flan_jax.data.sources import generated as gen
from flan_jax.data.templates import FewShotConfig, Template as T

COLLECTION = "default"
SEED = 0
HELD_OUT_CLUSTERS = ("word_analysis",)
TRAIN_MIXTURE = "flan_default_train"
EVAL_MIXTURE = "flan_default_eval"
TRAIN_VARIANTS = ("zs_opt", "zs_noopt")
# Option tasks get 20k train records, generative ones 10k: the example-proportional train mixture then leans on the
# classification tasks the tiny default model is gated on (rank accuracy), while still learning generation.
OPTION_TASK_EXAMPLES = {"train": 20_000, "validation": 200}
GENERATIVE_TASK_EXAMPLES = {"train": 10_000, "validation": 200}
FEW_SHOT = FewShotConfig(num_exemplars=2, max_input_length=256, exemplar_pool_size=200)
VOCAB_SIZE = 2048                 # BPE pieces: whole words for the templates and word lists, digits split
VOCAB_CORPUS_RECORDS = 300        # train records rendered per task and variant to train the vocabulary on

# name -> (cluster, generator, fields, templates, extra register_task kwargs)
TASKS = {
    "parity": ("number_properties", gen.gen_parity, ("number", "answer"), [
        T("Is {number} even or odd?", "{answer}"),
        T("Number: {number}\nIs this number even or odd?", "{answer}"),
        T("Even or odd: {number}", "{answer}"),
        T("{number} -- odd or even?", "{answer}"),
    ], {"options_field": "options", "rationale_field": "rationale"}),
    "larger_number": ("number_properties", gen.gen_larger_number, ("a", "b", "answer"), [
        T("Which is larger, {a} or {b}?", "{answer}"),
        T("Pick the bigger number: {a}, {b}", "{answer}"),
        T("Which is greater: {a} or {b}?", "{answer}"),
    ], {"options_field": "options"}),
    "multiple_of_five": ("number_properties", gen.gen_multiple_of_five, ("number", "answer"), [
        T("Is {number} divisible by 5?", "{answer}"),
        T("Is {number} a multiple of 5?", "{answer}"),
        T("Number: {number}\nDivisible by five?", "{answer}"),
    ], {"options_field": "options"}),
    "keyword_sentiment": ("text_classification", gen.gen_keyword_sentiment, ("sentence", "answer"), [
        T("{sentence}\nPositive or negative?", "{answer}"),
        T("Review: {sentence}\nSentiment?", "{answer}"),
        T("How does the writer feel? \"{sentence}\"", "{answer}"),
    ], {"options_field": "options",
        "inversion_templates": [T("Write a short {answer} review.", "{sentence}"),
                                T("Give an example of a {answer} sentence about something.", "{sentence}"),
                                T("Sentiment: {answer}\nReview:", "{sentence}")]}),
    "topic": ("text_classification", gen.gen_topic, ("sentence", "answer"), [
        T("{sentence}\nWhat is this about?", "{answer}"),
        T("Sentence: {sentence}\nTopic?", "{answer}"),
        T("Topic of: {sentence}", "{answer}"),
    ], {"options_field": "options"}),
    "list_contains": ("list_ops", gen.gen_list_contains, ("items", "item", "answer"), [
        T("Does [{items}] contain {item}?", "{answer}"),
        T("List: {items}\nIs {item} in it?", "{answer}"),
        T("Is {item} one of {items}?", "{answer}"),
    ], {"options_field": "options"}),
    "list_sort": ("list_ops", gen.gen_list_sort, ("items", "answer"), [
        T("Sort these numbers from smallest to largest: {items}", "{answer}"),
        T("Numbers: {items}\nWrite them in ascending order.", "{answer}"),
        T("Put {items} in increasing order.", "{answer}"),
    ], {}),
    "list_max": ("list_ops", gen.gen_list_max, ("items", "answer"), [
        T("What is the largest number in {items}?", "{answer}"),
        T("List: {items}\nMaximum:", "{answer}"),
        T("Find the biggest value among {items}.", "{answer}"),
    ], {}),
    "addition": ("arithmetic", gen.gen_addition, ("a", "b", "answer"), [
        T("What is {a} + {b}?", "{answer}"),
        T("Add {a} and {b}.", "{answer}"),
        T("Compute the sum of {a} and {b}.", "{answer}"),
        T("{a} plus {b} equals", "{answer}"),
    ], {"rationale_field": "rationale"}),
    "subtraction": ("arithmetic", gen.gen_subtraction, ("a", "b", "answer"), [
        T("What is {a} - {b}?", "{answer}"),
        T("Subtract {b} from {a}.", "{answer}"),
        T("{a} minus {b} equals", "{answer}"),
    ], {}),
    "uppercase": ("string_editing", gen.gen_uppercase, ("text", "answer"), [
        T("Write \"{text}\" in capital letters.", "{answer}"),
        T("Convert to uppercase: {text}", "{answer}"),
        T("Text: {text}\nThe same text in upper case:", "{answer}"),
    ], {"inversion_templates": [T("Write \"{answer}\" in lowercase letters.", "{text}"),
                                T("Convert to lowercase: {answer}", "{text}"),
                                T("Text: {answer}\nThe same text in lower case:", "{text}")]}),
    "acronym": ("string_editing", gen.gen_acronym, ("phrase", "answer"), [
        T("Make an acronym from the first letters of: {phrase}", "{answer}"),
        T("Phrase: {phrase}\nAcronym:", "{answer}"),
        T("Take the first letter of each word in \"{phrase}\" and write them in capitals.", "{answer}"),
    ], {}),
    "vowel_start": ("word_analysis", gen.gen_vowel_start, ("word", "answer"), [
        T("Does the word \"{word}\" start with a vowel?", "{answer}"),
        T("Word: {word}\nIs its first letter a vowel?", "{answer}"),
        T("Is the first letter of {word} one of a, e, i, o, u?", "{answer}"),
    ], {"options_field": "options"}),
    # Short yes/no options: summed-log-prob rank classification barely favours either (comparing words of
    # different lengths would always favour the shorter option).
    "contains_letter": ("word_analysis", gen.gen_contains_letter, ("word", "letter", "answer"), [
        T("Does the word \"{word}\" contain the letter {letter}?", "{answer}"),
        T("Word: {word}\nIs there a {letter} in it?", "{answer}"),
        T("Is the letter {letter} in {word}?", "{answer}"),
    ], {"options_field": "options"}),
    "reverse_word": ("word_analysis", gen.gen_reverse_word, ("word", "answer"), [
        T("Spell \"{word}\" backwards.", "{answer}"),
        T("Reverse the letters of the word {word}.", "{answer}"),
        T("Word: {word}\nReversed:", "{answer}"),
    ], {}),
}


def train_mixture_tasks() -> list[str]:
    """The seqio tasks the train mixture reads (zs_opt and zs_noopt variants of the seen clusters' tasks)."""
    seen = [name for name, spec in TASKS.items() if spec[0] not in HELD_OUT_CLUSTERS]
    return [t for base in seen for t in (f"{base}_{v}" for v in TRAIN_VARIANTS) if t in registry.list_tasks(COLLECTION)]


def vocabulary_corpus_examples() -> Iterator[tuple[str, int, dict]]:
    """(task, train record index, rendered example) for the first VOCAB_CORPUS_RECORDS train records of each task
    the train mixture reads: no validation record and nothing of the held-out clusters (not even their templates)
    shapes the vocabulary, so held-out prompts are tokenized as unseen text is."""
    for task in train_mixture_tasks():
        info = registry.task_info(task)
        examples = registry.iter_examples(registry.task_spec(info.base_task), info.variant, "train")
        for index, example in zip(range(VOCAB_CORPUS_RECORDS), examples):
            yield task, index, example


def vocabulary_corpus() -> list[str]:
    """Rendered inputs, targets and options of `vocabulary_corpus_examples` (what the vocabulary is trained on)."""
    texts = []
    for _, _, example in vocabulary_corpus_examples():
        texts += [example["inputs"], example["targets"], *example["options"]]
    return texts


def vocabulary(seed: int = SEED):
    """The T5 SentencePiece model named by FLAN_JAX_VOCAB if set, else a BPE model trained on this collection's own
    prompts (on first use, then cached; see flan_jax.data.vocabularies)."""
    if os.environ.get("FLAN_JAX_VOCAB"):
        return registry.DEFAULT_VOCABULARY
    generators = (__file__, gen.__file__, registry.__file__, vocabularies.__file__)
    sources = [open(path, "rb").read() for path in generators]
    return vocabularies.CorpusSentencePieceVocabulary(
        "flan_default", vocabulary_corpus, VOCAB_SIZE, vocabularies.fingerprint(str(seed), *sources))


def register(seed: int = SEED) -> None:
    """Registers every default task and the two default mixtures (cheap: no data is generated)."""
    vocab = vocabulary(seed)
    for name, (cluster, generate, fields, templates, extra) in TASKS.items():
        counts = OPTION_TASK_EXAMPLES if "options_field" in extra else GENERATIVE_TASK_EXAMPLES
        registry.register_task(name, GeneratedSource(name, generate, seed=seed, num_examples=counts), templates,
                               fields=fields, vocabulary=vocab,
                               cluster=cluster, collection=COLLECTION, few_shot=FEW_SHOT, seed=seed, **extra)
    train_tasks = train_mixture_tasks()
    mixing.register_mixture(TRAIN_MIXTURE, mixing.example_proportional_rates(mixing.num_train_examples(train_tasks)))
    eval_tasks = [f"{name}_zs_opt" if registry.task_spec(name).has_options else f"{name}_zs_noopt" for name in TASKS]
    mixing.register_mixture(EVAL_MIXTURE, {t: 1.0 for t in eval_tasks})


register()
