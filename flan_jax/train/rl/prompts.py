"""PPO prompts from registered tasks: the tokenized prompts of a split, and each one's reference answer.

For a preference task (`<name>_pref`, flan_jax.data.preference) the prompt is its rendered template and the reference
its best response; for an instruction task, its `inputs` and `targets_pretokenized`. Either way exact match can be
measured on checkable tasks. Prompts longer than `inputs_length` are counted and dropped, never silently cut.
"""
from __future__ import annotations

import logging

import numpy as np
import seqio

from flan_jax.data import preference as preference_data
from flan_jax.data.vocabularies import special_ids
from flan_jax.evaluation import inference
from flan_jax.train.rl.ppo import PromptSet

REFERENCE_FEATURES = ("targets_pretokenized", "chosen_pretokenized", "chosen")


def _reference(example: dict, task: str) -> str:
    for key in REFERENCE_FEATURES:
        if key in example:
            value = example[key]
            return value.decode() if isinstance(value, bytes) else str(value)
    raise ValueError(f"task {task!r}: examples have no reference feature (one of {REFERENCE_FEATURES}); "
                     f"features: {sorted(example)}")


def _task_names(name: str) -> list[str]:
    """A task, a mixture's tasks, or a comma-separated list of either (e.g. 'list_sort_pref,list_max_pref')."""
    if "," in name:
        return [task for part in name.split(",") if part.strip() for task in _task_names(part.strip())]
    item = seqio.get_mixture_or_task(name)
    if isinstance(item, seqio.Mixture):
        return [t.name for t in item.tasks]
    return [item.name]


def _is_preference_task(name: str) -> bool:
    try:
        preference_data.preference_spec(name)
        return True
    except KeyError:
        return False


def _preference_examples(name: str, split: str):
    """(vocabulary, iterator of (prompt token ids ending in EOS, best response text)) of a preference task's split, in
    source order."""
    vocab = preference_data.preference_spec(name).vocabulary
    eos = special_ids(vocab).eos
    return vocab, ((np.asarray(list(vocab.encode(group.inputs)) + [eos], np.int32), group.responses[0])
                   for group in preference_data.iter_groups(name, split))


def _instruction_examples(name: str, split: str):
    """(vocabulary, iterator of (prompt token ids, reference text)) of an instruction task's split."""
    task = seqio.get_mixture_or_task(name)
    examples = task.get_dataset(None, split=split, shuffle=False, use_cached=False).as_numpy_iterator()
    return task.output_features["inputs"].vocabulary, ((np.asarray(example["inputs"], np.int32),
                                                         _reference(example, name)) for example in examples)


def load_prompts(task_or_mixture: str, split: str, num_prompts: int, inputs_length: int) -> tuple[PromptSet, dict]:
    """(PromptSet of up to num_prompts prompts, split evenly over a mixture's tasks, counts {task: {kept, dropped}})."""
    names = _task_names(task_or_mixture)
    per_task = -(-num_prompts // len(names))
    rows, refs, counts = [], [], {}
    for name in names:
        vocab, examples = (_preference_examples if _is_preference_task(name) else _instruction_examples)(name, split)
        kept = dropped = 0
        for tokens, reference in examples:
            if kept >= per_task:
                break
            if len(tokens) > inputs_length:
                dropped += 1
                continue
            rows.append(inference.pad_rows([tokens], inputs_length, vocab.pad_id)[0])
            refs.append(reference)
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
