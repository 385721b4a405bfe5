"""Chain-of-thought tasks: local TSV/JSONL files (question, answer, rationale) and TFDS gsm8k.

`register(cot_dir=None, include_gsm8k=True)` (or $FLAN_JAX_COT_DIR on import). Two layouts, side by side:
  - `<cot_dir>/<name>/{train,validation,test}.{tsv,jsonl}` becomes dataset `cot_<name>`; TSV files have a header row
    naming at least question, answer, rationale;
  - `<cot_dir>/<name>_train.tsv`, FLAN's own files as they are (the layout of the FLAN repository's
    `flan/v2/cot_data`: no header, columns question, answer, rationale) becomes `cot_<name>`. FLAN ships train files
    only, so validation is held out of the train file by a hash of the question (`HELD_OUT_FRACTION` of the
    questions, `flan_jax.data.sources.files.HeldOutSplitSource`): deterministic, and a question is never on both sides.
    A `<name>_dev.tsv` or `<name>_validation.tsv` beside it is used as the validation split instead.
A file dataset named gsm8k replaces the TFDS one. Each dataset gets variants:
  cot        "<rationale> So the answer is <answer>." after one of our CoT templates (the training format)
  zs_noopt   the answer alone (direct prompting), fs_noopt with exemplars
Predictions of the cot variant are post-processed by `flan_jax.data.templates.extract_cot_answer` and scored by exact
match. Self-consistency voting over sampled CoT outputs lives with inference: flan_jax/evaluation/self_consistency.py.
Mixtures: cot_train (every dataset's cot variant, example-proportional, Flan 2022 cap 100k) and cot_eval.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

from flan_jax.data import mixing, registry
from flan_jax.data.sources import RecordSource, TfdsSource
from flan_jax.data.sources.files import HeldOutSplitSource, JsonlSource, TsvSource
from flan_jax.data.templates import FewShotConfig, Template as T, extract_cot_answer

COLLECTION = "cot"
ENV_COT_DIR = "FLAN_JAX_COT_DIR"
TRAIN_CAP = mixing.FLAN2022_EXAMPLE_CAPS["cot"]
FIELDS = ("question", "answer")
FEW_SHOT = FewShotConfig(num_exemplars=3, max_input_length=2048)
FLAN_COLUMNS = ("question", "answer", "rationale")
FLAN_TRAIN_FILE = re.compile(r"^(.+)_train\.tsv$")
HELD_OUT_FRACTION = 0.1

# Direct-answer templates (zs/fs variants) and CoT templates (cot variant), our own wording.
DIRECT_TEMPLATES = (
    T("{question}", "{answer}"),
    T("Question: {question}\nAnswer:", "{answer}"),
    T("Q: {question}\nA:", "{answer}"),
    T("Answer the following question.\n{question}", "{answer}"),
    T("{question}\nGive only the final answer.", "{answer}"),
    T("Solve this problem: {question}", "{answer}"),
    T("Here is a question: {question}\nWhat is the answer?", "{answer}"),
    T("{question}\n\nThe answer is:", "{answer}"),
)
COT_TEMPLATES = (
    T("{question}\nLet's think step by step.", "{rationale} So the answer is {answer}."),
    T("Question: {question}\nThink it through carefully, then answer.", "{rationale} So the answer is {answer}."),
    T("Q: {question}\nA: Let's reason about it.", "{rationale} The answer is {answer}."),
    T("Answer the question and explain your reasoning first.\n\n{question}",
      "{rationale} Therefore, the answer is {answer}."),
    T("{question}\n\nWork out the answer step by step.", "{rationale} Hence the answer is {answer}."),
    T("Solve the problem below. Show your work before the answer.\n{question}",
      "{rationale} Answer: {answer}"),
    T("Here is a question: {question}\nReason it out, then state the answer.",
      "{rationale} Thus, the answer is {answer}."),
    T("{question}\nFirst explain, then answer.", "{rationale} The answer is {answer}."),
)

_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_record(record: dict) -> dict | None:
    """TFDS gsm8k {question, answer: "<steps> #### <number>", short_answer} -> {question, rationale, answer}.

    Calculator annotations "<<2*3=6>>" are removed from the steps. Without "####" the `short_answer` is the answer
    and the whole `answer` text the rationale; None when neither gives an answer.
    """
    text = record.get("answer", "")
    match = _GSM8K_FINAL.search(text)
    answer = match.group(1) if match else record.get("short_answer", "")
    if not answer or not answer.strip():
        return None
    steps = _CALCULATOR.sub("", text[:match.start()] if match else text).strip()
    return {"question": record["question"], "rationale": " ".join(steps.split()), "answer": answer.strip()}


def _dataset_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def flan_file_source(cot_dir: str, name: str) -> RecordSource:
    """FLAN's `<name>_train.tsv` (no header: question, answer, rationale) with a validation split: the
    `<name>_dev.tsv` / `<name>_validation.tsv` file beside it if any, else held out of train by question hash."""
    files = {"train": os.path.join(cot_dir, f"{name}_train.tsv")}
    for suffix in ("dev", "validation"):
        path = os.path.join(cot_dir, f"{name}_{suffix}.tsv")
        if os.path.isfile(path):
            files["validation"] = path
            break
    source = TsvSource(files, columns=FLAN_COLUMNS, name=name)
    if "validation" in files:
        return source
    return HeldOutSplitSource(source, key_fields=("question",), fraction=HELD_OUT_FRACTION,
                              salt=f"flan_jax/cot/{name}")


def file_sources(cot_dir: str) -> dict[str, RecordSource]:
    """{dataset name: source} for every folder of `cot_dir` holding split files (.tsv or .jsonl) and every FLAN
    `<name>_train.tsv` file in it."""
    if not os.path.isdir(cot_dir):
        raise FileNotFoundError(f"cot: --cot-dir / ${ENV_COT_DIR} {cot_dir!r} is not a directory")
    sources, origin = {}, {}
    for entry in sorted(os.listdir(cot_dir)):
        path = os.path.join(cot_dir, entry)
        flan_match = FLAN_TRAIN_FILE.match(entry)
        if os.path.isdir(path):
            for ext, cls in (("tsv", TsvSource), ("jsonl", JsonlSource)):
                files = {s: os.path.join(path, f"{s}.{ext}") for s in ("train", "validation", "test")}
                files = {s: p for s, p in files.items() if os.path.isfile(p)}
                if files:
                    source = cls(files, name=entry)
                    break
            else:
                continue
        elif flan_match and os.path.isfile(path):
            source = flan_file_source(cot_dir, flan_match.group(1))
        else:
            continue
        name = _dataset_name(flan_match.group(1) if flan_match and not os.path.isdir(path) else entry)
        if name in sources:
            raise ValueError(f"cot: dataset cot_{name} is given twice under {cot_dir}: {origin[name]!r} and "
                             f"{entry!r}")
        sources[name], origin[name] = source, entry
    return sources


def register(cot_dir: str | None = None, *, include_gsm8k: bool = True, seed: int = 0) -> list[str]:
    """Registers CoT datasets (files under `cot_dir`, and gsm8k from TFDS) and the CoT mixtures; returns base tasks."""
    sources = file_sources(cot_dir) if cot_dir else {}
    if include_gsm8k and "gsm8k" not in sources:
        sources["gsm8k"] = TfdsSource("gsm8k", {"train": "train", "validation": "test"}, gsm8k_record,
                                      {"train": 7_473, "validation": 1_319})
    names = []
    for name, source in sources.items():
        base = f"cot_{name}"
        registry.register_task(base, source, list(DIRECT_TEMPLATES), fields=FIELDS, cluster="chain_of_thought",
                               collection=COLLECTION, rationale_field="rationale",
                               cot_templates=list(COT_TEMPLATES), few_shot=FEW_SHOT, seed=seed,
                               max_examples={"train": TRAIN_CAP})
        names.append(base)
    if names:
        counts = {f"{n}_cot": registry.task_spec(n).num_examples("train") or 0 for n in names
                  if "train" in registry.task_spec(n).source.splits}
        if counts:
            mixing.register_mixture("cot_train", mixing.example_proportional_rates(counts, example_cap=TRAIN_CAP))
        mixing.register_mixture("cot_eval", {f"{n}_cot": 1.0 for n in names})
    return names


def register_from_env() -> list[str] | None:
    directory = os.environ.get(ENV_COT_DIR)
    return register(directory) if directory else None


register_from_env()
