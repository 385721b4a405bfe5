"""Self-Instruct output directories as seqio tasks (the data `flan-jax self-instruct --out DIR` writes).

`register(directory)` (or $FLAN_JAX_SELFINSTRUCT_DIR on import; with neither nothing is registered and importing
costs nothing) reads DIR/self_instruct.jsonl and registers, in collection "selfinstruct":
  selfinstruct_with_input_zs_noopt   instances with an input (fields instruction, input, output)
  selfinstruct_no_input_zs_noopt     instances whose task needs no input (instruction, output)
each with our own encoding templates, one drawn per example. The validation split holds out whole instructions
(the lowest `validation_fraction` by a hash of the instruction text, at least one when there are two or more), so
it is disjoint from train. Mixtures: selfinstruct_train (example-proportional) and selfinstruct_eval.
The data is tokenized with DIR/vocabulary.model (the generating model's vocabulary) when present.
"""
from __future__ import annotations

import hashlib
import json
import os

import seqio

from flan_jax.data import mixing, registry
from flan_jax.data.sources import FunctionSource
from flan_jax.data.templates import Template as T

COLLECTION = "selfinstruct"
ENV_DIR = "FLAN_JAX_SELFINSTRUCT_DIR"
DATA_FILE = "self_instruct.jsonl"
VOCAB_FILE = "vocabulary.model"

WITH_INPUT_TEMPLATES = (
    T("{instruction}\n\n{input}", "{output}"),
    T("Instruction: {instruction}\nInput: {input}\nResponse:", "{output}"),
    T("{instruction}\nHere is the input: {input}", "{output}"),
    T("Task: {instruction}\n\n{input}\n\nAnswer:", "{output}"),
    T("Input: {input}\n\nWhat to do with it: {instruction}", "{output}"),
)
NO_INPUT_TEMPLATES = (
    T("{instruction}", "{output}"),
    T("Instruction: {instruction}\nResponse:", "{output}"),
    T("Task: {instruction}\nAnswer:", "{output}"),
    T("Please do the following. {instruction}", "{output}"),
)


def read_rows(directory: str) -> list[dict]:
    path = os.path.join(directory, DATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"selfinstruct: no {DATA_FILE} in {directory!r} (run `flan-jax self-instruct`)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for number, row in enumerate(rows, 1):
        if not isinstance(row.get("instruction"), str) or not isinstance(row.get("instances"), list):
            raise ValueError(f"selfinstruct: {path} row {number}: needs 'instruction' (str) and 'instances' (list)")
    return rows


def validation_instructions(instructions, fraction: float) -> set[str]:
    """The held-out instructions: the lowest `fraction` by SHA-1 of their text (stable whatever the file order)."""
    unique = sorted(set(instructions), key=lambda s: hashlib.sha1(s.encode("utf-8")).hexdigest())
    count = min(len(unique) - 1, max(1, round(fraction * len(unique)))) if len(unique) >= 2 else 0
    return set(unique[:count])


def split_records(rows: list[dict], fraction: float) -> dict[tuple[str, str], list[dict]]:
    """{(kind, split): flat records}; kind "with_input" or "no_input", split "train" or "validation"."""
    held_out = validation_instructions([r["instruction"] for r in rows], fraction)
    out = {(k, s): [] for k in ("with_input", "no_input") for s in ("train", "validation")}
    for row in rows:
        split = "validation" if row["instruction"] in held_out else "train"
        for inst in row["instances"]:
            record = {"instruction": row["instruction"], "input": inst.get("input", ""), "output": inst["output"]}
            out[("with_input" if record["input"].strip() else "no_input", split)].append(record)
    return out


def register(directory: str, *, validation_fraction: float = 0.1, vocabulary: seqio.Vocabulary | None = None,
             seed: int = 0) -> list[str]:
    """Registers DIR's data (see the module docstring); returns the seqio task names."""
    records = split_records(read_rows(directory), validation_fraction)
    vocab_path = os.path.join(directory, VOCAB_FILE)
    if vocabulary is None and os.path.isfile(vocab_path):
        vocabulary = seqio.SentencePieceVocabulary(vocab_path)
    names, train_counts = [], {}
    for kind, templates, fields in (("with_input", WITH_INPUT_TEMPLATES, ("instruction", "input", "output")),
                                    ("no_input", NO_INPUT_TEMPLATES, ("instruction", "output"))):
        counts = {split: len(records[(kind, split)]) for split in ("train", "validation")}
        if not any(counts.values()):
            continue
        source = FunctionSource(lambda split, kind=kind: records[(kind, split)], ("train", "validation"), counts,
                                name=f"selfinstruct_{kind}")
        task_names = registry.register_task(f"selfinstruct_{kind}", source, list(templates), fields=fields,
                                            cluster="selfinstruct", collection=COLLECTION, variants=["zs_noopt"],
                                            vocabulary=vocabulary, seed=seed)
        names += task_names
        if counts["train"]:
            train_counts[task_names[0]] = counts["train"]
    if train_counts:
        mixing.register_mixture("selfinstruct_train", mixing.example_proportional_rates(train_counts))
    if names:
        mixing.register_mixture("selfinstruct_eval", {n: 1.0 for n in names})
    return names


def register_from_env() -> list[str] | None:
    directory = os.environ.get(ENV_DIR)
    return register(directory) if directory else None


register_from_env()
