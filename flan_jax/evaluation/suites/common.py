"""Plain data shared by the suites: a rendered example, a task, and the CoT answer extraction."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Optional, Sequence

CONTENT_FREE_INPUTS = ("N/A", "", "[MASK]")   # Zhao et al. 2021, "Calibrate Before Use"


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    target: object                     # a string, or a tuple of reference strings (TyDiQA)
    options: tuple = ()                # rank classification: candidate answers (the target is one of them)
    content_free: tuple = ()           # the same prompt with the test input replaced by each content-free input


@dataclasses.dataclass(frozen=True)
class SuiteTask:
    name: str                          # "<suite>/<task>"
    examples: tuple
    kind: str                          # "rank" (score the options) or "generate" (greedy decoding)
    extract: Callable[[str], str]      # raw model output -> answer string
    score: Callable[[Sequence, Sequence], dict]   # (targets, answers) -> {metric: percent}; first key is primary
    max_decode_len: Optional[int] = None          # generation only; None: the runner's default

    def __post_init__(self):
        if self.kind not in ("rank", "generate"):
            raise ValueError(f"task {self.name}: kind must be 'rank' or 'generate', got {self.kind!r}")
        if not self.examples:
            raise ValueError(f"task {self.name}: no examples")


def percent_exact(targets: Sequence, answers: Sequence) -> dict:
    """{"accuracy": % of answers string-equal to their target} (no normalization)."""
    if len(targets) != len(answers):
        raise ValueError(f"accuracy: {len(targets)} targets but {len(answers)} predictions")
    if not targets:
        return {"accuracy": float("nan")}
    return {"accuracy": 100.0 * sum(a == t for t, a in zip(targets, answers)) / len(targets)}


_ANSWER_MARKERS = ("answer is", "final answer", "Answer:")


def extract_cot_answer(text: str) -> str:
    """The answer of a chain of thought: the piece after the last answer marker, stripped of surrounding
    punctuation, with a parenthesized letter "(B)" unwrapped to "B" (the Flan CoT convention)."""
    piece = text
    for marker in _ANSWER_MARKERS:
        if marker in piece:
            piece = piece.rsplit(marker, 1)[1]
    piece = piece.strip().strip(" .:,;!\"'").strip()
    m = re.fullmatch(r"\(?([A-Z])\)?", piece)
    return m.group(1) if m else piece
