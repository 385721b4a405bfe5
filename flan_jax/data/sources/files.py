"""Record sources over local files: JSON Lines, TSV, CSV and Parquet, one file (or several, read in order) per split.

These serve data that is not in TFDS: HF-datasets exports for promptsource templates (one JSON object per line, in
the dataset's own schema), chain-of-thought files (question / answer / rationale columns), and the like.

Split sizes are counted from the files when the source is created (one cheap pass over line ends) unless given;
creating a source for a missing file raises an error naming the split and path. A line that cannot be read (not
JSON, not an object, a TSV row with the wrong number of cells, bytes that are not UTF-8, a line over
`MAX_RECORD_BYTES`) yields None, which the registry skips and counts as
`record_is_none`; the source itself keeps why and where (`read_error_counts()`, `first_read_errors()`), which
`flan-jax data show` prints.

`HeldOutSplitSource` carves a validation split out of a train-only source by a hash of each record's key fields
(FLAN's chain-of-thought files ship a train split only).
"""
from __future__ import annotations

import collections
import csv
import hashlib
import json
import os
import threading
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from flan_jax.data.sources import Record, RecordSource

MapFn = Callable[[dict], Record | None]
# A record larger than this is skipped and counted ("record_too_large"): one runaway line (a missing newline in a
# generated file) must not hold the whole file in memory or stop the task.
MAX_RECORD_BYTES = 16 << 20
csv.field_size_limit(MAX_RECORD_BYTES)  # csv's default (131,072 characters) would end a file at one long cell


def _as_paths(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, (str, os.PathLike)) else tuple(value)


def count_lines(path: str, skip_header: bool = False) -> int:
    """Non-blank lines of a text file (minus a header line)."""
    count = 0
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                count += 1
    return max(0, count - 1) if skip_header else count


class _FileSource(RecordSource):
    _skip_header = False

    def __init__(self, split_files: Mapping[str, str | Sequence[str]], map_fn: MapFn | None = None,
                 num_examples: Mapping[str, int] | None = None, name: str = ""):
        self.split_files = {split: _as_paths(paths) for split, paths in split_files.items()}
        if not self.split_files:
            raise ValueError(f"{type(self).__name__}({name}): no split files given")
        for split, paths in self.split_files.items():
            for path in paths:
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{type(self).__name__}({name}): split {split!r}: no file {path!r}")
        if num_examples is None:
            num_examples = {split: sum(count_lines(p, self._skip_header) for p in paths)
                            for split, paths in self.split_files.items()}
        super().__init__(tuple(self.split_files), num_examples)
        self.map_fn = map_fn
        self._name = name or os.path.basename(os.path.dirname(os.path.abspath(self.split_files[self.splits[0]][0])))
        self._errors: collections.Counter = collections.Counter()
        self._first_errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def _read(self, path: str) -> Iterable[dict]:
        raise NotImplementedError

    def _unreadable(self, reason: str, path: str, line: int) -> None:
        """Counts a line that yields None (every pass over the data counts again, as the registry does)."""
        with self._lock:
            self._errors[reason] += 1
            self._first_errors.setdefault(reason, f"{path}:{line}")

    def _lines(self, path: str) -> Iterator[tuple[int, str | None]]:
        """(line number, text) of the non-blank lines of `path`; text None (counted) for a line that is not UTF-8 or
        is over MAX_RECORD_BYTES. Lines are read as bytes so one bad byte costs one record, not the file."""
        with open(path, "rb") as f:
            for line_number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                if len(raw) > MAX_RECORD_BYTES:
                    self._unreadable("record_too_large", path, line_number)
                    yield line_number, None
                    continue
                try:
                    yield line_number, raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._unreadable("invalid_utf8", path, line_number)
                    yield line_number, None

    def read_error_counts(self) -> dict[str, int]:
        """{reason: count} of lines that could not be read ("invalid_json", "not_a_json_object", "wrong_cell_count",
        "invalid_utf8", "record_too_large")."""
        with self._lock:
            return dict(self._errors)

    def first_read_errors(self) -> dict[str, str]:
        """{reason: "path:line"} of the first line that failed for each reason."""
        with self._lock:
            return dict(self._first_errors)

    def _iter_split(self, split: str) -> Iterable[Record]:
        for path in self.split_files[split]:
            for record in self._read(path):
                yield self.map_fn(record) if self.map_fn is not None and record is not None else record

    def describe(self) -> str:
        return f"{type(self).__name__}({self._name})"


