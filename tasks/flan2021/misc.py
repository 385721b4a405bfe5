"""Miscellaneous: TREC question types, CoLA acceptability, WiC word senses, CoQA, QuAC, DeepMind math."""
from __future__ import annotations

from flan_jax.data.templates import Template as T
from flan_jax.tasks.flan2021._common import QA_METRICS, Flan2021Dataset, first_text, label_name

CLUSTER = "misc"
YES_NO = ("no", "yes")
_TV = {"train": "train", "validation": "validation"}
# TFDS trec label-coarse order: DESC, ENTY, ABBR, HUM, NUM, LOC.
QUESTION_TYPES = ("description", "entity", "abbreviation", "human", "number", "location")

QUESTION_TYPE = (
    T("What kind of thing would answer this question?\n\n{question}", "{answer}"),
    T("Question: {question}\nWhat type of answer is it looking for?", "{answer}"),
    T("{question}\n\nIs this question asking for a description, an entity, an abbreviation, a person, a number, "
      "or a location?", "{answer}"),
    T("Classify the question by its expected answer type: {question}", "{answer}"),
    T("Here is a question: \"{question}\"\nWhich category does its answer fall into?", "{answer}"),
    T("Determine the answer type of the following question.\n{question}", "{answer}"),
    T("Q: {question}\nAnswer category:", "{answer}"),
    T("If someone answered \"{question}\", what sort of information would they give?", "{answer}"),
)
QUESTION_TYPE_INVERSIONS = (
    T("Write a question that asks for this type of answer: {answer}.", "{question}"),
)

ACCEPTABILITY = (
    T("Is this sentence grammatically acceptable?\n\n{sentence}", "{answer}"),
    T("Sentence: \"{sentence}\"\nWould a native speaker consider it well-formed?", "{answer}"),
    T("{sentence}\n\nIs the sentence above correct English?", "{answer}"),
    T("Check the grammar: {sentence}\nIs it acceptable?", "{answer}"),
    T("Does the following sentence make sense grammatically?\n{sentence}", "{answer}"),
    T("Could this appear in a carefully edited book? \"{sentence}\"", "{answer}"),
    T("Text: {sentence}\nGrammatical?", "{answer}"),
    T("Judge whether this is a proper English sentence: {sentence}", "{answer}"),
)

WORD_SENSE = (
    T("Does the word \"{word}\" mean the same thing in these two sentences?\n\n{first}\n{second}", "{answer}"),
    T("Sentence A: {first}\nSentence B: {second}\nIs \"{word}\" used with the same meaning in both?", "{answer}"),
    T("{first}\n{second}\n\nIn both sentences above, does \"{word}\" have the same sense?", "{answer}"),
    T("Consider the word \"{word}\". First use: {first} Second use: {second} Same meaning?", "{answer}"),
    T("Here are two sentences containing \"{word}\":\n- {first}\n- {second}\nIs the meaning of the word "
      "identical?", "{answer}"),
    T("Word: {word}\nContext 1: {first}\nContext 2: {second}\nSame sense?", "{answer}"),
    T("Is \"{word}\" being used in the same way in \"{first}\" and in \"{second}\"?", "{answer}"),
    T("Decide if the target word keeps its meaning across the two contexts.\nTarget: {word}\n1) {first}\n"
      "2) {second}", "{answer}"),
)
WORD_SENSE_INVERSIONS = (
    T("Sentence: {first}\nWrite another sentence using \"{word}\"; same meaning as here? {answer}.", "{second}"),
)

CONVERSATIONAL_QA = (
    T("{story}\n\nAnswer these questions in order:\n{questions}", "{answers}"),
    T("Read the text, then answer each numbered question.\n\n{story}\n\n{questions}", "{answers}"),
    T("Story: {story}\nQuestions:\n{questions}\nAnswers:", "{answers}"),
    T("{story}\n\nHere are some questions about the story:\n{questions}\nGive short numbered answers.",
      "{answers}"),
    T("Use the passage to answer a series of questions.\nPassage: {story}\n{questions}", "{answers}"),
    T("{questions}\n\nAnswer the questions above using this text:\n{story}", "{answers}"),
    T("Text:\n{story}\n\nRespond to each question with a few words.\n{questions}", "{answers}"),
    T("Here is a story followed by questions.\n{story}\n{questions}\nNumbered answers:", "{answers}"),
)

