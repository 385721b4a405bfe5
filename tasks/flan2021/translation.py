"""Translation: WMT'14 French and WMT'16 German, Romanian, Czech, Finnish, Turkish, Russian (each with English).

The forward templates translate into English; the inversion templates translate English into the other language
(FLAN 2021 mixed both directions in one dataset's templates).
"""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import TRANSLATION_METRICS, Flan2021Dataset

CLUSTER = "translation"

TO_ENGLISH = (
    T("Translate to English:\n\n{source}", "{english}"),
    T("{source}\n\nTranslate this {language} text into English.", "{english}"),
    T("What does \"{source}\" mean in English?", "{english}"),
    T("{language}: {source}\nEnglish:", "{english}"),
    T("Please render the following sentence in English.\n{source}", "{english}"),
    T("How would you say this in English? {source}", "{english}"),
    T("Give an English version of this {language} sentence: {source}", "{english}"),
    T("Source ({language}): {source}\nTarget (English):", "{english}"),
)
FROM_ENGLISH = (
    T("Translate to {language}:\n\n{english}", "{source}"),
    T("{english}\n\nHow is this said in {language}?", "{source}"),
    T("English: {english}\n{language}:", "{source}"),
    T("Write this sentence in {language}: {english}", "{source}"),
    T("Give the {language} translation of \"{english}\".", "{source}"),
    T("Source (English): {english}\nTarget ({language}):", "{source}"),
)

# (dataset name, TFDS builder/config, language code, language name, train size, validation size)
_PAIRS = (
    ("wmt14_enfr", "wmt14_translate/fr-en", "fr", "French", 40_836_715, 3_000),
    ("wmt16_ende", "wmt16_translate/de-en", "de", "German", 4_548_885, 2_169),
    ("wmt16_enro", "wmt16_translate/ro-en", "ro", "Romanian", 610_320, 1_999),
    ("wmt16_encs", "wmt16_translate/cs-en", "cs", "Czech", 997_240, 2_656),
    ("wmt16_enfi", "wmt16_translate/fi-en", "fi", "Finnish", 2_073_394, 1_370),
    ("wmt16_entr", "wmt16_translate/tr-en", "tr", "Turkish", 205_756, 1_001),
    ("wmt16_enru", "wmt16_translate/ru-en", "ru", "Russian", 1_516_162, 2_818),
)


def _pair_fn(code: str, language: str):
    def map_fn(r):
        source, english = r.get(code), r.get("en")
        return None if not source or not english else {"source": source, "english": english, "language": language}
    return map_fn


DATASETS = [
    Flan2021Dataset(name, tfds_name, CLUSTER, {"train": "train", "validation": "validation"},
                    {"train": train, "validation": validation}, _pair_fn(code, language),
                    ("source", "english", "language"), TO_ENGLISH, FROM_ENGLISH, metric_fns=TRANSLATION_METRICS)
    for name, tfds_name, code, language, train, validation in _PAIRS
]
