"""Record sources: named splits of plain Python dict records, read in a fixed order.

A source knows nothing of templates. `flan_jax.data.registry.register_task` renders its records into prompts.
Every source yields `(index, record)` pairs where `index` is the record's position in the split (stable across runs,
used for deterministic template choice and to keep a record out of its own few-shot exemplars).

- `check_record` / `MalformedRecordError`: record validation shared by every task (reasons are counter keys).
- `SkippedRecord`: what a source yields in place of a record it already knows is malformed, with the reason.
- `RecordSource`: the base class (override `records`; `num_examples` declares split sizes so mixing rates work
  without building a dataset).
- `FunctionSource`: wraps `fn(split) -> iterable of dicts`.
- `TfdsSource`: a TFDS dataset, decoded to Python values (bytes -> str) and mapped by `map_fn`. Works offline under
  `tfds.testing.mock_data`.
- `hf_datasets.DatasetsSource`: a Hugging Face `datasets` dataset (data files, a `save_to_disk` directory, a hub name).
- `chat.ChatTurnsSource`: chat `messages` records, one record per assistant turn.
- `flan_jax.data.sources.generated.GeneratedSource`: procedurally generated records (the embedded default mixture).
"""
from __future__ import annotations

import atexit
import itertools
import threading
import weakref
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Record = Mapping[str, Any]


class MalformedRecordError(ValueError):
    """A record cannot be rendered; `reason` is the counter key (e.g. "missing_field:premise")."""

    def __init__(self, reason: str, detail: str = "", context: str = ""):
        super().__init__(f"{context + ': ' if context else ''}{reason}{': ' + detail if detail else ''}")
        self.reason, self.detail = reason, detail


class SkippedRecord:
    """Yielded by a source in place of a record it found malformed (e.g. a conversation without an assistant turn):
    `check_record` raises its reason, so the registry skips and counts it like any other bad record."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail

    def __repr__(self) -> str:
        return f"SkippedRecord({self.reason!r}, {self.detail!r})"


def _as_text(value: Any, field: str) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if not isinstance(value, str):
        raise MalformedRecordError(f"wrong_type:{field}", f"expected str, got {type(value).__name__}")
    # Lone UTF-16 surrogates (e.g. from json.loads('"\\ud800"')) cannot be encoded for tf.data: replace them with
    # U+FFFD, as undecodable bytes are.
    value = value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if not value.strip():
        raise MalformedRecordError(f"empty_field:{field}")
    return value


def check_record(record: Any, text_fields: Sequence[str], options_field: str | None = None) -> dict:
    """Validates a record: each text field a non-blank str (bytes are decoded), the options field (if any) a list
    of >= 2 such strings. Returns {field: str} plus "_options": list[str]; raises MalformedRecordError whose
    `reason` names the problem and field ("missing_field:x", "wrong_type:x", "empty_field:x", ...)."""
    if isinstance(record, SkippedRecord):
        raise MalformedRecordError(record.reason, record.detail)
    if record is None:
        raise MalformedRecordError("record_is_none", "the source or its map_fn returned None")
    if not isinstance(record, Mapping):
        raise MalformedRecordError("record_not_a_mapping", type(record).__name__)
    values = {}
    for field in text_fields:
        if field not in record:
            raise MalformedRecordError(f"missing_field:{field}")
        values[field] = _as_text(record[field], field)
    if options_field is not None:
        options = record.get(options_field)
        if options is None:
            raise MalformedRecordError(f"missing_field:{options_field}")
        if isinstance(options, (str, bytes)) or not isinstance(options, Sequence):
            raise MalformedRecordError(f"wrong_type:{options_field}",
                                       f"expected a list of str, got {type(options).__name__}")
        options = [_as_text(o, options_field) for o in options]
        if len(options) < 2:
            raise MalformedRecordError(f"too_few_options:{options_field}")
        values["_options"] = options
    return values


class RecordSource:
    """Base class: a source of dict records with named splits."""

    def __init__(self, splits: Sequence[str], num_examples: Mapping[str, int] | None = None):
        self.splits = tuple(splits)
        self._num_examples = dict(num_examples or {})
        unknown = set(self._num_examples) - set(self.splits)
        if unknown:
            raise ValueError(f"{type(self).__name__}: num_examples names unknown splits {sorted(unknown)} "
                             f"(splits: {self.splits})")

    def num_examples(self, split: str) -> int | None:
        """Declared number of records in `split`, or None when unknown."""
        self.check_split(split)
        return self._num_examples.get(split)

    def check_split(self, split: str) -> None:
        if split not in self.splits:
            raise ValueError(f"{self.describe()}: unknown split {split!r}; available: {list(self.splits)}")

    def _iter_split(self, split: str) -> Iterable[Record]:
        raise NotImplementedError

    def records(self, split: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[tuple[int, Record]]:
        """Yields (index, record) in order; with num_shards > 1 only indices congruent to shard_index."""
        self.check_split(split)
        for index, record in enumerate(self._iter_split(split)):
            if index % num_shards == shard_index:
                yield index, record

    def first_records(self, split: str, count: int) -> list[tuple[int, Record]]:
        """The first `count` records of a split (the few-shot exemplar pool)."""
        return list(itertools.islice(self.records(split), count))

    def describe(self) -> str:
        return type(self).__name__


class FunctionSource(RecordSource):
    """Records from `fn(split) -> iterable of dicts` (e.g. a list in a test, or a file reader)."""

    def __init__(self, fn: Callable[[str], Iterable[Record]], splits: Sequence[str] = ("train", "validation"),
                 num_examples: Mapping[str, int] | None = None, name: str = ""):
        super().__init__(splits, num_examples)
        self._fn = fn
        self._name = name or getattr(fn, "__name__", "fn")

    def _iter_split(self, split: str) -> Iterable[Record]:
        return self._fn(split)

    def describe(self) -> str:
        return f"FunctionSource({self._name})"


def to_python(value: Any) -> Any:
    """Converts TFDS numpy values to plain Python: bytes -> str, numpy scalars -> int/float/bool, arrays -> lists."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [to_python(v) for v in value.tolist()] if value.dtype != object else [to_python(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {k: to_python(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_python(v) for v in value]
    return value


