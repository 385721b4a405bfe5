"""BIG-Bench Hard (Suzgun et al. 2022, github.com/suzgunmirac/BIG-Bench-Hard) in its published layout:

    DATA_DIR/bbh/<task>.json          {"canary": ..., "examples": [{"input": ..., "target": ...}]}
    DATA_DIR/cot-prompts/<task>.txt   canary line, "-----", task description, 3 "Q: ...\\nA: ..." exemplars whose
                                      answers end "So the answer is X."

CoT mode prompts with those exemplars as written; direct mode with the same exemplars, answer X only. Scoring follows
the BBH authors: exact match of the text after the last "So the answer is " (a trailing "." removed) against the target,
nothing else normalized.
"""
from __future__ import annotations

import json
import os

from flan_jax.evaluation.suites.common import Example, SuiteTask, percent_exact

ANSWER_PREFIX = "So the answer is "
COT_TRIGGER = "Let's think step by step."


def task_names(data_dir: str) -> list[str]:
    folder = os.path.join(data_dir, "bbh")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"BBH: no folder {folder} (expected DATA_DIR/bbh/<task>.json)")
    return sorted(f[:-5] for f in os.listdir(folder) if f.endswith(".json"))


def extract_answer(text: str) -> str:
    """The BBH authors' rule: the text after the last "So the answer is ", without its trailing period.
    Output without that phrase is compared whole (direct prompting answers alone). Only the surrounding whitespace
    the decoder leaves is stripped."""
    answer = text.rsplit(ANSWER_PREFIX, 1)[-1].strip()
    return answer[:-1] if answer.endswith(".") else answer


def score(targets, answers) -> dict:
    return percent_exact(list(targets), list(answers))


def parse_cot_prompt(text: str, path: str = "<prompt>") -> tuple[str, list[tuple[str, str]]]:
    """(description, [(question, chain-of-thought answer)]) from a cot-prompts file."""
    if "-----\n" not in text:
        raise ValueError(f"{path}: no '-----' line after the canary")
    body = text.split("-----\n", 1)[1].strip()
    description, *blocks = body.split("\n\nQ: ")
    exemplars = []
    for block in blocks:
        if "\nA: " not in block:
            raise ValueError(f"{path}: exemplar without an 'A: ' line: {block[:60]!r}")
        question, answer = block.split("\nA: ", 1)
        if ANSWER_PREFIX not in answer:
            raise ValueError(f"{path}: exemplar answer lacks {ANSWER_PREFIX!r}: {answer[-60:]!r}")
        exemplars.append((question.strip(), answer.strip()))
    if not exemplars:
        raise ValueError(f"{path}: no 'Q: ' exemplars")
    return description.strip(), exemplars


def render_prompt(description: str, exemplars, question: str, mode: str) -> str:
    shots = []
    for q, cot in exemplars:
        answer = cot if mode == "cot" else extract_answer(cot)
        shots.append(f"Q: {q}\nA: {answer}")
    tail = f"Q: {question}\nA:" + (f" {COT_TRIGGER}" if mode == "cot" else "")
    return "\n\n".join([description, *shots, tail])


def load_examples(data_dir: str, task: str) -> list[dict]:
    path = os.path.join(data_dir, "bbh", f"{task}.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rows = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an object with an 'examples' list")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not {"input", "target"} <= set(row):
            raise ValueError(f"{path}: example {i} lacks 'input' or 'target'")
    return rows


def load_tasks(data_dir: str, mode: str = "direct", shots: int = None, tasks=None) -> list[SuiteTask]:
    """One SuiteTask per BBH task; `shots` keeps the first K of the 3 exemplars (default all)."""
    if mode not in ("direct", "cot"):
        raise ValueError(f"BBH: --mode must be direct or cot, got {mode!r}")
    out = []
    for name in tasks or task_names(data_dir):
        prompt_path = os.path.join(data_dir, "cot-prompts", f"{name}.txt")
        with open(prompt_path, encoding="utf-8") as f:
            description, exemplars = parse_cot_prompt(f.read(), prompt_path)
        exemplars = exemplars[:shots] if shots is not None else exemplars
        examples = tuple(Example(render_prompt(description, exemplars, row["input"], mode), str(row["target"]))
                         for row in load_examples(data_dir, name))
        out.append(SuiteTask(f"bbh/{name}", examples, "generate", extract_answer, score,
                             max_decode_len=None if mode == "cot" else 0))   # 0: from the longest target
    return out


def scorer(task: str, mode: str):
    """(extract, score) for `eval-suite score`; the rule is the same in both modes."""
    del task, mode
    return extract_answer, score
