"""Preference pools: the first N prompts of each task, tokenized once into (prompt, chosen, rejected) pair rows, and
batches that keep all pairs of one prompt together (InstructGPT: the K(K-1)/2 comparisons of a prompt are one batch
element, which avoids overfitting to a response seen in many separate pairs). Truncations are counted."""
from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterator, Optional, Sequence

import numpy as np
import seqio

from flan_jax.data import preference as preference_data
from flan_jax.data.vocabularies import EOS_ID, special_ids  # noqa: F401  (EOS_ID: this module's API)


@dataclasses.dataclass
class PairPool:
    """Pair rows: inputs [N, Lin], responses [N, 2, Lt] (chosen, rejected), weight [N] = 1 / pairs of its prompt,
    group [N] (prompt number in the pool), task [N] (index into `tasks`)."""
    inputs: np.ndarray
    responses: np.ndarray
    weight: np.ndarray
    group: np.ndarray
    task: np.ndarray
    tasks: tuple[str, ...]
    counters: dict
    reference: Optional[np.ndarray] = None   # DPO: the reference model's log-probs [N, 2], computed once

    def __len__(self) -> int:
        return len(self.weight)

    def rows(self, index: np.ndarray) -> dict:
        """Batch arrays for row indices; -1 rows are padding (zeros, weight 0)."""
        safe = np.maximum(index, 0)
        real = index >= 0
        return {"inputs": np.where(real[:, None], self.inputs[safe], 0),
                "responses": np.where(real[:, None, None], self.responses[safe], 0),
                "weight": np.where(real, self.weight[safe], 0.0).astype(np.float32), "index": index}


def task_names(mixture_or_task: str) -> list[str]:
    """The preference tasks of a seqio mixture (or the one task)."""
    provider = seqio.get_mixture_or_task(mixture_or_task)
    names = [t.name for t in provider.tasks] if isinstance(provider, seqio.Mixture) else [provider.name]
    for name in names:
        preference_data.preference_spec(name)  # raises naming the task when it is not a preference task
    return names


def _tokens(vocab, text: str, length: int, counters: collections.Counter, what: str) -> list[int]:
    ids = list(vocab.encode(text))
    if len(ids) > length - 1:
        counters[f"truncated_{what}"] += 1
        ids = ids[:length - 1]
    return ids + [special_ids(vocab).eos]


def _pad(rows: Sequence[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out


def build_pool(tasks: Sequence[str], split: str, prompts_per_task: int, lengths: dict) -> PairPool:
    """The first `prompts_per_task` valid prompts of each task's split, interleaved task by task."""
    counters = collections.Counter()
    streams = [itertools.islice(preference_data.iter_groups(t, split), prompts_per_task) for t in tasks]
    inputs, chosen, rejected, weight, group, task = [], [], [], [], [], []
    number = 0
    for groups in itertools.zip_longest(*streams):
        for task_index, g in enumerate(groups):
            if g is None:
                continue
            vocab = preference_data.preference_spec(g.task).vocabulary
            prompt = _tokens(vocab, g.inputs, lengths["inputs"], counters, "inputs")
            encoded = [_tokens(vocab, r, lengths["targets"], counters, "responses") for r in g.responses]
            for better, worse in g.pairs:
                if encoded[better] == encoded[worse]:
                    counters["dropped_identical_after_truncation"] += 1
                    continue
                inputs.append(prompt)
                chosen.append(encoded[better])
                rejected.append(encoded[worse])
                weight.append(1.0 / len(g.pairs))
                group.append(number)
                task.append(task_index)
            number += 1
    if not weight:
        raise ValueError(f"preference tasks {list(tasks)}: no usable pair in split {split!r}")
    responses = np.stack([_pad(chosen, lengths["targets"]), _pad(rejected, lengths["targets"])], axis=1)
    counters["prompts"], counters["pairs"] = number, len(weight)
    return PairPool(_pad(inputs, lengths["inputs"]), responses, np.asarray(weight, np.float32),
                    np.asarray(group), np.asarray(task), tuple(tasks), dict(counters))


def epoch_batches(pool: PairPool, pairs_per_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Row indices [pairs_per_batch] per batch (-1 = padding): prompts shuffled per epoch, whole prompts per batch."""
    starts = np.flatnonzero(np.r_[True, pool.group[1:] != pool.group[:-1]])
    groups = np.split(np.arange(len(pool)), starts[1:])
    too_big = max(len(g) for g in groups)
    if too_big > pairs_per_batch:
        raise ValueError(f"PAIRS_PER_BATCH={pairs_per_batch} is smaller than the {too_big} pairs of one prompt; "
                         "all pairs of a prompt go in one batch")
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))
    batches, current = [], []
    for g in order:
        if len(current) + len(groups[g]) > pairs_per_batch:
            batches.append(current)
            current = []
        current += list(groups[g])
    if current:
        batches.append(current)
    return [np.asarray(b + [-1] * (pairs_per_batch - len(b))) for b in batches]


def train_batches(pool: PairPool, pairs_per_batch: int, seed: int, start_step: int = 0) -> Iterator[dict]:
    """Endless batches, epoch after epoch; batch number `start_step` first (resume replays no data)."""
    step, epoch = 0, 0
    while True:
        for index in epoch_batches(pool, pairs_per_batch, seed, epoch):
            if step >= start_step:
                yield pool.rows(index)
            step += 1
        epoch += 1


def eval_batches(pool: PairPool, pairs_per_batch: int) -> Iterator[tuple[np.ndarray, dict]]:
    """(row indices, batch) in pool order, the last batch padded."""
    for start in range(0, len(pool), pairs_per_batch):
        index = np.arange(start, min(start + pairs_per_batch, len(pool)))
        index = np.r_[index, -np.ones(pairs_per_batch - len(index), int)]
        yield index, pool.rows(index)
