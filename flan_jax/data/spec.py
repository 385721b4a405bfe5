"""What a registered task is: its declaration (TaskSpec) and what the trainer, evaluator and CLI read of it (TaskInfo)."""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import seqio

from flan_jax.data import templates as tpl
from flan_jax.data.sources import RecordSource


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything one `register_task` call declared (validated)."""

    name: str
    source: RecordSource
    templates: tuple[tpl.Template, ...]
    fields: tuple[str, ...]
    cluster: str
    collection: str
    options_field: str | None
    fixed_options: tuple[str, ...] | None
    options_style: str
    rationale_field: str | None
    cot_templates: tuple[tpl.Template, ...]
    inversion_templates: tuple[tpl.Template, ...]
    few_shot: tpl.FewShotConfig
    vocabulary: seqio.Vocabulary
    record_policy: str
    seed: int
    max_examples: Mapping[str, int]
    metric_fns: tuple[Callable, ...] | None

    @property
    def has_options(self) -> bool:
        return self.options_field is not None or self.fixed_options is not None

    def num_examples(self, split: str) -> int | None:
        count = self.source.num_examples(split)
        cap = self.max_examples.get(split)
        if cap is None:
            return count
        return cap if count is None else min(count, cap)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What the trainer/evaluator/CLI need to know about one registered seqio task."""

    name: str
    base_task: str
    variant: str
    cluster: str
    collection: str
    has_options: bool          # the "options" feature is non-empty (rank classification applies)
    num_templates: int
    splits: tuple[str, ...]
    num_examples: Mapping[str, int | None]
    metric: str                # "accuracy" for option variants, else "exact_match" (or the custom metric names)
    source: str