DIALOG_QA = (
    T("{title}\n\n{context}\n\nQuestion: {question}\nAnswer with a span of the text (or \"unanswerable\").",
      "{answer}"),
    T("Section about {title}: {context}\n\nQ: {question}", "{answer}"),
    T("Read the section and answer the question.\n{context}\n{question}", "{answer}"),
    T("Topic: {title}\nText: {context}\nA student asks: {question}", "{answer}"),
    T("{context}\n\nBased on the text, {question}", "{answer}"),
    T("Question: {question}\nWhat does this text about {title} say?\n{context}", "{answer}"),
    T("Answer from the passage, quoting it where you can.\n\n{context}\n\n{question}", "{answer}"),
    T("Here is part of an article on {title}:\n{context}\n{question}", "{answer}"),
)

ARITHMETIC = (
    T("{question}", "{answer}"),
    T("Solve this: {question}", "{answer}"),
    T("Math problem: {question}\nAnswer:", "{answer}"),
    T("Work out the answer. {question}", "{answer}"),
    T("{question}\nGive only the final result.", "{answer}"),
    T("Q: {question}\nA:", "{answer}"),
    T("Compute the following. {question}", "{answer}"),
    T("What is the solution to this problem? {question}", "{answer}"),
)
ARITHMETIC_INVERSIONS = (
    T("Write an arithmetic problem whose answer is {answer}.", "{question}"),
)


def _trec(r):
    answer = label_name(QUESTION_TYPES, r.get("label-coarse"))
    return None if answer is None else {"question": r["text"], "answer": answer}


def _cola(r):
    answer = label_name(YES_NO, r.get("label"))
    return None if answer is None else {"sentence": r["sentence"], "answer": answer}


def _wic(r):
    answer = label_name(YES_NO, r.get("label"))
    return None if answer is None else {"word": r["word"], "first": r["sentence1"], "second": r["sentence2"],
                                        "answer": answer}


def _coqa(r):
    # Questions and answers are parallel lists; pair them up in order.
    pairs = [(q, a) for q, a in zip(r.get("questions") or [], r["answers"].get("input_text") or [])
             if q.strip() and a.strip()]
    if not pairs:
        return None
    return {"story": r["story"], "questions": "\n".join(f"{i}. {q}" for i, (q, _) in enumerate(pairs, 1)),
            "answers": "\n".join(f"{i}. {a}" for i, (_, a) in enumerate(pairs, 1))}


def _quac(r):
    answer = first_text([r["orig_answer"].get("text")] + list(r["answers"].get("text") or []))
    if answer is None:
        return None
    answer = "unanswerable" if answer.strip() == "CANNOTANSWER" else answer
    return {"title": r["title"], "context": r["context"], "question": r["question"], "answer": answer}


def _math(r):
    question, answer = (r.get("question") or "").strip(), (r.get("answer") or "").strip()
    return None if not question or not answer else {"question": question, "answer": answer}


DATASETS = [
    Flan2021Dataset("trec", "trec", CLUSTER, {"train": "train", "validation": "test"},
                    {"train": 5_452, "validation": 500}, _trec, ("question", "answer"), QUESTION_TYPE,
                    QUESTION_TYPE_INVERSIONS, fixed_options=QUESTION_TYPES),
    Flan2021Dataset("cola", "glue/cola", CLUSTER, _TV, {"train": 8_551, "validation": 1_043}, _cola,
                    ("sentence", "answer"), ACCEPTABILITY, fixed_options=YES_NO),
    Flan2021Dataset("wic", "super_glue/wic", CLUSTER, _TV, {"train": 5_428, "validation": 638}, _wic,
                    ("word", "first", "second", "answer"), WORD_SENSE, WORD_SENSE_INVERSIONS, fixed_options=YES_NO),
    Flan2021Dataset("coqa", "coqa", CLUSTER, {"train": "train", "validation": "test"},
                    {"train": 7_199, "validation": 500}, _coqa, ("story", "questions", "answers"),
                    CONVERSATIONAL_QA, metric_fns=QA_METRICS),
    Flan2021Dataset("quac", "quac", CLUSTER, _TV, {"train": 83_568, "validation": 7_354}, _quac,
                    ("title", "context", "question", "answer"), DIALOG_QA, metric_fns=QA_METRICS),
    Flan2021Dataset("math_add_or_sub", "math_dataset/arithmetic__add_or_sub", CLUSTER,
                    {"train": "train", "validation": "test"}, {"train": 1_999_998, "validation": 10_000}, _math,
                    ("question", "answer"), ARITHMETIC, ARITHMETIC_INVERSIONS, metric_fns=QA_METRICS),
]
