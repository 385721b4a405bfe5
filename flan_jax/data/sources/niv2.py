"""Super-NaturalInstructions (NIv2) from a local clone: task JSON files, official splits, encodings, metrics.

Clone layout: `tasks/<task>.json` with {"Definition": [str], "Positive Examples": [{input, output, explanation}],
"Negative Examples": [...], "Instances": [{"id", "input", "output": [str, ...]}], "Categories": [str], ...} and
`splits/default/{train,test}_tasks.txt` (one task name per line).

Encodings (Tk-Instruct family; `encode(task, instance, config)`):
  def                   "Definition: ...\\n\\nNow complete the following example -\\nInput: ...\\nOutput:"
  def_pos<k>            + k positive examples (" Positive Example 1 -\\nInput: ...\\n Output: ...\\n\\n")
  def_pos<k>_neg<m>     + m negative examples
  ..._expl              + the examples' explanations
Evaluation: the first 100 instances of each test task; exact match and ROUGE-L (max over references, x100) per
category and overall (`score`); predictions in the official JSONL format (`write_niv2_predictions`).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import os
import re
import string
from typing import Any, Iterable, Mapping, Sequence

from flan_jax.data.sources import RecordSource

TEST_INSTANCES_PER_TASK = 100
SPLIT_FILES = {"train": "train_tasks.txt", "test": "test_tasks.txt"}
_ID_RE = re.compile(rb'"id"\s*:')


class NIv2Error(ValueError):
    """A task file or split file is missing or does not follow the NIv2 schema."""


def _text(value: Any, what: str) -> str:
    if isinstance(value, list):
        value = " ".join(str(v) for v in value)
    if not isinstance(value, str):
        raise NIv2Error(f"{what}: expected a string, got {type(value).__name__}")
    return value


def task_path(niv2_dir: str, task: str) -> str:
    return os.path.join(niv2_dir, "tasks", f"{task}.json")


def read_split(niv2_dir: str, split: str, split_dir: str = "default") -> list[str]:
    """Task names listed in `splits/<split_dir>/<split>_tasks.txt`."""
    if split not in SPLIT_FILES:
        raise NIv2Error(f"niv2: unknown split {split!r}; choose from {list(SPLIT_FILES)}")
    path = os.path.join(niv2_dir, "splits", split_dir, SPLIT_FILES[split])
    if not os.path.isfile(path):
        raise NIv2Error(f"niv2: no split file {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


_CATEGORY_RE = re.compile(rb'"Categories"\s*:\s*\[\s*"((?:[^"\\]|\\.)*)"')


def task_summary(niv2_dir: str, task: str) -> tuple[int, str]:
    """(number of instances, first category) from the file's raw bytes, without a JSON parse (cheap registration).

    "id" keys occur only in instances in the NIv2 schema.
    """
    path = task_path(niv2_dir, task)
    if not os.path.isfile(path):
        raise NIv2Error(f"niv2 task {task!r}: no file {path}")
    with open(path, "rb") as f:
        raw = f.read()
    match = _CATEGORY_RE.search(raw)
    category = json.loads(b'"' + match.group(1) + b'"') if match else "uncategorized"
    return len(_ID_RE.findall(raw)), category


def count_instances(niv2_dir: str, task: str) -> int:
    return task_summary(niv2_dir, task)[0]


def read_task(niv2_dir: str, task: str) -> dict:
    """Loads and checks one task JSON; errors name the task and the field."""
    path = task_path(niv2_dir, task)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise NIv2Error(f"niv2 task {task!r}: no file {path}") from None
    except json.JSONDecodeError as e:
        raise NIv2Error(f"niv2 task {task!r}: invalid JSON in {path}: {e}") from None
    for key in ("Definition", "Instances"):
        if key not in data:
            raise NIv2Error(f"niv2 task {task!r}: missing field {key!r}")
    data["Definition"] = _text(data["Definition"], f"niv2 task {task!r} field 'Definition'")
    for key in ("Positive Examples", "Negative Examples"):
        examples = data.get(key) or []
        for i, example in enumerate(examples):
            if not isinstance(example, Mapping) or "input" not in example or "output" not in example:
                raise NIv2Error(f"niv2 task {task!r}: {key}[{i}] needs 'input' and 'output'")
        data[key] = examples
    for i, instance in enumerate(data["Instances"]):
        if not isinstance(instance, Mapping) or not {"id", "input", "output"} <= set(instance):
            raise NIv2Error(f"niv2 task {task!r}: Instances[{i}] needs 'id', 'input' and 'output'")
        if isinstance(instance["output"], str):
            instance["output"] = [instance["output"]]
    data["Categories"] = list(data.get("Categories") or ["uncategorized"])
    data["name"] = task
    return data


# ----------------------------------------------------------------------------------------------------------------
# Encodings
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Encoding:
    """What an encoded NIv2 input contains (Tk-Instruct style)."""

    definition: bool = True
    num_positive: int = 0
    num_negative: int = 0
    explanation: bool = False

    @classmethod
    def parse(cls, name: str) -> "Encoding":
        """'def', 'def_pos2', 'def_pos2_neg2', 'def_pos2_neg2_expl', 'pos2' ..."""
        match = re.fullmatch(r"(def)?(?:_?pos(\d+))?(?:_neg(\d+))?(_expl)?", name)
        if not match or not name:
            raise ValueError(f"niv2 encoding {name!r}: expected e.g. 'def', 'def_pos2', 'def_pos2_neg2_expl'")
        return cls(bool(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0), bool(match.group(4)))


def _end(text: str) -> str:
    text = text.strip()
    return text if not text or text[-1] in string.punctuation else text + "."


def _example_block(kind: str, index: int, example: Mapping[str, Any], explanation: bool) -> str:
    block = f" {kind} Example {index} -\nInput: {_end(_text(example['input'], 'input'))}\n" \
            f" Output: {_end(_text(example['output'], 'output'))}\n"
    if explanation and example.get("explanation"):
        block += f" Explanation: {_end(_text(example['explanation'], 'explanation'))}\n"
    return block + "\n"


def encode(task: Mapping[str, Any], instance_input: str, encoding: Encoding | str = "def_pos2") -> str:
    """The model input for one instance of a task (see the module docstring for the layout)."""
    if isinstance(encoding, str):
        encoding = Encoding.parse(encoding)
    parts = []
    if encoding.definition:
        parts.append(f"Definition: {_end(task['Definition'])}\n\n")
    for i, example in enumerate(task.get("Positive Examples", [])[:encoding.num_positive]):
        parts.append(_example_block("Positive", i + 1, example, encoding.explanation))
    for i, example in enumerate(task.get("Negative Examples", [])[:encoding.num_negative]):
        parts.append(_example_block("Negative", i + 1, example, encoding.explanation))
    parts.append(f"Now complete the following example -\nInput: {_end(instance_input)}\nOutput:")
    return "".join(parts)


class NIv2Source(RecordSource):
    """One NIv2 task: split "train" (all instances) and "test" (the first 100).

    Records: {"id", "input", "output" (first reference), "outputs", "definition", "category", "encoded"}; "encoded"
    follows `encoding` (None leaves it out). The JSON is read on first use, so creating sources is cheap.
    """

    def __init__(self, niv2_dir: str, task: str, encoding: Encoding | str | None = None,
                 num_instances: int | None = None):
        n = count_instances(niv2_dir, task) if num_instances is None else num_instances
        # "test" first: it is the evaluation split (the CLI's default for eval mixtures is the first split).
        super().__init__(("test", "train"), {"train": n, "test": min(n, TEST_INSTANCES_PER_TASK)})
        self.niv2_dir, self.task = niv2_dir, task
        self.encoding = Encoding.parse(encoding) if isinstance(encoding, str) else encoding
        self._data: dict | None = None
        self._bad_file: str | None = None
        self._errors: collections.Counter = collections.Counter()

    def data(self) -> dict:
        if self._data is None:
            self._data = read_task(self.niv2_dir, self.task)
        return self._data

    def read_error_counts(self) -> dict[str, int]:
        """{"bad_task_file": records skipped} when the task's file failed to load (see _iter_split)."""
        return dict(self._errors)

    def first_read_errors(self) -> dict[str, str]:
        return {"bad_task_file": self._bad_file} if self._bad_file else {}

    def _iter_split(self, split: str) -> Iterable[dict]:
        try:
            data = self.data()
        except NIv2Error as e:   # one broken file skips its own task's records, counted, not the whole mixture
            if self._bad_file is None:
                logging.warning("%s; its records are skipped", e)
                self._bad_file = str(e)
            n = self.num_examples(split) or 0
            self._errors["bad_task_file"] += n
            yield from itertools.repeat(None, n)
            return
        instances = data["Instances"][:TEST_INSTANCES_PER_TASK] if split == "test" else data["Instances"]
        for instance in instances:
            outputs = [o for o in instance["output"] if isinstance(o, str)]
            record = {"id": str(instance["id"]), "input": instance["input"], "output": outputs[0] if outputs else "",
                      "outputs": outputs, "definition": data["Definition"], "category": data["Categories"][0]}
            if self.encoding is not None:
                record["encoded"] = encode(data, instance["input"], self.encoding)
            yield record

    def describe(self) -> str:
        return f"NIv2Source({self.task})"


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