_READ_BATCH = 128
# Readers suspended mid-split (an endless training stream) are closed at exit while TensorFlow is still up: a tf.data
# iterator left for interpreter teardown can take minutes to be destroyed, or hang.
_LIVE_READERS: "weakref.WeakSet[Iterator]" = weakref.WeakSet()


@atexit.register
def _close_live_readers() -> None:
    for reader in list(_LIVE_READERS):
        try:
            reader.close()
        except Exception:  # pylint: disable=broad-except  (best effort at exit)
            pass


def _read_options():
    """No tf.data autotuning for the per-split readers: a mixture keeps ~100 of them, each autotuned iterator adds
    a model thread, and destroying one at the end of a pass was seen to block forever waiting for that thread."""
    import tensorflow as tf  # lazy: TensorFlow takes seconds to import; only the input pipeline needs it

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def _batch_to_python(batch: Any) -> Any:
    """A ragged tf.data batch (nested dict of Tensor / RaggedTensor) as nested dicts of per-row Python lists."""
    if isinstance(batch, Mapping):
        return {k: _batch_to_python(v) for k, v in batch.items()}
    values = batch.to_list() if hasattr(batch, "to_list") else batch.numpy()
    return [to_python(v) for v in values]


def _batch_size(columns: Any) -> int:
    return _batch_size(next(iter(columns.values()))) if isinstance(columns, Mapping) else len(columns)


def _row(columns: Any, i: int) -> Any:
    return {k: _row(v, i) for k, v in columns.items()} if isinstance(columns, Mapping) else columns[i]


# tfds.load under tfds.testing.mock_data swaps a process-wide fake filesystem while it builds a dataset, which is not
# thread-safe; mixtures start several task generators on tf.data threads at once. Loads are rare, so serialize them.
_TFDS_LOAD_LOCK = threading.Lock()


class TfdsSource(RecordSource):
    """A TFDS dataset read in file order (no shuffling), decoded to Python and mapped to template fields.

    Args:
      name: TFDS name with optional config/version, e.g. "glue/rte:2.0.0".
      split_map: our split name -> TFDS split expression, e.g. {"train": "train", "validation": "validation"}.
      map_fn: decoded record -> dict of template fields (return None to mark a record malformed: counted/raised
        by the registry like any other bad record).
      num_examples: declared split sizes (so mixing rates need no dataset build).
      data_dir: optional TFDS data_dir.
    """

    def __init__(self, name: str, split_map: Mapping[str, str] | None = None,
                 map_fn: Callable[[dict], Record | None] | None = None,
                 num_examples: Mapping[str, int] | None = None, data_dir: str | None = None):
        split_map = dict(split_map or {"train": "train", "validation": "validation"})
        super().__init__(tuple(split_map), num_examples)
        self.name, self.split_map, self.map_fn, self.data_dir = name, split_map, map_fn, data_dir
        self._datasets: dict[tuple, Any] = {}  # (split, TFDS as_dataset) -> tf.data.Dataset, built on first read

    def dataset(self, split: str, batched: bool = False):
        """The split's tf.data.Dataset (decoded TFDS examples in file order; `batched`: in ragged batches of
        _READ_BATCH), built once and reused.

        Built lazily, on the first read: registering a task opens nothing. Reused by every later pass over the split
        (a repeated training stream) and by the other tasks of the same dataset (zero-shot, inversion, few-shot
        variants share their source), so tfds.load runs once per split, not once per task and pass.
        The cache is keyed on TFDS's `as_dataset` too: each `tfds.testing.mock_data` context patches it with a new
        function, so a dataset mocked in one context (e.g. one test's num_examples) is never served in another."""
        import tensorflow_datasets as tfds  # lazy: TFDS is heavy; importing a registration must stay cheap

        key = (split, tfds.core.DatasetBuilder.as_dataset)  # the key holds the function: its id is never reused
        with _TFDS_LOAD_LOCK:
            if key not in self._datasets:
                ds = tfds.load(self.name, split=self.split_map[split], shuffle_files=False, data_dir=self.data_dir)
                self._datasets[key] = (ds, ds.ragged_batch(_READ_BATCH).with_options(_read_options()))
            return self._datasets[key][batched]

    def _iter_split(self, split: str) -> Iterable[Record]:
        reader = self._read(split)
        _LIVE_READERS.add(reader)
        return reader

    def _read(self, split: str) -> Iterator[Record]:
        # Records are fetched from tf.data in ragged batches: one iterator call per batch, not per record (per-record
        # calls cost ~0.5 ms each, most of a task's reading time), then split back into records in file order.
        for batch in self.dataset(split, batched=True):
            columns = _batch_to_python(batch)
            for i in range(_batch_size(columns)):
                record = _row(columns, i)
                yield self.map_fn(record) if self.map_fn is not None else record

    def describe(self) -> str:
        return f"TfdsSource({self.name})"
