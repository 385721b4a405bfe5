"""Reading comprehension with commonsense: CosmosQA, ReCoRD."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import QA_METRICS, Flan2021Dataset, first_text, label_name

CLUSTER = "reading_comprehension_commonsense"
_TV = {"train": "train", "validation": "validation"}

STORY_QUESTION = (
    T("{context}\n\n{question}", "{answer}"),
    T("Read the story and answer.\n\nStory: {context}\nQuestion: {question}", "{answer}"),
    T("{context}\n\nUsing common sense about the situation above, {question}", "{answer}"),
    T("Here is a short account:\n{context}\n\nQ: {question}", "{answer}"),
    T("Question: {question}\n\nContext: {context}\n\nWhat is the most sensible answer?", "{answer}"),
    T("Think about what probably happened.\n{context}\n{question}", "{answer}"),
    T("Context: {context}\nQ: {question}\nA:", "{answer}"),
    T("{context}\n\nWhich answer fits best? {question}", "{answer}"),
)
STORY_QUESTION_INVERSIONS = (
    T("{context}\n\nWrite a question about this text that \"{answer}\" answers.", "{question}"),
    T("Story: {context}\nAnswer: {answer}\nWhat was the question?", "{question}"),
)

CLOZE = (
    T("{passage}\n\n{query}\n\nWhat should replace \"@placeholder\" in the sentence above?", "{answer}"),
    T("Article: {passage}\n\nFill in @placeholder: {query}", "{answer}"),
    T("{passage}\n\nComplete the follow-up sentence by naming the missing entity (@placeholder):\n{query}",
      "{answer}"),
    T("Read the news story, then tell me what @placeholder stands for.\n\n{passage}\n\nSentence: {query}",
      "{answer}"),
    T("Sentence with a gap: {query}\nSource text: {passage}\nThe gap (@placeholder) is:", "{answer}"),
    T("{passage}\n\nIn \"{query}\", who or what is @placeholder?", "{answer}"),
    T("Passage:\n{passage}\n\nQuery: {query}\nMissing entity:", "{answer}"),
    T("Use the story to fill the blank marked @placeholder.\n{passage}\n{query}", "{answer}"),
)


def _cosmos(r):
    options = [r["answer0"], r["answer1"], r["answer2"], r["answer3"]]
    answer = label_name(options, r.get("label"))
    return None if answer is None else {"context": r["context"], "question": r["question"], "answer": answer,
                                        "options": options}


def _record(r):
    answer = first_text(r.get("answers"))
    return None if answer is None else {"passage": r["passage"], "query": r["query"], "answer": answer}


DATASETS = [
    Flan2021Dataset("cosmos_qa", "cosmos_qa", CLUSTER, _TV, {"train": 25_262, "validation": 2_985}, _cosmos,
                    ("context", "question", "answer"), STORY_QUESTION, STORY_QUESTION_INVERSIONS,
                    options_field="options"),
    Flan2021Dataset("record", "super_glue/record", CLUSTER, _TV, {"train": 100_730, "validation": 10_000}, _record,
                    ("passage", "query", "answer"), CLOZE, metric_fns=QA_METRICS),
]
