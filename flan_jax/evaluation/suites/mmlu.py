"""MMLU (Hendrycks et al. 2021, github.com/hendrycks/test) in its published layout:

    DATA_DIR/dev/<subject>_dev.csv, DATA_DIR/test/<subject>_test.csv   rows question,A,B,C,D,answer (no header)

Direct mode: the authors' k-shot prompt (k = 5 dev rows) and rank classification over the four letters. CoT mode: the
same prompt ending "Answer: Let's think step by step.", greedy generation, and the Flan CoT answer extraction.
Contextual calibration replaces the test question and its choices with each content-free input.
"""
from __future__ import annotations

import csv
import os

from flan_jax.evaluation.suites.common import (CONTENT_FREE_INPUTS, Example, SuiteTask, extract_cot_answer,
                                               percent_exact)

LETTERS = ("A", "B", "C", "D")


def subjects(data_dir: str) -> list[str]:
    folder = os.path.join(data_dir, "test")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"MMLU: no folder {folder} (expected DATA_DIR/test/<subject>_test.csv)")
    return sorted(f[:-len("_test.csv")] for f in os.listdir(folder) if f.endswith("_test.csv"))


def read_rows(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r]
    for n, r in enumerate(rows, 1):
        if len(r) != 6 or r[5].strip() not in LETTERS:
            raise ValueError(f"{path}:{n}: expected question,A,B,C,D,answer with answer in A-D, got {r[:1]}...")
    return rows


def format_question(row, with_answer: bool) -> str:
    text = row[0] + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, row[1:5])) + "\nAnswer:"
    return text + (f" {row[5].strip()}\n\n" if with_answer else "")


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def load_tasks(data_dir: str, mode: str = "direct", shots: int = None, tasks=None) -> list[SuiteTask]:
    if mode not in ("direct", "cot"):
        raise ValueError(f"MMLU: --mode must be direct or cot, got {mode!r}")
    shots = 5 if shots is None else shots
    out = []
    for subject in tasks or subjects(data_dir):
        dev = read_rows(os.path.join(data_dir, "dev", f"{subject}_dev.csv"))
        if len(dev) < shots:
            raise ValueError(f"MMLU {subject}: {shots} shots asked, dev has {len(dev)} rows")
        context = header(subject) + "".join(format_question(r, True) for r in dev[:shots])
        trigger = " Let's think step by step." if mode == "cot" else ""
        cf = tuple(context + c + "\nAnswer:" + trigger for c in CONTENT_FREE_INPUTS)
        examples = tuple(Example(context + format_question(r, False) + trigger, r[5].strip(), LETTERS, cf)
                         for r in read_rows(os.path.join(data_dir, "test", f"{subject}_test.csv")))
        kind = "rank" if mode == "direct" else "generate"
        out.append(SuiteTask(f"mmlu/{subject}", examples, kind, extract_letter if mode == "cot" else str,
                             score))
    return out


def extract_letter(text: str) -> str:
    return extract_cot_answer(text)


def score(targets, answers) -> dict:
    return percent_exact(list(targets), [a.strip() for a in answers])


def scorer(task: str, mode: str):
    return (extract_letter if mode == "cot" else str.strip), score
