"""Structured data to text: E2E NLG (cleaned), WebNLG, DART, CommonGen (GEM)."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import SUMMARY_METRICS, Flan2021Dataset, join_list, linearize_table

CLUSTER = "struct_to_text"

DATA_TO_TEXT = (
    T("Data: {data}\n\nWrite a sentence that describes this data.", "{text}"),
    T("Turn the following facts into fluent English: {data}", "{text}"),
    T("{data}\n\nExpress the information above as a short sentence.", "{text}"),
    T("Here is some structured data:\n{data}\nDescribe it in words.", "{text}"),
    T("Generate a natural-sounding description from these attributes: {data}", "{text}"),
    T("Facts: {data}\nSentence:", "{text}"),
    T("Write one or two sentences that mention all of this: {data}", "{text}"),
    T("Convert the record into text.\n\n{data}", "{text}"),
)
DATA_TO_TEXT_INVERSIONS = (
    T("Sentence: {text}\n\nList the facts this sentence states, as structured data.", "{data}"),
    T("Extract the key-value data from the text: {text}", "{data}"),
)

CONCEPTS_TO_SENTENCE = (
    T("Write a sentence that uses all of these words: {concepts}", "{text}"),
    T("Concepts: {concepts}\n\nMake an everyday sentence containing every concept.", "{text}"),
    T("Use the following words together in one sentence: {concepts}", "{text}"),
    T("{concepts}\n\nCompose a sentence about a plausible scene with those words.", "{text}"),
    T("Here are some keywords: {concepts}. Write a sentence with them.", "{text}"),
    T("Generate a sentence from these concepts: {concepts}", "{text}"),
    T("Words: {concepts}\nSentence:", "{text}"),
    T("Describe a situation that involves {concepts}.", "{text}"),
)
CONCEPTS_TO_SENTENCE_INVERSIONS = (
    T("What are the main concepts in this sentence?\n\n{text}", "{concepts}"),
    T("Sentence: {text}\nList its key words, separated by commas.", "{concepts}"),
)


def _table_record(r):
    data = linearize_table(r["input_text"]["table"])
    text = r.get("target_text")
    return None if data is None or not text else {"data": data, "text": text}


def _common_gen(r):
    concepts = join_list(r.get("concepts") or [])
    text = r.get("target")
    return None if not concepts or not text else {"concepts": concepts, "text": text}


_TV = {"train": "train", "validation": "validation"}

DATASETS = [
    Flan2021Dataset("e2e_nlg", "e2e_cleaned", CLUSTER, _TV, {"train": 33_525, "validation": 4_299}, _table_record,
                    ("data", "text"), DATA_TO_TEXT, DATA_TO_TEXT_INVERSIONS, metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("web_nlg", "web_nlg", CLUSTER, _TV,
                    {"train": 35_426, "validation": 4_464}, _table_record, ("data", "text"), DATA_TO_TEXT,
                    DATA_TO_TEXT_INVERSIONS, metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("dart", "dart", CLUSTER, _TV, {"train": 62_659, "validation": 2_768}, _table_record,
                    ("data", "text"), DATA_TO_TEXT, DATA_TO_TEXT_INVERSIONS, metric_fns=SUMMARY_METRICS),
    Flan2021Dataset("common_gen", "gem/common_gen", CLUSTER, _TV, {"train": 67_389, "validation": 993},
                    _common_gen, ("concepts", "text"), CONCEPTS_TO_SENTENCE, CONCEPTS_TO_SENTENCE_INVERSIONS,
                    metric_fns=SUMMARY_METRICS),
]
