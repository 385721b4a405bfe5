"""Training input read from a preprocessed cache (`format.py`) with Grain: select it with `train.input_pipeline =
'cache'` and `train.input_cache_dir = '/path'`.

    per task: ArrayRecord shards -> records decoded -> shuffled per epoch (seeded) -> repeated
    tasks mixed by the registered rates (MixingSchedule: index-based, so any position is O(1))
    -> this process's slice of the mixed stream (mixed[shard_index::num_shards])
    -> to_iter_dataset -> our best-fit packer (a Grain IterDataset) -> optionally mp_prefetch: that many worker
    processes, each packing its own slice -> batches of exactly the features native.PackedBatches produces.

The whole position is the Grain iterator's `get_state()`: the mixed stream's next index, the packer (its buffer,
RNG and counters, as `native.packer_state`) and the rows not yet batched. All plain data, so it is saved with each
checkpoint; a run built with `state=` continues bitwise, reading only the records after the position.

The cache is refused (`format.CacheError`, naming the field, task or file) when it was built for another vocabulary,
render or format version or other feature lengths, misses a task or split of the mixture, holds a stale task (its
fingerprint differs from the task's declaration now), or a shard is missing or corrupt.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import os
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
from absl import flags

from flan_jax import packing
from flan_jax.pipeline import native
from flan_jax.pipeline.cache import format as cache_format

REBUILD = "rebuild it with `flan-jax data cache`"
# Threads reading records ahead of the packer, and how far ahead (a restored iterator re-reads at most that many).
# None: a local shard serves a record in ~10 us, less than a reader thread costs under the GIL; on a network file
# system (gcsfuse) raise both.
READ_THREADS, READ_AHEAD = 0, 0
# A worker process's packing counters since its previous batch, sent with the batch (removed before the trainer).
COUNTS_KEY = "packing_counts"


CacheError = cache_format.CacheError


# --- opening and checking a cache ------------------------------------------------------------------------------------
def _run_lengths(task_feature_lengths: Mapping[str, int]) -> dict:
    return {key: int(task_feature_lengths[key]) for key in ("inputs", "targets")}


def check_cache(cache_dir: str, tasks: Sequence[str], split: str, task_feature_lengths: Mapping[str, int]) -> dict:
    """{task: [shard paths]} of a cache that can serve `tasks`' `split` for a run of these feature lengths;
    a CacheError naming what differs otherwise (see the module docstring)."""
    cache_format.require("grain", "array_record")
    manifest = cache_format.read_manifest(cache_dir)
    cached_lengths = manifest.get("feature_lengths")
    # An untruncated cache (feature_lengths None) serves any run lengths; a truncated one only its own.
    expected = cache_format.expected_manifest(tasks, None if cached_lengths is None else
                                              _run_lengths(task_feature_lengths))
    cache_format.check_manifest(manifest, expected, cache_dir)
    entries = manifest.get("tasks") or {}
    shards = {}
    for task in tasks:
        entry = (entries.get(task) or {}).get(split)
        if entry is None:
            raise CacheError(f"cache {cache_dir} has no {split!r} split of task {task!r} ({REBUILD} for the run's "
                             "mixture)")
        want = cache_format.task_fingerprint(task, split, cached_lengths)
        if entry.get("fingerprint") != want:
            raise CacheError(f"cache {cache_dir}: task {task!r} split {split!r} is stale (fingerprint "
                             f"{entry.get('fingerprint')!r}, the task now gives {want!r}: its templates, source, "
                             f"caps or vocabulary changed); {REBUILD}")
        stats = cache_format.read_split_stats(cache_dir, task, split)
        if stats is None or stats.get("fingerprint") != want:
            raise CacheError(f"cache {cache_dir}: task {task!r} split {split!r} is not committed "
                             f"({cache_format.stats_path(cache_dir, task, split)} is missing or stale); {REBUILD}")
        paths = [os.path.join(cache_format.split_dir(cache_dir, task, split), name) for name in stats["shards"]]
        for path in paths:
            if not os.path.isfile(path):
                raise CacheError(f"cache {cache_dir}: shard {path} of task {task!r} is missing; {REBUILD}")
        if not paths or not stats.get("examples"):
            raise CacheError(f"cache {cache_dir}: task {task!r} has no {split!r} examples; remove it from the "
                             "mixture")
        shards[task] = (paths, [int(n) for n in stats.get("shard_examples") or ()] or None, int(stats["examples"]))
    return shards


class TaskRecords:
    """A task's cached examples as a random-access source for Grain: item i is (task id, record index, inputs,
    targets), in record-index order (shard k holds the records k mod n: item i is read from shard i mod n while all
    shards are equally full). Read errors and undecodable records raise CacheError naming the shard and task.
    Picklable (the readers are reopened in a worker process); `reads` counts the records read in this process."""

    def __init__(self, task: str, task_id: int, paths: Sequence[str], shard_examples: Optional[Sequence[int]],
                 examples: int):
        self.task, self.task_id, self.paths, self.examples = task, task_id, list(paths), examples
        self.reads = 0
        self._readers = None
        lengths = [r.num_records() for r in self._open()]
        for path, have, want in zip(self.paths, lengths, shard_examples or ()):
            if have != want:  # a truncated or overwritten shard
                raise CacheError(f"shard {path} of task {self.task!r} is corrupt: it holds {have} records, its "
                                 f"stats say {want}; {REBUILD}")
        if sum(lengths) != examples:
            raise CacheError(f"task {self.task!r}: its shards {self.paths} hold {sum(lengths)} records, its stats "
                             f"say {examples}; {REBUILD}")
        n = len(lengths)
        if all(lengths[k] == len(range(k, examples, n)) for k in range(n)):
            self._order = None  # round-robin: item i is record i // n of shard i % n
        else:  # unequal shards: the items of shard k in (j, k) order, keys j * n + k
            keys = np.concatenate([np.arange(m, dtype=np.int64) * n + k for k, m in enumerate(lengths)])
            self._order = np.sort(keys)

    def _open(self):
        """One plain ArrayRecordReader per shard (0.1 ms to open; Grain's ArrayRecordDataSource starts a thread pool
        per source, 1.7 ms: seconds at 1,800 tasks)."""
        if self._readers is None:
            from array_record.python import array_record_module  # lazy: only cache readers need ArrayRecord
            readers = []
            for path in self.paths:
                try:
                    readers.append(array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0"))
                except Exception as e:  # noqa: BLE001 - the reader's errors are not typed
                    raise CacheError(f"shard {path} of task {self.task!r} is unreadable ({e}); {REBUILD}") from None
            self._readers = readers
        return self._readers

    def __getstate__(self):
        return dict(vars(self), _readers=None, reads=0)

    def __len__(self) -> int:
        return self.examples

    def __getitem__(self, item: int):
        item = int(item) % self.examples
        n = len(self.paths)
        key = item if self._order is None else int(self._order[item])
        shard, offset = key % n, key // n
        path = self.paths[shard]
        self.reads += 1
        try:
            data = self._open()[shard].read([offset])[0]
            index, inputs, targets = cache_format.decode_example(data)
        except CacheError:
            raise
        except Exception as e:  # noqa: BLE001 - ArrayRecord read errors are untyped RuntimeErrors
            raise CacheError(f"shard {path} of task {self.task!r} is corrupt: record {offset}: {e}; {REBUILD}") \
                from None
        return self.task_id, index, inputs, targets


def _task_seed(seed: int, task: str) -> int:
    return int.from_bytes(hashlib.sha256(f"flan_jax.cache/{seed}/{task}".encode()).digest()[:4], "little")


class MixingSchedule:
    """Which task, and which of its examples, stands at each position of the mixed stream: O(1) for any position.

    Positions come in periods of `period` slots; in each, task t holds round(rate_t * period) slots (at least one),
    in an order drawn per period from (seed, period number). Position i is then (task, the count of that task's
    slots before i) with no walk over earlier positions, so a stream opened at step 100,000 costs what one opened at
    step 10 does. (Grain's MapDataset.mix picks each element by a scan over all datasets, a cost per element that
    grows with the number of tasks.) Rates are kept to 1 part in `period`."""

    def __init__(self, rates: Sequence[float], seed: int, period: int = 1 << 20):
        rates = np.asarray(rates, np.float64) / float(np.sum(rates))
        exact = rates * max(period, 16 * len(rates))
        counts = np.floor(exact).astype(np.int64)
        short = int(round(exact.sum())) - int(counts.sum())  # largest remainders get the slots rounding left over
        counts[np.argsort(counts - exact, kind="stable")[:short]] += 1
        self.counts = np.maximum(counts, 1)
        self.period = int(self.counts.sum())
        self._seed, self._cached = seed, (-1, None, None)

    def _slots(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """(task of each slot, its rank among that task's slots) of one period."""
        if self._cached[0] != number:
            tasks = np.repeat(np.arange(self.counts.size, dtype=np.int32), self.counts)
            tasks = tasks[np.random.default_rng([self._seed, number]).permutation(tasks.size)]
            order = np.argsort(tasks, kind="stable")
            starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
            ranks = np.empty(tasks.size, np.int64)
            ranks[order] = np.arange(tasks.size) - np.repeat(starts, self.counts)
            self._cached = (number, tasks, ranks)
        return self._cached[1], self._cached[2]

    def __getitem__(self, position: int) -> tuple[int, int]:
        number, slot = divmod(int(position), self.period)
        tasks, ranks = self._slots(number)
        task = int(tasks[slot])
        return task, number * int(self.counts[task]) + int(ranks[slot])


def example_dataset(cache_dir: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int], *,
                    split: str = "train", seed: int = 0, shuffle: bool = True, shard_index: int = 0,
                    num_shards: int = 1):
    """(grain.MapDataset of this shard's endless mixed examples (task id, record index, inputs, targets),
    [task names by id], [their TaskRecords]). Checks the cache first."""
    task_epochs = _grain_classes()[2]
    rates = native.registry_components(mixture_or_task_name)
    names = sorted(rates)
    shards = check_cache(cache_dir, names, split, task_feature_lengths)
    sources, datasets = [], []
    for task_id, task in enumerate(names):
        source = TaskRecords(task, task_id, *shards[task])
        sources.append(source)
        datasets.append(task_epochs(source, _task_seed(seed, task) if shuffle else None))
    schedule = MixingSchedule([rates[n] for n in names], seed)
    mixed = datasets[0] if len(datasets) == 1 else _grain_classes()[3](datasets, schedule)
    if num_shards > 1:
        mixed = mixed[shard_index::num_shards]
    return mixed, names, sources


