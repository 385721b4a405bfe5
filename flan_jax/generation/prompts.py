"""Self-Instruct prompts (our wording) and the parsers that read the model's continuations back.

Our models are encoder-decoders: a prompt is the encoder input and the decoder writes its continuation, so each
prompt ends where the model should carry on ("9." after eight numbered tasks, "Example 1" after a new task).
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class SeedTask:
    instruction: str
    instances: tuple[tuple[str, str], ...]     # (input, output); input "" when the task needs none
    is_classification: bool


def load_seed_tasks(path: str) -> list[SeedTask]:
    """One JSON object per line: {"instruction", "instances": [{"input", "output"}], "is_classification"}."""
    tasks = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                raise ValueError(f"{where}: field 'instruction' must be a non-empty string")
            instances = row.get("instances")
            if not isinstance(instances, list) or not instances or not all(
                    isinstance(i, dict) and isinstance(i.get("input", ""), str) and isinstance(i.get("output"), str)
                    for i in instances):
                raise ValueError(f"{where}: field 'instances' must be a non-empty list of {{input, output}} strings")
            if not isinstance(row.get("is_classification"), bool):
                raise ValueError(f"{where}: field 'is_classification' must be true or false")
            tasks.append(SeedTask(row["instruction"].strip(),
                                  tuple((i.get("input", "").strip(), i["output"].strip()) for i in instances),
                                  row["is_classification"]))
    if not tasks:
        raise ValueError(f"{path}: no seed tasks")
    return tasks


# ----------------------------------------------------------------------------------------------------------------
# 1. New instructions
# ----------------------------------------------------------------------------------------------------------------

INSTRUCTION_HEADER = "Here is a list of different tasks a helpful assistant can do:\n"
_NUMBERED = re.compile(r"(?:^|\n)\s*\d{1,2}\s*[.)]\s*")


def instruction_prompt(instructions: Sequence[str]) -> str:
    lines = [f"{i}. {' '.join(text.split())}" for i, text in enumerate(instructions, 1)]
    return INSTRUCTION_HEADER + "\n".join(lines) + f"\n{len(instructions) + 1}."


def parse_instructions(text: str, cut_off: bool) -> tuple[list[str], int]:
    """The continuation of `instruction_prompt` split at its list numbers -> (instructions, dropped). When the
    generation hit the length limit its last item may be cut mid-sentence, so it is dropped (dropped = 1)."""
    items = [" ".join(piece.split()) for piece in _NUMBERED.split(text)]
    items = [item for item in items if item]
    if cut_off and items:
        return items[:-1], 1
    return items, 0


# ----------------------------------------------------------------------------------------------------------------
# 3. Is it a classification task?
# ----------------------------------------------------------------------------------------------------------------

CLASSIFICATION_HEADER = ("Does each task ask for one answer out of a small, fixed set of labels "
                         "(a classification task)?\n\n")
CLASSIFICATION_OPTIONS = ("Yes", "No")


def classification_prompt(instruction: str, examples: Sequence[SeedTask]) -> str:
    shots = "".join(f"Task: {t.instruction}\nClassification task: {'Yes' if t.is_classification else 'No'}\n\n"
                    for t in examples)
    return CLASSIFICATION_HEADER + shots + f"Task: {instruction}\nClassification task:"


# ----------------------------------------------------------------------------------------------------------------
# 4. Instances: input first (most tasks) or output first (classification: a label, then an input for it)
# ----------------------------------------------------------------------------------------------------------------

INPUT_FIRST_HEADER = ("Write examples for each task. An example is an input and the output for it; "
                      "when a task needs no input, write the output alone.\n\n")
OUTPUT_FIRST_HEADER = ("For each classification task, name a class label and then write an input that "
                       "belongs to that label.\n\n")
_EXAMPLE = re.compile(r"(?:^|\n)\s*Example\s*\d*\s*[.:]?\s*\n?")
_INPUT = re.compile(r"^\s*Input\s*:\s*", re.IGNORECASE)
_OUTPUT = re.compile(r"\n?\s*Output\s*:\s*", re.IGNORECASE)
_LABEL = re.compile(r"(?:^|\n)\s*Class label\s*:\s*", re.IGNORECASE)
_LABEL_INPUT = re.compile(r"\n?\s*Input\s*:\s*", re.IGNORECASE)


def _input_first_block(task: SeedTask) -> str:
    parts = []
    for n, (inp, out) in enumerate(task.instances, 1):
        parts.append(f"Example {n}\n" + (f"Input: {inp}\n" if inp else "") + f"Output: {out}\n")
    return "".join(parts)


def instance_prompt(instruction: str, is_classification: bool, examples: Sequence[SeedTask]) -> str:
    if is_classification:
        shots = "".join(f"Task: {t.instruction}\n" + "".join(f"Class label: {out}\nInput: {inp}\n"
                                                               for inp, out in t.instances) + "\n"
                        for t in examples)
        return OUTPUT_FIRST_HEADER + shots + f"Task: {instruction}\nClass label:"
    shots = "".join(f"Task: {t.instruction}\n{_input_first_block(t)}\n" for t in examples)
    return INPUT_FIRST_HEADER + shots + f"Task: {instruction}\nExample 1\n"


def parse_input_first(text: str) -> list[tuple[str, str]]:
    """"Input: x\\nOutput: y\\nExample 2\\n..." -> [(x, y), ...]; a chunk without "Output:" is an output alone."""
    instances = []
    for chunk in _EXAMPLE.split(text):
        if not chunk.strip():
            continue
        pieces = _OUTPUT.split(chunk, maxsplit=1)
        if len(pieces) == 2:
            inp, out = _INPUT.sub("", pieces[0], count=1), pieces[1]
        else:
            inp, out = "", _INPUT.sub("", chunk, count=1)
        instances.append((inp.strip(), out.strip()))
    return instances


def parse_output_first(text: str) -> list[tuple[str, str]]:
    """"label\\nInput: x\\nClass label: ..." (the continuation of "Class label:") -> [(x, label), ...]."""
    instances = []
    for chunk in _LABEL.split(text):
        if not chunk.strip():
            continue
        pieces = _LABEL_INPUT.split(chunk, maxsplit=1)
        label = pieces[0].strip()
        inp = pieces[1].strip() if len(pieces) == 2 else ""
        instances.append((inp, label))
    return instances
