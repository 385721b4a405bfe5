"""Records -> examples: rendering one record with a task's templates, skip-and-count of malformed records, and the
seqio side of a registry task (a DataSource whose examples come from `render_record`).

The source is checkpointable tf.data (see below), so a seqio Task or Mixture of registry tasks can save and restore
its iterator's position (train/seqio_input.py).
"""
from __future__ import annotations

import collections
import itertools
import random
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from flan_jax.data import templates as tpl
from flan_jax.data.sources import MalformedRecordError, check_record
from flan_jax.data.spec import TaskSpec

_BUILD_COUNT = 0
# Changes whenever a record would render to different text (templates aside): caches keyed on it are rebuilt.
RENDER_VERSION = 1

# The source is a tf.data range of chunk numbers mapped through one Python call per chunk (one Python->TF
# conversion per chunk instead of per example, ~3x faster). Unlike a from_generator stream, a range and its
# position are tf.data state: an iterator over a Task or Mixture built on it can be checkpointed
# (tf.train.Checkpoint, external state ignored: the chunk call is a pure function of the chunk number), and
# restoring it reads no earlier chunk again. Options are padded to the chunk's widest list and trimmed after
# unbatching.
CHUNK_SIZE = 128
_CHUNK_DTYPES = (tf.string, tf.string, tf.string, tf.int32, tf.int32, tf.bool)
_CHUNK_KEYS = ("inputs", "targets", "options", "num_options", "template_index")

_DATA_ERRORS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
_SPLIT_ERRORS: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
_ERRORS_LOCK = threading.Lock()
_POOLS: dict[tuple[str, str], list[tuple[int, dict]]] = {}

# ----------------------------------------------------------------------------------------------------------------
# Records -> examples (pure Python; unit-testable without TF)
# ----------------------------------------------------------------------------------------------------------------

def normalize_record(spec: TaskSpec, record: Any, need_rationale: bool = False) -> dict:
    """Checks a source record for `spec`; returns {field: str} (+ "_options"). Raises MalformedRecordError."""
    values = check_record(record, spec.fields + ((spec.rationale_field,) if need_rationale else ()),
                          spec.options_field)
    if spec.fixed_options is not None:
        values["_options"] = list(spec.fixed_options)
    return values


def example_rng(spec: TaskSpec, split: str, index: int) -> random.Random:
    """The per-example random stream: template, options style and exemplars all come from it.

    Its seed string has its own namespace: a source that seeds records from (seed, name, split, index) too would
    otherwise draw the same numbers, and the template choice would leak the label."""
    return random.Random(f"prompt/{spec.seed}/{spec.name}/{split}/{index}")


def variant_templates(spec: TaskSpec, variant: str) -> tuple[tpl.Template, ...]:
    if variant == "cot":
        return spec.cot_templates
    if variant == "inv":
        return spec.inversion_templates
    return spec.templates


def _length_fn(spec: TaskSpec) -> Callable[[str], int]:
    if spec.few_shot.length_unit == "bytes":
        return tpl.byte_length
    return lambda text: len(spec.vocabulary.encode(text))


def _render_one(spec: TaskSpec, variant: str, template: tpl.Template, values: Mapping[str, Any],
                style: tpl.OptionsStyle | None) -> tuple[str, str, list[str]]:
    """Renders (input, target, scored options) for one record with a fixed template and options style."""
    inputs, target = template.render(values)
    options = values.get("_options") if variant in ("zs_opt", "zs_noopt", "fs_opt", "fs_noopt") else None
    if not options:
        return inputs, target, []
    if target not in options:
        raise MalformedRecordError("target_not_in_options", f"target {target!r} not in {options}")
    if style is None:  # noopt: options are not shown, but stay available for rank classification
        return inputs, target, list(options)
    return tpl.apply_options(inputs, target, options, style)


def render_example(spec: TaskSpec, variant: str, split: str, index: int, values: Mapping[str, Any],
                   pool: Sequence[tuple[int, Mapping[str, Any]]] = ()) -> dict:
    """Renders one normalized record into {"inputs", "targets", "options", "template_index"}."""
    rng = example_rng(spec, split, index)
    templates = variant_templates(spec, variant)
    template_index = rng.randrange(len(templates))
    template = templates[template_index]
    style = None
    if variant.endswith("_opt"):
        style = tpl.DEFAULT_OPTIONS_STYLE if spec.options_style == "default" else tpl.random_options_style(rng)
    inputs, target, options = _render_one(spec, variant, template, values, style)
    if variant.startswith("fs_") and pool:
        exemplars = []
        # Draw a few spares so dropping the example itself (or an identical prompt) still leaves k exemplars.
        for pool_pos in rng.sample(range(len(pool)), min(len(pool), spec.few_shot.num_exemplars + 2)):
            pool_index, pool_values = pool[pool_pos]
            if split == _pool_split(spec) and pool_index == index:
                continue
            try:
                x, y, _ = _render_one(spec, variant, template, pool_values, style)
            except MalformedRecordError:
                continue
            if x == inputs:
                continue
            exemplars.append((x, y))
            if len(exemplars) == spec.few_shot.num_exemplars:
                break
        inputs, _ = tpl.assemble_few_shot(inputs, exemplars, rng, spec.few_shot, _length_fn(spec))
    return {"inputs": inputs, "targets": target, "options": options, "template_index": template_index}