# --- Grain transformations: endless task epochs, packing ---------------------------------------------------------
_GRAIN_CLASSES = None


def _grain_classes():
    """(PackIterDataset, BatchIterDataset, TaskEpochs, MixedTasks): defined on first use, since Grain is imported lazily."""
    global _GRAIN_CLASSES
    if _GRAIN_CLASSES is not None:
        return _GRAIN_CLASSES
    import grain  # lazy: Grain is needed only by the cache input path

    class PackIterator(grain.DatasetIterator):
        def __init__(self, parent, make_packer):
            super().__init__(parent)
            self.packer = make_packer()
            self._rows = collections.deque()

        def __next__(self):
            while not self._rows:
                _, _, inputs, targets = next(self._parent)
                self._rows.extend(self.packer.add(inputs, targets))
            return self._rows.popleft()

        def get_state(self):
            # A copy: the packer's buffers change in place as it goes on.
            return copy.deepcopy({"parent": self._parent.get_state(), "packer": native.packer_state(self.packer),
                                  "rows": list(self._rows)})

        def set_state(self, state):
            self._parent.set_state(state["parent"])
            restored = native.packer_from_state(state["packer"])
            # The counters object stays the one the converter holds (the trainer reads it).
            vars(self.packer.stats).update(vars(restored.stats))
            restored.stats = self.packer.stats
            self.packer = restored
            self._rows = collections.deque(state["rows"])

    class PackIterDataset(grain.IterDataset):
        """Packed rows (lists of (inputs, targets) segments) of a stream of (task id, index, inputs, targets)."""

        def __init__(self, parent, make_packer):
            super().__init__(parent)
            self._make_packer = make_packer

        def __iter__(self):
            return PackIterator(self._parent.__iter__(), self._make_packer)

        def __str__(self):
            return "PackIterDataset(flan_jax.packing.ExamplePacker)"

    class BatchIterator(grain.DatasetIterator):
        def __init__(self, parent, batch_size, features, with_counts):
            super().__init__(parent)
            self._batch_size, self._features, self._with_counts = batch_size, features, with_counts
            self._counted = dataclasses.asdict(self.packer.stats)

        @property
        def packer(self):
            return self._parent.packer

        def __next__(self):
            batch = self._features([next(self._parent) for _ in range(self._batch_size)])
            if self._with_counts:  # in a worker process: the counters added since the last batch travel with it
                now = dataclasses.asdict(self.packer.stats)
                batch[COUNTS_KEY] = {k: v if k == "max_segments_in_a_row" else v - self._counted[k]
                                     for k, v in now.items() if v != self._counted[k]}
                self._counted = now
            return batch

        def get_state(self):
            return self._parent.get_state()

        def set_state(self, state):
            self._parent.set_state(state)
            self._counted = dataclasses.asdict(self.packer.stats)

    class BatchIterDataset(grain.IterDataset):
        """Feature batches (dicts of [batch, length] arrays) of packed rows: built where the rows are packed, so a
        worker process sends a few large arrays per batch, not every segment of every row."""

        def __init__(self, parent, batch_size, features, with_counts: bool = False):
            super().__init__(parent)
            self._args = batch_size, features, with_counts

        def __iter__(self):
            return BatchIterator(self._parent.__iter__(), *self._args)

    class TaskEpochs(grain.MapDataset):
        """A task's records repeated endlessly, each epoch in its own seeded order (None: record order). One numpy
        permutation per epoch, not Grain's shuffle + repeat: those cost ~50 us per element, more than the read."""

        def __init__(self, source: TaskRecords, seed: Optional[int]):
            super().__init__()
            self._source, self._seed, self._epoch, self._order = source, seed, -1, None

        def __len__(self) -> int:
            return sys.maxsize

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            epoch, offset = divmod(int(index), len(self._source))
            if self._seed is None:
                return self._source[offset]
            if epoch != self._epoch:
                self._order = np.random.default_rng([self._seed, epoch]).permutation(len(self._source))
                self._epoch = epoch
            return self._source[int(self._order[offset])]

        def __str__(self):
            return f"TaskEpochs({self._source.task})"

    class MixedTasks(grain.MapDataset):
        """The tasks' endless datasets interleaved by a MixingSchedule (random access, O(1) per element)."""

        def __init__(self, datasets, schedule: MixingSchedule):
            super().__init__(list(datasets))
            self._schedule = schedule

        def __len__(self) -> int:
            return sys.maxsize

        def __getitem__(self, index):
            if isinstance(index, slice):
                return self.slice(index)
            task, offset = self._schedule[index]
            return self._parents[task][offset]

        def __str__(self):
            return f"MixedTasks({len(self._parents)} tasks)"

    _GRAIN_CLASSES = PackIterDataset, BatchIterDataset, TaskEpochs, MixedTasks
    return _GRAIN_CLASSES


