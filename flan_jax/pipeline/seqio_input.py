"""The seqio input path with a saved position: resuming restores it instead of replaying the stream.

A Task or Mixture of `flan_jax.data.registry` tasks is checkpointable tf.data end to end (the source is a range of
chunk numbers, see `rendered_source.chunked_dataset`; shuffle buffers, in-memory caches, the mixture's sampler and the
repeat are tf.data state). Its iterator is saved with `tf.train.Checkpoint`, as T5X's `save_dataset` does, so a
resumed run renders none of the examples it had already read.

Our best-fit packers run in Python (not tf.data state), so they run here, outside tf.data, on the mixture's
examples: the position is then the tf.data iterator's checkpoint, the examples read but not yet packed, and the
packer with its buffer and counters as plain data (`native_pipeline.PackedBatches`). seqio's own converters are tf.data,
so the whole pipeline's iterator is the position. Pipelines with other parts (tasks from outside the registry,
whose sources may hold Python state that tf.data cannot save) keep no position and are replayed on resume.
"""
from __future__ import annotations

import collections
import os
import tempfile
from typing import Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from flan_jax.pipeline import native as native_pipeline

from flan_jax import packing

from flan_jax.data import render as rendered_source

_READ_BATCH = 256  # examples per tf.data -> numpy transfer (one transfer per example is several times slower)


def checkpointable(provider) -> bool:
    """True when every task of the Task or Mixture reads a registry source (tf.data state only)."""
    return all(isinstance(t.source, rendered_source.RenderedSource) for t in seqio.get_subtasks(provider))


def python_packed(converter) -> bool:
    """Converters whose packing PackedBatches runs in Python (its rows equal the converter's own)."""
    return isinstance(converter, (packing.PackedEncDecFeatureConverter, packing.PackedPrefixLMFeatureConverter))


def _with_state_ignored(ds: tf.data.Dataset) -> tf.data.Dataset:
    # The chunk calls are py_functions: pure functions of their chunk number, so their "state" is none to save.
    options = tf.data.Options()
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return ds.with_options(options)


def save_iterator(iterator) -> dict:
    """{file name: bytes} of a tf.train.Checkpoint of a tf.data iterator (plain data)."""
    with tempfile.TemporaryDirectory() as d:
        tf.train.Checkpoint(iterator=iterator).write(os.path.join(d, "iterator"))
        return {name: open(os.path.join(d, name), "rb").read() for name in sorted(os.listdir(d))}


def restore_iterator(iterator, files: Mapping[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        tf.train.Checkpoint(iterator=iterator).read(os.path.join(d, "iterator")).assert_consumed()


class TfStream:
    """Numpy elements of a tf.data dataset; `state()` is its iterator's checkpoint, `state=` restores one."""

    def __init__(self, ds: tf.data.Dataset, state: Optional[Mapping[str, bytes]] = None):
        self._iterator = iter(_with_state_ignored(ds))
        if state is not None:
            restore_iterator(self._iterator, state)

    def __iter__(self):
        return self

    def __next__(self):
        return tf.nest.map_structure(lambda t: t.numpy(), next(self._iterator))

    def state(self) -> dict:
        return save_iterator(self._iterator)


class SeqioExamples:
    """(inputs, targets) int32 token arrays of a seqio Task or Mixture, in its order, with a resumable position."""

    def __init__(self, provider, task_feature_lengths: Mapping[str, int], *, split: str, shuffle: bool, seed: int,
                 shard_info: Optional[seqio.ShardInfo], state: Optional[dict] = None):
        ds = provider.get_dataset(dict(task_feature_lengths), split=split, use_cached=False, shuffle=shuffle,
                                  seed=seed, shard_info=shard_info, num_epochs=None, trim_output_features=False)
        ds = ds.map(lambda ex: {"inputs": ex["inputs"], "targets": ex["targets"]}).ragged_batch(_READ_BATCH)
        ds = ds.map(lambda b: {k: (b[k].flat_values, b[k].row_lengths()) for k in ("inputs", "targets")}).prefetch(2)
        self._batches = TfStream(ds, None if state is None else state["iterator"])
        self._pending = collections.deque(() if state is None else state["pending"])

    def state(self) -> dict:
        return {"iterator": self._batches.state(), "pending": list(self._pending)}

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._pending:
            batch = next(self._batches)
            columns = []
            for key in ("inputs", "targets"):
                values, lengths = batch[key]
                ends = np.cumsum(lengths).tolist()
                columns.append([values[e - n:e] for e, n in zip(ends, lengths.tolist())])
            self._pending.extend(zip(*columns))
        return self._pending.popleft()


def seqio_batches(name: str, task_feature_lengths: Mapping[str, int], batch_size: int, converter, *, split: str,
                  shuffle: bool, seed: int, shard_info: Optional[seqio.ShardInfo], trim_output_features: bool,
                  skip_batches: int = 0, state: Optional[dict] = None):
    """Batches of numpy features as `seqio.get_dataset(...).batch(batch_size)` yields them, skipping the first
    `skip_batches` by replay unless `state` (a saved position) is given. Has `state()` when it is checkpointable."""
    provider = seqio.get_mixture_or_task(name)
    if checkpointable(provider) and python_packed(converter):
        examples = SeqioExamples(provider, task_feature_lengths, split=split, shuffle=shuffle, seed=seed,
                                 shard_info=shard_info, state=None if state is None else state["examples"])
        batches = native_pipeline.PackedBatches(name, task_feature_lengths, batch_size, converter, examples=examples,
                                                state=state)
        if state is None:
            for _ in range(skip_batches):
                next(batches)
        return batches
    ds = seqio.get_dataset(name, task_feature_lengths=dict(task_feature_lengths), feature_converter=converter,
                           dataset_split=split, shuffle=shuffle, num_epochs=None, shard_info=shard_info, seed=seed,
                           batch_size=batch_size, verbose=False, trim_output_features=trim_output_features)
    if checkpointable(provider) and not hasattr(converter, "stats"):  # seqio's converters: tf.data throughout
        batches = TfStream(ds, state)  # skipped in Python: a saved position must fit the same dataset graph
        if state is None:
            for _ in range(skip_batches):
                next(batches)
        return batches
    return ds.skip(skip_batches).as_numpy_iterator()
