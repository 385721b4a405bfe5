"""Coreference: Winogrande (XL), WSC (SuperGLUE, fixed spans), Definite Pronoun Resolution."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import Flan2021Dataset, label_name

CLUSTER = "coreference"
YES_NO = ("no", "yes")

FILL_BLANK = (
    T("{sentence}\n\nWho or what belongs in the blank (_)?", "{answer}"),
    T("Fill in the blank: {sentence}", "{answer}"),
    T("Sentence: {sentence}\nWhich option correctly replaces the underscore?", "{answer}"),
    T("Read the sentence and decide what \"_\" refers to.\n{sentence}", "{answer}"),
    T("In the sentence \"{sentence}\", what is the missing word?", "{answer}"),
    T("{sentence}\nReplace _ with the right choice.", "{answer}"),
    T("Complete the sentence so that it makes sense: {sentence}", "{answer}"),
    T("Which choice fits the gap best?\n\n{sentence}", "{answer}"),
)
FILL_BLANK_INVERSIONS = (
    T("Write a sentence with a blank (_) where \"{answer}\" is the right filler.", "{sentence}"),
)

PRONOUN_YES_NO = (
    T("{text}\n\nIn the passage above, does \"{pronoun}\" refer to {candidate}?", "{answer}"),
    T("Text: {text}\nQuestion: is \"{pronoun}\" the same as \"{candidate}\" here?", "{answer}"),
    T("{text}\n\nWho is \"{pronoun}\"? Is it {candidate}?", "{answer}"),
    T("Read this: {text}\nDoes the pronoun \"{pronoun}\" point to \"{candidate}\"?", "{answer}"),
    T("Consider the sentence \"{text}\". Here, \"{pronoun}\" means {candidate}. True?", "{answer}"),
    T("{text}\nIs it correct that \"{pronoun}\" stands for \"{candidate}\"?", "{answer}"),
    T("Resolve the reference.\nPassage: {text}\nMention: {pronoun}\nCandidate: {candidate}\nSame entity?",
      "{answer}"),
    T("In \"{text}\", can \"{pronoun}\" be replaced by \"{candidate}\" without changing the meaning?",
      "{answer}"),
)

PRONOUN_CHOICE = (
    T("{sentence}\n\nWho or what does \"{pronoun}\" refer to?", "{answer}"),
    T("Sentence: {sentence}\nPronoun: {pronoun}\nWhich noun does the pronoun stand for?", "{answer}"),
    T("In \"{sentence}\", what is \"{pronoun}\"?", "{answer}"),
    T("Read the sentence and resolve the pronoun \"{pronoun}\".\n{sentence}", "{answer}"),
    T("{sentence}\nHere, \"{pronoun}\" means", "{answer}"),
    T("Find the antecedent of \"{pronoun}\" in this sentence: {sentence}", "{answer}"),
    T("Who is meant by \"{pronoun}\"?\n\n{sentence}", "{answer}"),
    T("Pronoun resolution.\nText: {sentence}\nTarget pronoun: {pronoun}\nReferent:", "{answer}"),
)
PRONOUN_CHOICE_INVERSIONS = (
    T("Write a sentence in which the pronoun \"{pronoun}\" refers to {answer}.", "{sentence}"),
)


def _winogrande(r):
    options = [r["option1"], r["option2"]]
    answer = label_name(options, r.get("label"))
    return None if answer is None else {"sentence": r["sentence"], "answer": answer, "options": options}


def _wsc(r):
    answer = label_name(YES_NO, r.get("label"))
    return None if answer is None else {"text": r["text"], "pronoun": r["span2_text"],
                                        "candidate": r["span1_text"], "answer": answer}


def _dpr(r):
    options = list(r.get("candidates") or [])
    answer = label_name(options, r.get("label"))
    return None if answer is None else {"sentence": r["sentence"], "pronoun": r["pronoun"], "answer": answer,
                                        "options": options}


DATASETS = [
    Flan2021Dataset("winogrande", "winogrande", CLUSTER, {"train": "train_xl", "validation": "validation"},
                    {"train": 40_398, "validation": 1_267}, _winogrande, ("sentence", "answer"), FILL_BLANK,
                    FILL_BLANK_INVERSIONS, options_field="options"),
    Flan2021Dataset("wsc", "super_glue/wsc.fixed", CLUSTER, {"train": "train", "validation": "validation"},
                    {"train": 554, "validation": 104}, _wsc, ("text", "pronoun", "candidate", "answer"),
                    PRONOUN_YES_NO, fixed_options=YES_NO),
    Flan2021Dataset("definite_pronoun_resolution", "definite_pronoun_resolution", CLUSTER,
                    {"train": "train", "validation": "test"}, {"train": 1_322, "validation": 564}, _dpr,
                    ("sentence", "pronoun", "answer"), PRONOUN_CHOICE, PRONOUN_CHOICE_INVERSIONS,
                    options_field="options"),
]