class CacheBatches:
    """Endless batches of packed features from a cache (the layout of native.PackedBatches); `state()` is plain
    data and `state=` resumes bitwise. See `cache_batches`."""

    def __init__(self, cache_dir: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                 batch_size: int, converter=None, *, split: str = "train", seed: int = 0, shuffle: bool = True,
                 shard_index: int = 0, num_shards: int = 1, state: Optional[dict] = None, worker_count: int = 0):
        import grain  # lazy: Grain is needed only by the cache input path

        converter = converter or packing.PackedEncDecFeatureConverter()
        prefix_lm = isinstance(converter, packing.PackedPrefixLMFeatureConverter)  # decoder-only models
        if not isinstance(converter, (packing.PackedEncDecFeatureConverter, packing.PackedPrefixLMFeatureConverter)) \
                or not converter.pack:
            raise ValueError("train.input_pipeline='cache' packs with flan_jax.packing.PackedEncDecFeatureConverter "
                             f"or PackedPrefixLMFeatureConverter; got {type(converter).__name__}")
        lengths = (int(task_feature_lengths["inputs"]), int(task_feature_lengths["targets"]))
        bos, loss_on_targets_only = converter.bos_id, getattr(converter, "loss_on_targets_only", True)
        options = dict(converter.packing_options)
        self.batch_size = batch_size
        mixed, self.tasks, self.sources = example_dataset(
                cache_dir, mixture_or_task_name, task_feature_lengths, split=split, seed=seed, shuffle=shuffle,
                shard_index=shard_index, num_shards=num_shards)
        examples = mixed.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_AHEAD))
        make_packer = functools.partial(packing.ExamplePacker, lengths, concatenate=prefix_lm, **options)
        features = functools.partial(_feature_batch, lengths=lengths, prefix_lm=prefix_lm,
                                     loss_on_targets_only=loss_on_targets_only, bos=bos)
        pack_dataset, batch_dataset = _grain_classes()[:2]
        dataset = batch_dataset(pack_dataset(examples, make_packer), batch_size, features, worker_count > 0)
        self._workers = worker_count
        if worker_count > 0:
            # Each worker packs and batches its own slice of the mixed stream (element i goes to worker i mod k);
            # batches are taken from the workers in turn: deterministic for a given worker count, which the position
            # records.
            _absl_flags_parsed()
            dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
        self._batches = dataset.__iter__()
        # With workers the packers' counters live there and arrive with the batches, summed here.
        self.stats = self._batches.packer.stats if worker_count == 0 else packing.PackingStats()
        if state is not None:
            if state.get("workers", 0) != worker_count:
                raise ValueError(f"the input position was saved with {state.get('workers', 0)} input workers, this "
                                 f"run has {worker_count}")
            self._batches.set_state(state["grain"])
            if worker_count:
                vars(self.stats).update(state["stats"])
        converter.stats = self.stats

    def state(self) -> dict:
        saved = {"workers": self._workers, "grain": _plain(self._batches.get_state())}
        if self._workers:
            saved["stats"] = dataclasses.asdict(self.stats)
        return saved

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches)
        for key, value in batch.pop(COUNTS_KEY, {}).items():
            if key == "max_segments_in_a_row":
                self.stats.max_segments_in_a_row = max(self.stats.max_segments_in_a_row, value)
            else:
                setattr(self.stats, key, getattr(self.stats, key) + value)
        return batch

    def reads(self) -> int:
        """Records read so far in this process (not counting worker processes)."""
        return sum(s.reads for s in self.sources)


