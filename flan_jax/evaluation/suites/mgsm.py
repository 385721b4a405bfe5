"""MGSM (Shi et al. 2022, github.com/google-research/url-nlp/mgsm): DATA_DIR/mgsm_<lang>.tsv, rows question<TAB>answer
(a number), no header. 8-shot chain of thought: exemplars come from DATA_DIR/exemplars/mgsm_<lang>.tsv (question,
step-by-step answer ending "The answer is N.") when present, else the first K rows of the test file with their numeric
answer (those rows are then not evaluated). The prediction is the number after the last "answer is" (else the last
number in the output), compared numerically.
"""
from __future__ import annotations

import csv
import os
import re

from flan_jax.evaluation.suites.common import Example, SuiteTask

DEFAULT_MODE = "cot"
DEFAULT_SHOTS = 8
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def languages(data_dir: str) -> list[str]:
    names = sorted(f[5:-4] for f in os.listdir(data_dir) if f.startswith("mgsm_") and f.endswith(".tsv")) \
        if os.path.isdir(data_dir) else []
    if not names:
        raise FileNotFoundError(f"MGSM: no mgsm_<lang>.tsv in {data_dir}")
    return names


def read_tsv(path: str) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if r]
    for n, r in enumerate(rows, 1):
        if len(r) != 2:
            raise ValueError(f"{path}:{n}: expected question<TAB>answer, got {len(r)} fields")
    return [(q, a) for q, a in rows]


def extract_number(text: str) -> str:
    piece = text.rsplit("answer is", 1)[1] if "answer is" in text else text
    numbers = _NUMBER.findall(piece) or _NUMBER.findall(text)
    if not numbers:
        return ""
    found = numbers[0] if "answer is" in text else numbers[-1]
    return found.replace(",", "").rstrip(".")


def _as_number(text: str):
    try:
        return float(str(text).replace(",", "").strip())
    except ValueError:
        return None


def score(targets, answers) -> dict:
    if len(targets) != len(answers):
        raise ValueError(f"mgsm: {len(targets)} targets but {len(answers)} predictions")
    hits = [_as_number(a) is not None and _as_number(a) == _as_number(t) for t, a in zip(targets, answers)]
    return {"accuracy": 100.0 * sum(hits) / max(len(hits), 1)}


def load_tasks(data_dir: str, mode: str = DEFAULT_MODE, shots: int = None, tasks=None) -> list[SuiteTask]:
    if mode not in ("direct", "cot"):
        raise ValueError(f"MGSM: --mode must be direct or cot, got {mode!r}")
    shots = DEFAULT_SHOTS if shots is None else shots
    out = []
    for lang in tasks or languages(data_dir):
        rows = read_tsv(os.path.join(data_dir, f"mgsm_{lang}.tsv"))
        exemplar_path = os.path.join(data_dir, "exemplars", f"mgsm_{lang}.tsv")
        if os.path.exists(exemplar_path):
            exemplars = read_tsv(exemplar_path)[:shots]
        else:
            exemplars, rows = rows[:shots], rows[shots:]
        trigger = " Let's think step by step." if mode == "cot" else ""
        context = "".join(f"Question: {q}\nAnswer:{trigger} {a}\n\n" for q, a in exemplars)
        examples = tuple(Example(f"{context}Question: {q}\nAnswer:{trigger}", a.strip()) for q, a in rows)
        out.append(SuiteTask(f"mgsm/{lang}", examples, "generate", extract_number, score,
                             max_decode_len=None if mode == "cot" else 16))
    return out


def scorer(task: str, mode: str):
    return extract_number, score
