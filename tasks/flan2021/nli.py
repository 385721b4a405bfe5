"""Natural language inference: ANLI R1-R3, RTE, CB, SNLI, MNLI, QNLI, WNLI.

Three-way datasets answer yes / it is not possible to tell / no; two-way datasets answer yes / no. Both share the
premise/hypothesis templates (they ask a yes/no question), and invert into "write a hypothesis with this answer".
"""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import Flan2021Dataset, label_name

CLUSTER = "nli"
THREE_WAY = ("yes", "it is not possible to tell", "no")
TWO_WAY = ("yes", "no")

PREMISE_HYPOTHESIS = (
    T("{premise}\n\nBased on the passage above, is it true that \"{hypothesis}\"?", "{answer}"),
    T("Read this: {premise}\n\nDoes it follow that \"{hypothesis}\"?", "{answer}"),
    T("Premise: {premise}\nHypothesis: {hypothesis}\n\nIf the premise holds, does the hypothesis hold too?",
      "{answer}"),
    T("Suppose this is the case: \"{premise}\"\nCan we then say that \"{hypothesis}\"?", "{answer}"),
    T("Here is a statement: {premise}\n\nAnd here is a claim: {hypothesis}\n\nIs the claim backed up by the "
      "statement?", "{answer}"),
    T("{premise}\nQuestion: is \"{hypothesis}\" a sound conclusion from this?", "{answer}"),
    T("Look at the text below.\n\n{premise}\n\nShould we conclude that the next sentence is correct?\n{hypothesis}",
      "{answer}"),
    T("Given: {premise}\nClaim: {hypothesis}\nDoes the given text imply the claim?", "{answer}"),
    T("Decide whether the second sentence can be inferred from the first one.\n\nFirst: {premise}\n"
      "Second: {hypothesis}", "{answer}"),
)
PREMISE_HYPOTHESIS_INVERSIONS = (
    T("{premise}\n\nWrite a sentence such that asking \"is it implied by the text above?\" gets the answer "
      "\"{answer}\".", "{hypothesis}"),
    T("Text: {premise}\nVerdict: {answer}\nWhat statement about the text was being checked?", "{hypothesis}"),
    T("Compose a short passage for which the answer to \"does '{hypothesis}' follow from it?\" is {answer}.",
      "{premise}"),
)

QUESTION_SENTENCE = (
    T("Does the sentence \"{sentence}\" answer the question \"{question}\"?", "{answer}"),
    T("Question: {question}\nSentence: {sentence}\nCan the question be answered from the sentence?", "{answer}"),
    T("{question}\n\nIs the following a good answer to the question above?\n{sentence}", "{answer}"),
    T("I want to know: {question}\nDoes this sentence tell me? \"{sentence}\"", "{answer}"),
    T("Sentence: {sentence}\n\nIs the answer to \"{question}\" contained in that sentence?", "{answer}"),
    T("Someone asked \"{question}\" and got the reply \"{sentence}\". Does the reply answer the question?",
      "{answer}"),
    T("Check whether this sentence responds to the question.\nQ: {question}\nS: {sentence}", "{answer}"),
    T("{sentence}\n\nDoes the text above contain the answer to this question: {question}", "{answer}"),
)
QUESTION_SENTENCE_INVERSIONS = (
    T("Write a question that the sentence below {answer_phrase}.\n\n{sentence}", "{question}"),
    T("Sentence: {sentence}\nDoes it answer the question? {answer}\nWhat was the question?", "{question}"),
)


def _nli(labels, record_keys=("premise", "hypothesis")):
    """map_fn for premise/hypothesis datasets; `labels` maps the TFDS class index to our answer."""
    premise_key, hypothesis_key = record_keys

    def map_fn(r):
        answer = label_name(labels, r.get("label"))
        return None if answer is None else {"premise": r[premise_key], "hypothesis": r[hypothesis_key],
                                            "answer": answer}
    return map_fn


# TFDS label order -> answer (class names checked in tests/test_flan2021.py against the builders).
_ENC = ("yes", "it is not possible to tell", "no")          # entailment, neutral, contradiction
_ECN = ("yes", "no", "it is not possible to tell")          # entailment, contradiction, neutral (CB)
_E_NOT = ("yes", "no")                                      # entailment, not_entailment
_NOT_E = ("no", "yes")                                      # not_entailment, entailment (WNLI)


def _qnli(r):
    answer = label_name(_E_NOT, r.get("label"))
    if answer is None:
        return None
    return {"question": r["question"], "sentence": r["sentence"], "answer": answer,
            "answer_phrase": "answers" if answer == "yes" else "does not answer"}


def _three_way(name, tfds_name, splits, counts, keys=("premise", "hypothesis"), labels=_ENC):
    return Flan2021Dataset(name, tfds_name, CLUSTER, splits, counts, _nli(labels, keys),
                           ("premise", "hypothesis", "answer"), PREMISE_HYPOTHESIS, PREMISE_HYPOTHESIS_INVERSIONS,
                           fixed_options=THREE_WAY)


def _two_way(name, tfds_name, counts, labels):
    return Flan2021Dataset(name, tfds_name, CLUSTER, {"train": "train", "validation": "validation"}, counts,
                           _nli(labels, ("sentence1", "sentence2") if "wnli" in tfds_name else ("premise", "hypothesis")),
                           ("premise", "hypothesis", "answer"), PREMISE_HYPOTHESIS, PREMISE_HYPOTHESIS_INVERSIONS,
                           fixed_options=TWO_WAY)


_TV = {"train": "train", "validation": "validation"}

DATASETS = [
    _three_way("anli_r1", "anli/r1", _TV, {"train": 16_946, "validation": 1_000}, ("context", "hypothesis")),
    _three_way("anli_r2", "anli/r2", _TV, {"train": 45_460, "validation": 1_000}, ("context", "hypothesis")),
    _three_way("anli_r3", "anli/r3", _TV, {"train": 100_459, "validation": 1_200}, ("context", "hypothesis")),
    _three_way("snli", "snli", _TV, {"train": 550_152, "validation": 9_842}),
    _three_way("mnli", "multi_nli", {"train": "train", "validation": "validation_matched"},
               {"train": 392_702, "validation": 9_815}),
    _three_way("cb", "super_glue/cb", _TV, {"train": 250, "validation": 56}, labels=_ECN),
    _two_way("rte", "super_glue/rte", {"train": 2_490, "validation": 277}, _E_NOT),
    _two_way("wnli", "glue/wnli", {"train": 635, "validation": 71}, _NOT_E),
    Flan2021Dataset("qnli", "glue/qnli", CLUSTER, _TV, {"train": 104_743, "validation": 5_463}, _qnli,
                    ("question", "sentence", "answer", "answer_phrase"), QUESTION_SENTENCE,
                    QUESTION_SENTENCE_INVERSIONS, fixed_options=TWO_WAY),
]
