"""Paraphrase: MRPC, QQP, PAWS-Wiki, STS-B (similarity rated 0-5)."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import Flan2021Dataset, label_name

CLUSTER = "paraphrase"
YES_NO = ("no", "yes")
_TV = {"train": "train", "validation": "validation"}
SIMILARITY_SCORES = ("0", "1", "2", "3", "4", "5")

SAME_MEANING = (
    T("Sentence 1: {first}\nSentence 2: {second}\n\nDo these two sentences mean the same thing?", "{answer}"),
    T("\"{first}\"\n\"{second}\"\n\nAre these two sentences paraphrases of each other?", "{answer}"),
    T("Is the meaning of \"{first}\" the same as the meaning of \"{second}\"?", "{answer}"),
    T("{first}\n\n{second}\n\nDo both of these say the same thing?", "{answer}"),
    T("Compare the two texts.\nA: {first}\nB: {second}\nIs B a rewording of A?", "{answer}"),
    T("First: {first}\nSecond: {second}\nCould one replace the other without changing the meaning?", "{answer}"),
    T("Here are two sentences. {first} / {second}\nAre they semantically equivalent?", "{answer}"),
    T("Decide whether the pair expresses the same idea.\n\n- {first}\n- {second}", "{answer}"),
)
SAME_MEANING_INVERSIONS = (
    T("Sentence: {first}\nWrite another sentence; answer to \"same meaning?\" should be {answer}.", "{second}"),
    T("{first}\n\nRewrite this sentence so that a reader asked \"is it a paraphrase?\" would say {answer}.",
      "{second}"),
)

DUPLICATE_QUESTIONS = (
    T("Question 1: {first}\nQuestion 2: {second}\n\nAre these asking the same thing?", "{answer}"),
    T("Would \"{first}\" and \"{second}\" get the same answer?", "{answer}"),
    T("{first}\n{second}\n\nAre the two questions above duplicates?", "{answer}"),
    T("Someone posted \"{first}\". Another person posted \"{second}\". Should the posts be merged as duplicates?",
      "{answer}"),
    T("Do these two questions have the same intent?\nA: {first}\nB: {second}", "{answer}"),
    T("First question: {first}\nSecond question: {second}\nSame question?", "{answer}"),
    T("Check if the following questions are paraphrases.\n\n{first}\n\n{second}", "{answer}"),
    T("Is \"{second}\" just another way of asking \"{first}\"?", "{answer}"),
)
DUPLICATE_QUESTIONS_INVERSIONS = (
    T("Question: {first}\nWrite a second question; are they duplicates? {answer}.", "{second}"),
)

SIMILARITY = (
    T("On a scale of 0 to 5, how similar are these sentences?\n\n{first}\n{second}", "{answer}"),
    T("Sentence A: {first}\nSentence B: {second}\nRate their similarity from 0 (unrelated) to 5 (same meaning).",
      "{answer}"),
    T("How close in meaning are \"{first}\" and \"{second}\"? Give a score between 0 and 5.", "{answer}"),
    T("{first}\n\n{second}\n\nScore the semantic overlap of the two sentences (0-5).", "{answer}"),
    T("Give a similarity grade, 0 lowest and 5 highest.\n- {first}\n- {second}", "{answer}"),
    T("Here are two sentences:\n1. {first}\n2. {second}\nHow much do they mean the same thing, from 0 to 5?",
      "{answer}"),
    T("Text one: {first}\nText two: {second}\nSimilarity (0-5):", "{answer}"),
    T("Judge how alike these sentences are on a 0-5 scale: \"{first}\" versus \"{second}\".", "{answer}"),
)
SIMILARITY_INVERSIONS = (
    T("Sentence: {first}\nWrite a sentence whose similarity to it is {answer} on a 0-5 scale.", "{second}"),
)


def _pair(first_key, second_key, labels):
    def map_fn(r):
        answer = label_name(labels, r.get("label"))
        return None if answer is None else {"first": r[first_key], "second": r[second_key], "answer": answer}
    return map_fn


def _stsb(r):
    score = r.get("label")
    if not isinstance(score, float) or not 0.0 <= score <= 5.0:
        return None
    return {"first": r["sentence1"], "second": r["sentence2"], "answer": str(int(round(score)))}


_FIELDS = ("first", "second", "answer")

DATASETS = [
    Flan2021Dataset("mrpc", "glue/mrpc", CLUSTER, _TV, {"train": 3_668, "validation": 408},
                    _pair("sentence1", "sentence2", YES_NO), _FIELDS, SAME_MEANING, SAME_MEANING_INVERSIONS,
                    fixed_options=YES_NO),
    Flan2021Dataset("qqp", "glue/qqp", CLUSTER, _TV, {"train": 363_846, "validation": 40_430},
                    _pair("question1", "question2", YES_NO), _FIELDS, DUPLICATE_QUESTIONS,
                    DUPLICATE_QUESTIONS_INVERSIONS, fixed_options=YES_NO),
    Flan2021Dataset("paws_wiki", "paws_wiki/labeled_final_tokenized", CLUSTER, _TV,
                    {"train": 49_401, "validation": 8_000}, _pair("sentence1", "sentence2", YES_NO), _FIELDS,
                    SAME_MEANING, SAME_MEANING_INVERSIONS, fixed_options=YES_NO),
    Flan2021Dataset("stsb", "glue/stsb", CLUSTER, _TV, {"train": 5_749, "validation": 1_500}, _stsb, _FIELDS,
                    SIMILARITY, SIMILARITY_INVERSIONS, fixed_options=SIMILARITY_SCORES),
]
