"""PPO prompts from registered seqio tasks: the tokenized `inputs` of a split, and each one's reference answer.

The reference is the task's `targets_pretokenized` (an instruction task) or `chosen_pretokenized` (a preference task's
preferred response), so exact match can be measured on checkable tasks. Prompts longer than `inputs_length` are
counted and dropped, never silently cut.
"""
from __future__ import annotations

import logging

import numpy as np
import seqio

from flan_jax.train.preference.ppo import PromptSet

REFERENCE_FEATURES = ("targets_pretokenized", "chosen_pretokenized", "chosen")


def _reference(example: dict, task: str) -> str:
    for key in REFERENCE_FEATURES:
        if key in example:
            value = example[key]
            return value.decode() if isinstance(value, bytes) else str(value)
    raise ValueError(f"task {task!r}: examples have no reference feature (one of {REFERENCE_FEATURES}); "
                     f"features: {sorted(example)}")


def _task_names(name: str) -> list[str]:
    item = seqio.get_mixture_or_task(name)
    if isinstance(item, seqio.Mixture):
        return [t.name for t in item.tasks]
    return [item.name]


def load_prompts(task_or_mixture: str, split: str, num_prompts: int, inputs_length: int) -> tuple[PromptSet, dict]:
    """(PromptSet of up to num_prompts prompts, split evenly over a mixture's tasks, counts {task: {kept, dropped}})."""
    names = _task_names(task_or_mixture)
    per_task = -(-num_prompts // len(names))
    rows, refs, counts = [], [], {}
    for name in names:
        task = seqio.get_mixture_or_task(name)
        ds = task.get_dataset(None, split=split, shuffle=False, use_cached=False)
        kept = dropped = 0
        for example in ds.as_numpy_iterator():
            if kept >= per_task:
                break
            tokens = np.asarray(example["inputs"], np.int32)
            if len(tokens) > inputs_length:
                dropped += 1
                continue
            rows.append(np.pad(tokens, (0, inputs_length - len(tokens))))
            refs.append(_reference(example, name))
            kept += 1
        if kept == 0:
            raise ValueError(f"task {name!r} split {split!r}: no prompt fits PROMPT_LENGTH={inputs_length} "
                             f"({dropped} longer)")
        if dropped:
            logging.warning("task %s split %s: %d prompts longer than %d tokens dropped", name, split, dropped,
                            inputs_length)
        counts[name] = {"kept": kept, "dropped": dropped}
    order = np.random.default_rng(0).permutation(len(rows))[:num_prompts]   # tasks interleaved
    return PromptSet(np.stack(rows)[order], tuple(refs[i] for i in order)), counts
