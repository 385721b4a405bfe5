"""Self-Instruct filters (Wang et al. 2022, "Self-Instruct: Aligning Language Models with Self-Generated
Instructions", section 2.3): cheap rules on a generated instruction, and validity rules on its instances.

Every rule returns the name of the rule it broke (a report.json counter key) or None. An instruction is counted
under the first rule it breaks, in the order of INSTRUCTION_FILTERS; the ROUGE-L novelty test runs last (it is the
only one that looks at the pool).
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

MIN_WORDS, MAX_WORDS = 4, 150
# Instructions a text-only model cannot carry out.
BLOCKED_KEYWORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                    "draw", "plot", "go to")
_KEYWORD_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in BLOCKED_KEYWORDS) + r")\b", re.IGNORECASE)
ROUGE_THRESHOLD = 0.7
MAX_INSTANCES = 5


def too_short_or_long(instruction: str) -> str | None:
    n = len(instruction.split())
    return "too_short" if n < MIN_WORDS else "too_long" if n > MAX_WORDS else None


def blocked_keyword(instruction: str) -> str | None:
    return "blocked_keyword" if _KEYWORD_RE.search(instruction) else None


def write_a_program(instruction: str) -> str | None:
    # Such prompts invite the model to describe a program rather than do the task.
    return "write_a_program" if instruction.lower().startswith("write a program") else None


def bad_first_character(instruction: str) -> str | None:
    first = instruction.lstrip()[:1]
    if not first:
        return None   # empty: already too short
    if not first.isascii():
        return "starts_non_ascii"
    return "starts_with_punctuation" if not first.isalnum() else None


INSTRUCTION_FILTERS: tuple[Callable[[str], str | None], ...] = (
    too_short_or_long, blocked_keyword, write_a_program, bad_first_character)
INSTRUCTION_FILTER_NAMES = ("too_short", "too_long", "blocked_keyword", "write_a_program", "starts_with_punctuation",
                            "starts_non_ascii", "rouge_similar")


def rule_filter(instruction: str) -> str | None:
    """The first cheap rule `instruction` breaks, or None."""
    for rule in INSTRUCTION_FILTERS:
        reason = rule(instruction)
        if reason:
            return reason
    return None


# ----------------------------------------------------------------------------------------------------------------
# Instances: (input, output) pairs; input may be "" (the task needs none)
# ----------------------------------------------------------------------------------------------------------------

INSTANCE_FILTER_NAMES = ("empty_output", "input_equals_output", "ends_with_colon", "truncated", "conflicting_outputs",
                         "duplicate", "over_limit")


def invalid_instance(inp: str, out: str) -> str | None:
    """The validity rule an instance breaks: nothing to predict, a copy task, or text that stops at a colon."""
    if not out.strip():
        return "empty_output"
    if inp.strip() and inp.strip().lower() == out.strip().lower():
        return "input_equals_output"
    if inp.rstrip().endswith(":") or out.rstrip().endswith(":"):
        return "ends_with_colon"
    return None


def filter_instances(instances: Sequence[tuple[str, str]], truncated_last: bool = False,
                     max_instances: int = MAX_INSTANCES) -> tuple[list[tuple[str, str]], dict[str, int]]:
    """Kept instances (at most `max_instances`, first ones first) and {rule: instances dropped}.

    - truncated: the last instance of a generation cut off at the length limit;
    - empty_output / input_equals_output / ends_with_colon: see `invalid_instance`;
    - conflicting_outputs: one non-empty input with two different outputs makes the whole set untrustworthy, so
      every instance is dropped;
    - duplicate: exact repeats of an earlier instance; over_limit: beyond `max_instances`.
    """
    counts = dict.fromkeys(INSTANCE_FILTER_NAMES, 0)
    instances = [(i.strip(), o.strip()) for i, o in instances]
    if truncated_last and instances:
        instances.pop()
        counts["truncated"] += 1
    valid = []
    for inp, out in instances:
        reason = invalid_instance(inp, out)
        if reason:
            counts[reason] += 1
        else:
            valid.append((inp, out))
    outputs: dict[str, set] = {}
    for inp, out in valid:
        if inp:
            outputs.setdefault(inp, set()).add(out)
    if any(len(v) > 1 for v in outputs.values()):
        counts["conflicting_outputs"] += len(valid)
        return [], counts
    unique = list(dict.fromkeys(valid))
    counts["duplicate"] += len(valid) - len(unique)
    counts["over_limit"] += max(0, len(unique) - max_instances)
    return unique[:max_instances], counts