def test_references(niv2_dir: str, tasks: Sequence[str] | None = None) -> list[dict]:
    """[{"id", "task", "category", "references"}] for the first 100 instances of each test task, in order."""
    rows = []
    for task in tasks if tasks is not None else read_split(niv2_dir, "test"):
        data = read_task(niv2_dir, task)
        for instance in data["Instances"][:TEST_INSTANCES_PER_TASK]:
            rows.append({"id": str(instance["id"]), "task": task, "category": data["Categories"][0],
                         "references": list(instance["output"])})
    return rows


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and English articles, collapse whitespace (the official EM normalization)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


_SCORER = None


def _rouge_l(prediction: str, reference: str) -> float:
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer  # lazy: it imports JAX and NLTK (~1.3 s); registration stays cheap
        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


def score(predictions: Sequence[str], references: Sequence[Sequence[str]],
          categories: Sequence[str] | None = None) -> dict[str, float]:
    """{"exact_match", "rouge_l", "exact_match_<category>", "rouge_l_<category>", ...}, x100, max over references."""
    if len(predictions) != len(references):
        raise ValueError(f"niv2 score: {len(predictions)} predictions but {len(references)} references")
    if categories is not None and len(categories) != len(predictions):
        raise ValueError(f"niv2 score: {len(categories)} categories for {len(predictions)} predictions")
    per: dict[str, list[tuple[float, float]]] = collections.defaultdict(list)
    for i, (prediction, refs) in enumerate(zip(predictions, references)):
        if not refs:
            raise ValueError(f"niv2 score: example {i} has no references")
        em = max(float(normalize_answer(prediction) == normalize_answer(r)) for r in refs)
        rl = max(_rouge_l(prediction, r) for r in refs)
        per["overall"].append((em, rl))
        if categories is not None:
            per[re.sub(r"\W+", "_", categories[i].strip().lower())].append((em, rl))
    results = {}
    for group, values in per.items():
        suffix = "" if group == "overall" else f"_{group}"
        results[f"exact_match{suffix}"] = 100.0 * sum(v[0] for v in values) / len(values)
        results[f"rouge_l{suffix}"] = 100.0 * sum(v[1] for v in values) / len(values)
    return results


def write_niv2_predictions(path: str, ids: Sequence[str], predictions: Sequence[str]) -> None:
    """Writes the official prediction file: one {"id": ..., "prediction": ...} JSON object per line."""
    if len(ids) != len(predictions):
        raise ValueError(f"write_niv2_predictions: {len(ids)} ids but {len(predictions)} predictions")
    if len(set(ids)) != len(ids):
        raise ValueError("write_niv2_predictions: duplicate ids")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for id_, prediction in zip(ids, predictions):
            f.write(json.dumps({"id": str(id_), "prediction": str(prediction)}, ensure_ascii=False) + "\n")


def read_niv2_predictions(path: str) -> dict[str, str]:
    with open(path, encoding="utf-8") as f:
        return {row["id"]: row["prediction"] for row in map(json.loads, filter(str.strip, f))}
