"""Closed-book QA: TriviaQA (no context), Natural Questions (open), ARC Easy, ARC Challenge."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import QA_METRICS, Flan2021Dataset, first_text

CLUSTER = "closed_book_qa"
_TV = {"train": "train", "validation": "validation"}

TRIVIA = (
    T("{question}", "{answer}"),
    T("Answer this question: {question}", "{answer}"),
    T("Quiz time! {question}", "{answer}"),
    T("Q: {question}\nA:", "{answer}"),
    T("Give a short answer from general knowledge.\n{question}", "{answer}"),
    T("Here is a trivia question: {question}\nWhat is the answer?", "{answer}"),
    T("Question: {question}\nAnswer:", "{answer}"),
    T("Without looking anything up, {question}", "{answer}"),
    T("What would you say to this? {question}", "{answer}"),
)
TRIVIA_INVERSIONS = (
    T("Write a trivia question whose answer is \"{answer}\".", "{question}"),
    T("Answer: {answer}\nWhat could the question have been?", "{question}"),
)

SCIENCE_MC = (
    T("{question}", "{answer}"),
    T("Science question: {question}", "{answer}"),
    T("Pick the correct answer.\n\n{question}", "{answer}"),
    T("Q: {question}\nWhich choice is right?", "{answer}"),
    T("A student is asked: {question}\nWhat should the student answer?", "{answer}"),
    T("Answer this grade-school science question: {question}", "{answer}"),
    T("Question: {question}\nThe best answer is", "{answer}"),
    T("Use what you know about the natural world. {question}", "{answer}"),
)
SCIENCE_MC_INVERSIONS = (
    T("Write a science exam question whose correct answer is \"{answer}\".", "{question}"),
)


def _trivia(r):
    answer = r["answer"].get("value") or first_text(r["answer"].get("aliases"))
    return None if not answer or not answer.strip() else {"question": r["question"], "answer": answer}


def _nq_open(r):
    answer = first_text(r.get("answer"))
    return None if answer is None else {"question": r["question"], "answer": answer}


def _arc(r):
    texts, labels = r["choices"]["text"], r["choices"]["label"]
    matches = [text for text, label in zip(texts, labels) if label == r.get("answerKey")]
    return None if not matches else {"question": r["question"], "answer": matches[0], "options": list(texts)}


DATASETS = [
    Flan2021Dataset("trivia_qa", "trivia_qa/rc.nocontext", CLUSTER, _TV, {"train": 138_384, "validation": 18_669},
                    _trivia, ("question", "answer"), TRIVIA, TRIVIA_INVERSIONS, metric_fns=QA_METRICS),
    Flan2021Dataset("natural_questions", "natural_questions_open", CLUSTER, _TV,
                    {"train": 87_925, "validation": 3_610}, _nq_open, ("question", "answer"), TRIVIA,
                    TRIVIA_INVERSIONS, metric_fns=QA_METRICS),
    Flan2021Dataset("arc_easy", "ai2_arc/ARC-Easy", CLUSTER, _TV, {"train": 2_251, "validation": 570}, _arc,
                    ("question", "answer"), SCIENCE_MC, SCIENCE_MC_INVERSIONS, options_field="options"),
    Flan2021Dataset("arc_challenge", "ai2_arc/ARC-Challenge", CLUSTER, _TV, {"train": 1_119, "validation": 299},
                    _arc, ("question", "answer"), SCIENCE_MC, SCIENCE_MC_INVERSIONS, options_field="options"),
]
