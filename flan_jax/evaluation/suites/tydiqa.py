"""TyDiQA-GoldP (Clark et al. 2020) in the SQuAD-style JSON of its release (tydiqa-goldp-v1.1-dev.json or one file
per language): {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers": [{"text"}]}]}]}]}.
The language is the id's prefix ("english-..."); one task per language. Scored with the SQuAD v1.1 exact match and
token F1 (lowercase, punctuation and English articles removed, whitespace collapsed), max over the references.
Few-shot exemplars (default 1, as in the Flan-T5 paper) are the first questions of each language, not evaluated.
"""
from __future__ import annotations

import collections
import json
import os
import re
import string

from flan_jax.evaluation.suites.common import Example, SuiteTask

DEFAULT_SHOTS = 1


def normalize_answer(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(targets, answers) -> dict:
    """{"f1", "exact_match"} in percent; a target is a reference string or a tuple of them."""
    if len(targets) != len(answers):
        raise ValueError(f"tydiqa: {len(targets)} targets but {len(answers)} predictions")
    refs = [(t,) if isinstance(t, str) else tuple(t) for t in targets]
    em = [max(normalize_answer(a) == normalize_answer(r) for r in rs) for rs, a in zip(refs, answers)]
    f1 = [max(_f1(a, r) for r in rs) for rs, a in zip(refs, answers)]
    n = max(len(targets), 1)
    return {"f1": 100.0 * sum(f1) / n, "exact_match": 100.0 * sum(em) / n}


def read_questions(data_dir: str) -> dict:
    """{language: [(context, question, (answers...))]} from every *.json file in DATA_DIR."""
    files = sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) if os.path.isdir(data_dir) else []
    if not files:
        raise FileNotFoundError(f"TyDiQA: no SQuAD-style *.json file in {data_dir}")
    by_lang = collections.defaultdict(list)
    for name in files:
        path = os.path.join(data_dir, name)
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for article in data.get("data", []):
            for para in article.get("paragraphs", []):
                for qa in para.get("qas", []):
                    answers = tuple(a["text"] for a in qa.get("answers", []))
                    if not answers or "id" not in qa:
                        raise ValueError(f"{path}: question {qa.get('id', '?')} lacks an id or answers")
                    lang = str(qa["id"]).split("-", 1)[0]
                    if not lang.isalpha():   # the language names a task and its predictions file
                        raise ValueError(f"{path}: question id {qa['id']!r} does not start with a language name "
                                         "(e.g. english-123)")
                    by_lang[lang].append((para["context"], qa["question"], answers))
    return dict(by_lang)


def _render(context: str, question: str) -> str:
    return f"{context}\n\nQ: {question}\n\nA:"


def load_tasks(data_dir: str, mode: str = "direct", shots: int = None, tasks=None) -> list[SuiteTask]:
    if mode != "direct":
        raise ValueError("TyDiQA: only --mode direct (extractive QA)")
    shots = DEFAULT_SHOTS if shots is None else shots
    questions = read_questions(data_dir)
    out = []
    for lang in tasks or sorted(questions):
        rows = questions[lang]
        if len(rows) <= shots:
            raise ValueError(f"TyDiQA {lang}: {len(rows)} questions, not enough for {shots} shots plus a test")
        context = "".join(_render(c, q) + f" {a[0]}\n\n" for c, q, a in rows[:shots])
        examples = tuple(Example(context + _render(c, q), a) for c, q, a in rows[shots:])
        out.append(SuiteTask(f"tydiqa/{lang}", examples, "generate", str.strip, score, max_decode_len=32))
    return out


def scorer(task: str, mode: str):
    return str.strip, score
