"""The seqio side of a registry task: a DataSource whose examples come from `registry.render_record`.

The source is checkpointable tf.data (see below), so a seqio Task or Mixture of registry tasks can save and restore
its iterator's position (train/seqio_input.py).
"""
from __future__ import annotations

import itertools
import threading
from typing import Callable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flan_jax.data import registry  # registry imports this module too: only attributes used at call time

_BUILD_COUNT = 0

# The source is a tf.data range of chunk numbers mapped through one Python call per chunk (one Python->TF
# conversion per chunk instead of per example, ~3x faster). Unlike a from_generator stream, a range and its
# position are tf.data state: an iterator over a Task or Mixture built on it can be checkpointed
# (tf.train.Checkpoint, external state ignored: the chunk call is a pure function of the chunk number), and
# restoring it reads no earlier chunk again. Options are padded to the chunk's widest list and trimmed after
# unbatching.
CHUNK_SIZE = 128
_CHUNK_DTYPES = (tf.string, tf.string, tf.string, tf.int32, tf.int32, tf.bool)
_CHUNK_KEYS = ("inputs", "targets", "options", "num_options", "template_index")


class RecordChunks:
    """chunk k -> the rendered valid examples among this shard's records [k*C, (k+1)*C) as column arrays, plus
    `done` (no records left in the split or under its cap).

    Sequential chunks continue one open record iterator. Any other chunk (the next pass of a repeat, or the first
    chunk after a restored tf.data iterator) reopens the source and passes over the earlier records without
    normalizing or rendering them."""

    def __init__(self, spec, variant: str, split: str, shard_index: int = 0, num_shards: int = 1):
        self.spec, self.variant, self.split = spec, variant, split
        self.shard_index, self.num_shards = shard_index, num_shards
        self._records, self._next_chunk = None, None
        self._lock = threading.Lock()

    def _open_at(self, chunk: int):
        cap = self.spec.max_examples.get(self.split)
        records = self.spec.source.records(self.split, self.shard_index, self.num_shards)
        if cap is not None:
            records = itertools.takewhile(lambda pair: pair[0] < cap, records)
        self._records = itertools.islice(records, chunk * CHUNK_SIZE, None)

    def __call__(self, chunk) -> tuple:
        chunk = int(chunk)
        with self._lock:
            if chunk != self._next_chunk:
                self._open_at(chunk)
            records = list(itertools.islice(self._records, CHUNK_SIZE))
            self._next_chunk = chunk + 1
        pool = registry.exemplar_pool(self.spec) if self.variant.startswith("fs_") and records else ()
        rendered = (registry.render_record(self.spec, self.variant, self.split, i, r, pool) for i, r in records)
        examples = [e for e in rendered if e is not None]
        width = max((len(e["options"]) for e in examples), default=0)
        return (np.array([e["inputs"].encode() for e in examples], dtype=object).reshape([-1]),
                np.array([e["targets"].encode() for e in examples], dtype=object).reshape([-1]),
                np.array([[o.encode() for o in e["options"]] + [b""] * (width - len(e["options"]))
                          for e in examples], dtype=object).reshape([len(examples), width]),
                np.array([len(e["options"]) for e in examples], np.int32),
                np.array([e["template_index"] for e in examples], np.int32),
                np.array(not records))


def chunked_dataset(chunks: Callable) -> tf.data.Dataset:
    """Examples of `chunks` (a RecordChunks) as a checkpointable tf.data pipeline, chunk 0 onwards until done."""

    @tf.autograph.experimental.do_not_convert
    def call(k):
        columns = tf.py_function(chunks, [k], _CHUNK_DTYPES)
        for column, shape in zip(columns, ([None], [None], [None, None], [None], [None], [])):
            column.set_shape(shape)
        return dict(zip(_CHUNK_KEYS + ("done",), columns))

    @tf.autograph.experimental.do_not_convert
    def not_done(chunk):
        return tf.logical_not(chunk["done"])

    @tf.autograph.experimental.do_not_convert
    def examples(chunk):
        return {k: chunk[k] for k in _CHUNK_KEYS}

    return tf.data.Dataset.range(2 ** 62).map(call).take_while(not_done).map(examples).unbatch().map(_trim_options)


@tf.autograph.experimental.do_not_convert
def _trim_options(example: dict) -> dict:
    example = dict(example)
    example["options"] = example["options"][:example.pop("num_options")]
    return example


class RenderedSource(seqio.DataSource):
    """A seqio DataSource yielding rendered text examples of one task variant (any number of shards)."""

    def __init__(self, spec, variant: str):
        super().__init__(splits=spec.source.splits)  # counts come from num_input_examples below
        self.spec, self.variant = spec, variant

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return [split]

    def num_input_examples(self, split: str) -> int | None:
        return self.spec.num_examples(split)

    def get_dataset(self, split: str = "train", shuffle: bool = True, seed: int | None = None,
                    shard_info: seqio.ShardInfo | None = None, *, sequence_length=None, use_cached=False,
                    num_epochs=1) -> tf.data.Dataset:
        del shuffle, seed, sequence_length, use_cached, num_epochs  # order is fixed; the Task shuffles
        global _BUILD_COUNT
        _BUILD_COUNT += 1
        self.spec.source.check_split(split)
        shard_index, num_shards = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        return chunked_dataset(RecordChunks(self.spec, self.variant, split, shard_index, num_shards))


def datasets_built() -> int:
    return _BUILD_COUNT