class JsonlSource(_FileSource):
    """One JSON object per non-blank line. A line that is not a JSON object yields None (counted as malformed)."""

    def _read(self, path: str) -> Iterable[dict]:
        for line_number, line in self._lines(path):
            if line is None:
                yield None
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                self._unreadable("invalid_json", path, line_number)
                yield None
                continue
            if not isinstance(record, dict):
                self._unreadable("not_a_json_object", path, line_number)
                record = None
            yield record


class TsvSource(_FileSource):
    """Tab-separated values. With `columns` the file has no header row; otherwise its first row names the columns.

    A row with a different number of cells than columns yields None (counted as malformed by the registry).
    """

    def __init__(self, split_files: Mapping[str, str | Sequence[str]], columns: Sequence[str] | None = None,
                 map_fn: MapFn | None = None, num_examples: Mapping[str, int] | None = None, name: str = ""):
        self.columns = tuple(columns) if columns is not None else None
        self._skip_header = columns is None
        super().__init__(split_files, map_fn, num_examples, name)

    def _read(self, path: str) -> Iterable[dict]:
        # Unquoted TSV: a row is a line and cells are split on tabs (what csv's QUOTE_NONE reader does, without its
        # 131,072-character field limit).
        columns = self.columns
        for line_number, line in self._lines(path):
            if line is None:
                if columns is not None:
                    yield None
                continue
            row = line.rstrip("\r\n").split("\t")
            if not any(cell.strip() for cell in row):
                continue
            if columns is None:
                columns = tuple(cell.strip() for cell in row)
                continue
            if len(row) != len(columns):
                self._unreadable("wrong_cell_count", path, line_number)
                yield None
                continue
            yield dict(zip(columns, row))


class CsvSource(_FileSource):
    """Comma-separated values with a header row, quoted as spreadsheets and pandas write them (a quoted cell may hold
    commas and newlines). A row with a different number of cells than the header, or bytes that are not UTF-8,
    yields None (counted)."""
    _skip_header = True

    def __init__(self, split_files: Mapping[str, str | Sequence[str]], map_fn: MapFn | None = None,
                 num_examples: Mapping[str, int] | None = None, name: str = "", delimiter: str = ","):
        self.delimiter = delimiter
        if num_examples is None:  # quoted cells may span lines: count rows, not lines
            num_examples = {split: sum(sum(1 for _ in self._rows(p)) for p in _as_paths(paths))
                            for split, paths in split_files.items() if all(os.path.isfile(p) for p in _as_paths(paths))}
        super().__init__(split_files, map_fn, num_examples or None, name)

    def _rows(self, path: str) -> Iterator[tuple[int, list[str]]]:
        # surrogateescape: a bad byte becomes a lone surrogate in its cell, found below, instead of an exception
        # that would end the file.
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=self.delimiter)
            header = None
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error:  # a cell over the field limit (MAX_RECORD_BYTES): that row only
                    self._unreadable("record_too_large", path, reader.line_num)
                    yield reader.line_num, None
                    continue
                if not any(cell.strip() for cell in row):
                    continue
                if header is None:
                    header = row
                    continue
                yield reader.line_num, row

    def _read(self, path: str) -> Iterable[dict]:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            header = next(csv.reader(f, delimiter=self.delimiter), None)
        columns = tuple(cell.strip() for cell in header or ())
        for line_number, row in self._rows(path):
            if row is None:
                yield None
            elif any(_has_surrogate(cell) for cell in row):
                self._unreadable("invalid_utf8", path, line_number)
                yield None
            elif len(row) != len(columns):
                self._unreadable("wrong_cell_count", path, line_number)
                yield None
            else:
                yield dict(zip(columns, row))


