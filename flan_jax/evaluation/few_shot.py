"""Few-shot in-context prompts for the periodic evaluator: k exemplars of a task's train split before each test input.

An exemplar is a rendered train record, "<inputs>\\n<targets>"; exemplars are joined and followed by the test input
with blank lines (the layout of FLAN's few-shot templates, Wei et al. 2021, with the rendered zero-shot prompt as the
input). Exemplars come only from the exemplar split, and one whose input equals the evaluated example's input is
skipped (a task whose splits overlap would otherwise show the model its own answer).
"""
from __future__ import annotations

from typing import Sequence

EXEMPLAR_SEPARATOR = "\n\n"


def exemplar_pool(task, split: str, size: int, feature_lengths=None) -> list[tuple[str, str]]:
    """The first `size` (inputs, targets) strings of `task`'s `split`, in order (deterministic across evaluations)."""
    try:
        ds = task.get_dataset(sequence_length=feature_lengths and dict(feature_lengths), split=split, shuffle=False, num_epochs=1)
    except Exception as e:  # a split the source lacks: seqio's own error, named by task and split
        raise ValueError(f"few-shot eval: task {task.name!r} has no exemplar split {split!r} ({e})") from None
    pool = []
    for ex in ds.take(size).as_numpy_iterator():
        for key in ("inputs_pretokenized", "targets_pretokenized"):
            if key not in ex:
                raise ValueError(f"few-shot eval: task {task.name!r} split {split!r} lacks feature {key!r}")
        pool.append((ex["inputs_pretokenized"].decode("utf-8"), ex["targets_pretokenized"].decode("utf-8")))
    return pool


def select_exemplars(pool: Sequence[tuple[str, str]], k: int, test_input: str, task_name: str = "?") -> list:
    """The first k exemplars of the pool whose input is not the test input."""
    chosen = [ex for ex in pool if ex[0] != test_input][:k]
    if len(chosen) < k:
        raise ValueError(f"few-shot eval: task {task_name!r} has {len(chosen)} usable exemplars, {k} requested")
    return chosen


def context(exemplars: Sequence[tuple[str, str]]) -> str:
    """The text placed before the test input ('' for zero-shot)."""
    return "".join(f"{inp}\n{tgt}{EXEMPLAR_SEPARATOR}" for inp, tgt in exemplars)

