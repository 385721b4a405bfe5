"""Shared pieces of the Flan 2021 collection: the dataset declaration, record helpers and QA metrics.

A cluster module lists `Flan2021Dataset`s; `flan_jax.tasks.flan2021.register()` turns each into registry tasks. Helpers that
read TFDS records return None for a record that cannot be mapped (label out of range, no answer, ...), which the
registry counts as a data error of that task instead of dropping it silently.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import re
import string
import threading
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from flan_jax.data import metrics
from flan_jax.data.templates import Template

COLLECTION = "flan2021"
TRAIN_EXAMPLE_CAP = 30_000  # FLAN 2021: at most 30k training examples per dataset
TRAIN_EVAL_SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class Flan2021Dataset:
    """One TFDS dataset of the collection.

    `splits` maps our split names ("train", "validation") to the TFDS split names; `num_examples` gives the real
    TFDS split sizes (declared so mixing rates need no download). `map_fn(tfds record) -> {field: str} or None`.
    """

    name: str
    tfds_name: str
    cluster: str
    splits: Mapping[str, str]
    num_examples: Mapping[str, int]
    map_fn: Callable[[dict], dict | None]
    fields: tuple[str, ...]
    templates: tuple[Template, ...]
    inversion_templates: tuple[Template, ...] = ()
    fixed_options: tuple[str, ...] | None = None
    options_field: str | None = None
    metric_fns: tuple[Callable, ...] = ()
    note: str = ""  # e.g. "manual download" for builders that need files placed by hand

    def __post_init__(self):
        if set(self.splits) != set(TRAIN_EVAL_SPLITS):
            raise ValueError(f"flan2021 dataset {self.name!r}: splits must map exactly {TRAIN_EVAL_SPLITS}, "
                             f"got {sorted(self.splits)}")
        if set(self.num_examples) != set(self.splits):
            raise ValueError(f"flan2021 dataset {self.name!r}: num_examples must cover {sorted(self.splits)}")


def label_name(labels: Sequence[str], index: Any) -> str | None:
    """labels[index] for a valid class index, else None (a malformed record)."""
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        return None
    return labels[index] if 0 <= index < len(labels) else None


def first_text(values: Any) -> str | None:
    """The first non-blank string of a list (answers lists), else None."""
    if isinstance(values, str):
        return values if values.strip() else None
    for value in values or ():
        if isinstance(value, str) and value.strip():
            return value
    return None


def join_list(values: Sequence[str], separator: str = ", ") -> str:
    return separator.join(v.strip() for v in values if isinstance(v, str) and v.strip())


_TRIPLE_HEADERS = ("subject", "predicate", "object")


def linearize_table(table: Mapping[str, Sequence[Any]]) -> str | None:
    """Flattens a TFDS struct-to-text table {column_header, content, row_number} into one line of text.

    Rows of subject/predicate/object cells become "s | p | o" triples; other rows become "header: content" pairs.
    Rows are joined with "; ". The three lists are parallel in real data; cells are paired by position (TFDS mock
    data gives them independent lengths, so the shortest list bounds the cells).
    """
    headers, contents, rows = table.get("column_header"), table.get("content"), table.get("row_number")
    if not headers or not contents or not rows:
        return None
    grouped: dict[Any, list[tuple[str, str]]] = collections.OrderedDict()
    for header, content, row in zip(headers, contents, rows):
        grouped.setdefault(row, []).append((str(header).strip(), str(content).strip()))
    parts = []
    for cells in grouped.values():
        names = tuple(h.lower() for h, _ in cells)
        if names and set(names) <= set(_TRIPLE_HEADERS):
            parts.append(" | ".join(c for _, c in cells))
        else:
            parts.append(", ".join(f"{h}: {c}" if h else c for h, c in cells))
    text = "; ".join(p for p in parts if p.strip())
    return text or None


# ----------------------------------------------------------------------------------------------------------------
# QA metric: SQuAD-style token F1 (seqio signature), used next to exact_match for extractive/closed-book QA.
# ----------------------------------------------------------------------------------------------------------------

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def _qa_tokens(text: str) -> list[str]:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES_RE.sub(" ", text).split()


def _f1(reference: str, prediction: str) -> float:
    ref, pred = _qa_tokens(reference), _qa_tokens(prediction)
    if not ref or not pred:
        return float(ref == pred)
    common = sum((collections.Counter(ref) & collections.Counter(pred)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """Mean token F1 x100 (lowercased, punctuation and articles removed), max over references."""
    if len(targets) != len(predictions):
        raise ValueError(f"f1: {len(targets)} targets but {len(predictions)} predictions")
    if not targets:
        return {"f1": float("nan")}
    scores = []
    for target, prediction in zip(targets, predictions):
        refs = target if isinstance(target, (list, tuple)) else [target]
        scores.append(max(_f1(metrics.to_text(r), metrics.to_text(prediction)) for r in refs))
    return {"f1": 100.0 * float(np.mean(scores))}


QA_METRICS = (metrics.exact_match, f1)
SUMMARY_METRICS = (metrics.rouge_l,)
TRANSLATION_METRICS = (metrics.bleu,)


@contextlib.contextmanager
def serialized_tfds_load():
    """Serializes `tfds.load` calls while active (for TFDS mock data in multi-task seqio pipelines).

    `tfds.testing.mock_data` swaps in a process-wide fake filesystem while it builds each dataset, which is not
    thread-safe: a seqio Mixture starts several task generators on tf.data threads at once and the fake filesystem
    of one build can vanish under another ("could not find data in /tmp/non-existing/..."). Holding a lock around
    the build (iteration stays parallel) avoids that. Real TFDS data does not need this.
    """
    import tensorflow_datasets as tfds  # lazy: TFDS is heavy; importing a registration must stay cheap

    original = tfds.load
    lock = threading.Lock()

    def locked_load(*args, **kwargs):
        with lock:
            return original(*args, **kwargs)

    tfds.load = locked_load
    try:
        yield
    finally:
        tfds.load = original
