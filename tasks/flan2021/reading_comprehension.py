"""Reading comprehension: BoolQ, DROP, MultiRC, SQuAD v1.1, SQuAD v2.0, OpenBookQA."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import QA_METRICS, Flan2021Dataset, first_text, label_name

CLUSTER = "reading_comprehension"
YES_NO = ("yes", "no")
_TV = {"train": "train", "validation": "validation"}

# Extractive / abstractive QA over a passage: fields context, question, answer.
PASSAGE_QA = (
    T("{context}\n\nAnswer this question using the passage above: {question}", "{answer}"),
    T("Read the passage and answer the question.\n\nPassage: {context}\nQuestion: {question}", "{answer}"),
    T("{context}\n\nQ: {question}\nA:", "{answer}"),
    T("Here is some text:\n{context}\n\nWhat is the answer to \"{question}\"?", "{answer}"),
    T("Question: {question}\n\nFind the answer in this text:\n{context}", "{answer}"),
    T("Background: {context}\n\nUsing the background, respond to: {question}", "{answer}"),
    T("I have a question about this article.\n\n{context}\n\n{question}", "{answer}"),
    T("Text: {context}\nBased only on the text, {question}", "{answer}"),
    T("Study this passage, then give a short answer.\n{context}\nQuestion: {question}\nShort answer:", "{answer}"),
)
PASSAGE_QA_INVERSIONS = (
    T("{context}\n\nWrite a question about the passage whose answer is \"{answer}\".", "{question}"),
    T("Passage: {context}\nAnswer: {answer}\nWhat question does this answer respond to?", "{question}"),
)

BOOLEAN_QA = (
    T("{passage}\n\nBased on the passage, {question}?", "{answer}"),
    T("Passage: {passage}\nQuestion: {question}?\nAnswer yes or no.", "{answer}"),
    T("Read the text and tell me: {question}?\n\n{passage}", "{answer}"),
    T("{passage}\n\nIs the following true according to the text: {question}?", "{answer}"),
    T("Here is an article:\n{passage}\n\nQuestion: {question}?", "{answer}"),
    T("Text: {passage}\n\nAfter reading this, can you say whether {question}?", "{answer}"),
    T("Answer the yes/no question from the passage.\nQ: {question}?\nPassage: {passage}", "{answer}"),
    T("{question}?\n\nUse this to decide:\n{passage}", "{answer}"),
)
BOOLEAN_QA_INVERSIONS = (
    T("{passage}\n\nWrite a yes/no question about the text whose answer is \"{answer}\".", "{question}"),
    T("Passage: {passage}\nAnswer: {answer}\nWhat yes-or-no question was asked?", "{question}"),
)

ANSWER_CHECK = (
    T("{paragraph}\n\nQuestion: {question}\nProposed answer: {response}\nIs the proposed answer correct?",
      "{answer}"),
    T("Read this:\n{paragraph}\n\nSomeone asked \"{question}\" and was told \"{response}\". Were they told the "
      "truth?", "{answer}"),
    T("Paragraph: {paragraph}\nQ: {question}\nA: {response}\nIs A a right answer to Q given the paragraph?",
      "{answer}"),
    T("{paragraph}\n\nDoes \"{response}\" correctly answer \"{question}\"?", "{answer}"),
    T("Given the text below, decide if the response answers the question correctly.\n\n{paragraph}\n\n"
      "Question: {question}\nResponse: {response}", "{answer}"),
    T("Question: {question}\nCandidate answer: {response}\nContext: {paragraph}\nIs the candidate right?",
      "{answer}"),
    T("{paragraph}\n\nAfter reading the paragraph, would you accept \"{response}\" as an answer to: {question}",
      "{answer}"),
    T("Check this answer against the passage.\nPassage: {paragraph}\nQuestion: {question}\nAnswer: {response}",
      "{answer}"),
)

OPEN_BOOK = (
    T("Fact: {fact}\n\nUse the fact to answer: {question}", "{answer}"),
    T("{question}\n\nHint: {fact}", "{answer}"),
    T("Given that {fact}, {question}", "{answer}"),
    T("Here is a piece of science knowledge: {fact}\nQuestion: {question}", "{answer}"),
    T("Knowing that \"{fact}\", how would you answer \"{question}\"?", "{answer}"),
    T("Question: {question}\nSupporting fact: {fact}\nAnswer:", "{answer}"),
    T("Read the fact and pick the best answer.\n{fact}\n{question}", "{answer}"),
    T("{fact}\n\nWith that in mind: {question}", "{answer}"),
)
OPEN_BOOK_INVERSIONS = (
    T("Fact: {fact}\nAnswer: {answer}\nWrite a multiple-choice question that this fact answers.", "{question}"),
)


def _boolq(r):
    answer = label_name(("no", "yes"), r.get("label"))
    return None if answer is None else {"passage": r["passage"], "question": r["question"], "answer": answer}


def _drop(r):
    answer = first_text([r.get("answer")] + list(r.get("validated_answers") or []))
    return None if answer is None else {"context": r["passage"], "question": r["question"], "answer": answer}


def _multirc(r):
    answer = label_name(("no", "yes"), r.get("label"))
    return None if answer is None else {"paragraph": r["paragraph"], "question": r["question"],
                                        "response": r["answer"], "answer": answer}


def _squad(r):
    answer = first_text(r["answers"]["text"])
    return None if answer is None else {"context": r["context"], "question": r["question"], "answer": answer}


def _squad_v2(r):
    answer = "unanswerable" if r.get("is_impossible") else first_text(r["answers"]["text"])
    return None if answer is None else {"context": r["context"], "question": r["question"], "answer": answer}


def _openbookqa(r):
    q = r["question"]
    options = [q["choice_A"], q["choice_B"], q["choice_C"], q["choice_D"]]
    answer = label_name(options, r.get("answerKey"))
    return None if answer is None else {"fact": r["fact1"], "question": q["stem"], "answer": answer,
                                        "options": options}


DATASETS = [
    Flan2021Dataset("bool_q", "super_glue/boolq", CLUSTER, _TV, {"train": 9_427, "validation": 3_270}, _boolq,
                    ("passage", "question", "answer"), BOOLEAN_QA, BOOLEAN_QA_INVERSIONS, fixed_options=YES_NO),
    Flan2021Dataset("drop", "drop", CLUSTER, {"train": "train", "validation": "dev"},
                    {"train": 77_409, "validation": 9_536}, _drop, ("context", "question", "answer"), PASSAGE_QA,
                    PASSAGE_QA_INVERSIONS, metric_fns=QA_METRICS),
    Flan2021Dataset("multirc", "super_glue/multirc", CLUSTER, _TV, {"train": 27_243, "validation": 4_848}, _multirc,
                    ("paragraph", "question", "response", "answer"), ANSWER_CHECK, fixed_options=YES_NO),
    Flan2021Dataset("squad_v1", "squad/v1.1", CLUSTER, _TV, {"train": 87_599, "validation": 10_570}, _squad,
                    ("context", "question", "answer"), PASSAGE_QA, PASSAGE_QA_INVERSIONS, metric_fns=QA_METRICS),
    Flan2021Dataset("squad_v2", "squad/v2.0", CLUSTER, _TV, {"train": 130_319, "validation": 11_873}, _squad_v2,
                    ("context", "question", "answer"),
                    PASSAGE_QA + (T("{context}\n\n{question} (If the passage does not say, answer \"unanswerable\".)",
                                    "{answer}"),),
                    metric_fns=QA_METRICS),
    Flan2021Dataset("openbookqa", "openbookqa", CLUSTER, _TV, {"train": 4_957, "validation": 500}, _openbookqa,
                    ("fact", "question", "answer"), OPEN_BOOK, OPEN_BOOK_INVERSIONS, options_field="options"),
]