def _pool_split(spec: TaskSpec) -> str:
    return "train" if "train" in spec.source.splits else spec.source.splits[0]


def exemplar_pool(spec: TaskSpec) -> list[tuple[int, dict]]:
    """Valid records from the head of the train split (cached per task); built only when a few-shot dataset is."""
    key = (spec.name, _pool_split(spec))
    if key not in _POOLS:
        pool = []
        for index, record in spec.source.first_records(key[1], spec.few_shot.exemplar_pool_size):
            try:
                pool.append((index, normalize_record(spec, record)))
            except MalformedRecordError:
                pass
        _POOLS[key] = pool
    return _POOLS[key]


def forget_exemplar_pools(base_task: str) -> None:
    """Drops the cached few-shot pools of a base task (it is being registered again)."""
    for key in [k for k in _POOLS if k[0] == base_task]:
        del _POOLS[key]


def _count_error(task_name: str, split: str, reason: str) -> None:
    with _ERRORS_LOCK:
        _DATA_ERRORS[task_name][reason] += 1
        _SPLIT_ERRORS[task_name, split][reason] += 1


def render_record(spec: TaskSpec, variant: str, split: str, index: int, record: Any, pool) -> dict | None:
    """One record rendered, or None after counting why it was skipped (fail_fast: raises, naming the record)."""
    try:
        values = normalize_record(spec, record, need_rationale=(variant == "cot"))
        return render_example(spec, variant, split, index, values, pool)
    except MalformedRecordError as e:
        task_name = f"{spec.name}_{variant}"
        if spec.record_policy == "fail_fast":
            raise MalformedRecordError(e.reason, e.detail, f"task {task_name!r}, split {split!r}, "
                                                           f"record {index}") from None
        _count_error(task_name, split, e.reason)
        return None


def iter_examples(spec: TaskSpec, variant: str, split: str, shard_index: int = 0, num_shards: int = 1, *,
                  start_record: int = 0, with_index: bool = False) -> Iterator[dict]:
    """Python stream of rendered examples for one variant and split (what the seqio source wraps).

    start_record: records with a smaller index are passed over unread by normalize/render (a resumed input pipeline
    continues from its cursor); with_index: yield (record index, example) pairs.
    """
    pool = exemplar_pool(spec) if variant.startswith("fs_") else ()
    cap = spec.max_examples.get(split)
    for index, record in spec.source.records(split, shard_index, num_shards):
        if cap is not None and index >= cap:
            break
        if index < start_record:
            continue
        example = render_record(spec, variant, split, index, record, pool)
        if example is not None:  # outside the renderer's try: closing a suspended stream must not count an error
            yield (index, example) if with_index else example


def data_error_counts(task: str | None = None, split: str | None = None) -> dict:
    """{seqio task name: {reason: count}} of skipped records (counted on every pass over the data); of one split's
    records only when `split` is given; of one task when `task` is (then just {reason: count})."""
    with _ERRORS_LOCK:
        if split is None:
            counts = {name: dict(c) for name, c in _DATA_ERRORS.items() if c}
        else:
            counts = {name: dict(c) for (name, s), c in _SPLIT_ERRORS.items() if s == split and c}
    return counts.get(task, {}) if task is not None else counts


def restore_data_error_counts(counts: Mapping[str, Mapping[str, int]], split: str) -> None:
    """Sets one split's counts to saved ones (a resumed input pipeline does not read those records again)."""
    with _ERRORS_LOCK:
        for (name, s), counter in list(_SPLIT_ERRORS.items()):
            if s == split:
                _DATA_ERRORS[name].subtract(counter)
                counter.clear()
        for name, reasons in counts.items():
            _SPLIT_ERRORS[name, split].update(reasons)
            _DATA_ERRORS[name].update(reasons)
        for name in list(_DATA_ERRORS):
            _DATA_ERRORS[name] = +_DATA_ERRORS[name]  # drop reasons whose count fell to 0


def reset_data_error_counts() -> None:
    with _ERRORS_LOCK:
        _DATA_ERRORS.clear()
        _SPLIT_ERRORS.clear()


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
        pool = exemplar_pool(self.spec) if self.variant.startswith("fs_") and records else ()
        rendered = (render_record(self.spec, self.variant, self.split, i, r, pool) for i, r in records)
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