def _has_surrogate(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


class ParquetSource(_FileSource):
    """Parquet files (one or more per split), read a row group at a time; every column becomes a record field.
    Sizes come from the files' metadata."""

    def __init__(self, split_files: Mapping[str, str | Sequence[str]], map_fn: MapFn | None = None,
                 name: str = "", batch_size: int = 1024):
        import pyarrow.parquet as pq  # lazy: pyarrow is needed only for Parquet files
        self._pq, self.batch_size = pq, batch_size
        counts = {split: sum(pq.ParquetFile(p).metadata.num_rows for p in _as_paths(paths))
                  for split, paths in split_files.items() if all(os.path.isfile(p) for p in _as_paths(paths))}
        super().__init__(split_files, map_fn, counts or None, name)

    def _read(self, path: str) -> Iterable[dict]:
        for batch in self._pq.ParquetFile(path).iter_batches(batch_size=self.batch_size):
            yield from batch.to_pylist()


class HeldOutSplitSource(RecordSource):
    """`base` with `held_out_split` carved out of its `from_split` by a hash of each record's `key_fields`.

    A record goes to the held-out split when sha256(salt, key field values) / 2**256 < fraction, so the split is
    deterministic, independent of file order, and records with equal keys (e.g. a repeated question) always land on
    the same side: no held-out key is also a train key. Unreadable records (None) and records lacking a key field
    stay in `from_split`, where the registry counts them. Indices are positions within the new splits; other splits
    of `base` pass through. Sizes come from one pass over `from_split` when the source is created.
    """

    def __init__(self, base: RecordSource, key_fields: Sequence[str], fraction: float = 0.1,
                 held_out_split: str = "validation", from_split: str = "train", salt: str = "flan_jax/held_out"):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"HeldOutSplitSource({base.describe()}): fraction must be in (0, 1), got {fraction}")
        if held_out_split in base.splits or from_split not in base.splits:
            raise ValueError(f"HeldOutSplitSource({base.describe()}): needs split {from_split!r} and no split "
                             f"{held_out_split!r}; has {list(base.splits)}")
        self.base, self.key_fields, self.fraction, self.salt = base, tuple(key_fields), fraction, salt
        self.held_out_split, self.from_split = held_out_split, from_split
        held_out = sum(self._is_held_out(record) for _, record in base.records(from_split))
        total = base.num_examples(from_split)
        counts = {s: n for s in base.splits if (n := base.num_examples(s)) is not None}
        counts[held_out_split] = held_out
        if total is not None:
            counts[from_split] = total - held_out
        super().__init__((*base.splits, held_out_split), counts)

    def _is_held_out(self, record) -> bool:
        if not isinstance(record, Mapping) or not all(isinstance(record.get(f), str) for f in self.key_fields):
            return False
        key = "\x1f".join([self.salt, *(record[f] for f in self.key_fields)]).encode("utf-8", "surrogatepass")
        return int.from_bytes(hashlib.sha256(key).digest(), "big") < self.fraction * 2 ** 256

    def records(self, split: str, shard_index: int = 0, num_shards: int = 1) -> Iterator[tuple[int, Record]]:
        self.check_split(split)
        if split not in (self.held_out_split, self.from_split):
            yield from self.base.records(split, shard_index, num_shards)
            return
        want_held_out = split == self.held_out_split
        index = 0
        for _, record in self.base.records(self.from_split):
            if self._is_held_out(record) != want_held_out:
                continue
            if index % num_shards == shard_index:
                yield index, record
            index += 1

    def describe(self) -> str:
        return (f"HeldOut({self.base.describe()}: {self.held_out_split} = {self.fraction:g} of {self.from_split} by "
                f"hash of {', '.join(self.key_fields)})")
