"""Builds small preprocessed caches (flan_jax/pipeline/cache/format.py) for tests, without the Beam job: the token
arrays come from the native pipeline (the same examples the seqio Tasks give)."""
from __future__ import annotations

import itertools
from typing import Mapping, Optional, Sequence

from flan_jax.data import registry
from flan_jax.pipeline import native
from flan_jax.pipeline.cache import format as cache_format


def task_examples(task: str, split: str, limit: Optional[int] = None) -> list:
    """[(record index, inputs, targets)] of a task's split in record order (records the registry skips are absent)."""
    info = registry.task_info(task)
    indices = (i for i, _ in registry.iter_examples(registry.task_spec(info.base_task), info.variant, split,
                                                     with_index=True))
    pairs = native.TaskStream(task, split, shuffle=False, repeat=False)
    return [(i, a, b) for i, (a, b) in itertools.islice(zip(indices, pairs), limit)]


def write_task(root: str, task: str, split: str, examples: Sequence, num_shards: int = 2,
               feature_lengths: Optional[Mapping[str, int]] = None) -> dict:
    """Writes one (task, split): shard k holds the records whose index is k mod num_shards, then stats.json.
    Returns the manifest entry {"fingerprint", "examples", "shards"}."""
    names, counts = [], []
    for k in range(num_shards):
        path = cache_format.shard_path(root, task, split, k, num_shards)
        counts.append(cache_format.write_shard(path, [cache_format.encode_example(i, a, b) for i, a, b in examples
                                                      if i % num_shards == k]))
        names.append(path.rsplit("/", 1)[1])
    entry = {"fingerprint": cache_format.task_fingerprint(task, split, feature_lengths),
             "examples": len(examples), "shards": names}
    cache_format.write_json_atomic(cache_format.stats_path(root, task, split), dict(entry, shard_examples=counts))
    return entry


def build_cache(root: str, tasks: Sequence[str], splits: Sequence[str] = ("validation",), num_shards: int = 2,
                limit: Optional[int] = None, feature_lengths: Optional[Mapping[str, int]] = None) -> dict:
    """Writes a complete cache of `tasks`' `splits` (at most `limit` records each) under `root`; returns
    {(task, split): [(record index, inputs, targets)]} as written."""
    written, entries = {}, {}
    for task in tasks:
        for split in splits:
            examples = task_examples(task, split, limit)
            written[task, split] = examples
            entries.setdefault(task, {})[split] = write_task(root, task, split, examples, num_shards,
                                                             feature_lengths)
    write_manifest(root, tasks, entries, feature_lengths)
    return written


def write_manifest(root: str, tasks: Sequence[str], entries: dict,
                   feature_lengths: Optional[Mapping[str, int]] = None, **overrides) -> dict:
    manifest = dict(cache_format.expected_manifest(tasks, feature_lengths), tasks=entries, **overrides)
    cache_format.write_json_atomic(f"{root}/{cache_format.MANIFEST}", manifest)
    return manifest