def _feature_batch(rows, *, lengths, prefix_lm, loss_on_targets_only, bos) -> dict:
    """Packed rows -> the feature arrays of native.PackedBatches."""
    if prefix_lm:  # one decoder row per segment: inputs ++ targets share one length budget
        return packing.prefix_lm_feature_batch(rows, sum(lengths), loss_on_targets_only, bos)
    return packing.encdec_feature_batch(rows, lengths, bos)


def _absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags: outside an absl app (`flan-jax train`, tests) mark them parsed
    with their defaults, or reading them raises."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _plain(x):
    """Grain's iterator states as plain data (numpy scalars -> Python numbers; tuples and deques kept)."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, collections.deque):
        return collections.deque(_plain(v) for v in x)
    if isinstance(x, list):
        return [_plain(v) for v in x]
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    return x


def cache_batches(cache_dir: str, mixture_or_task_name: str, task_feature_lengths: Mapping[str, int],
                  batch_size: int, converter=None, *, split: str = "train", seed: int = 0, shuffle: bool = True,
                  shard_index: int = 0, num_shards: int = 1, state: Optional[dict] = None,
                  worker_count: int = 0) -> CacheBatches:
    """Endless batches of this process's packed features read from the cache at `cache_dir`.

    converter: a PackedEncDecFeatureConverter (or PackedPrefixLMFeatureConverter for decoder-only models): its
    packing options are used and it receives the `.stats` counters. shard_index/num_shards: this process's slice of
    the mixed stream. state: a `state()` to continue from. worker_count > 0 reads, decodes and packs in that many
    Grain worker processes (mp_prefetch; every worker's position is part of the state, so a position is resumed
    only with the same worker count).
    """
    return CacheBatches(cache_dir, mixture_or_task_name, task_feature_lengths, batch_size, converter, split=split,
                        seed=seed, shuffle=shuffle, shard_index=shard_index, num_shards=num_shards, state=state,
                        worker_count=worker_count)
