"""Record sources over local files: JSON Lines and TSV, one file (or several, read in order) per split.

These serve data that is not in TFDS: HF-datasets exports for promptsource templates (one JSON object per line, in
the dataset's own schema), chain-of-thought files (question / answer / rationale columns), and the like.

Split sizes are counted from the files when the source is created (one cheap pass over line ends) unless given;
creating a source for a missing file raises an error naming the split and path.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Callable, Iterable, Mapping, Sequence

from flan_jax.sources import Record, RecordSource

MapFn = Callable[[dict], Record | None]


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

    def _read(self, path: str) -> Iterable[dict]:
        raise NotImplementedError

    def _iter_split(self, split: str) -> Iterable[Record]:
        for path in self.split_files[split]:
            for record in self._read(path):
                yield self.map_fn(record) if self.map_fn is not None else record

    def describe(self) -> str:
        return f"{type(self).__name__}({self._name})"


class JsonlSource(_FileSource):
    """One JSON object per non-blank line. A line that is not a JSON object yields None (counted as malformed)."""

    def _read(self, path: str) -> Iterable[dict]:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    yield None
                    continue
                yield record if isinstance(record, dict) else None


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
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            columns = self.columns
            for row in rows:
                if not any(cell.strip() for cell in row):
                    continue
                if columns is None:
                    columns = tuple(cell.strip() for cell in row)
                    continue
                yield dict(zip(columns, row)) if len(row) == len(columns) else None
